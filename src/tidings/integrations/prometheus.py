"""Prometheus metrics: what was published, handled, retried, dead-lettered, and how long it took.

Install it once in each process (web, relay, worker), then expose the registry as usual::

    from tidings.integrations.prometheus import install_metrics

    install_metrics(service="shop")  # or install_metrics(registry, service="shop")

``tidings worker`` and ``tidings relay`` do both with ``--metrics-port``. Nothing happens on
import. Every series has the labels ``service`` (the ``service=`` given here, else empty) and
``system`` (the transport's name, ``tidings`` in-process and for the outbox), and, where it
applies, ``event_type`` and ``handler``. Labels never hold ids or message text: their values
are the registered event types, the handlers' names and fixed words, cut to 100 printable
characters.

Counters: ``tidings_published_total`` (events a bus published or an outbox stored),
``tidings_handled_total`` (``outcome``: ``done``, or ``duplicate`` when the inbox skipped it),
``tidings_handler_failures_total``, ``tidings_retries_total`` (``cause``: ``error``, or
``busy`` when another worker holds the inbox claim), ``tidings_dead_letters_total``
(``reason``: ``handler`` when a handler ran out of attempts, ``undecodable``, ``refused`` for a
delivery aimed at a handler that does not take it), ``tidings_rejected_total`` (the last two,
which no handler ran), ``tidings_unrouted_total`` (events no handler or subscriber took) and
``tidings_relayed_total``. Histograms: ``tidings_handler_duration_seconds`` (a handler run that
returned or raised), ``tidings_delivery_latency_seconds`` (from the event's ``occurred_at``,
its envelope's ``time``, to the start of each handler run, retries included; never below 0),
``tidings_relay_batch_size`` and ``tidings_relay_lag_seconds`` (from ``occurred_at`` to the
relay's send, per event). :func:`watch_outbox` adds the gauges of an outbox table.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec

try:
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
    from prometheus_client import start_http_server as _start_http_server
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - depends on the environment
    msg = "tidings metrics need prometheus_client: pip install 'tidings[prometheus]'"
    raise ImportError(msg) from exc

from tidings import _tracing
from tidings._untrusted import log_safe
from tidings.errors import HandlerFailedError

if TYPE_CHECKING:
    import sqlalchemy as sa
    from prometheus_client.metrics_core import Metric

    from tidings.events import DomainEvent
    from tidings.outbox import Outbox
    from tidings.ports import DeadLetter

__all__ = [
    "install_metrics",
    "metrics_installed",
    "serve_metrics",
    "uninstall_metrics",
    "watch_outbox",
]

_NAME = "metrics"
"""The name this integration is installed under (see :func:`tidings._tracing.install`)."""

_LABEL_LIMIT = 100
_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
    900.0, 3600.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)

# While a relayed batch is sent: its events are counted as relayed, not published again.
_relaying: ContextVar[bool] = ContextVar("tidings_metrics_relaying", default=False)
_lock = threading.Lock()
_current: list[_Metrics] = []  # the installed metrics (none or one), to unregister them


class _Time(msgspec.Struct):
    """The one envelope attribute the relay's lag needs; the rest of the envelope is skipped."""

    time: str | None = None


_read_time = msgspec.json.Decoder(_Time).decode


def _label(value: object) -> str:
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


def install_metrics(
    registry: CollectorRegistry | None = None, *, service: str | None = None
) -> None:
    """Count publishing, relaying and handling in this process into ``registry``.

    ``registry`` defaults to prometheus_client's global ``REGISTRY`` (what
    ``start_http_server`` serves); ``service`` is the ``service`` label of every series.
    Installing again replaces the previous installation and unregisters its series. Thread-safe,
    but meant for the composition root, once per process (in each forked worker child, with
    prometheus_client's multiprocess mode).
    """
    with _lock:
        _drop()
        metrics = _Metrics(REGISTRY if registry is None else registry, _label(service))
        _current.append(metrics)
        _tracing.install(_NAME, _MetricsHooks(metrics))


