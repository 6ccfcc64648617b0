"""The test kit: test handlers and views with no broker and no database server.

- :func:`capture` records what a bus publishes instead of sending it (no broker connection),
  asserts on it (:meth:`Captured.assert_published`, with a per-field diff when it fails), and
  :meth:`Captured.deliver` runs the recorded events through the bus's handlers now, through a
  real :class:`~tidings.delivery.Dispatcher` with an in-memory inbox and dead-letter store:
  the rules of a worker, retries run at once instead of after their delay.
- ``deliver(twice=True)`` (or ``capture(bus, deliver_twice=True)``) hands every event to every
  handler twice with no inbox in front, proving the handler idempotent on its own.
- :func:`deterministic` (or :func:`frozen_ids` and :func:`frozen_clock`) makes event ids and
  ``occurred_at`` the same on every run, for snapshot tests.
- :func:`use_memory_transport` swaps a bus's configured transport (Celery, Redis Streams) for a
  :class:`~tidings.transports.memory.MemoryTransport` with worker threads, for a block.

The pytest plugin (:mod:`tidings.testing.plugin`) wraps these in fixtures. Nothing here
imports pytest.
"""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from tidings import _ids
from tidings.bus import EventBus, Handler
from tidings.codec import Codec, default_codec
from tidings.delivery import Dispatcher, Outcome, Received
from tidings.events import DomainEvent
from tidings.memory import MemoryDeadLetterStore, MemoryInbox
from tidings.ports import DeadLetter, Transport
from tidings.retry import RetryPolicy
from tidings.transports.memory import MemoryBroker, MemoryTransport

__all__ = [
    "Captured",
    "capture",
    "deterministic",
    "frozen_clock",
    "frozen_ids",
    "use_memory_transport",
]

E = TypeVar("E", bound=DomainEvent)

_MAX_EVENTS = 1000


class _Recorder:
    """Stands in for a bus's transport while captured: ``send`` records, nothing connects."""

    name = "capture"

    def __init__(self) -> None:
        self.events: list[DomainEvent] = []
        self._lock = threading.Lock()

    def bind(self, bus: Any) -> None:
        """Accept the bus (never called: :func:`capture` sets the attribute itself)."""

    def subscribed(self, handler: Any) -> None:
        """Accept any handler subscribed while captured."""

    def send(self, events: Sequence[Any]) -> None:
        """Record ``events`` in publish order."""
        with self._lock:
            self.events.extend(events)

    def close(self) -> None:
        """Nothing to release."""


