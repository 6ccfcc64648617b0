"""The broker side of the outbox fault tests: what ``tidings relay`` and ``tidings worker`` load.

Both commands import this module with ``OUTBOX_FAULTS_REDIS`` (the broker's URL) and
``OUTBOX_FAULTS_PREFIX`` (every stream and key of the test starts with it) set, and then find:

- ``bus``: an :class:`~tidings.EventBus` on a :class:`RedisStreamsTransport` publishing to
  ``{prefix}:stream:<event type>``. Its one handler (service ``OUTBOX_FAULTS_SERVICE``,
  default ``consumer``) runs behind a :class:`RedisInbox` and counts its effect per event id in
  the hash ``{prefix}:effects``: ``tidings worker --app tests.apps.outbox_faults:bus``.
- ``relay_transport``: what ``tidings relay --transport tests.apps.outbox_faults:relay_transport``
  forwards each batch's stored envelopes through: the bus's transport; then, if
  ``OUTBOX_FAULTS_HOLD`` names a Redis key and that key exists, it records the batch's event ids
  in ``{prefix}:held`` and its pid in ``{prefix}:holding``, and blocks (up to a minute) until
  the key is gone: the window after the broker confirmed and before the relay marks the rows,
  in which a test kills the relay.

The test process imports the module without those variables, for :class:`Tick` alone.
``python -m tests.apps.outbox_faults DB_URL TABLE COUNT`` is a web process that crashes: it
commits ``COUNT`` events in transactions of ten (printing each committed event id), then writes
five more (printed as ``doomed <id>``) in a transaction it never commits, and kills itself
with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from tidings import DomainEvent, EventBus, register_event
from tidings.deadletter.redis import RedisDeadLetterStore
from tidings.inbox.redis import RedisInbox
from tidings.ports import StoredEnvelope
from tidings.transports.redis_streams import RedisStreamsTransport

HOLD_LIMIT = 60.0  # a held publish returns by itself after this long, should nobody kill it


@register_event
@dataclass(frozen=True)
class Tick(DomainEvent):
    """An event of one aggregate; the outbox keeps order per ``aggregate_id``."""

    event_type: ClassVar[str] = "outbox_faults.tick"
    aggregate_id: str = ""
    seq: int = 0


def make_bus(client: redis.Redis, prefix: str, *, service: str) -> EventBus:
    """Return the bus: streams, inbox, dead letters and effects under ``prefix``."""
    transport = RedisStreamsTransport(
        client,
        service=service,
        stream_prefix=f"{prefix}:stream",
        inbox=RedisInbox(client, prefix=f"{prefix}:inbox"),
        dead_letters=RedisDeadLetterStore(client, prefix=f"{prefix}:dlq"),
        block_ms=100,
    )
    bus = EventBus(transport=transport)
    effects = f"{prefix}:effects"

    def record(event: Tick) -> None:
        client.hincrby(effects, event.event_id, 1)

    bus.add_handler(record, Tick, name=f"{service}.record")
    return bus


if os.environ.get("OUTBOX_FAULTS_REDIS"):
    _prefix = os.environ["OUTBOX_FAULTS_PREFIX"]
    # One quick retry inside redis-py, so that the relay's own backoff is what tests observe.
    _client = redis.Redis.from_url(
        os.environ["OUTBOX_FAULTS_REDIS"], retry=Retry(ExponentialBackoff(cap=0.05), 1)
    )
    bus = make_bus(_client, _prefix, service=os.environ.get("OUTBOX_FAULTS_SERVICE", "consumer"))
    _hold = os.environ.get("OUTBOX_FAULTS_HOLD")

    class HoldingTransport:
        """The bus's transport; when told to, each send blocks after the broker confirmed."""

        name = "redis-streams"

        def __init__(self, inner: RedisStreamsTransport) -> None:
            self.inner = inner

        def bind(self, bus: EventBus) -> None:
            """Bound already (the inner transport serves ``bus``)."""

        def subscribed(self, handler: object) -> None:
            """Nothing to check: the inner transport checked the bus's handlers."""

        def send(self, events: Sequence[DomainEvent]) -> None:
            """Send through the inner transport, then hold if told to."""
            self.inner.send(events)
            self._hold([event.event_id for event in events])

        def send_envelopes(self, envelopes: Sequence[StoredEnvelope]) -> None:
            """Forward through the inner transport, then hold if told to."""
            self.inner.send_envelopes(envelopes)
            self._hold([envelope.event_id for envelope in envelopes])

        def close(self) -> None:
            """Close the inner transport."""
            self.inner.close()

        def _hold(self, ids: list[str]) -> None:
            if not ids or not _hold or not _client.exists(_hold):
                return
            _client.rpush(f"{_prefix}:held", *ids)
            _client.set(f"{_prefix}:holding", os.getpid())
            deadline = time.monotonic() + HOLD_LIMIT
            while _client.exists(_hold) and time.monotonic() < deadline:
                time.sleep(0.02)

    assert isinstance(bus.transport, RedisStreamsTransport)
    relay_transport = HoldingTransport(bus.transport)


def crash_after_commit(db_url: str, table: str, count: int) -> None:
    """Commit ``count`` events, start one more transaction, and die by SIGKILL within it."""
    import sqlalchemy as sa  # noqa: PLC0415 - only this entry point needs the sql extra

    from tidings.outbox import Outbox  # noqa: PLC0415

    engine = sa.create_engine(db_url)
    outbox = Outbox(table_name=table)
    events = [Tick(aggregate_id=f"a{n % 5}", seq=n) for n in range(count)]
    for start in range(0, count, 10):
        batch = events[start : start + 10]
        with engine.begin() as connection:
            outbox.add(connection, *batch)
        for event in batch:
            print(event.event_id, flush=True)
    with engine.begin() as connection:
        doomed = [Tick(aggregate_id="doomed", seq=n) for n in range(5)]
        outbox.add(connection, *doomed)
        for event in doomed:
            print("doomed", event.event_id, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    crash_after_commit(sys.argv[1], sys.argv[2], int(sys.argv[3]))
