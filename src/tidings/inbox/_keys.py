"""Bounded inbox keys: a handler name, source or event id too long to embed is hashed instead.

Event ids come from messages, so anyone who can publish chooses their length; an inbox key (a
Redis key, a SQL primary key) must not grow with them. Values up to a bound are kept as they
are, so existing inbox data keeps working; longer ones (and the rare short one that starts with
the marker, so that nobody can spell a hashed key by hand) become the marker followed by the hex
SHA-256 of their UTF-8 bytes.
"""

from __future__ import annotations

import hashlib
from typing import Final

__all__ = ["HASHED", "LEGACY_SOURCE", "MAX_EMBEDDED", "bounded"]

HASHED: Final = "~sha256~"
"""What a hashed key part starts with."""

MAX_EMBEDDED: Final = 128
"""Longest handler name, source or event id embedded in a key as it is, in characters."""

LEGACY_SOURCE: Final = HASHED + "legacy"
"""The source of an inbox entry written before keys had one (a SQL row's ``source``).

It starts with :data:`HASHED` and is not hex, so no real source, bounded, can spell it.
"""


def bounded(value: str, limit: int = MAX_EMBEDDED) -> str:
    """Return ``value`` if it is at most ``limit`` characters, else its marked SHA-256.

    The hashed form is ``HASHED`` followed by hex digits, cut so that it is at most
    ``max(limit, 40)`` characters (never fewer than 32 hex digits: 128 bits).
    """
    if len(value) <= limit and not value.startswith(HASHED):
        return value
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
    return HASHED + digest[: max(32, limit - len(HASHED))]
