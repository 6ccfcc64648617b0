"""``ThreadedTransport``: the embedded transport, worker threads behind an in-process queue.

Every event still crosses the wire format (encoded on ``send``, decoded by the
:class:`~tidings.delivery.Dispatcher` in a worker thread), passes the inbox, and is retried or
dead-lettered by the same rules as in Celery or Redis Streams workers. Nothing survives the
process: it is for demos and tests, where a broker would only be in the way.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tidings.codec import Codec, default_codec
from tidings.delivery import Dispatcher, Received
from tidings.errors import UsageError
from tidings.events import DomainEvent
from tidings.ports import DeadLetterStore, Inbox
from tidings.retry import RetryPolicy

if TYPE_CHECKING:
    from tidings.bus import EventBus, Handler

__all__ = ["ThreadedTransport"]

log = logging.getLogger("tidings.demo.threads")

_STOP = object()


class ThreadedTransport:
    """Runs the bus's handlers in ``workers`` threads of this process.

    Args:
        dead_letters: where failures and undecodable messages end.
        inbox: the idempotency guard (``None``: at-least-once effects).
        retry: the policy of handlers without their own.
        workers: how many threads handle messages.
        codec: encodes and decodes envelopes.

    ``send`` returns once the events are queued (thread-safe). A failed handler's redelivery
    waits in a timer heap for its delay, then joins the queue again. :meth:`start` starts the
    threads; :meth:`close` stops them after the messages already due are handled, keeping the
    redeliveries still waiting for a later :meth:`start` (:meth:`pending` says how many).
    """

    name = "threads"

    def __init__(
        self,
        *,
        dead_letters: DeadLetterStore,
        inbox: Inbox | None = None,
        retry: RetryPolicy | None = None,
        workers: int = 4,
        codec: Codec | None = None,
    ) -> None:
        if workers < 1:
            msg = "ThreadedTransport needs at least one worker thread"
            raise ValueError(msg)
        self.dead_letters = dead_letters
        self.inbox = inbox
        self.retry = RetryPolicy() if retry is None else retry
        self.workers = workers
        self.codec = default_codec if codec is None else codec
        self._dispatcher: Dispatcher | None = None
        self._ready: queue.SimpleQueue[Received | object] = queue.SimpleQueue()
        self._later: list[tuple[float, int, Received]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._closing = False
        self._unfinished = 0  # queued, running or waiting for a redelivery
        self._count_lock = threading.Lock()

    def bind(self, bus: EventBus) -> None:
        """Make the dispatcher that runs ``bus``'s handlers (called by ``EventBus``)."""
        if self._dispatcher is not None:
            msg = "a ThreadedTransport serves one EventBus"
            raise UsageError(msg)
        self._dispatcher = Dispatcher.serving(bus, self)

    def subscribed(self, handler: Handler) -> None:
        """Accept any handler: a delay of any length can wait in the timer heap."""

    def send(self, events: Sequence[DomainEvent]) -> None:
        """Encode every event, then queue one message each."""
        bodies = [self.codec.encode(event) for event in events]
        with self._count_lock:
            self._unfinished += len(bodies)
        for body in bodies:
            self._ready.put(Received(body, destination=self.name))

    def start(self) -> None:
        """Start the worker threads and the timer thread; again after :meth:`close`."""
        if self._threads:
            return
        with self._wake:
            self._closing = False
        self._threads = [
            threading.Thread(target=self._work, name=f"tidings-worker-{n}", daemon=True)
            for n in range(self.workers)
        ]
        self._threads.append(threading.Thread(target=self._time, name="tidings-timer", daemon=True))
        for thread in self._threads:
            thread.start()

    def idle(self) -> bool:
        """Whether every message sent was handled, with no redelivery waiting."""
        with self._count_lock:
            return self._unfinished == 0

    def pending(self) -> int:
        """Return how many redeliveries wait for their delay."""
        with self._wake:
            return len(self._later)

    def close(self) -> None:
        """Stop the threads; messages already queued are handled first. Idempotent."""
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        for _ in range(self.workers):
            self._ready.put(_STOP)
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads = []

    def _work(self) -> None:
        dispatcher = self._dispatcher
        if dispatcher is None:
            msg = "create the EventBus with this transport before starting it"
            raise UsageError(msg)
        while True:
            item = self._ready.get()
            if not isinstance(item, Received):
                return
            try:
                outcome = dispatcher.dispatch(item)
            except Exception:
                # Only a dead-letter store failure gets here: try the message again soon.
                log.exception("could not finish a delivery; trying it again in 1 s")
                self._schedule(item, 1.0)
            else:
                for again in outcome.retries:
                    redelivery = Received(
                        again.body, again.headers, item.destination, again.handler, again.attempt
                    )
                    self._schedule(redelivery, again.delay)
            finally:
                with self._count_lock:
                    self._unfinished -= 1

    def _schedule(self, message: Received, delay: float) -> None:
        with self._count_lock:
            self._unfinished += 1
        with self._wake:
            heapq.heappush(self._later, (time.monotonic() + delay, next(self._order), message))
            self._wake.notify()

    def _time(self) -> None:
        with self._wake:
            while not self._closing:
                now = time.monotonic()
                while self._later and self._later[0][0] <= now:
                    self._ready.put(heapq.heappop(self._later)[2])
                timeout = self._later[0][0] - now if self._later else None
                self._wake.wait(timeout)