class Captured:
    """What a captured bus published, and a way to deliver it to the bus's handlers.

    Made by :func:`capture`; read :attr:`events` in publish order (events raised by handlers
    during :meth:`deliver` included). Thread-safe for recording; assert from the test thread.
    """

    def __init__(
        self,
        bus: EventBus,
        recorder: _Recorder,
        *,
        inbox: bool,
        deliver_twice: bool,
        retry: RetryPolicy,
        codec: Codec,
    ) -> None:
        self.bus = bus
        self._recorder = recorder
        self._delivered = 0
        self.deliver_twice = deliver_twice
        """Whether :meth:`deliver` delivers twice unless told otherwise."""
        self.inbox: MemoryInbox | None = MemoryInbox() if inbox else None
        """The inbox :meth:`deliver` guards handlers with (``None``: unguarded)."""
        self.dead_letter_store = MemoryDeadLetterStore()
        """Where :meth:`deliver` dead-letters, as a worker would."""
        self.retry = retry
        """The policy of handlers without their own (the bus's transport's, else the default)."""
        self.codec = codec
        """How events cross the wire in :meth:`deliver` (the bus's transport's, else default)."""

    @property
    def events(self) -> list[DomainEvent]:
        """Every event published while captured, in order (a copy)."""
        return list(self._recorder.events)

    @property
    def dead_letters(self) -> list[DeadLetter]:
        """What :meth:`deliver` dead-lettered, oldest first."""
        return list(reversed(self.dead_letter_store.list(limit=_MAX_EVENTS)))

    def of(self, event_class: type[E]) -> list[E]:
        """The published events that are instances of ``event_class``, in order."""
        return [e for e in self._recorder.events if isinstance(e, event_class)]

    def clear(self) -> None:
        """Forget what was published so far (the inbox and dead letters stay)."""
        with self._recorder._lock:
            self._recorder.events.clear()
        self._delivered = 0

    def _matching(self, event_class: type[E], expected: dict[str, Any]) -> list[E]:
        _check_fields(event_class, expected)
        return [
            e
            for e in self.of(event_class)
            if all(getattr(e, name) == value for name, value in expected.items())
        ]

    def assert_published(self, event_class: type[E], /, **expected: Any) -> E:
        """Assert an event of ``event_class`` with these field values was published; return it.

        Unnamed fields may hold anything. The first match is returned.

        Raises:
            AssertionError: none matches; the message lists what was published of that class
                and a per-field diff of the closest candidate (the most fields equal).
            TypeError: a keyword is not a field of ``event_class``.
        """
        found = self._matching(event_class, expected)
        if found:
            return found[0]
        raise AssertionError(self._explain(event_class, expected))

    def assert_published_once(self, event_class: type[E], /, **expected: Any) -> E:
        """Like :meth:`assert_published`, but exactly one event may match.

        Raises:
            AssertionError: none or several match (the message lists them).
        """
        found = self._matching(event_class, expected)
        if len(found) == 1:
            return found[0]
        if not found:
            raise AssertionError(self._explain(event_class, expected))
        listed = "\n".join(f"  {e!r}" for e in found)
        msg = f"expected one {_describe(event_class, expected)}, {len(found)} published:\n{listed}"
        raise AssertionError(msg)

    def assert_not_published(self, event_class: type[DomainEvent], /, **expected: Any) -> None:
        """Assert no event of ``event_class`` with these field values was published.

        Raises:
            AssertionError: one was (the message lists them).
        """
        found = self._matching(event_class, expected)
        if found:
            listed = "\n".join(f"  {e!r}" for e in found)
            msg = f"expected no {_describe(event_class, expected)}, published:\n{listed}"
            raise AssertionError(msg)

    def _explain(self, event_class: type[DomainEvent], expected: dict[str, Any]) -> str:
        wanted = _describe(event_class, expected)
        candidates = self.of(event_class)
        if not candidates:
            published = [type(e).__name__ for e in self._recorder.events]
            seen = ", ".join(published) if published else "nothing"
            return f"no {wanted} published; published: {seen}"
        lines = [f"no {wanted} published; {len(candidates)} {event_class.__name__} published:"]
        lines += [f"  {e!r}" for e in candidates]

        def score(event: DomainEvent) -> int:
            return sum(getattr(event, k) == v for k, v in expected.items())

        closest = max(candidates, key=score)  # the first of the best: max keeps the first
        lines.append(
            f"closest ({candidates.index(closest) + 1} of {len(candidates)}), field by field:"
        )
        for name, value in expected.items():
            actual = getattr(closest, name)
            if actual == value:
                lines.append(f"    {name}: {actual!r}")
            else:
                lines.append(f"  - {name}: expected {value!r}")
                lines.append(f"  + {name}: published {actual!r}")
        return "\n".join(lines)

    def deliver(self, *, twice: bool | None = None, max_events: int = _MAX_EVENTS) -> list[Outcome]:
        """Run the events not yet delivered through the bus's handlers, now, in this thread.

        Each event is encoded and decoded (it crosses the wire format, as in a worker), and
        passes a real :class:`~tidings.delivery.Dispatcher` with this capture's inbox, retry
        policy and dead-letter store. A failing handler is retried at once, without its delay,
        up to its policy's ``max_attempts``; then it is dead-lettered (:attr:`dead_letters`).
        Events the handlers publish are captured and delivered in turn, until none is left.

        ``twice`` (default: the capture's ``deliver_twice``) dispatches every message twice in a
        row with *no inbox*: each handler receives each event twice, so a handler whose effect
        is not idempotent on its own shows it (two rows, two emails, two follow-up events).
        Without ``twice`` the inbox (unless ``capture(inbox=False)``) suppresses repeats.

        Returns:
            One :class:`~tidings.delivery.Outcome` per dispatch (first deliveries and
            immediate retries), in the order they ran.

        Raises:
            AssertionError: more than ``max_events`` events were delivered in one call (a loop
                of handlers publishing each other's events, say).
        """
        twice = self.deliver_twice if twice is None else twice
        dispatcher = Dispatcher(
            self.bus,
            dead_letters=self.dead_letter_store,
            inbox=None if twice else self.inbox,
            codec=self.codec,
            retry=self.retry,
            transport="capture",
        )
        outcomes: list[Outcome] = []
        count = 0
        while self._delivered < len(self._recorder.events):
            event = self._recorder.events[self._delivered]
            self._delivered += 1
            count += 1
            if count > max_events:
                msg = f"deliver() stopped after {max_events} events: do handlers publish in a loop?"
                raise AssertionError(msg)
            body = self.codec.encode(event)
            for _ in range(2 if twice else 1):
                pending = [Received(body, destination="capture")]
                while pending:
                    outcome = dispatcher.dispatch(pending.pop(0))
                    outcomes.append(outcome)
                    pending += [
                        Received(r.body, r.headers, "capture", r.handler, r.attempt)
                        for r in outcome.retries
                    ]
        return outcomes