def uninstall_metrics() -> None:
    """Stop counting and unregister the series; harmless when not installed."""
    with _lock:
        _drop()


def metrics_installed() -> bool:
    """Whether :func:`install_metrics` is in effect in this process."""
    return isinstance(_tracing.installed(_NAME), _MetricsHooks)


def _drop() -> None:
    _tracing.uninstall(_NAME)
    while _current:
        _current.pop().unregister()


def serve_metrics(port: int, host: str = "127.0.0.1", *, service: str | None = None) -> None:
    """Install the metrics on the global registry and serve it on ``host:port`` (``/metrics``).

    The server runs in a daemon thread for the life of the process. ``port`` 0 is refused:
    nobody could find the port to scrape.

    Raises:
        ValueError: ``port`` is not between 1 and 65535.
        OSError: the port cannot be bound (in use, or not allowed).
    """
    if not 0 < port < 65536:
        msg = f"the metrics port must be between 1 and 65535, not {port}"
        raise ValueError(msg)
    _start_http_server(port, addr=host)
    install_metrics(service=service)


def watch_outbox(
    engine: sa.Engine,
    outbox: Outbox,
    registry: CollectorRegistry | None = None,
    *,
    service: str | None = None,
) -> Collector:
    """Report an outbox table's backlog at each scrape; return the collector (to unregister).

    Gauges ``tidings_outbox_pending_rows`` and ``tidings_outbox_oldest_pending_age_seconds``
    (labels ``service`` and ``table``; the age is 0 with nothing pending), read by one
    aggregate query per scrape. The per-key lag stays in ``tidings outbox status``: partition
    keys are ids, never labels. When the query fails the scrape still answers, with
    ``tidings_outbox_up`` 0 and no backlog gauges.
    """
    collector = _OutboxCollector(engine, outbox, _label(service))
    (REGISTRY if registry is None else registry).register(collector)
    return collector


class _OutboxCollector(Collector):
    """The backlog gauges of one outbox table, read when scraped."""

    def __init__(self, engine: sa.Engine, outbox: Outbox, service: str) -> None:
        import sqlalchemy as sa  # noqa: PLC0415 - the sql extra, present: an Outbox exists

        table = outbox.table
        self._engine = engine
        self._labels = [service, _label(table.name)]
        self._query = sa.select(sa.func.count(), sa.func.min(table.c.created_at)).where(
            table.c.published_at.is_(None)
        )

    def collect(self) -> Iterable[Metric]:
        from tidings.outbox._table import as_utc  # noqa: PLC0415 - needs SQLAlchemy

        names = ["service", "table"]
        up = GaugeMetricFamily(
            "tidings_outbox_up", "1 if the outbox backlog query worked", None, names
        )
        try:
            with self._engine.connect() as connection:
                count, oldest = connection.execute(self._query).one()
        except Exception:  # noqa: BLE001 - a scrape answers even with the database down
            up.add_metric(self._labels, 0)
            return [up]
        up.add_metric(self._labels, 1)
        pending = GaugeMetricFamily(
            "tidings_outbox_pending_rows", "Outbox rows not yet relayed", None, names
        )
        pending.add_metric(self._labels, int(count))
        age = GaugeMetricFamily(
            "tidings_outbox_oldest_pending_age_seconds",
            "Age of the oldest outbox row not yet relayed (0 when none)",
            None,
            names,
        )
        waited = 0.0 if oldest is None else time.time() - as_utc(oldest).timestamp()
        age.add_metric(self._labels, max(0.0, waited))
        return [up, pending, age]


def _counter(name: str, documentation: str, labels: list[str]) -> Counter:
    """A counter ``tidings_<name>_total``, not registered yet."""
    return Counter(f"tidings_{name}", documentation, labels, registry=None)


