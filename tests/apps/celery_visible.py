"""A service whose failures must show in Celery's own monitors (``celery events``, Flower).

Three handlers, one event type each: ``visible.flaky`` fails on its first attempt and succeeds
on the second, ``visible.doomed`` always fails (dead-lettered after ``ATTEMPTS``), and
``visible.ping`` succeeds (the test's way to know its event receiver listens). Every handler
run counts itself in Redis (``{prefix}:runs:{handler}``, failures ``{prefix}:fails:{handler}``).
Events carry an e-mail address: personal data that no monitor may be shown.

The worker subprocess is started as ``celery -A tests.apps.celery_visible worker -Q <queue>``
with ``VISIBLE_QUEUE``, ``VISIBLE_PREFIX`` (Redis key prefix) and ``VISIBLE_BROKER`` set; the
test process calls :func:`make` itself to publish.
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
from tidings.retry import RetryPolicy
from tidings.transports.celery import CeleryTransport

REDIS_URL = os.environ.get("TIDINGS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ATTEMPTS = 3
"""How many times ``visible.doomed`` runs before its event is dead-lettered."""


@register_event
@dataclass(frozen=True)
class MemberJoined(DomainEvent):
    event_type: ClassVar[str] = "celery_visible.member_joined"
    email: str = ""


@register_event
@dataclass(frozen=True)
class MemberComplained(DomainEvent):
    event_type: ClassVar[str] = "celery_visible.member_complained"
    email: str = ""


@register_event
@dataclass(frozen=True)
class Pinged(DomainEvent):
    event_type: ClassVar[str] = "celery_visible.pinged"


class FlakyError(RuntimeError):
    """The flaky handler's first attempt (its message names no personal data)."""


class DoomedError(RuntimeError):
    """The doomed handler's every attempt (its message names no personal data)."""


def make(
    queue: str, prefix: str, broker: str
) -> tuple[Celery, EventBus, CeleryTransport, redis.Redis]:
    """Build the service on ``broker``: Redis inbox and dead letters, the three handlers."""
    client = redis.Redis.from_url(REDIS_URL)
    app = Celery(f"visible-{queue}", broker=broker)
    app.conf.update(
        task_default_queue=queue,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=True,  # what `celery -E` turns on: the monitors' feed
    )
    transport = CeleryTransport(
        app,
        queue=queue,
        inbox=RedisInbox(client, prefix=f"{prefix}:inbox"),
        dead_letters=RedisDeadLetterStore(client, prefix=f"{prefix}:dlq"),
        retry=RetryPolicy(max_attempts=ATTEMPTS, initial_delay=0.1, max_delay=0.5, jitter=0),
        exchange=f"{prefix}.events",
    )
    bus = EventBus(transport=transport)

    def ran(handler: str) -> int:
        return int(client.incr(f"{prefix}:runs:{handler}"))

    def failed(handler: str) -> None:
        client.incr(f"{prefix}:fails:{handler}")

    @bus.subscribe(MemberJoined, name="visible.flaky")
    def welcome(event: MemberJoined) -> None:
        if ran("visible.flaky") == 1:
            failed("visible.flaky")
            msg = "the mail relay is away"
            raise FlakyError(msg)

    @bus.subscribe(MemberComplained, name="visible.doomed")
    def escalate(event: MemberComplained) -> None:
        ran("visible.doomed")
        failed("visible.doomed")
        msg = "the ticket system refuses every complaint"
        raise DoomedError(msg)

    @bus.subscribe(Pinged, name="visible.ping")
    def pong(event: Pinged) -> None:
        ran("visible.ping")

    return app, bus, transport, client


if os.environ.get("VISIBLE_QUEUE"):
    app, bus, transport, _client = make(
        os.environ["VISIBLE_QUEUE"], os.environ["VISIBLE_PREFIX"], os.environ["VISIBLE_BROKER"]
    )
