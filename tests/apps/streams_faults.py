"""A service for the Redis Streams fault tests: handlers that block, crash, or just record.

A worker subprocess runs ``tidings worker --app tests.apps.streams_faults:bus`` with
``FAULTS_REDIS``, ``FAULTS_PREFIX`` and ``FAULTS_SERVICE`` set (and optionally
``FAULTS_CLAIM_IDLE``, ``FAULTS_MAX_DELIVERIES``); tests build the same bus in-process with
:func:`make_bus` to publish, or to run a second consumer of the service.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import redis
from tests.apps.hostile_events import Priced

from tidings import DomainEvent, EventBus, register_event
from tidings.deadletter.redis import RedisDeadLetterStore
from tidings.inbox.redis import RedisInbox
from tidings.retry import RetryPolicy
from tidings.transports.redis_streams import RedisStreamsTransport


@register_event
@dataclass(frozen=True)
class Step(DomainEvent):
    """An event every handler of the service records once in effect."""

    event_type: ClassVar[str] = "faults.step"
    seq: int = 0


@register_event
@dataclass(frozen=True)
class Stuck(DomainEvent):
    """An event whose first handling blocks until the test releases it (or kills the worker)."""

    event_type: ClassVar[str] = "faults.stuck"


@register_event
@dataclass(frozen=True)
class Deadly(DomainEvent):
    """An event whose handler kills its process every time: a poison entry."""

    event_type: ClassVar[str] = "faults.deadly"


@register_event
@dataclass(frozen=True)
class Flaky(DomainEvent):
    """An event whose handler fails on its first attempt and records it on the second."""

    event_type: ClassVar[str] = "faults.flaky"


def make_bus(
    client: redis.Redis, prefix: str, *, service: str, **options: Any
) -> tuple[EventBus, RedisStreamsTransport]:
    """Return the service's bus, handlers included, with keys under ``prefix``."""
    settings: dict[str, Any] = {
        "stream_prefix": f"{prefix}:stream",
        "inbox": RedisInbox(client, prefix=f"{prefix}:inbox", lease=1.0),
        "dead_letters": RedisDeadLetterStore(client, prefix=f"{prefix}:dlq"),
        "retry": RetryPolicy(max_attempts=3, initial_delay=0.05, jitter=0.0),
        "block_ms": 100,
        "claim_idle": 0.5,
        **options,
    }
    transport = RedisStreamsTransport(client, service=service, **settings)
    bus = EventBus(transport=transport)
    effects = f"{prefix}:effects:{service}"

    def record(event: DomainEvent) -> None:
        client.rpush(effects, event.event_id)

    def stuck(event: Stuck) -> None:
        if client.incr(f"{prefix}:started:{event.event_id}") == 1:
            client.rpush(f"{prefix}:started", event.event_id)
            deadline = time.monotonic() + 30
            while not client.exists(f"{prefix}:release") and time.monotonic() < deadline:
                time.sleep(0.02)
        client.rpush(effects, f"stuck:{event.event_id}")

    def deadly(_event: Deadly) -> None:
        os._exit(70)

    def flaky(event: Flaky) -> None:
        if client.incr(f"{prefix}:tries:{event.event_id}") == 1:
            msg = "fails on its first attempt"
            raise RuntimeError(msg)
        client.rpush(effects, f"flaky:{event.event_id}")

    bus.add_handler(record, Step, Stuck, Priced, name=f"{service}.record")
    bus.add_handler(flaky, Flaky, name=f"{service}.flaky")
    bus.add_handler(stuck, Stuck, name=f"{service}.stuck")
    bus.add_handler(deadly, Deadly, name=f"{service}.deadly")
    return bus, transport


if os.environ.get("FAULTS_SERVICE"):
    _client = redis.Redis.from_url(os.environ["FAULTS_REDIS"])
    bus, transport = make_bus(
        _client,
        os.environ["FAULTS_PREFIX"],
        service=os.environ["FAULTS_SERVICE"],
        claim_idle=float(os.environ.get("FAULTS_CLAIM_IDLE", "0.5")),
        max_deliveries=int(os.environ.get("FAULTS_MAX_DELIVERIES", "5")),
    )
