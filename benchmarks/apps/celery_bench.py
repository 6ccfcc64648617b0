"""The Celery benchmark's tidings side: the transport, and the plain task beside it.

``BENCH_QUEUE`` and ``BENCH_PREFIX`` (Redis keys) come from the environment. This module's worker
serves the tidings tasks and the plain task on that queue; the baseline itself runs on a stock
Celery worker (:mod:`benchmarks.apps.celery_plain`). With ``BENCH_METRICS_PORT`` set (and
``PROMETHEUS_MULTIPROC_DIR``) the worker serves Prometheus metrics there.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import redis
from celery import Celery

from benchmarks.apps.celery_plain import REDIS_URL, celery_app, plain_task
from tidings import DomainEvent, EventBus, register_event
from tidings.deadletter.redis import RedisDeadLetterStore
from tidings.inbox.redis import RedisInbox
from tidings.transports.celery import CeleryTransport


@register_event
@dataclass(frozen=True)
class Ping(DomainEvent):
    """The benchmark's event: a few fields, like a typical domain event."""

    event_type: ClassVar[str] = "bench.ping"
    order_id: str = ""
    sequence: int = 0
    marker: bool = False
    latency: bool = False


def make(queue: str, prefix: str) -> tuple[Celery, EventBus, CeleryTransport, Any, redis.Redis]:
    """Build the app, the tidings bus (no-op handler, inbox on) and the plain task."""
    client = redis.Redis.from_url(REDIS_URL)
    app = celery_app(queue)
    transport = CeleryTransport(
        app,
        queue=queue,
        exchange=f"{prefix}.events",  # routed by type; the run's own registry, removed with it
        inbox=RedisInbox(client, prefix=f"{prefix}:inbox"),
        dead_letters=RedisDeadLetterStore(client, prefix=f"{prefix}:dlq"),
    )
    bus = EventBus(transport=transport)

    @bus.subscribe(Ping, name="bench.no_op")
    def no_op(event: Ping) -> None:
        if event.latency:
            client.rpush(f"{prefix}:started", f"{event.order_id}|{time.time()}")
        if event.marker:
            client.set(f"{prefix}:done", "1")

    return app, bus, transport, plain_task(app, client, prefix), client


def make_fanout(queue: str, prefix: str) -> tuple[EventBus, CeleryTransport]:
    """A second publisher to the same queue, without routing (``publish_to=[queue]``).

    Its own app (one transport per app); its messages are the same ``tidings.deliver`` tasks
    the worker of :func:`make` runs, so the two publishers differ only in routing by type.
    """
    client = redis.Redis.from_url(REDIS_URL)
    transport = CeleryTransport(
        celery_app(queue),
        queue=queue,
        publish_to=[queue],
        inbox=RedisInbox(client, prefix=f"{prefix}:inbox"),
        dead_letters=RedisDeadLetterStore(client, prefix=f"{prefix}:dlq"),
    )
    return EventBus(transport=transport), transport


if os.environ.get("BENCH_QUEUE"):
    app, bus, transport, plain, _client = make(
        os.environ["BENCH_QUEUE"], os.environ["BENCH_PREFIX"]
    )
    if os.environ.get("BENCH_METRICS_PORT"):  # the metrics row (benchmarks.metrics_e2e)
        from tidings.integrations.prometheus import serve_celery_metrics

        serve_celery_metrics(app, port=int(os.environ["BENCH_METRICS_PORT"]), service="bench")
