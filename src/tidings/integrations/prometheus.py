"""Prometheus metrics: what was published, handled, retried, dead-lettered, and how long it took.

Install it once in each process (web, relay, worker), then expose the registry as usual::

    from tidings.integrations.prometheus import install_metrics

    install_metrics(service="shop")  # or install_metrics(registry, service="shop")

``tidings worker`` and ``tidings relay`` do both with ``--metrics-port``; a Celery app's module
calls :func:`serve_celery_metrics` (prefork children included). Nothing happens on import.
Every series has the labels ``service`` (the ``service=`` given here, else empty) and
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

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client import start_http_server as _start_http_server
    from prometheus_client import values as prometheus_values
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.multiprocess import MultiProcessCollector
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - depends on the environment
    msg = "tidings metrics need prometheus_client: pip install 'tidings[prometheus]'"
    raise ImportError(msg) from exc

from tidings import _tracing
from tidings.integrations._families import Family, Gathered, Snapshots
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
_served: CollectorRegistry = REGISTRY  # what this process serves (a registry of its own when
# it gathers children's counts or prometheus_client's multiprocess files)
_current: list[Metrics] = []  # the installed metrics (none or one), to unregister them


def install_metrics(
    registry: CollectorRegistry | None = None, *, service: str | None = None
) -> None:
    """Count publishing, relaying and handling in this process into ``registry``.

    ``registry`` defaults to prometheus_client's global ``REGISTRY`` (what
    ``start_http_server`` serves); ``service`` is the ``service`` label of every series.
    Installing again replaces the previous installation and unregisters its series. Thread-safe,
    but meant for the composition root, once per process. A forked child counts on in its own
    copy, which its parent does not serve: :func:`serve_celery_metrics` gathers the children of
    Celery's prefork pool.
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
    application's own series summed over the processes writing there, and tidings' series of
    this process. ``port`` 0 is refused: nobody could find the port to scrape.

    Raises:
        ValueError: ``port`` is not between 1 and 65535.
        OSError: the port cannot be bound (in use, or not allowed).
    """
    _serve(port, host, service, None)


def _serve(port: int, host: str, service: str | None, children: Path | None) -> None:
    """Serve as :func:`serve_metrics`, adding the states child processes write in ``children``."""
    global _served  # noqa: PLW0603 - the one registry this process serves
    if not 0 < port < 65536:
        msg = f"the metrics port must be between 1 and 65535, not {port}"
        raise ValueError(msg)
    served = REGISTRY
    if children is not None or _multiprocess():
        served = CollectorRegistry()
        if _multiprocess():  # the application's own series, from the processes' files
            MultiProcessCollector(served)  # type: ignore[no-untyped-call]
        served.register(Gathered(children, _families))
    _start_http_server(port, addr=host, registry=served)
    _served = served
    install_metrics(service=service)


def _families() -> tuple[Family, ...]:
    installed = _current
    return installed[0].families() if installed else ()


def _multiprocess() -> bool:
    """Whether prometheus_client keeps its values in ``PROMETHEUS_MULTIPROC_DIR`` files."""
    return bool(getattr(prometheus_values.ValueClass, "_multiprocess", False))


def serve_celery_metrics(
    app: Any, *, port: int = 9808, host: str = "127.0.0.1", service: str | None = None
) -> None:
    """Serve the metrics of ``app``'s Celery workers on ``host:port``, once a worker starts.

    Call it in the module that makes the Celery app: it only connects to Celery's worker
    signals, so publishers importing the module serve nothing. When a worker of ``app`` starts,
    its main process serves the metrics (:func:`serve_metrics`). Under the prefork pool, where
    handlers run in child processes, each child writes its counts to a private temporary
    directory every second and when it exits, and the main process serves their sum: a scrape
    sees a child's runs at most about a second late, and the runs of children that exited stay
    counted. The directory is removed when the worker stops. A port that cannot be bound is
    logged as an error; the worker runs on without metrics.
    """
    try:
        from celery import signals  # noqa: PLC0415 - the celery extra
        from celery.concurrency import get_implementation  # noqa: PLC0415
        from celery.concurrency.prefork import TaskPool  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - depends on the environment
        msg = "serve_celery_metrics needs Celery: pip install 'tidings[celery,prometheus]'"
        raise ImportError(msg) from exc
    state: dict[str, Any] = {}  # "children": the directory; in a child, "writer" too

    def on_worker_init(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", app) is not app:
            return  # a worker of another app in this process
        pool = get_implementation(getattr(sender, "pool_cls", None) or "prefork")
        forks = isinstance(pool, type) and issubclass(pool, TaskPool)
        children = Path(tempfile.mkdtemp(prefix="tidings-metrics-")) if forks else None
        try:
            _serve(port, host, service, children)
        except OSError as exc:
            log.error("tidings metrics are not served: cannot listen on %s:%d: %s", host, port, exc)
            if children is not None:
                shutil.rmtree(children, ignore_errors=True)
            return
        state["children"] = children

    def on_process_init(**_: Any) -> None:
        children = state.get("children")
        if children is None or not _current:
            return
        _current[0].reset()  # the parent's counts are its own; this child counts from zero
        writer = Snapshots(children, _families)
        writer.start()
        state["writer"] = writer

    def on_process_shutdown(**_: Any) -> None:
        writer = state.get("writer")
        if writer is not None:
            writer.stop()

    def on_worker_shutdown(**_: Any) -> None:
        children = state.pop("children", None)
        if children is not None and "writer" not in state:  # the main process
            shutil.rmtree(children, ignore_errors=True)

    signals.worker_init.connect(on_worker_init, weak=False)
    signals.worker_process_init.connect(on_process_init, weak=False)
    signals.worker_process_shutdown.connect(on_process_shutdown, weak=False)
    signals.worker_shutdown.connect(on_worker_shutdown, weak=False)


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
