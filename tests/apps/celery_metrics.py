"""A Celery service for the metrics tests: ``serve_celery_metrics`` under the prefork pool.

The worker subprocess is started as ``celery -A tests.apps.celery_metrics worker -Q <queue>``
with ``METRICS_QUEUE``, ``METRICS_PREFIX`` (Redis key prefix) and ``METRICS_PORT`` set, and
``METRICS_MAX_TASKS`` (a pool child exits after that many tasks) if wanted; the test process
calls :func:`make` itself to publish. The handler ``bakery.bake`` pushes each event's id and
its process id to Redis.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import redis
from celery import Celery

from tidings import DomainEvent, EventBus, register_event
from tidings.deadletter.redis import RedisDeadLetterStore
from tidings.inbox.redis import RedisInbox
from tidings.transports.celery import CeleryTransport

REDIS_URL = os.environ.get("TIDINGS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@register_event
@dataclass(frozen=True)
class LoafBaked(DomainEvent):
    event_type: ClassVar[str] = "celery_metrics.loaf_baked"


def make(queue: str, prefix: str) -> tuple[Celery, EventBus, CeleryTransport, redis.Redis]:
    """Build the service: Celery app, transport with Redis inbox and dead letters, one handler."""
    client = redis.Redis.from_url(REDIS_URL)
    app = Celery(f"metrics-{queue}", broker=REDIS_URL)
    app.conf.update(
        task_default_queue=queue,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    transport = CeleryTransport(
        app,
        queue=queue,
        inbox=RedisInbox(client, prefix=f"{prefix}:inbox"),
        dead_letters=RedisDeadLetterStore(client, prefix=f"{prefix}:dlq"),
    )
    bus = EventBus(transport=transport)

    @bus.subscribe(LoafBaked, name="bakery.bake")
    def bake(event: LoafBaked) -> None:
        client.rpush(f"{prefix}:baked", event.event_id)
        client.sadd(f"{prefix}:pids", os.getpid())

    return app, bus, transport, client


if os.environ.get("METRICS_QUEUE"):
    from tidings.integrations.prometheus import serve_celery_metrics

    app, bus, transport, _client = make(os.environ["METRICS_QUEUE"], os.environ["METRICS_PREFIX"])
    if os.environ.get("METRICS_MAX_TASKS"):
        app.conf.worker_max_tasks_per_child = int(os.environ["METRICS_MAX_TASKS"])
    serve_celery_metrics(app, port=int(os.environ["METRICS_PORT"]), service="bakery")
