"""The worker side of the transport conformance suite: its events, handlers and journal.

A worker process of the transport under test builds its consuming bus as in production and
calls :func:`install_handlers` on it; the handlers write what they did, and the context they
saw, into a :class:`Journal` the test side reads. Importing this module registers the suite's
event classes (``conformance.*``). :mod:`tidings.testing.transport` re-exports every name.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Protocol

from tidings.bus import EventBus
from tidings.context import current_context
from tidings.events import DomainEvent
from tidings.registry import register_event
from tidings.retry import RetryPolicy

DEADLINE = 20.0
"""Seconds any single wait may take before the test fails."""
MAIN = "main"
"""The service every test's worker runs."""
OTHER = "audit"
"""The second service of the fan-out test."""
ATTEMPTS = 3
"""How many times the suite's handlers are tried in all."""
RETRY = RetryPolicy(max_attempts=ATTEMPTS, initial_delay=0.05, max_delay=0.2, jitter=0.0)
"""The retry policy of the suite's handlers: quick, so that retries do not slow the suite."""

DONE = "done"
"""Outcome of a handler attempt that returned."""
FAILED = "failed"
"""Outcome of a handler attempt that raised."""
CRASHING = "crashing"
"""Outcome of a handler attempt that killed its process."""
MARKER = "marker"
"""``publisher`` of the events a test sends last, to know everything before it was handled."""
CHAINED = "chain"
"""``publisher`` of the follow-up events a handler raises."""


# -- the events and handlers the worker side runs ---------------------------------------------


@dataclass(frozen=True)
class ConformanceEvent(DomainEvent):
    """Base of the suite's events (never published itself).

    Attributes:
        scope: the test that published it; effects are journaled under it.
        publisher: which publisher sent it (a thread, ``"chain"`` for a handler's follow-up).
        seq: its position in that publisher's sequence.
    """

    event_type: ClassVar[str] = "conformance.event"
    scope: str = ""
    publisher: str = ""
    seq: int = 0


@register_event
@dataclass(frozen=True)
class Noted(ConformanceEvent):
    """An event only the recording handler receives."""

    event_type: ClassVar[str] = "conformance.noted"


@register_event
@dataclass(frozen=True)
class Flaky(ConformanceEvent):
    """An event whose ``flaky`` handler fails its first ``failures`` attempts, then succeeds."""

    event_type: ClassVar[str] = "conformance.flaky"
    failures: int = 0


@register_event
@dataclass(frozen=True)
class Poisoned(ConformanceEvent):
    """An event whose ``poison`` handler fails every time."""

    event_type: ClassVar[str] = "conformance.poisoned"


@register_event
@dataclass(frozen=True)
class Chained(ConformanceEvent):
    """An event whose ``chain`` handler publishes a :class:`Noted` follow-up on the same bus."""

    event_type: ClassVar[str] = "conformance.chained"


@register_event
@dataclass(frozen=True)
class CrashOnce(ConformanceEvent):
    """An event whose ``crash`` handler kills its own process (``os._exit``) on the first try."""

    event_type: ClassVar[str] = "conformance.crash_once"


@register_event
@dataclass(frozen=True)
class Unencodable(ConformanceEvent):
    """An event that can carry a value with no JSON form, so that encoding it fails."""

    event_type: ClassVar[str] = "conformance.unencodable"
    value: Any = None


class HandlerError(Exception):
    """The failure the suite's failing handlers raise."""


@dataclass(frozen=True)
class Effect:
    """One attempt of one of the suite's handlers, as it wrote it into the journal.

    Attributes:
        handler: the handler's name (``service.role``).
        event_id: the event it handled.
        event_type: that event's type.
        outcome: ``"done"``, ``"failed"`` (it raised) or ``"crashing"`` (it killed its process).
        publisher: the event's ``publisher``.
        seq: the event's ``seq``.
        correlation_id: the correlation id bound while the handler ran.
        causation_id: the causation id bound while the handler ran.
        tenant_id: the tenant id bound while the handler ran.
        caused_by: the event's own ``causation_id`` field.
    """

    handler: str
    event_id: str
    event_type: str
    outcome: str
    publisher: str
    seq: int
    correlation_id: str | None
    causation_id: str | None
    tenant_id: str | None
    caused_by: str | None

    def to_json(self) -> str:
        """Return the journal entry for this effect."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, entry: str) -> Effect:
        """Return the effect a journal entry holds."""
        return cls(**json.loads(entry))


class Journal(Protocol):
    """Storage the worker side writes effects to and the test side reads them from.

    It must be reachable from every process a worker runs handlers in (Redis, a database, a
    file); :class:`MemoryJournal` serves transports that handle events in the test process.
    Appends from several processes must not be lost; entries of a scope keep append order.
    """

    def append(self, scope: str, entry: str) -> None:
        """Add ``entry`` at the end of ``scope``'s entries; durable once this returns."""
        ...

    def entries(self, scope: str) -> list[str]:
        """Return every entry of ``scope``, in append order."""
        ...


