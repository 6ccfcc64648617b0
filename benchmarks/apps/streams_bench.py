"""The Redis Streams benchmark's worker side: tidings' worker app and the hand-written loop.

``BENCH_PREFIX`` (the first part of every Redis key) comes from the environment. Importing this
module with it set builds ``bus``, for ``tidings worker --app benchmarks.apps.streams_bench:bus``:
a :class:`~tidings.transports.redis_streams.RedisStreamsTransport` with a
:class:`~tidings.inbox.redis.RedisInbox` and a
:class:`~tidings.deadletter.redis.RedisDeadLetterStore`, and one handler that does nothing
but record latency probes and markers. ``BENCH_MAXLEN``, when set, makes the worker trim;
``BENCH_AUDIT``, when set, installs the audit trail on a Redis store under the same prefix.

``python -m benchmarks.apps.streams_bench`` (same environment) runs the baseline instead: a
redis-py consumer of the raw stream ``{BENCH_PREFIX}:raw``, reading with ``XREADGROUP COUNT
100`` and acknowledging each batch with one ``XACK``, recording the same probes and markers.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import redis

from tidings import DomainEvent, EventBus, register_event
from tidings.deadletter.redis import RedisDeadLetterStore
from tidings.inbox.redis import RedisInbox
from tidings.transports.redis_streams import RedisStreamsTransport

REDIS_URL = os.environ.get("TIDINGS_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
SERVICE = "bench"
RAW_GROUP = "raw"
MARKER = b"bench_marker"
LATENCY = b"bench_latency"


@register_event
@dataclass(frozen=True)
class StreamPing(DomainEvent):
    """The benchmark's event: a few fields, like a typical domain event."""

    event_type: ClassVar[str] = "bench.stream_ping"
    order_id: str = ""
    sequence: int = 0
    marker: bool = False
    latency: bool = False


def make(
    prefix: str, *, maxlen: int | None = None
) -> tuple[EventBus, RedisStreamsTransport, redis.Redis]:
    """Build the bus: Redis Streams transport, inbox on, a no-op handler that notes probes."""
    client = redis.Redis.from_url(REDIS_URL)
    transport = RedisStreamsTransport(
        client,
        service=SERVICE,
        inbox=RedisInbox(client, prefix=f"{prefix}:inbox"),
        dead_letters=RedisDeadLetterStore(client, prefix=f"{prefix}:dlq"),
        stream_prefix=f"{prefix}:stream",
        maxlen=maxlen,
    )
    bus = EventBus(transport=transport)

    @bus.subscribe(StreamPing, name="bench.no_op")
    def no_op(event: StreamPing) -> None:
        if event.latency:
            client.rpush(f"{prefix}:started", f"{event.order_id}|{time.time()}")
        if event.marker:
            client.rpush(f"{prefix}:done", "1")

    return bus, transport, client


def raw_stream(prefix: str) -> str:
    """Return the stream the hand-written loop produces to and consumes from."""
    return f"{prefix}:raw"


def consume_raw(prefix: str) -> None:
    """The baseline consumer: XREADGROUP COUNT 100, XACK the batch; until SIGTERM."""
    client = redis.Redis.from_url(REDIS_URL)
    stream = raw_stream(prefix)
    try:
        client.xgroup_create(stream, RAW_GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stopping.append(signum))
    while not stopping:
        reply: Any = client.xreadgroup(RAW_GROUP, "c1", {stream: ">"}, count=100, block=2000)
        if not reply:
            continue
        entries = reply[0][1]
        done = False
        for _, fields in entries:
            if LATENCY in fields:
                client.rpush(f"{prefix}:started", f"{fields[LATENCY].decode()}|{time.time()}")
            if MARKER in fields:
                done = True
        client.xack(stream, RAW_GROUP, *[entry_id for entry_id, _ in entries])
        if done:
            client.rpush(f"{prefix}:done", "1")
    client.close()


if os.environ.get("BENCH_PREFIX"):
    _maxlen = os.environ.get("BENCH_MAXLEN")
    bus, transport, _client = make(
        os.environ["BENCH_PREFIX"], maxlen=int(_maxlen) if _maxlen else None
    )

if os.environ.get("BENCH_PREFIX") and os.environ.get("BENCH_AUDIT"):
    # The audited worker of benchmarks.streams_audit: its handler runs are recorded too.
    from benchmarks.apps.audit_store import bench_store
    from tidings.audit import install_audit

    install_audit(bench_store(os.environ["BENCH_AUDIT"], os.environ["BENCH_PREFIX"], _client))

if __name__ == "__main__":
    consume_raw(os.environ["BENCH_PREFIX"])
