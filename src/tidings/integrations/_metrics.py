"""The hooks behind :mod:`tidings.integrations.prometheus`: the series, and what counts them.

Imported by that module only, after it imported prometheus_client (or said which extra to
install); see it for the series and their labels.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec
from prometheus_client import CollectorRegistry

from tidings._untrusted import log_safe
from tidings.errors import HandlerFailedError
from tidings.integrations._families import Family, FastCounter, FastHistogram

if TYPE_CHECKING:
    from tidings.events import DomainEvent
    from tidings.ports import DeadLetter

__all__ = ["Metrics", "MetricsHooks", "label"]

_LABEL_LIMIT = 100
_DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
)  # fmt: skip
_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
    900.0, 3600.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)

# While a relayed batch is sent: its events are counted as relayed, not published again.
_relaying: ContextVar[bool] = ContextVar("tidings_metrics_relaying", default=False)


class _Time(msgspec.Struct):
    """The one envelope attribute the relay's lag needs; the rest of the envelope is skipped."""

    time: str | None = None


_read_time = msgspec.json.Decoder(_Time).decode


def label(value: object) -> str:
    """A label value: printable, at most ``_LABEL_LIMIT`` characters (never raises)."""
    text = value if isinstance(value, str) else "" if value is None else str(value)
    if len(text) <= _LABEL_LIMIT and text.isascii() and text.isprintable():
        return text
    return log_safe(text, _LABEL_LIMIT)[:_LABEL_LIMIT]


def _age(occurred_at: object, now: float) -> float | None:
    """Seconds from an ISO-8601 ``occurred_at`` to ``now`` (at least 0), or ``None``."""
    if not isinstance(occurred_at, str):
        return None
    try:
        moment = datetime.fromisoformat(occurred_at)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, now - moment.timestamp())


def _counter(name: str, documentation: str, labels: list[str]) -> FastCounter:
    """A counter ``tidings_<name>_total``, not registered yet."""
    return FastCounter(f"tidings_{name}", documentation, labels)


class Metrics:
    """The series of one installation, on one registry."""

    def __init__(self, registry: CollectorRegistry, service: str) -> None:
        self.registry = registry
        self.service = service
        event = ["service", "system", "event_type"]
        run = [*event, "handler"]
        table = ["service", "table"]
        self.published = _counter("published", "Events published or stored in an outbox", event)
        self.handled = _counter("handled", "Handler runs that succeeded", [*run, "outcome"])
        self.failures = _counter("handler_failures", "Handler runs that raised", run)
        self.retries = _counter("retries", "Handler runs scheduled again", [*run, "cause"])
        self.dead_letters = _counter(
            "dead_letters", "Messages stored as dead letters", [*event, "reason"]
        )
        self.rejected = _counter(
            "rejected",
            "Messages dead-lettered with no handler run",
            ["service", "system", "reason"],
        )
        self.unrouted = _counter("unrouted", "Events no handler or subscriber took", event)
        self.relayed = _counter("relayed", "Outbox events sent on", [*table, "event_type"])
        self.duration = FastHistogram(
            "tidings_handler_duration_seconds", "Handler run time", run, _DURATION_BUCKETS
        )
        self.latency = FastHistogram(
            "tidings_delivery_latency_seconds",
            "From the event's occurred_at to a handler run's start",
            run,
            _LATENCY_BUCKETS,
        )
        self.batch_size = FastHistogram(
            "tidings_relay_batch_size", "Events per relayed batch", table, _BATCH_BUCKETS
        )
        self.relay_lag = FastHistogram(
            "tidings_relay_lag_seconds",
            "From the event's occurred_at to the relay's send",
            table,
            _LATENCY_BUCKETS,
        )
        self._runs: dict[tuple[str, str, str], _RunSeries] = {}
        self._events: dict[tuple[str, str], Any] = {}
        registered: list[Family] = []
        try:
            for family in self.families():
                registry.register(family)
                registered.append(family)
        except BaseException:  # a name taken by another collector: leave the registry as found
            for family in registered:
                registry.unregister(family)
            raise

    def families(self) -> tuple[Family, ...]:
        """Every family of this installation."""
        return (
            self.published, self.handled, self.failures, self.retries, self.dead_letters,
            self.rejected, self.unrouted, self.relayed, self.duration, self.latency,
            self.batch_size, self.relay_lag,
        )  # fmt: skip

    def reset(self) -> None:
        """Forget every value (a forked child starts from none: its parent's are counted)."""
        self._runs = {}
        self._events = {}
        for family in self.families():
            family.reset()

    def unregister(self) -> None:
        """Take every family off the registry."""
        for family in self.families():
            self.registry.unregister(family)

    def run_series(self, system: str, event_type: str, handler: str) -> _RunSeries:
        key = (system, event_type, handler)
        series = self._runs.get(key)
        if series is None:
            series = self._runs.setdefault(
                key,
                _RunSeries(self, self.service, label(system), label(event_type), label(handler)),
            )
        return series

    def published_series(self, system: str, event_type: str) -> Any:
        key = (system, event_type)
        child = self._events.get(key)
        if child is None:
            child = self._events.setdefault(
                key, self.published.labels(self.service, label(system), label(event_type))
            )
        return child


class _RunSeries:
    """The bound series of one (system, event type, handler): labels resolved once."""

    __slots__ = ("busy", "dead", "done", "duplicate", "duration", "failures", "latency", "retries")

    def __init__(
        self, metrics: Metrics, service: str, system: str, event_type: str, handler: str
    ) -> None:
        labels = (service, system, event_type, handler)
        self.done = metrics.handled.labels(*labels, "done")
        self.duplicate = metrics.handled.labels(*labels, "duplicate")
        self.failures = metrics.failures.labels(*labels)
        self.retries = metrics.retries.labels(*labels, "error")
        self.busy = metrics.retries.labels(*labels, "busy")
        self.dead = metrics.dead_letters.labels(service, system, event_type, "handler")
        self.duration = metrics.duration.labels(*labels)
        self.latency = metrics.latency.labels(*labels)


