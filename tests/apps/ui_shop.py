"""A Redis Streams shop for the ops page's tests: a follow-up event, a retry, a dead letter.

An ``OrderPlaced`` has two handlers: ``billing.charge`` fails its first attempt, then
publishes a ``PaymentTaken`` (handled by ``ledger.record``); ``mail.confirm`` fails while
``{prefix}:broken`` exists (dead-lettered after its attempts), and records the order in
``{prefix}:mailed`` once repaired. ``tidings ui --app tests.apps.ui_shop:bus`` replays with
``UI_SHOP_PREFIX`` set (the key prefix of streams, inbox and dead letters; also the service).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import redis

from tidings import DomainEvent, EventBus, register_event
from tidings.deadletter.redis import RedisDeadLetterStore
from tidings.inbox.redis import RedisInbox
from tidings.retry import RetryPolicy
from tidings.transports.redis_streams import RedisStreamsTransport

REDIS_URL = os.environ.get("TIDINGS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ATTEMPTS = 2


@register_event
@dataclass(frozen=True)
class OrderPlaced(DomainEvent):
    event_type: ClassVar[str] = "ui_shop.order_placed"
    order_id: str = ""


@register_event
@dataclass(frozen=True)
class PaymentTaken(DomainEvent):
    event_type: ClassVar[str] = "ui_shop.payment_taken"
    order_id: str = ""


class CardDeclined(Exception):
    """The first charge of an order fails."""


class MailDown(Exception):
    """The mail server is down while the switch is on."""


def make(prefix: str) -> tuple[EventBus, RedisStreamsTransport, redis.Redis]:
    """Build the shop on Redis under ``prefix``."""
    client = redis.Redis.from_url(REDIS_URL)
    transport = RedisStreamsTransport(
        client,
        service=prefix,
        stream_prefix=f"{prefix}:stream",
        inbox=RedisInbox(client, prefix=f"{prefix}:inbox"),
        dead_letters=RedisDeadLetterStore(client, prefix=f"{prefix}:dlq"),
        retry=RetryPolicy(max_attempts=ATTEMPTS, initial_delay=0.02, max_delay=0.05, jitter=0.0),
        block_ms=50,
    )
    bus = EventBus(transport=transport)

    @bus.subscribe(OrderPlaced, name="billing.charge")
    def charge(event: OrderPlaced) -> None:
        if client.incr(f"{prefix}:charges:{event.event_id}") == 1:
            raise CardDeclined(f"card declined for <b>{event.order_id}</b>")
        bus.publish(PaymentTaken(order_id=event.order_id))

    @bus.subscribe(OrderPlaced, name="mail.confirm")
    def confirm(event: OrderPlaced) -> None:
        if client.exists(f"{prefix}:broken"):
            raise MailDown("smtp down <script>alert(1)</script>")
        client.rpush(f"{prefix}:mailed", event.order_id)

    @bus.subscribe(PaymentTaken, name="ledger.record")
    def record(event: PaymentTaken) -> None:
        client.rpush(f"{prefix}:ledger", event.order_id)

    return bus, transport, client


if os.environ.get("UI_SHOP_PREFIX"):
    bus, transport, _client = make(os.environ["UI_SHOP_PREFIX"])
