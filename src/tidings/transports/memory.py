"""``MemoryTransport``: events through in-process queues, handled by worker threads.

The embedded transport, for tests, demos and programs that want workers without a broker.
Every event still crosses the wire format (encoded on ``send``, decoded by the
:class:`~tidings.delivery.Dispatcher` in a worker thread), passes the inbox, and is retried or
dead-lettered by the same rules as with Celery or Redis Streams. Queues live in a
:class:`MemoryBroker`, by default the process's own (:func:`default_broker`): transports meet
there by queue name as they would on a real broker, so a publisher and its workers, or several
services, can be separate buses. Nothing survives the process, and nothing is redelivered after
a crash: a process that dies takes its queues with it.

Queue names work as with :class:`~tidings.transports.celery.CeleryTransport`: a transport's
workers consume ``queue``; it publishes to every queue of ``publish_to`` (default: its own), one
per service that wants the events. A failed handler's redelivery waits in the transport's timer
for its delay, then joins its queue again.
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
from tidings.ports import DeadLetterStore, Inbox
from tidings.retry import RetryPolicy

if TYPE_CHECKING:
    from tidings.bus import EventBus, Handler
    from tidings.events import DomainEvent
    from tidings.ports import StoredEnvelope

__all__ = ["MemoryBroker", "MemoryTransport", "default_broker"]

log = logging.getLogger("tidings.memory")


class _Stop:
    """Tells one transport's worker thread to end (other transports' threads put it back)."""

    __slots__ = ("owner",)

    def __init__(self, owner: MemoryTransport) -> None:
        self.owner = owner


class MemoryBroker:
    """Named in-process queues, and how many of their messages are not finished yet.

    A message is unfinished from the moment it is put until a worker finished with it; a
    redelivery waiting for its delay counts as unfinished. Thread-safe.
    """

    def __init__(self) -> None:
        self._queues: dict[str, queue.SimpleQueue[Received | _Stop]] = {}
        self._unfinished: dict[str, int] = {}
        self._lock = threading.Lock()

    def queue(self, name: str) -> queue.SimpleQueue[Received | _Stop]:
        """Return the queue ``name`` (made on first use)."""
        with self._lock:
            found = self._queues.get(name)
            if found is None:
                found = self._queues[name] = queue.SimpleQueue()
                self._unfinished[name] = 0
            return found

    def put(self, name: str, message: Received) -> None:
        """Put ``message`` on queue ``name``."""
        target = self.queue(name)
        self.count(name, 1)
        target.put(message)

    def count(self, name: str, change: int) -> None:
        """Change how many messages of queue ``name`` are unfinished."""
        with self._lock:
            self._unfinished[name] = self._unfinished.get(name, 0) + change

    def idle(self, name: str) -> bool:
        """Whether every message put on queue ``name`` was finished, none waiting to retry."""
        with self._lock:
            return self._unfinished.get(name, 0) == 0


_default_broker: MemoryBroker | None = None
_default_lock = threading.Lock()


def default_broker() -> MemoryBroker:
    """Return the process's own broker, where transports made without one meet."""
    global _default_broker  # noqa: PLW0603 - one per process, made on first use
    with _default_lock:
        if _default_broker is None:
            _default_broker = MemoryBroker()
        return _default_broker


