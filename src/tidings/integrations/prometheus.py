"""Prometheus metrics: what was published, handled, retried, dead-lettered, and how long it took.

Install it once in each process (web, relay, worker), then expose the registry as usual::

    from tidings.integrations.prometheus import install_metrics

    install_metrics(service="shop")  # or install_metrics(registry, service="shop")

``tidings worker`` and ``tidings relay`` do both with ``--metrics-port``; a Celery app's module
calls :func:`serve_celery_metrics` (prefork workers need ``PROMETHEUS_MULTIPROC_DIR``). Nothing
happens on import. Every series has the labels ``service`` (the ``service=`` given here, else
empty) and ``system`` (the transport's name, ``tidings`` in-process and for the outbox), and,
where it applies, ``event_type`` and ``handler``. Labels never hold ids or message text:
their values are the registered event types, the handlers' names and fixed words, cut to 100
printable characters.

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

import logging
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

try:
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client import start_http_server as _start_http_server
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.multiprocess import MultiProcessCollector
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - depends on the environment
    msg = "tidings metrics need prometheus_client: pip install 'tidings[prometheus]'"
    raise ImportError(msg) from exc

from tidings import _tracing
from tidings.integrations._histogram import multiprocess
from tidings.integrations._metrics import Metrics, MetricsHooks, label

if TYPE_CHECKING:
    import sqlalchemy as sa
    from prometheus_client.metrics_core import Metric

    from tidings.outbox import Outbox

__all__ = [
    "install_metrics",
    "metrics_installed",
    "serve_celery_metrics",
    "serve_metrics",
    "uninstall_metrics",
    "watch_outbox",
]

log = logging.getLogger("tidings.metrics")

_NAME = "metrics"
"""The name this integration is installed under (see :func:`tidings._tracing.install`)."""

_lock = threading.Lock()
_served: CollectorRegistry = REGISTRY  # what serve_metrics serves (its own in multiprocess mode)
_current: list[Metrics] = []  # the installed metrics (none or one), to unregister them


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
        metrics = Metrics(REGISTRY if registry is None else registry, label(service))
        _current.append(metrics)
        _tracing.install(_NAME, MetricsHooks(metrics))


def uninstall_metrics() -> None:
    """Stop counting and unregister the series; harmless when not installed."""
    with _lock:
        _drop()


def metrics_installed() -> bool:
    """Whether :func:`install_metrics` is in effect in this process."""
    return isinstance(_tracing.installed(_NAME), MetricsHooks)


def _drop() -> None:
    _tracing.uninstall(_NAME)
    while _current:
        _current.pop().unregister()


def serve_metrics(port: int, host: str = "127.0.0.1", *, service: str | None = None) -> None:
    """Install the metrics on the global registry and serve it on ``host:port`` (``/metrics``).

    The server runs in a daemon thread for the life of the process. In prometheus_client's
    multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set before it was imported) it serves the
    sum over every process writing to that directory instead. ``port`` 0 is refused: nobody
    could find the port to scrape.

    Raises:
        ValueError: ``port`` is not between 1 and 65535.
        OSError: the port cannot be bound (in use, or not allowed).
    """
    global _served  # noqa: PLW0603 - the one registry this process serves
    if not 0 < port < 65536:
        msg = f"the metrics port must be between 1 and 65535, not {port}"
        raise ValueError(msg)
    served = REGISTRY
    if multiprocess():
        served = CollectorRegistry()
        MultiProcessCollector(served)  # type: ignore[no-untyped-call]
    _start_http_server(port, addr=host, registry=served)
    _served = served
    install_metrics(service=service)


def serve_celery_metrics(
    app: Any, *, port: int = 9808, host: str = "127.0.0.1", service: str | None = None
) -> None:
    """Serve the metrics of ``app``'s Celery workers on ``host:port``, once a worker starts.

    Call it in the module that makes the Celery app: it only connects to Celery's
    ``worker_init`` signal, so publishers importing the module serve nothing. When a worker of
    ``app`` starts, it serves the metrics (:func:`serve_metrics`) from the worker's main
    process. Under the prefork pool the handlers run in child processes: set
    ``PROMETHEUS_MULTIPROC_DIR`` to an empty directory in the worker's environment (it must be
    set before prometheus_client is imported), and the main process serves the sum over its
    children. A prefork worker without it serves nothing and logs an error saying so.
    """
    try:
        from celery import signals  # noqa: PLC0415 - the celery extra
        from celery.concurrency import get_implementation  # noqa: PLC0415
        from celery.concurrency.prefork import TaskPool  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - depends on the environment
        msg = "serve_celery_metrics needs Celery: pip install 'tidings[celery,prometheus]'"
        raise ImportError(msg) from exc

    def on_worker_init(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", app) is not app:
            return  # a worker of another app in this process
        pool = get_implementation(getattr(sender, "pool_cls", None) or "prefork")
        if isinstance(pool, type) and issubclass(pool, TaskPool) and not multiprocess():
            log.error(
                "tidings metrics are not served: the prefork pool runs handlers in child "
                "processes; set PROMETHEUS_MULTIPROC_DIR to an empty directory for the worker"
            )
            return
        try:
            serve_metrics(port, host, service=service)
        except OSError as exc:
            log.error("tidings metrics are not served: cannot listen on %s:%d: %s", host, port, exc)

    signals.worker_init.connect(on_worker_init, weak=False)


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
    ``tidings_outbox_up`` 0 and no backlog gauges. ``registry`` defaults to the one
    :func:`serve_metrics` serves (prometheus_client's global ``REGISTRY`` until it is called).
    """
    collector = _OutboxCollector(engine, outbox, label(service))
    (_served if registry is None else registry).register(collector)
    return collector


class _OutboxCollector(Collector):
    """The backlog gauges of one outbox table, read when scraped."""

    def __init__(self, engine: sa.Engine, outbox: Outbox, service: str) -> None:
        import sqlalchemy as sa  # noqa: PLC0415 - the sql extra, present: an Outbox exists

        table = outbox.table
        self._engine = engine
        self._labels = [service, label(table.name)]
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
