"""The Celery benchmark's worker side: tidings' transport and a plain Celery task, side by side.

``BENCH_QUEUE`` and ``BENCH_PREFIX`` (Redis keys) come from the environment; the worker serves
both the tidings tasks and the plain baseline task on that queue.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import redis
from celery import Celery

from tidings import DomainEvent, EventBus, register_event
from tidings.deadletter.redis import RedisDeadLetterStore
from tidings.inbox.redis import RedisInbox
from tidings.transports.celery import CeleryTransport

REDIS_URL = os.environ.get("TIDINGS_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


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
    app = Celery("bench", broker=REDIS_URL)
    app.conf.update(
        task_default_queue=queue,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_prefetch_multiplier=16,
    )
    transport = CeleryTransport(
        app,
        queue=queue,
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

    @app.task(name="bench.plain", ignore_result=True, acks_late=True)
    def plain(data: dict[str, Any]) -> None:
        if data.get("latency"):
            client.rpush(f"{prefix}:started", f"{data['order_id']}|{time.time()}")
        if data.get("marker"):
            client.set(f"{prefix}:done", "1")

    return app, bus, transport, plain, client


if os.environ.get("BENCH_QUEUE"):
    app, bus, transport, plain, _client = make(
        os.environ["BENCH_QUEUE"], os.environ["BENCH_PREFIX"]
    )