class _Metrics:
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
        self.duration = Histogram(
            "tidings_handler_duration_seconds", "Handler run time", run, registry=None
        )
        self.latency = Histogram(
            "tidings_delivery_latency_seconds",
            "From the event's occurred_at to a handler run's start",
            run,
            buckets=_LATENCY_BUCKETS,
            registry=None,
        )
        self.batch_size = Histogram(
            "tidings_relay_batch_size",
            "Events per relayed batch",
            table,
            buckets=_BATCH_BUCKETS,
            registry=None,
        )
        self.relay_lag = Histogram(
            "tidings_relay_lag_seconds",
            "From the event's occurred_at to the relay's send",
            table,
            buckets=_LATENCY_BUCKETS,
            registry=None,
        )
        self._runs: dict[tuple[str, str, str], _RunSeries] = {}
        self._events: dict[tuple[str, str], Any] = {}
        registered: list[Collector] = []
        try:
            for metric in self._all():
                registry.register(metric)
                registered.append(metric)
        except BaseException:  # a name taken by another collector: leave the registry as found
            for metric in registered:
                registry.unregister(metric)
            raise

    def _all(self) -> tuple[Collector, ...]:
        return (
            self.published, self.handled, self.failures, self.retries, self.dead_letters,
            self.rejected, self.unrouted, self.relayed, self.duration, self.latency,
            self.batch_size, self.relay_lag,
        )  # fmt: skip

    def unregister(self) -> None:
        for metric in self._all():
            self.registry.unregister(metric)

    def run_series(self, system: str, event_type: str, handler: str) -> _RunSeries:
        key = (system, event_type, handler)
        series = self._runs.get(key)
        if series is None:
            series = self._runs.setdefault(
                key,
                _RunSeries(self, self.service, _label(system), _label(event_type), _label(handler)),
            )
        return series

    def published_series(self, system: str, event_type: str) -> Any:
        key = (system, event_type)
        child = self._events.get(key)
        if child is None:
            child = self._events.setdefault(
                key, self.published.labels(self.service, _label(system), _label(event_type))
            )
        return child


class _RunSeries:
    """The bound series of one (system, event type, handler): labels resolved once."""

    __slots__ = ("busy", "dead", "done", "duplicate", "duration", "failures", "latency", "retries")

    def __init__(
        self, metrics: _Metrics, service: str, system: str, event_type: str, handler: str
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

    def __init__(self, metrics: _Metrics, events: Sequence[DomainEvent], system: str) -> None:
        self.metrics = metrics
        self.events = events
        self.system = system

    def __exit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        # An in-process publish whose handlers failed did publish: every handler ran.
        if error is not None and not isinstance(error, HandlerFailedError):
            return
        for event in self.events:
            event_type = getattr(event, "event_type", "")
            self.metrics.published_series(self.system, event_type).inc()


class _Relayed(AbstractContextManager[object]):
    """Counts a relayed batch, its size and each event's lag, when it was sent."""

    __slots__ = ("events", "metrics", "table", "token")

    def __init__(self, metrics: _Metrics, events: Sequence[DomainEvent], table: str) -> None:
        self.metrics = metrics
        self.events = events
        self.table = _label(table)

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
            metrics.relayed.labels(service, table, _label(event.event_type)).inc()
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


class _MetricsHooks:
    """:class:`tidings._tracing.TracingHooks` counting into one :class:`_Metrics`."""

    __slots__ = ("metrics",)

    def __init__(self, metrics: _Metrics) -> None:
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
        metrics.rejected.labels(metrics.service, _label(system), reason).inc()
        metrics.dead_letters.labels(
            metrics.service, _label(system), _label(letter.event_type), reason
        ).inc()

    def unrouted(self, event_type: str, count: int, *, system: str) -> None:
        metrics = self.metrics
        metrics.unrouted.labels(metrics.service, _label(system), _label(event_type)).inc(count)
