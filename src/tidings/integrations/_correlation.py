"""The correlation-id rules every web integration shares: validate, mint, log safely.

Internal to :mod:`tidings.integrations`: the ASGI middleware, the Django middleware and the
Flask extension all accept, replace and mint ids through :func:`choose_id`, so a header value
means the same thing, and is logged the same careful way, whichever framework received it.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable, Iterable
from typing import Final

__all__ = ["choose_id", "is_valid_id", "mint_id"]

_ID_CHARS: Final = re.compile(r"[A-Za-z0-9._:-]+")
_UNSAFE_CHAR: Final = re.compile(r"[^A-Za-z0-9._:-]")
_EXCERPT_LENGTH: Final = 16


def is_valid_id(value: str) -> bool:
    """Return whether ``value`` is non-empty and made only of ``A-Z a-z 0-9 . _ : -``."""
    return _ID_CHARS.fullmatch(value) is not None


def mint_id() -> str:
    """Return a fresh correlation id: a random uuid4 in its canonical string form."""
    return str(uuid.uuid4())


def _excerpt(value: str) -> str:
    # A rejected id is attacker-controlled: log only a short prefix, unsafe characters masked.
    return _UNSAFE_CHAR.sub("?", value[:_EXCERPT_LENGTH])


def choose_id(
    candidates: Iterable[tuple[str, str | None]],
    *,
    validate: Callable[[str], bool],
    max_length: int,
    logger: logging.Logger,
) -> str:
    """Return the correlation id for a request from its ``(header name, value)`` candidates.

    The first candidate whose value is not ``None`` decides: it is returned if it has 1 to
    ``max_length`` characters and ``validate`` accepts it; otherwise a fresh uuid4 is returned
    and a warning is logged on ``logger`` with the header name, the value's length and a masked
    16-character excerpt, never the raw value. With no candidate present a uuid4 is minted.
    """
    for name, value in candidates:
        if value is None:
            continue
        if len(value) <= max_length and validate(value):
            return value
        replacement = mint_id()
        logger.warning(
            "rejected the correlation id in header %s (length %d, excerpt %r); using %s",
            name,
            len(value),
            _excerpt(value),
            replacement,
        )
        return replacement
    return mint_id()