class MemoryJournal:
    """A :class:`Journal` in this process, for transports whose workers are threads."""

    def __init__(self) -> None:
        self._entries: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def append(self, scope: str, entry: str) -> None:
        """Add ``entry`` at the end of ``scope``'s entries."""
        with self._lock:
            self._entries.setdefault(scope, []).append(entry)

    def entries(self, scope: str) -> list[str]:
        """Return every entry of ``scope``, in append order."""
        with self._lock:
            return list(self._entries.get(scope, ()))


def _note(journal: Journal, handler: str, event: ConformanceEvent, outcome: str) -> None:
    context = current_context()
    effect = Effect(
        handler=handler,
        event_id=event.event_id,
        event_type=event.event_type,
        outcome=outcome,
        publisher=event.publisher,
        seq=event.seq,
        correlation_id=context.correlation_id,
        causation_id=context.causation_id,
        tenant_id=context.tenant_id,
        caused_by=event.causation_id,
    )
    journal.append(event.scope, effect.to_json())


def _tries(journal: Journal, handler: str, event: ConformanceEvent) -> int:
    """How many attempts of ``handler`` on ``event`` were journaled before this one."""
    effects = (Effect.from_json(entry) for entry in journal.entries(event.scope))
    return sum(1 for e in effects if e.handler == handler and e.event_id == event.event_id)


def install_handlers(bus: EventBus, journal: Journal, *, service: str = MAIN) -> None:
    """Subscribe the suite's handlers to the worker side's ``bus``, writing into ``journal``.

    Handlers are named ``f"{service}.{role}"`` (roles: ``record``, ``flaky``, ``poison``,
    ``chain``, ``crash``), so that two services sharing an inbox stay apart; each has the
    :data:`RETRY` policy. ``record`` receives every :class:`ConformanceEvent`; the others only
    their own event class. ``chain`` publishes on ``bus``, so the worker's bus must publish to
    its own service's consumers.
    """

    def record(event: ConformanceEvent) -> None:
        _note(journal, f"{service}.record", event, DONE)

    def flaky(event: Flaky) -> None:
        name = f"{service}.flaky"
        if _tries(journal, name, event) < event.failures:
            _note(journal, name, event, FAILED)
            msg = f"flaky handler failed on purpose for {event.event_id}"
            raise HandlerError(msg)
        _note(journal, name, event, DONE)

    def poison(event: Poisoned) -> None:
        _note(journal, f"{service}.poison", event, FAILED)
        msg = f"poison handler always fails, this time on {event.event_id}"
        raise HandlerError(msg)

    def chain(event: Chained) -> None:
        bus.publish(Noted(scope=event.scope, publisher=CHAINED))
        _note(journal, f"{service}.chain", event, DONE)

    def crash(event: CrashOnce) -> None:
        name = f"{service}.crash"
        if _tries(journal, name, event) == 0:
            _note(journal, name, event, CRASHING)
            os._exit(70)  # a crash, not an exception: no cleanup, no acknowledgement
        _note(journal, name, event, DONE)

    bus.add_handler(record, ConformanceEvent, name=f"{service}.record", retry=RETRY)
    bus.add_handler(flaky, Flaky, name=f"{service}.flaky", retry=RETRY)
    bus.add_handler(poison, Poisoned, name=f"{service}.poison", retry=RETRY)
    bus.add_handler(chain, Chained, name=f"{service}.chain", retry=RETRY)
    bus.add_handler(crash, CrashOnce, name=f"{service}.crash", retry=RETRY)


# -- what a transport provides ------------------------------------------------------------------
