"""Bounding what a dead letter keeps of a message: its body and its headers.

Anyone who can write to a queue chooses a message's size and its headers; a dead-letter store
that keeps all of it could be filled, or made to fail for ever on one huge message. Every place
that makes a dead letter from a received message cuts it here, once, and says so in the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

__all__ = [
    "MAX_HEADERS",
    "MAX_HEADER_KEY",
    "MAX_HEADER_VALUE",
    "bounded_letter_fields",
]

MAX_HEADERS: Final = 64
"""The most headers a dead letter keeps (the first ones, in the message's order)."""
MAX_HEADER_KEY: Final = 128
"""The longest header name a dead letter keeps, in characters; longer ones are cut."""
MAX_HEADER_VALUE: Final = 1024
"""The longest header value a dead letter keeps, in characters; longer ones are cut."""


def bounded_letter_fields(
    body: bytes, headers: Mapping[Any, object], max_bytes: int
) -> tuple[bytes, dict[str, str], str]:
    """Return ``(body, headers, note)`` cut to what a dead letter keeps.

    The body keeps at most ``max_bytes`` bytes (the codec's limit: nothing longer could be
    decoded anyway). Headers whose values are text or numbers are kept as text, at most
    :data:`MAX_HEADERS` of them, names cut at :data:`MAX_HEADER_KEY` and values at
    :data:`MAX_HEADER_VALUE` characters; other values (lists, maps, ``None``) are left out.
    ``note`` says what was cut, to append to the letter's reason (``""`` when nothing was).
    Runs in time bounded by the kept sizes and the number of headers.
    """
    notes: list[str] = []
    keep = max(0, max_bytes)
    if len(body) > keep:
        notes.append(f"body cut from {len(body)} to {keep} bytes")
        body = body[:keep]
    kept: dict[str, str] = {}
    dropped = cut = 0
    for key, value in headers.items():
        if not isinstance(value, str | int | float) or len(kept) >= MAX_HEADERS:
            dropped += 1
            continue
        name = key if isinstance(key, str) else repr(key)
        if len(name) > MAX_HEADER_KEY:
            name, cut = name[:MAX_HEADER_KEY], cut + 1
        if isinstance(value, int) and value.bit_length() > 64:
            text = f"<an integer of {value.bit_length()} bits>"  # str() of it is quadratic
        else:
            text = value if isinstance(value, str) else str(value)
        if len(text) > MAX_HEADER_VALUE:
            text, cut = text[:MAX_HEADER_VALUE], cut + 1
        kept[name] = text
    if dropped:
        notes.append(f"{dropped} header(s) left out")
    if cut:
        notes.append(f"{cut} header name(s) or value(s) cut")
    return body, kept, f" ({'; '.join(notes)})" if notes else ""
