"""A service for the per-key ordering tests of the Redis Streams transport.

A worker subprocess runs ``tidings worker --app tests.apps.streams_order:bus`` with
``ORDER_REDIS``, ``ORDER_PREFIX`` and ``ORDER_SERVICE`` set; tests build the same bus in-process
with :func:`make_bus` to publish. The one handler appends ``key:seq`` to ``{prefix}:log`` (every
handled event, in handling order) once it succeeded; an event with ``fail`` raises on its first
attempt (logging ``fail:key:seq``), one with ``hold`` blocks its first attempt until
``{prefix}:release`` exists (pushing the worker's pid to ``{prefix}:holders`` first). The pids
of the workers that handled events are in the set ``{prefix}:pids``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import redis

from tidings import DomainEvent, EventBus, register_event
from tidings.deadletter.redis import RedisDeadLetterStore
from tidings.inbox.redis import RedisInbox
from tidings.retry import RetryPolicy
from tidings.transports.redis_streams import RedisStreamsTransport

PARTITIONS = 8


@register_event
@dataclass(frozen=True)
class Keyed(DomainEvent):
    """The ``seq``-th event of ``key``."""

    event_type: ClassVar[str] = "order.keyed"
    key: str = ""
    seq: int = 0
    fail: bool = False
    hold: bool = False


def make_bus(
    client: redis.Redis, prefix: str, *, service: str, **options: Any
) -> tuple[EventBus, RedisStreamsTransport]:
    """Return the service's bus, its handler included, with keys under ``prefix``."""
    settings: dict[str, Any] = {
        "stream_prefix": f"{prefix}:stream",
        "inbox": RedisInbox(client, prefix=f"{prefix}:inbox", lease=1.0),
        "dead_letters": RedisDeadLetterStore(client, prefix=f"{prefix}:dlq"),
        "retry": RetryPolicy(max_attempts=3, initial_delay=1.0, jitter=0.0),
        "block_ms": 100,
        "count": 10,
        "claim_idle": 1.0,
        "partitions": PARTITIONS,
        "partition_key": "key",
        **options,
    }
    transport = RedisStreamsTransport(client, service=service, **settings)
    bus = EventBus(transport=transport)

    def record(event: Keyed) -> None:
        first = client.incr(f"{prefix}:attempts:{event.event_id}") == 1
        if event.fail and first:
            client.rpush(f"{prefix}:log", f"fail:{event.key}:{event.seq}")
            msg = f"{event.key}:{event.seq} fails once"
            raise RuntimeError(msg)
        if event.hold and first:
            client.rpush(f"{prefix}:holders", os.getpid())
            deadline = time.monotonic() + 30
            while not client.exists(f"{prefix}:release") and time.monotonic() < deadline:
                time.sleep(0.02)
        client.rpush(f"{prefix}:log", f"{event.key}:{event.seq}")
        client.sadd(f"{prefix}:pids", os.getpid())

    bus.add_handler(record, Keyed, name=f"{service}.record")
    return bus, transport


if os.environ.get("ORDER_SERVICE"):
    _client = redis.Redis.from_url(os.environ["ORDER_REDIS"])
    bus, transport = make_bus(
        _client, os.environ["ORDER_PREFIX"], service=os.environ["ORDER_SERVICE"]
    )