def _check_fields(event_class: type[DomainEvent], expected: dict[str, Any]) -> None:
    known = {f.name for f in fields(event_class)}
    unknown = sorted(set(expected) - known)
    if unknown:
        msg = f"{event_class.__name__} has no field {', '.join(unknown)}"
        raise TypeError(msg)


def _describe(event_class: type[DomainEvent], expected: dict[str, Any]) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in expected.items())
    return f"{event_class.__name__}({args})"


@contextmanager
def capture(
    bus: EventBus, *, deliver_twice: bool = False, inbox: bool = True
) -> Iterator[Captured]:
    """Record what ``bus`` publishes in the block instead of sending it; yield the record.

    ``bus.publish``, ``bus.apublish`` and an outbox :class:`~tidings.outbox.Relay` publishing
    through the bus record the events (their handlers do not run until
    :meth:`Captured.deliver`); the configured transport is not used, so no broker is needed.
    The transport's retry policy and codec, when it has them, are those of ``deliver``. The
    bus's transport is restored on exit, even when the block raises. Captures do not nest on
    one bus.

    Args:
        bus: the bus to capture.
        deliver_twice: the default of :meth:`Captured.deliver`'s ``twice``.
        inbox: whether ``deliver`` guards handlers with a :class:`~tidings.memory.MemoryInbox`,
            as a worker with an inbox does.
    """
    original: Transport | None = bus.transport
    if isinstance(original, _Recorder):
        msg = "this bus is captured already"
        raise RuntimeError(msg)
    recorder = _Recorder()
    retry = getattr(original, "retry", None)
    codec = getattr(original, "codec", None)
    captured = Captured(
        bus,
        recorder,
        inbox=inbox,
        deliver_twice=deliver_twice,
        retry=retry if isinstance(retry, RetryPolicy) else RetryPolicy(),
        codec=codec if isinstance(codec, Codec) else default_codec,
    )
    bus.transport = recorder
    try:
        yield captured
    finally:
        bus.transport = original


# -- deterministic ids and clock -----------------------------------------------------------

_patch_lock = threading.Lock()


