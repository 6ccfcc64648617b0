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

from tidings._untrusted import plain_id

__all__ = ["TENANT_LIMIT", "checked_tenant", "choose_id", "is_valid_id", "mint_id"]

_ID_CHARS: Final = re.compile(r"[A-Za-z0-9._:-]+")
_UNSAFE_CHAR: Final = re.compile(r"[^A-Za-z0-9._:-]")
_EXCERPT_LENGTH: Final = 16

TENANT_LIMIT: Final = 256
"""The longest tenant id a resolver may return: the codec's bound on an envelope's ids."""


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


def checked_tenant(value: object, *, logger: logging.Logger) -> str | None:
    """Return the tenant id a resolver returned, or ``None`` when it is absent or unfit.

    A resolver reads the request, so what it returns may be an attacker's header: it is held
    to the codec's rule for an envelope's ``tenantid`` (printable ASCII, 1 to
    :data:`TENANT_LIMIT` characters). An ``int`` (a primary key, say) is taken as its decimal
    form. Anything else binds no tenant, and a warning is logged with the value's type, length
    and a masked excerpt, never the raw value.
    """
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    accepted = plain_id(value, TENANT_LIMIT)
    if accepted is None:
        text = value if isinstance(value, str) else ""
        logger.warning(
            "rejected the tenant id from the resolver (%s, length %d, excerpt %r); no tenant bound",
            type(value).__name__,
            len(text),
            _excerpt(text),
        )
    return accepted
