"""The transactional outbox on PostgreSQL, against hand-written SQL, side by side in one run.

Three comparisons, each side in tables of its own (unique names, dropped at the end), measured
in alternating rounds (the order within a round alternates too), reported as medians:

1. write path: one transaction inserting a business row plus ``Outbox.add`` of one event,
   against the same business row plus a hand-written ``INSERT`` of the same envelope (encoded
   by the same codec, same columns) into an identical outbox table; both through SQLAlchemy
   Core on one connection. Time per transaction; ratio baseline / ours.
2. relay throughput: a backlog of outbox rows drained by ``Relay.run_once`` publishing through
   a :class:`~tidings.transports.redis_streams.RedisStreamsTransport`, against a hand-written
   loop (psycopg 3: ``SELECT ... FOR UPDATE SKIP LOCKED``, pipelined ``XADD``, ``DELETE ...
   WHERE id = ANY(...)``, commit). Events per second; ratio ours / baseline.
3. latency from the commit call to handler start: a relay thread woken by LISTEN/NOTIFY
   against one polling every second, both publishing into an in-process bus; events are
   committed one at a time, each waited for. Rounds interleave several NOTIFY samples with
   one polling sample, each after a random pause (up to the poll interval for polling, so
   commits fall anywhere in its cycle). Ratio polling / NOTIFY.
"""

from __future__ import annotations

import itertools
import os
import random
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, ClassVar

import redis
import sqlalchemy as sa

from benchmarks.harness import Row
from tidings import DomainEvent, EventBus, encode, register_event
from tidings.memory import MemoryDeadLetterStore
from tidings.outbox import Outbox, Relay
from tidings.transports.redis_streams import RedisStreamsTransport

