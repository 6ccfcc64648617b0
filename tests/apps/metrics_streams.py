"""A Redis Streams service for the metrics tests of ``tidings worker --metrics-port``.

A worker subprocess runs ``tidings worker --app tests.apps.metrics_streams:bus`` with
``METRICS_REDIS`` and ``METRICS_PREFIX`` set; tests build the same bus in-process with
:func:`make_bus` to publish. Handler ``kitchen.cook`` pushes each event's id to
``{prefix}:cooked``; ``kitchen.burn`` raises for a ``burnt`` event (dead-lettered at once).
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


@register_event
@dataclass(frozen=True)
class Cooked(DomainEvent):
    """A dish left the kitchen; ``burnt`` makes ``kitchen.burn`` fail."""

    event_type: ClassVar[str] = "metrics_app.cooked"
    burnt: bool = False


def make_bus(client: redis.Redis, prefix: str) -> tuple[EventBus, RedisStreamsTransport]:
    """Return the service's bus, its handlers included, with keys under ``prefix``."""
    transport = RedisStreamsTransport(
        client,
        service="kitchen",
        stream_prefix=f"{prefix}:stream",
        inbox=RedisInbox(client, prefix=f"{prefix}:inbox"),
        dead_letters=RedisDeadLetterStore(client, prefix=f"{prefix}:dlq"),
        retry=RetryPolicy(max_attempts=1),
        block_ms=100,
    )
    bus = EventBus(transport=transport)
    bus.add_handler(
        lambda event: client.rpush(f"{prefix}:cooked", event.event_id), Cooked, name="kitchen.cook"
    )

    def burn(event: Cooked) -> None:
        if event.burnt:
            msg = "burnt"
            raise RuntimeError(msg)

    bus.add_handler(burn, Cooked, name="kitchen.burn")
    return bus, transport


if os.environ.get("METRICS_PREFIX"):
    bus, transport = make_bus(
        redis.Redis.from_url(os.environ["METRICS_REDIS"]), os.environ["METRICS_PREFIX"]
    )
