"""A Celery service wired with ``CeleryTransport(app, queue=...)`` and nothing else.

Started as ``celery -A tests.apps.celery_defaults worker`` (with or without ``-Q``), with
``DEFAULTS_QUEUE`` (the transport's queue; also the prefix of the test's own Redis keys) set.
The app keeps Celery's default queue, ``celery``, for its own tasks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import redis
from celery import Celery

from tidings import DomainEvent, EventBus, register_event
from tidings.transports.celery import CeleryTransport

REDIS_URL = os.environ.get("TIDINGS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@register_event
@dataclass(frozen=True)
class BellRung(DomainEvent):
    event_type: ClassVar[str] = "celery_defaults.bell_rung"
    bell: str = ""


def make(queue: str) -> tuple[Celery, EventBus, CeleryTransport, redis.Redis]:
    """Build the service on the Redis broker: the transport gets its stores by default."""
    client = redis.Redis.from_url(REDIS_URL)
    app = Celery(f"defaults-{queue}", broker=REDIS_URL)
    app.conf.update(broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)
    transport = CeleryTransport(app, queue=queue)
    bus = EventBus(transport=transport)

    @bus.subscribe(BellRung, name="defaults.ring")
    def ring(event: BellRung) -> None:
        client.rpush(f"{queue}:rung", event.bell)

    @app.task(name=f"{queue}.plain")
    def plain(value: str) -> None:
        client.rpush(f"{queue}:plain", value)

    return app, bus, transport, client


app = make(os.environ["DEFAULTS_QUEUE"])[0] if "DEFAULTS_QUEUE" in os.environ else None
