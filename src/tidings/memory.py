"""In-process implementations of the ports: the embedded default and fast tests.

They keep state in this process only, so they protect nothing across a crash or between
workers; use the Redis or SQL stores for that.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

from tidings.errors import InboxBusyError
from tidings.ports import DeadLetter, DeadLetterFilter

__all__ = ["MemoryDeadLetterStore", "MemoryInbox"]


class MemoryInbox:
    """An :class:`~tidings.ports.Inbox` in a dict: pairs done in this process are not repeated.

    Keys are (handler, source, event id): an event id reused by another producer is not a
    duplicate (``source=None``, a caller naming no source, is a source of its own).
    """

    by_source = True
    """Keys tell producers apart: the worker passes each event's ``source``."""

    def __init__(self) -> None:
        self._done: set[tuple[str, str | None, str]] = set()
        self._running: set[tuple[str, str | None, str]] = set()
        self._lock = threading.Lock()

    @contextmanager
    def guard(self, handler: str, event_id: str, source: str | None = None) -> Iterator[bool]:
        """Claim (handler, source, event_id); see :class:`~tidings.ports.Inbox`."""
        key = (handler, source, event_id)
        with self._lock:
            if key in self._done:
                fresh = False
            elif key in self._running:
                msg = f"{handler} is already handling event {event_id} in this process"
                raise InboxBusyError(msg, retry_after=1.0)
            else:
                self._running.add(key)
                fresh = True
        if not fresh:
            yield False
            return
        try:
            yield True
        except BaseException:
            with self._lock:
                self._running.discard(key)
            raise
        with self._lock:
            self._running.discard(key)
            self._done.add(key)

    def is_done(self, handler: str, event_id: str, source: str | None = None) -> bool:
        """Whether (handler, source, event_id) took effect."""
        return (handler, source, event_id) in self._done


class MemoryDeadLetterStore:
    """A :class:`~tidings.ports.DeadLetterStore` in a dict, newest first."""

    def __init__(self) -> None:
        self._letters: dict[str, DeadLetter] = {}
        self._lock = threading.Lock()

    def add(self, letter: DeadLetter) -> None:
        """Store ``letter`` (a copy of its headers), replacing one with the same id."""
        with self._lock:
            self._letters.pop(letter.id, None)
            self._letters[letter.id] = replace(letter, headers=dict(letter.headers))

    def get(self, letter_id: str) -> DeadLetter | None:
        """Return the dead letter with this id, or ``None``."""
        return self._letters.get(letter_id)

    def list(self, *, limit: int = 100, offset: int = 0) -> list[DeadLetter]:
        """Return up to ``limit`` dead letters, newest first, skipping ``offset``."""
        if limit < 0 or offset < 0:
            msg = "limit and offset must be >= 0"
            raise ValueError(msg)
        with self._lock:
            newest_first = list(reversed(self._letters.values()))
        return newest_first[offset : offset + limit]

    def iter_matching(
        self, where: DeadLetterFilter, *, page_size: int = 500
    ) -> Iterator[DeadLetter]:
        """Yield the letters ``where`` matches, newest first, from a copy taken now.

        Raises:
            ValueError: ``page_size`` is below 1 (it is otherwise unused: nothing is paged).
        """
        if page_size < 1:
            msg = f"page_size must be >= 1, not {page_size}"
            raise ValueError(msg)
        with self._lock:
            newest_first = list(reversed(self._letters.values()))
        return (letter for letter in newest_first if where.matches(letter))

    def remove(self, letter_id: str) -> bool:
        """Delete one dead letter; return whether it existed."""
        with self._lock:
            return self._letters.pop(letter_id, None) is not None

    def purge(self) -> int:
        """Delete every dead letter; return how many there were."""
        with self._lock:
            count = len(self._letters)
            self._letters.clear()
        return count

    def count(self) -> int:
        """Return how many dead letters are stored."""
        return len(self._letters)