POSTGRES_URL = os.environ.get(
    "TIDINGS_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("TIDINGS_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
WRITE_TARGET = 1 / 1.10  # ours at most 10% slower
POLL_INTERVAL = 1.0


@register_event
@dataclass(frozen=True)
class OrderPlacedOutbox(DomainEvent):
    """A typical domain event: the order (its aggregate, the partition key) and a few fields."""

    event_type: ClassVar[str] = "bench.outbox.order_placed"
    aggregate_id: str = ""
    customer_id: str = ""
    total: Decimal = Decimal(0)
    currency: str = "EUR"
    lines: int = 0


@dataclass
class _Env:
    """What every comparison shares: the servers, unique names, and what to clean up."""

    name: str
    engine: sa.Engine
    client: redis.Redis
    metadata: sa.MetaData
    ids: Iterator[int]

    def event(self) -> OrderPlacedOutbox:
        n = next(self.ids)
        return OrderPlacedOutbox(
            aggregate_id=f"order-{n}",
            customer_id="customer-42",
            total=Decimal("149.90"),
            currency="EUR",
            lines=n % 5 + 1,
        )

    def outbox(self, suffix: str) -> Outbox:
        outbox = Outbox(self.metadata, table_name=f"{self.name}_{suffix}")
        outbox.create_tables(self.engine)
        return outbox

    def orders(self, suffix: str) -> sa.Table:
        table = sa.Table(
            f"{self.name}_{suffix}",
            self.metadata,
            sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
            sa.Column("order_id", sa.String(64), nullable=False, unique=True),
            sa.Column("customer_id", sa.String(64), nullable=False),
            sa.Column("total", sa.Numeric(12, 2), nullable=False),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        )
        table.create(self.engine)
        return table

    def fill(self, outbox: Outbox, count: int) -> None:
        with self.engine.begin() as connection:
            for first in range(0, count, 1000):
                size = min(1000, count - first)
                outbox.add(connection, *(self.event() for _ in range(size)))
        # Every round starts from a vacuumed table: no dead rows left by the previous drain.
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(sa.text(f'VACUUM ANALYZE "{outbox.table.name}"'))


def _alternate(
    rounds: int, first: Callable[[], float], second: Callable[[], float]
) -> tuple[list[float], list[float]]:
    """Run both ``rounds`` times, swapping which goes first every round."""
    a: list[float] = []
    b: list[float] = []
    for i in range(rounds):
        if i % 2:
            b.append(second())
            a.append(first())
        else:
            a.append(first())
            b.append(second())
    return a, b


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def write_path(env: _Env, *, quick: bool) -> Row:
    """Business row + ``Outbox.add`` vs business row + hand-written INSERT, per transaction."""
    rounds, per_round = (20, 20) if quick else (100, 40)
    ours_outbox = env.outbox("w_ours_outbox")
    base_outbox = env.outbox("w_base_outbox")
    ours_orders = env.orders("w_ours_orders")
    base_orders = env.orders("w_base_orders")
    hand_written = sa.text(
        f'INSERT INTO "{base_outbox.table.name}" '  # noqa: S608 - our own table name
        "(event_id, event_type, partition_key, payload, created_at, attempts) "
        "VALUES (:event_id, :event_type, :partition_key, :payload, :created_at, 0)"
    )
    ours_insert = sa.insert(ours_orders)
    base_insert = sa.insert(base_orders)

    with env.engine.connect() as connection:

        def order(event: OrderPlacedOutbox) -> dict[str, Any]:
            return {
                "order_id": event.aggregate_id,
                "customer_id": event.customer_id,
                "total": event.total,
                "created_at": datetime.now(UTC),
            }

        def ours(count: int) -> float:
            start = time.perf_counter_ns()
            for _ in range(count):
                event = env.event()
                with connection.begin():
                    connection.execute(ours_insert, order(event))
                    ours_outbox.add(connection, event)
            return (time.perf_counter_ns() - start) / count / 1000

        def baseline(count: int) -> float:
            start = time.perf_counter_ns()
            for _ in range(count):
                event = env.event()
                with connection.begin():
                    connection.execute(base_insert, order(event))
                    connection.execute(
                        hand_written,
                        {
                            "event_id": event.event_id,
                            "event_type": event.event_type,
                            "partition_key": event.aggregate_id,
                            "payload": encode(event).decode("utf-8"),
                            "created_at": datetime.now(UTC),
                        },
                    )
            return (time.perf_counter_ns() - start) / count / 1000

        ours(20), baseline(20)  # warm up: statement caches, prepared statements
        ours_us, base_us = _alternate(rounds, lambda: ours(per_round), lambda: baseline(per_round))
    mine, base = statistics.median(ours_us), statistics.median(base_us)
    return Row("outbox write: business row + Outbox.add vs + hand-written INSERT (per tx)",
               round(mine, 1), round(base, 1), "µs/tx", round(base / mine, 3),
               round(WRITE_TARGET, 3), base / mine >= WRITE_TARGET)  # fmt: skip


def relay_throughput(env: _Env, *, quick: bool) -> Row:
    """``Relay.run_once`` → Redis Streams until empty vs a hand-written SKIP LOCKED loop."""
    rounds, count = (3, 2000) if quick else (5, 20000)
    ours_outbox = env.outbox("r_ours_outbox")
    base_outbox = env.outbox("r_base_outbox")
    transport = RedisStreamsTransport(
        env.client,
        service=env.name,
        dead_letters=MemoryDeadLetterStore(),
        stream_prefix=f"{env.name}:ours",
    )
    relay = Relay(env.engine, ours_outbox, EventBus(transport=transport))
    ours_stream = transport.stream(OrderPlacedOutbox)
    base_stream = f"{env.name}:base:{OrderPlacedOutbox.event_type}"
    table = base_outbox.table.name
    claim = f'SELECT id, payload FROM "{table}" ORDER BY id LIMIT 500 FOR UPDATE SKIP LOCKED'  # noqa: S608
    delete = f'DELETE FROM "{table}" WHERE id = ANY(%s)'  # noqa: S608 - our own table name

    def ours(count: int = count) -> float:
        env.fill(ours_outbox, count)
        start = time.perf_counter()
        while relay.run_once():
            pass
        elapsed = time.perf_counter() - start
        assert env.client.xlen(ours_stream) == count
        env.client.delete(ours_stream)
        return count / elapsed

    def baseline(count: int = count) -> float:
        env.fill(base_outbox, count)
        raw = env.engine.raw_connection()
        try:
            connection: Any = raw.driver_connection
            start = time.perf_counter()
            while True:
                rows = connection.execute(claim).fetchall()
                if not rows:
                    connection.commit()
                    break
                with env.client.pipeline(transaction=False) as pipe:
                    for _, payload in rows:
                        pipe.xadd(base_stream, {"envelope": payload})
                    pipe.execute()
                connection.execute(delete, ([row[0] for row in rows],))
                connection.commit()
            elapsed = time.perf_counter() - start
        finally:
            raw.close()
        assert env.client.xlen(base_stream) == count
        env.client.delete(base_stream)
        return count / elapsed

    ours(500), baseline(500)  # warm up: connections, statement caches, prepared statements
    ours_rate, base_rate = _alternate(rounds, ours, baseline)
    mine, base = statistics.median(ours_rate), statistics.median(base_rate)
    return Row("outbox relay PG → Redis Streams vs SKIP LOCKED + pipelined XADD + DELETE loop",
               round(mine), round(base), "events/s", round(mine / base, 2), 0.5,
               mine / base >= 0.5)  # fmt: skip


def latency(env: _Env, *, quick: bool) -> list[Row]:
    """Commit → handler start: LISTEN/NOTIFY relay vs a relay polling every second."""
    rounds, per_round = (8, 5) if quick else (40, 5)
    notify_outbox = env.outbox("l_notify_outbox")
    poll_outbox = env.outbox("l_poll_outbox")
    started: dict[str, float] = {}
    waiting: dict[str, threading.Event] = {}

    def handler(event: OrderPlacedOutbox) -> None:
        started[event.aggregate_id] = time.perf_counter()
        waiting[event.aggregate_id].set()

    bus = EventBus()
    bus.add_handler(handler, OrderPlacedOutbox, name="bench.outbox.started")
    relays = [
        Relay(env.engine, notify_outbox, bus, listen=True, poll_interval=POLL_INTERVAL),
        Relay(env.engine, poll_outbox, bus, listen=False, poll_interval=POLL_INTERVAL),
    ]
    stop = threading.Event()
    threads = [threading.Thread(target=relay.run, args=(stop,), daemon=True) for relay in relays]

    def sample(outbox: Outbox, pause: float) -> float:
        time.sleep(random.uniform(0, pause))  # noqa: S311 - not cryptographic
        event = env.event()
        done = waiting[event.aggregate_id] = threading.Event()
        with env.engine.connect() as connection:
            transaction = connection.begin()
            outbox.add(connection, event)
            start = time.perf_counter()
            transaction.commit()
        if not done.wait(POLL_INTERVAL * 10):
            msg = f"the relay of {outbox.table.name} did not deliver within 10 poll intervals"
            raise TimeoutError(msg)
        del waiting[event.aggregate_id]
        return (started.pop(event.aggregate_id) - start) * 1e6

    notify_us: list[float] = []
    poll_us: list[float] = []
    for thread in threads:
        thread.start()
    try:
        sample(notify_outbox, 0.0), sample(poll_outbox, 0.0)  # warm up
        for i in range(rounds):
            if i % 2:
                poll_us.append(sample(poll_outbox, POLL_INTERVAL))
            notify_us.extend(sample(notify_outbox, 0.005) for _ in range(per_round))
            if not i % 2:
                poll_us.append(sample(poll_outbox, POLL_INTERVAL))
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
    n50, n99 = _pct(notify_us, 0.5), _pct(notify_us, 0.99)
    p50, p99 = _pct(poll_us, 0.5), _pct(poll_us, 0.99)
    return [
        Row(f"outbox latency p50 commit → handler: NOTIFY vs {POLL_INTERVAL:g} s polling",
            round(n50), round(p50), "µs", round(p50 / n50, 1), None, None),
        Row(f"outbox latency p99 commit → handler: NOTIFY vs {POLL_INTERVAL:g} s polling",
            round(n99), round(p99), "µs", round(p99 / n99, 1), 10, p99 / n99 >= 10),
    ]  # fmt: skip


def rows(*, quick: bool = False) -> list[Row]:
    """Measure and return the outbox rows (PostgreSQL and Redis must be reachable)."""
    name = f"bench_outbox_{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(POSTGRES_URL, pool_size=8)
    client = redis.Redis.from_url(REDIS_URL)
    env = _Env(name, engine, client, sa.MetaData(), itertools.count())
    try:
        found = [write_path(env, quick=quick), relay_throughput(env, quick=quick)]
        found += latency(env, quick=quick)
    finally:
        env.metadata.drop_all(engine, checkfirst=True)
        for key in client.scan_iter(f"{name}*"):
            client.delete(key)
        client.close()
        engine.dispose()
    return found
