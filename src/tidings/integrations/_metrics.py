"""The hooks behind :mod:`tidings.integrations.prometheus`: the series, and what counts them.

Imported by that module only, after it imported prometheus_client (or said which extra to
install); see it for the series and their labels.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from threading import get_ident
from typing import TYPE_CHECKING, Any

import msgspec
from prometheus_client import CollectorRegistry

from tidings._untrusted import log_safe
from tidings.codec import nests_within
from tidings.errors import HandlerFailedError
from tidings.integrations._families import Family, FastCounter, FastHistogram
from tidings.integrations._runs import (
    BUSY,
    DEAD,
    DONE,
    DUPLICATE,
    FAILED,
    LATENCY_BUCKETS,
    RETRIED,
    Run,
    RunCounter,
    RunHistogram,
    RunSeries,
    count_runs,
)

if TYPE_CHECKING:
    from tidings._tracing import RunReport
    from tidings.events import DomainEvent
    from tidings.ports import DeadLetter

__all__ = ["Metrics", "MetricsHooks", "label"]

_LABEL_LIMIT = 100
_now = time.time
_clock = time.perf_counter
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
        runs = self._all_runs
        self.handled = RunCounter(
            "tidings_handled", "Handler runs returned, or skipped as duplicates",
            [*run, "outcome"], runs,
            [(DONE, ("done",)), (DUPLICATE, ("duplicate",))],
        )  # fmt: skip
        self.failures = RunCounter(
            "tidings_handler_failures", "Handler runs that raised", run, runs, [(FAILED, ())]
        )
        self.retries = RunCounter(
            "tidings_retries", "Handler runs scheduled again", [*run, "cause"], runs,
            [(RETRIED, ("error",)), (BUSY, ("busy",))],
        )  # fmt: skip
        self.dead_letters = RunCounter(
            "tidings_dead_letters", "Messages stored as dead letters", [*event, "reason"], runs,
            [(DEAD, ("handler",))], width=3,
        )  # fmt: skip
        self.rejected = _counter(
            "rejected",
            "Messages dead-lettered with no handler run",
            ["service", "system", "reason"],
        )
        self.unrouted = _counter("unrouted", "Events no handler or subscriber took", event)
        self.relayed = _counter("relayed", "Outbox events sent on", [*table, "event_type"])
        self.duration = RunHistogram(
            "tidings_handler_duration_seconds", "Handler run time", run, runs, latency=False
        )
        self.latency = RunHistogram(
            "tidings_delivery_latency_seconds",
            "From the event's occurred_at to a handler run's start",
            run,
            runs,
            latency=True,
        )
        self.batch_size = FastHistogram(
            "tidings_relay_batch_size", "Events per relayed batch", table, _BATCH_BUCKETS
        )
        self.relay_lag = FastHistogram(
            "tidings_relay_lag_seconds",
            "From the event's occurred_at to the relay's send",
            table,
            LATENCY_BUCKETS,
        )
        self._runs: dict[tuple[int, str, str, str], RunSeries] = {}
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

    def _all_runs(self) -> Iterable[RunSeries]:
        return self._runs.values()

    def run_series(self, system: str, event_type: str, handler: str) -> RunSeries:
        """This thread's series of ``handler``'s runs on ``event_type``, made on first use."""
        key = (get_ident(), system, event_type, handler)
        series = self._runs.get(key)
        if series is None:
            labels = (self.service, label(system), label(event_type), label(handler))
            series = self._runs.setdefault(key, RunSeries(labels))
        return series

    def published_series(self, system: str, event_type: str) -> Any:
        """The counter child of published events of ``event_type`` on ``system`` (cached)."""
        key = (system, event_type)
        child = self._events.get(key)
        if child is None:
            child = self._events.setdefault(
                key, self.published.labels(self.service, label(system), label(event_type))
            )
        return child


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
        return _read_time(body).time if nests_within(body) else None
    except Exception:  # noqa: BLE001 - an observer never raises into a delivery
        return None


class _InlineRun(Run):
    """A handler run inside a relayed batch (the relay ran it in-process).

    Its own publishes are the handler's, not the relay's: counted as published while it
    runs, until it reports how it ended.
    """

    __slots__ = ("token",)

    def __init__(self, series: RunSeries, occurred: object) -> None:
        super().__init__(series, occurred)
        self.token: Token[bool] | None = _relaying.set(False)

    def _restore(self) -> None:
        if self.token is not None:
            _relaying.reset(self.token)
            self.token = None

    def done(self, fresh: bool) -> None:
        super().done(fresh)
        self._restore()

    def busy(self, retry_in: float) -> None:
        super().busy(retry_in)
        self._restore()

    def failed(
        self,
        error: BaseException,
        *,
        retry_in: float | None = None,
        dead_letter: str | None = None,
    ) -> None:
        super().failed(error, retry_in=retry_in, dead_letter=dead_letter)
        self._restore()

    def end(self) -> None:
        super().end()
        self._restore()


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
    ) -> Run:
        # run_series, inlined: this is once per handler run.
        metrics = self.metrics
        series = metrics._runs.get((get_ident(), system, event.event_type, handler))
        if series is None:
            series = metrics.run_series(system, event.event_type, handler)
        if _relaying.get():  # a handler the relay runs inline: what it publishes is counted
            return _InlineRun(series, event.occurred_at)
        return Run(series, event.occurred_at)

    def runs(self, runs: Sequence[RunReport], *, system: str) -> None:
        """Count a worker's batch of runs (see :class:`tidings._tracing.BatchHooks`)."""
        count_runs(self.metrics.run_series, system, runs, _now() - _clock())

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
