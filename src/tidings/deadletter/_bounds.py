"""What a dead-letter store keeps of a letter: every field cut to a bound, the cut noted.

A dead letter is made of what came from outside (a body, headers, an event id anyone could
write), so the stores bound it themselves at ``add``, whoever the caller: they refuse nothing
(a letter refused is a message lost) and keep at most :data:`MAX_BODY_BYTES` of a body (or the
store's own ``max_body_bytes``), and a bounded amount of text and headers. What was cut is said
at the end of the letter's ``reason``, so an operator knows the letter is not the whole message.
"""

from __future__ import annotations

import dataclasses
from typing import Final

from tidings.ports import DeadLetter

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_HEADERS",
    "MAX_HEADER_LENGTH",
    "MAX_REASON_LENGTH",
    "MAX_TEXT_LENGTH",
    "MAX_TRACEBACK_LENGTH",
    "bounded_letter",
]

MAX_BODY_BYTES: Final = 1024 * 1024
"""Default longest body kept, in bytes: the codec's default limit on an envelope."""

MAX_REASON_LENGTH: Final = 8000
"""Longest reason kept, in characters (before the note of what was cut)."""

MAX_TRACEBACK_LENGTH: Final = 16000
"""Longest traceback kept, in characters: its end, where the error was raised."""

MAX_TEXT_LENGTH: Final = 1024
"""Longest handler, event type, event id, transport or destination kept, in characters."""

MAX_HEADERS: Final = 64
"""Most headers kept (the first ones, in the order given)."""

MAX_HEADER_LENGTH: Final = 1024
"""Longest header name or value kept, in characters."""

_FIELDS: Final = ("handler", "event_type", "event_id", "transport", "destination")


def bounded_letter(letter: DeadLetter, max_body_bytes: int = MAX_BODY_BYTES) -> DeadLetter:
    """Return ``letter`` with every field within its bound, or ``letter`` itself if it was.

    The body keeps its first ``max_body_bytes`` bytes; the reason and the other text fields
    their start; the traceback its end; the headers their first :data:`MAX_HEADERS` entries,
    names and values cut at :data:`MAX_HEADER_LENGTH`. Each cut is listed at the end of
    ``reason`` (``[cut by the store: body from 2000000 to 1048576 bytes; ...]``). Constant work
    for a letter within bounds; linear in the headers kept otherwise.
    """
    cuts: list[str] = []
    changes: dict[str, object] = {}
    if len(letter.body) > max_body_bytes:
        changes["body"] = bytes(letter.body[:max_body_bytes])
        cuts.append(f"body from {len(letter.body)} to {max_body_bytes} bytes")
    if len(letter.traceback) > MAX_TRACEBACK_LENGTH:
        changes["traceback"] = "…" + letter.traceback[-MAX_TRACEBACK_LENGTH:]
        cuts.append(f"traceback from {len(letter.traceback)} characters to its end")
    for name in _FIELDS:
        value = getattr(letter, name)
        if value is not None and len(value) > MAX_TEXT_LENGTH:
            changes[name] = value[:MAX_TEXT_LENGTH]
            cuts.append(f"{name} from {len(value)} to {MAX_TEXT_LENGTH} characters")
    headers = letter.headers
    if len(headers) > MAX_HEADERS or any(
        len(str(k)) > MAX_HEADER_LENGTH or len(str(v)) > MAX_HEADER_LENGTH
        for k, v in _first(headers)
    ):
        kept = {str(k)[:MAX_HEADER_LENGTH]: str(v)[:MAX_HEADER_LENGTH] for k, v in _first(headers)}
        changes["headers"] = kept
        cuts.append(
            f"headers to {len(kept)} of {len(headers)}, names and values to "
            f"{MAX_HEADER_LENGTH} characters"
        )
    reason = letter.reason
    if len(reason) > MAX_REASON_LENGTH:
        cuts.insert(0, f"reason from {len(reason)} characters")
        reason = reason[:MAX_REASON_LENGTH] + "…"
    if not cuts:
        return letter
    changes["reason"] = f"{reason} [cut by the store: {'; '.join(cuts)}]"
    return dataclasses.replace(letter, **changes)  # type: ignore[arg-type]


def _first(headers: dict[str, str]) -> list[tuple[str, str]]:
    """The first :data:`MAX_HEADERS` headers (without copying the rest)."""
    found: list[tuple[str, str]] = []
    for item in headers.items():
        if len(found) == MAX_HEADERS:
            break
        found.append(item)
    return found