@contextmanager
def frozen_ids(seed: int | str = 0) -> Iterator[None]:
    """Make every id tidings generates in the block (event, correlation, dead letter) repeatable.

    The ids are version-4 UUID strings drawn from ``random.Random(seed)``: the same seed gives
    the same sequence on every run, so the n-th event of a test always has the same id. The
    random ids come back on exit. One thread draws at a time; which thread gets which id is
    then up to the scheduler, so snapshot only single-threaded code.
    """
    rng = random.Random(seed)  # noqa: S311 - repeatable, not secret

    def make() -> list[str]:
        return [str(uuid.UUID(int=rng.getrandbits(128), version=4))]

    with _patch_lock:
        saved_pool = list(_ids._pool)
        saved_make = _ids._make_ids
        _ids._pool.clear()
        _ids._make_ids = make
    try:
        yield
    finally:
        with _patch_lock:
            _ids._make_ids = saved_make
            _ids._pool[:] = saved_pool


@contextmanager
def frozen_clock(
    at: str | datetime = "2026-01-01T00:00:00+00:00", *, tick: timedelta = timedelta(0)
) -> Iterator[None]:
    """Make ``occurred_at`` (and dead letters' ``failed_at``) read ``at`` in the block.

    ``at`` is an aware datetime or an ISO-8601 string with an offset. With ``tick`` each read
    returns the previous one plus ``tick``, so events keep a strict order. The real clock comes
    back on exit.
    """
    start = datetime.fromisoformat(at) if isinstance(at, str) else at
    if start.tzinfo is None:
        msg = "frozen_clock needs an aware time, e.g. '2026-01-01T00:00:00+00:00'"
        raise ValueError(msg)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    now = [(start - epoch) // timedelta(microseconds=1) * 1000]
    step = tick // timedelta(microseconds=1) * 1000
    lock = threading.Lock()

    def time_ns() -> int:
        with lock:
            value = now[0]
            now[0] += step
        return value

    with _patch_lock:
        saved = getattr(_ids, "time_ns")  # noqa: B009 - a private import, patched
        setattr(_ids, "time_ns", time_ns)  # noqa: B010
    try:
        yield
    finally:
        with _patch_lock:
            setattr(_ids, "time_ns", saved)  # noqa: B010


@contextmanager
def deterministic(
    seed: int | str = 0,
    at: str | datetime = "2026-01-01T00:00:00+00:00",
    *,
    tick: timedelta = timedelta(0),
) -> Iterator[None]:
    """:func:`frozen_ids` and :func:`frozen_clock` together: the usual set-up of a snapshot test."""
    with frozen_ids(seed), frozen_clock(at, tick=tick):
        yield


# -- swapping the transport ----------------------------------------------------------------


@contextmanager
def use_memory_transport(
    bus: EventBus,
    *,
    inbox: bool = True,
    retry: RetryPolicy | None = None,
    workers: int = 1,
) -> Iterator[MemoryTransport]:
    """Swap ``bus``'s transport for a started in-memory one for the block; yield it.

    For a test that wants real asynchronous workers (threads) but no broker: a bus wired with
    ``CeleryTransport(app)`` then publishes to a private :class:`MemoryBroker` and its
    handlers run in the transport's worker threads, with an in-memory inbox (unless
    ``inbox=False``) and dead-letter store (``transport.dead_letters``); the retry policy is
    ``retry``, else the configured transport's. Wait for the work with ``transport.idle()``.
    Every handler of the bus is checked by the new transport, as at subscription. On exit the
    workers stop and the configured transport is back (it was never connected by this).
    For synchronous tests, prefer :func:`capture` and :meth:`Captured.deliver`.
    """
    original = bus.transport
    configured = getattr(original, "retry", None)
    transport = MemoryTransport(
        dead_letters=MemoryDeadLetterStore(),
        inbox=MemoryInbox() if inbox else None,
        retry=retry
        if retry is not None
        else configured
        if isinstance(configured, RetryPolicy)
        else None,
        workers=workers,
        broker=MemoryBroker(),
    )
    transport.bind(bus)
    handlers: tuple[Handler, ...] = bus.handlers
    for handler in handlers:
        transport.subscribed(handler)
    bus.transport = transport
    transport.start()
    try:
        yield transport
    finally:
        transport.close()
        bus.transport = original
