"""The idle wait of a relay that wakes on PostgreSQL ``NOTIFY``, shared by both relays.

The SQLAlchemy relay (:mod:`tidings.outbox.relay`) and the Django one
(:mod:`tidings.integrations.django.relay`) open their listening connections their own way;
waiting on one, and falling back to polling when it fails, is the same.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol, TypeVar

__all__ = ["Listener", "idle"]

_SLICE = 0.25  # longest a wait goes without looking at the stop event


class Listener(Protocol):
    """A connection LISTENing on the outbox's channel."""

    def wait(self, timeout: float) -> bool:
        """Whether a notification arrived within ``timeout`` seconds."""
        ...

    def close(self) -> None:
        """Close the connection (errors ignored: it may be dead already)."""
        ...


_L = TypeVar("_L", bound=Listener)


def idle(
    stop: threading.Event, listener: _L | None, poll_interval: float, log: logging.Logger
) -> _L | None:
    """Wait up to ``poll_interval`` for a notification on ``listener`` or ``stop``.

    Without a listener, just wait. Returns the listener if still usable, ``None`` once it
    failed (closed, the failure logged on ``log``).
    """
    deadline = time.monotonic() + poll_interval
    while not stop.is_set():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        if listener is None:
            stop.wait(remaining)
            break
        try:
            if listener.wait(min(remaining, _SLICE)):
                break
        except Exception:
            log.warning("the outbox listener failed; polling until it is back", exc_info=True)
            listener.close()
            listener = None
    return listener
