"""A Redis Streams service whose handler fails while a switch is on, for replay tests.

A worker runs ``tidings worker --app tests.apps.replay_streams:bus`` and ``tidings dlq replay``
takes the same ``--app`` (or ``tests.apps.replay_streams:transport``), with ``REPLAY_PREFIX``
(the key prefix of streams, inbox, dead letters and effects; also the service name) set.
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
ATTEMPTS = 3


@register_event
@dataclass(frozen=True)
class InvoiceSent(DomainEvent):
    event_type: ClassVar[str] = "replay_streams.invoice_sent"
    invoice_id: str = ""


class Broken(Exception):
    """The handler's downstream is down."""


def make(prefix: str) -> tuple[EventBus, RedisStreamsTransport, redis.Redis]:
    """Build the service: its handler fails while ``{prefix}:broken`` exists."""
    client = redis.Redis.from_url(REDIS_URL)
    transport = RedisStreamsTransport(
        client,
        service=prefix,
        stream_prefix=f"{prefix}:stream",
        inbox=RedisInbox(client, prefix=f"{prefix}:inbox"),
        dead_letters=RedisDeadLetterStore(client, prefix=f"{prefix}:dlq"),
        retry=RetryPolicy(max_attempts=ATTEMPTS, initial_delay=0.05, max_delay=0.1, jitter=0.0),
        block_ms=100,
    )
    bus = EventBus(transport=transport)

    @bus.subscribe(InvoiceSent, name="billing.mail")
    def mail(event: InvoiceSent) -> None:
        client.incr(f"{prefix}:attempts")
        if client.exists(f"{prefix}:broken"):
            raise Broken(f"mail server down for {event.invoice_id}")
        client.rpush(f"{prefix}:mailed", event.invoice_id)

    return bus, transport, client


if os.environ.get("REPLAY_PREFIX"):
    bus, transport, _client = make(os.environ["REPLAY_PREFIX"])