class _Run:
    """One handler run: its duration and outcome are counted when it reports how it ended."""

    __slots__ = ("ended", "series", "start")

    def __init__(self, series: _RunSeries) -> None:
        self.series = series
        self.ended = False
        self.start = time.perf_counter()

    def _ran(self) -> bool:
        """Mark the run ended; ``False`` when it already was (each run counts once)."""
        if self.ended:
            return False
        self.ended = True
        self.series.duration.observe(time.perf_counter() - self.start)
        return True

    def done(self, fresh: bool) -> None:
        if not fresh:  # the inbox skipped it: no handler ran, no duration
            if not self.ended:
                self.ended = True
                self.series.duplicate.inc()
            return
        if self._ran():
            self.series.done.inc()

    def busy(self, retry_in: float) -> None:
        if not self.ended:  # the handler did not run: no duration
            self.ended = True
            self.series.busy.inc()

    def failed(
        self,
        error: BaseException,
        *,
        retry_in: float | None = None,
        dead_letter: str | None = None,
    ) -> None:
        if not self._ran():
            return
        self.series.failures.inc()
        if retry_in is not None:
            self.series.retries.inc()
        elif dead_letter is not None:
            self.series.dead.inc()

    def end(self) -> None:
        self.ended = True  # cut short by the worker: no outcome to count

    def __enter__(self) -> _Run:
        return self

    def __exit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        if error is not None:
            self.failed(error)
        else:
            self.done(fresh=True)


class _Published(AbstractContextManager[object]):
    """Counts ``events`` as published when the block ends (handlers' failures included)."""

    __slots__ = ("events", "metrics", "system")

    def __init__(self, metrics: Metrics, events: Sequence[DomainEvent], system: str) -> None:
        self.metrics = metrics
        self.events = events
        self.system = system

    def __exit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        # An in-process publish whose handlers failed did publish: every handler ran.
        if error is not None and not isinstance(error, HandlerFailedError):
            return
        counts: dict[str, int] = {}  # one increment per type, not per event
        for event in self.events:
            event_type = getattr(event, "event_type", "")
            counts[event_type] = counts.get(event_type, 0) + 1
        for event_type, count in counts.items():
            self.metrics.published_series(self.system, event_type).inc(count)


class _Relayed(AbstractContextManager[object]):
    """Counts a relayed batch, its size and each event's lag, when it was sent."""

    __slots__ = ("events", "metrics", "table", "token")

    def __init__(self, metrics: Metrics, events: Sequence[DomainEvent], table: str) -> None:
        self.metrics = metrics
        self.events = events
        self.table = label(table)

    def __enter__(self) -> _Relayed:
        self.token = _relaying.set(True)
        return self

    def __exit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        _relaying.reset(self.token)
        if error is not None:
            return
        metrics, service, table = self.metrics, self.metrics.service, self.table
        metrics.batch_size.labels(service, table).observe(len(self.events))
        lag = metrics.relay_lag.labels(service, table)
        now = time.time()
        for event in self.events:
            metrics.relayed.labels(service, table, label(event.event_type)).inc()
            age = _age(_occurred_at(event), now)
            if age is not None:
                lag.observe(age)


def _occurred_at(event: DomainEvent) -> object:
    """An event's ``occurred_at``, or a stored envelope's ``time``."""
    occurred = getattr(event, "occurred_at", None)
    if occurred is not None:
        return occurred
    body = getattr(event, "body", None)
    if not isinstance(body, bytes):
        return None
    try:
        return _read_time(body).time
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None


class _NotCounted(AbstractContextManager[object]):
    """A publish inside a relayed batch: the relay counts it."""

    __slots__ = ()

    def __exit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        return None


_NOT_COUNTED = _NotCounted()


class MetricsHooks:
    """:class:`tidings._tracing.TracingHooks` counting into one :class:`Metrics`."""

    __slots__ = ("metrics",)

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def publish(
        self, events: Sequence[DomainEvent], system: str, destination: str | None
    ) -> AbstractContextManager[object]:
        if _relaying.get():
            return _NOT_COUNTED
        return _Published(self.metrics, events, system)

    def relay(
        self,
        events: Sequence[DomainEvent],
        traceparents: Sequence[str | None],
        destination: str,
    ) -> AbstractContextManager[object]:
        return _Relayed(self.metrics, events, destination)

    def handle(
        self,
        handler: str,
        event: DomainEvent,
        *,
        body: bytes | None,
        system: str,
        destination: str,
        attempt: int,
    ) -> _Run:
        series = self.metrics.run_series(system, event.event_type, handler)
        age = _age(event.occurred_at, time.time())
        if age is not None:
            series.latency.observe(age)
        return _Run(series)

    def traceparent(self, event: DomainEvent) -> str | None:
        return None

    def rejected(self, letter: DeadLetter, *, system: str) -> None:
        # An undecodable message has no event; a refused one was aimed at a handler that does
        # not take its event (the handler's name came with the message: never a label).
        reason = "undecodable" if letter.event_type is None else "refused"
        metrics = self.metrics
        metrics.rejected.labels(metrics.service, label(system), reason).inc()
        metrics.dead_letters.labels(
            metrics.service, label(system), label(letter.event_type), reason
        ).inc()

    def unrouted(self, event_type: str, count: int, *, system: str) -> None:
        metrics = self.metrics
        metrics.unrouted.labels(metrics.service, label(system), label(event_type)).inc(count)
