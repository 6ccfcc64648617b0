"""A shop service wired like a user's composition root, for Celery worker processes.

The worker subprocess is started as ``celery -A tests.apps.celery_shop worker -Q <queue>`` with
``SHOP_QUEUE``, ``SHOP_PREFIX`` (Redis key prefix for the inbox, dead letters and effects) and
``SHOP_SERVICE`` set; the test process calls :func:`make` itself to publish.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import redis
from celery import Celery

from tidings import DomainEvent, EventBus, current_context, register_event
from tidings.deadletter.redis import RedisDeadLetterStore
from tidings.inbox.redis import RedisInbox
from tidings.retry import RetryPolicy
from tidings.transports.celery import CeleryTransport

REDIS_URL = os.environ.get("TIDINGS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@register_event
@dataclass(frozen=True)
class ParcelBooked(DomainEvent):
    event_type: ClassVar[str] = "celery_shop.parcel_booked"
    parcel_id: str = ""
    poison: bool = False


class Flaky(Exception):
    """A handler failure worth retrying."""


def make(
    queue: str,
    prefix: str,
    *,
    service: str = "shipping",
    publish_to: tuple[str, ...] | None = (),
) -> tuple[Celery, EventBus, CeleryTransport, redis.Redis]:
    """Build the service: Celery app, transport with Redis inbox and dead letters, handlers.

    ``publish_to`` empty sends to ``queue`` alone; ``None`` routes by type (``SHOP_ROUTED``).
    """
    client = redis.Redis.from_url(REDIS_URL)
    app = Celery(f"shop-{service}", broker=REDIS_URL)
    app.conf.update(
        task_default_queue=queue,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    transport = CeleryTransport(
        app,
        queue=queue,
        publish_to=None if publish_to is None else publish_to or (queue,),
        inbox=RedisInbox(client, prefix=f"{prefix}:inbox"),
        dead_letters=RedisDeadLetterStore(client, prefix=f"{prefix}:dlq"),
        retry=RetryPolicy(max_attempts=3, initial_delay=0.05, max_delay=0.2),
    )
    bus = EventBus(transport=transport)

    @bus.subscribe(ParcelBooked, name=f"{service}.record")
    def record(event: ParcelBooked) -> None:
        context = current_context()
        client.rpush(
            f"{prefix}:effects:{service}",
            f"{event.event_id}|{context.correlation_id}|{context.tenant_id}|{context.causation_id}",
        )

    @bus.subscribe(
        ParcelBooked,
        name=f"{service}.poison",
        retry=RetryPolicy(max_attempts=3, initial_delay=0.05, max_delay=0.2),
    )
    def poison(event: ParcelBooked) -> None:
        if event.poison:
            client.incr(f"{prefix}:poison_attempts")
            raise Flaky(f"parcel {event.parcel_id} cannot be booked")

    return app, bus, transport, client


if os.environ.get("SHOP_QUEUE"):
    app, bus, transport, _client = make(
        os.environ["SHOP_QUEUE"],
        os.environ["SHOP_PREFIX"],
        service=os.environ.get("SHOP_SERVICE", "shipping"),
        publish_to=None if os.environ.get("SHOP_ROUTED") else (),
    )