class MemoryTransport:
    """Publishes to in-process queues; :meth:`start` runs the bus's handlers in threads.

    Args:
        dead_letters: where failures and undecodable messages end.
        queue: the queue this transport's workers consume (and where their retries go).
        publish_to: the queues events are sent to, one per service that handles them
            (default: ``[queue]``).
        inbox: the idempotency guard (``None``: at-least-once effects).
        retry: the policy of handlers without their own.
        workers: how many threads :meth:`start` runs; with one, events are handled in the
            order they were published.
        codec: encodes and decodes envelopes.
        broker: where the queues live (default: :func:`default_broker`).

    ``send`` returns once the events are queued (thread-safe). :meth:`start` starts the worker
    threads; :meth:`close` stops them after each finished its current message (the rest wait
    in the queue, and redeliveries in the timer, for a later :meth:`start`). A publishing-only
    transport never needs :meth:`start`.
    """

    name = "memory"

    def __init__(
        self,
        *,
        dead_letters: DeadLetterStore,
        queue: str = "tidings",
        publish_to: Sequence[str] | None = None,
        inbox: Inbox | None = None,
        retry: RetryPolicy | None = None,
        workers: int = 1,
        codec: Codec | None = None,
        broker: MemoryBroker | None = None,
    ) -> None:
        if workers < 1:
            msg = "MemoryTransport needs at least one worker thread"
            raise ValueError(msg)
        self.dead_letters = dead_letters
        self.queue = queue
        self.publish_to = tuple(publish_to) if publish_to else (queue,)
        self.inbox = inbox
        self.retry = RetryPolicy() if retry is None else retry
        self.workers = workers
        self.codec = default_codec if codec is None else codec
        self.broker = default_broker() if broker is None else broker
        self._dispatcher: Dispatcher | None = None
        self._later: list[tuple[float, int, Received]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._closing = False

    # -- wiring and publishing ---------------------------------------------------------------

    def bind(self, bus: EventBus) -> None:
        """Make the dispatcher that runs ``bus``'s handlers (called by ``EventBus``)."""
        if self._dispatcher is not None:
            msg = "a MemoryTransport serves one EventBus; make one transport per bus"
            raise UsageError(msg)
        self._dispatcher = Dispatcher.serving(bus, self)

    def subscribed(self, handler: Handler) -> None:
        """Accept any handler: a delay of any length can wait in the timer."""

    def send(self, events: Sequence[DomainEvent]) -> None:
        """Encode every event (nothing is sent if one fails), then queue one message each."""
        bodies = [self.codec.encode(event) for event in events]
        for name in self.publish_to:
            for body in bodies:
                self.broker.put(name, Received(body, destination=name))

    def send_envelopes(self, envelopes: Sequence[StoredEnvelope]) -> None:
        """Queue each stored envelope, unchanged, on every queue of ``publish_to`` (in order).

        Needs no event class (:class:`~tidings.ports.EnvelopeSender`); refuses nothing.
        """
        for name in self.publish_to:
            for envelope in envelopes:
                self.broker.put(name, Received(envelope.body, destination=name))

    def close(self) -> None:
        """Stop the worker threads (each after its current message); idempotent."""
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        workers = [t for t in self._threads if t.name.startswith("tidings-memory-worker")]
        for _ in workers:
            self.broker.queue(self.queue).put(_Stop(self))
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads = []

    # -- working -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker threads and the retry timer (again after :meth:`close`).

        Raises:
            UsageError: the transport is not bound to a bus yet.
        """
        if self._dispatcher is None:
            msg = "create the EventBus with this transport before starting it"
            raise UsageError(msg)
        if self._threads:
            return
        with self._wake:
            self._closing = False
        self._threads = [
            threading.Thread(target=self._work, name=f"tidings-memory-worker-{n}", daemon=True)
            for n in range(self.workers)
        ]
        self._threads.append(
            threading.Thread(target=self._time, name="tidings-memory-timer", daemon=True)
        )
        for thread in self._threads:
            thread.start()

    def idle(self) -> bool:
        """Whether every message of this transport's queue was handled, none waiting to retry."""
        return self.broker.idle(self.queue)

    def pending(self) -> int:
        """Return how many redeliveries wait for their delay."""
        with self._wake:
            return len(self._later)

    def _work(self) -> None:
        dispatcher = self._dispatcher
        assert dispatcher is not None  # noqa: S101 - checked by start
        source = self.broker.queue(self.queue)
        while True:
            item = source.get()
            if isinstance(item, _Stop):
                if item.owner is self:
                    return
                source.put(item)  # another transport's, consuming the same queue
                continue
            try:
                outcome = dispatcher.dispatch(item)
            except Exception:
                # Only a dead-letter store failure gets here: try the message again soon.
                log.exception("could not finish a delivery; trying it again in 1 s")
                self._schedule(item, 1.0)
            else:
                for again in outcome.retries:
                    redelivery = Received(
                        again.body, again.headers, self.queue, again.handler, again.attempt
                    )
                    self._schedule(redelivery, again.delay)
            finally:
                self.broker.count(self.queue, -1)

    def _schedule(self, message: Received, delay: float) -> None:
        self.broker.count(self.queue, 1)
        with self._wake:
            heapq.heappush(self._later, (time.monotonic() + delay, next(self._order), message))
            self._wake.notify()

    def _time(self) -> None:
        source = self.broker.queue(self.queue)
        with self._wake:
            while not self._closing:
                now = time.monotonic()
                while self._later and self._later[0][0] <= now:
                    source.put(heapq.heappop(self._later)[2])
                timeout = self._later[0][0] - now if self._later else None
                self._wake.wait(timeout)
