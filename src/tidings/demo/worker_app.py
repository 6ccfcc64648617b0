"""The Celery app the demo's worker processes run: ``celery -A tidings.demo.worker_app worker``.

Configured by the ``TIDINGS_DEMO_*`` environment variables the demo sets
(:meth:`CelerySettings.env <tidings.demo.celery_side.CelerySettings.env>`); without them,
importing this module does nothing. With them, it is the worker's composition root: it builds
the shop's Celery side, subscribes the handlers, installs the audit trail on the run's store,
serves the worker's metrics (:func:`~tidings.integrations.prometheus.serve_celery_metrics`,
prefork children included) when given a port, journals log lines (through the
``ContextFilter``), says when the worker is ready, and gives each pool process its own
database connections.
"""

from __future__ import annotations

import logging
from typing import Any

from tidings.audit import install_audit
from tidings.demo.celery_side import CelerySettings, build
from tidings.demo.journal import JournalLogHandler, record

__all__: list[str] = []

_settings = CelerySettings.from_env()

if _settings is not None:
    from celery import signals

    side = build(_settings, buffered=True)
    side.shop.subscribe(side.bus)
    app = side.app
    install_audit(side.audit, flush_interval=0.2)
    if _settings.metrics_port:
        from tidings.integrations.prometheus import serve_celery_metrics

        serve_celery_metrics(app, port=_settings.metrics_port, service="shop")
    _logger = logging.getLogger("tidings")
    _logger.addHandler(JournalLogHandler(side.shop.journal))
    _logger.setLevel(logging.INFO)

    @signals.worker_ready.connect(weak=False)  # type: ignore[untyped-decorator]
    def _ready(**_: Any) -> None:
        side.journal.add(record("ready", name="celery worker"))

    @signals.worker_process_init.connect(weak=False)  # type: ignore[untyped-decorator]
    def _own_connections(**_: Any) -> None:
        # A forked pool process must not share its parent's database sockets.
        side.shop.engine.dispose(close=False)
        side.inbox_engine.dispose(close=False)
