import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import orm
from tests.audit_run import (
    DEADLINE,
    EXPECTED,
    RETRY,
    STORES,
    OrderPlaced,
    PaymentTaken,
    audit_store,
    auditing,
    run_shop,
    settled,
    shop,
)

from tidings import EventBus, _tracing, event_context
from tidings.audit import (
    AuditRecord,
    AuditStore,
    _writer,
    audit_installed,
    flush_audit,
    install_audit,
    open_audit_store,
    uninstall_audit,
)
from tidings.audit.redis import RedisAuditStore
from tidings.audit.sql import SqlAuditStore
from tidings.codec import default_codec
from tidings.deadletter.redis import RedisDeadLetterStore
from tidings.delivery import Received
from tidings.inbox.redis import RedisInbox
from tidings.memory import MemoryDeadLetterStore, MemoryInbox
from tidings.outbox import Outbox, Relay
from tidings.testing.workers import wait_until
from tidings.transports.memory import MemoryBroker, MemoryTransport
from tidings.transports.redis_streams import RedisStreamsTransport


@pytest.fixture(params=STORES)
def store(request, unique_name, tmp_path) -> Iterator[AuditStore]:
    with audit_store(request.param, unique_name, tmp_path) as made:
        yield made


def record(kind: str = "handled", **fields: object) -> AuditRecord:
    values: dict[str, object] = {
        "event_id": "e-1",
        "event_type": "t",
        "correlation_id": "c-1",
        "tenant_id": "acme",
        "at": time.time(),
        **fields,
    }
    return AuditRecord(kind, **values)  # type: ignore[arg-type]


def outline(records: Sequence[AuditRecord]) -> list[tuple[str, str | None, str | None, int]]:
    return sorted((r.kind, r.event_type, r.handler, r.attempt) for r in records)


SHOP_OUTLINE = sorted(
    [
        ("published", OrderPlaced.event_type, None, 0),
        ("published", PaymentTaken.event_type, None, 0),
        ("retried", OrderPlaced.event_type, "billing.charge", 1),
        ("handled", OrderPlaced.event_type, "billing.charge", 2),
        ("handled", PaymentTaken.event_type, "ledger.record", 1),
        ("retried", OrderPlaced.event_type, "mail.confirm", 1),
        ("dead_lettered", OrderPlaced.event_type, "mail.confirm", 2),
    ]
)


def check_shop_records(records: Sequence[AuditRecord], order: OrderPlaced) -> None:
    assert outline(records) == SHOP_OUTLINE
    assert [r.at for r in records] == sorted(r.at for r in records)
    assert {r.correlation_id for r in records} == {order.correlation_id}
    assert {r.tenant_id for r in records} == {"acme"}
    follow_ups = {r.event_id for r in records if r.event_type == PaymentTaken.event_type}
    assert len(follow_ups) == 1
    for r in records:
        expected = order.event_id if r.event_type == PaymentTaken.event_type else None
        assert r.causation_id == expected
        assert r.worker.endswith(f":{os.getpid()}")
        if r.handler is not None:
            assert r.duration is not None
            assert r.duration >= 0
    (dead,) = [r for r in records if r.kind == "dead_lettered"]
    assert "MailDown: smtp down" in dead.detail
    (retry,) = [r for r in records if r.kind == "retried" and r.handler == "billing.charge"]
    assert "CardDeclined" in retry.detail
    assert retry.outcome == "retry"


@pytest.mark.integration
def test_a_memory_transport_run_comes_back_by_correlation_from_every_store(store, unique_name):
    """Every publish, retry, run and dead letter of a real run is found by its correlation id."""
    order, records = run_shop(store, unique_name)
    check_shop_records(records, order)
    assert outline(store.by_event(order.event_id)) == [
        entry for entry in SHOP_OUTLINE if entry[1] == OrderPlaced.event_type
    ]
    assert len(store.by_tenant("acme", limit=100)) == EXPECTED


@pytest.mark.integration
@pytest.mark.parametrize("kind", STORES)
def test_a_redis_streams_worker_run_comes_back_by_correlation(
    kind, unique_name, tmp_path, redis_url
):
    """Through a real Redis stream and consumer, the run's records come back by correlation."""
    client = redis.Redis.from_url(redis_url)
    transport = RedisStreamsTransport(
        client,
        service="shop",
        stream_prefix=f"{unique_name}:stream",
        inbox=RedisInbox(client, prefix=f"{unique_name}:inbox"),
        dead_letters=RedisDeadLetterStore(client, prefix=f"{unique_name}:dlq"),
        retry=RETRY,
        block_ms=50,
    )
    made = shop(EventBus(transport=transport))
    stopping = threading.Event()
    consumer = threading.Thread(target=transport.run, args=(stopping,), daemon=True)
    try:
        with audit_store(kind, f"a_{unique_name}", tmp_path) as audit, auditing(audit):
            transport.streams()  # the groups exist before the first publish
            consumer.start()
            order = made.place(f"{unique_name}-request")
            records = settled(audit, order.correlation_id, EXPECTED)
            check_shop_records(records, order)
    finally:
        stopping.set()
        if consumer.ident is not None:
            consumer.join(DEADLINE)
        for key in client.scan_iter(f"{unique_name}*"):
            client.delete(key)
        transport.close()
        client.close()
    assert not consumer.is_alive()


@pytest.mark.integration
def test_by_tenant_gives_the_newest_first_within_limit_and_since(store):
    """by_tenant reads only that tenant's records, newest first, cut by limit and since."""
    now = time.time()
    store.write([record(at=now - 30 + n, event_id=f"e-{n}") for n in range(5)])
    store.write([record(at=now, tenant_id="other", event_id="x")])
    assert [r.event_id for r in store.by_tenant("acme", limit=3)] == ["e-4", "e-3", "e-2"]
    assert [r.event_id for r in store.by_tenant("acme", since=now - 27.5)] == ["e-4", "e-3"]
    assert store.by_tenant("acme", limit=0) == []
    assert [r.event_id for r in store.by_tenant("other")] == ["x"]
    assert store.by_tenant("nobody") == []
    with pytest.raises(ValueError, match="limit"):
        store.by_tenant("acme", limit=-1)


@pytest.mark.integration
def test_records_round_trip_every_field(store):
    """A record written comes back equal, hostile text and all, by correlation and by event."""
    written = record(
        "dead_lettered",
        causation_id="cause",
        handler="h.one",
        outcome="dead_letter",
        attempt=3,
        duration=0.25,
        worker="host:12",
        detail="boom \x1b[31m\x00 é \udcff",
    )
    store.write([written])
    (by_correlation,) = store.by_correlation("c-1")
    (by_event,) = store.by_event("e-1")
    assert by_correlation == by_event
    expected = {**written.to_dict(), "detail": by_event.detail}
    assert by_event.to_dict() == expected
    assert by_event.detail.startswith("boom \x1b[31m")
    assert by_event.detail.endswith(" é \\udcff") or by_event.detail.endswith(" é \udcff")
    assert store.by_correlation("nobody") == []
    assert store.by_event("nobody") == []


@pytest.mark.integration
def test_trim_removes_only_the_records_older_than_asked(store):
    """trim(older_than) removes the older records from every lookup and keeps the newer ones."""
    store.write([record(event_id="old", at=time.time())])
    written = time.time()
    wait_until(lambda: time.time() > written + 0.01, what="the clock to move on")
    middle = time.time()
    wait_until(lambda: time.time() > middle + 0.01, what="the clock to move on")
    store.write([record(event_id="new", at=time.time())])
    assert store.trim(time.time() - middle) == 1
    assert [r.event_id for r in store.by_correlation("c-1")] == ["new"]
    assert [r.event_id for r in store.by_tenant("acme")] == ["new"]
    assert store.by_event("old") == []
    assert store.trim(3600) == 0
    with pytest.raises(ValueError, match="older_than"):
        store.trim(-1)


def at(record: AuditRecord) -> float:
    return record.at


class ListStore:
    """An audit store in a list, whose write can be held or made to fail."""

    def __init__(self) -> None:
        self.records: list[AuditRecord] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail = False

    def write(self, records: Sequence[AuditRecord]) -> None:
        self.gate.wait(DEADLINE)
        if self.fail:
            raise ConnectionError("store down")
        self.records.extend(records)

    def by_correlation(self, correlation_id: str) -> list[AuditRecord]:
        return sorted((r for r in self.records if r.correlation_id == correlation_id), key=at)

    def by_event(self, event_id: str) -> list[AuditRecord]:
        return sorted((r for r in self.records if r.event_id == event_id), key=at)

    def by_tenant(
        self, tenant_id: str, *, limit: int = 100, since: float | None = None
    ) -> list[AuditRecord]:
        return [r for r in self.records if r.tenant_id == tenant_id][:limit]

    def trim(self, older_than: float) -> int:
        return 0

    def close(self) -> None:
        pass


def test_the_audit_is_off_until_installed_and_off_after_uninstall():
    """No hooks before install_audit; after uninstall_audit the slot is empty again."""
    assert not audit_installed()
    assert _tracing.installed("audit") is None
    store = ListStore()
    install_audit(store)
    assert audit_installed()
    uninstall_audit()
    assert not audit_installed()
    bus = EventBus()
    bus.add_handler(lambda event: None, OrderPlaced, name="h")
    bus.publish(OrderPlaced())
    flush_audit()
    assert store.records == []


def test_handlers_never_wait_for_the_store_and_uninstall_flushes_the_queue():
    """With the store's write stuck, publish and handlers finish; uninstall writes everything."""
    store = ListStore()
    store.gate.clear()
    bus = EventBus()
    bus.add_handler(lambda event: None, OrderPlaced, name="h")
    install_audit(store, batch=1, flush_interval=0.01)
    try:
        started = time.perf_counter()
        for _ in range(50):
            bus.publish(OrderPlaced())
        assert time.perf_counter() - started < 5
    finally:
        store.gate.set()
        uninstall_audit()
    assert len(store.records) == 100
    assert {r.kind for r in store.records} == {"published", "handled"}


def test_a_full_queue_drops_the_oldest_and_warns_once_per_interval(caplog):
    """Past max_queued the oldest records go, counted in one WARNING; the newest are kept."""
    store = ListStore()
    store.gate.clear()
    bus = EventBus()
    install_audit(store, batch=10_000, max_queued=10, flush_interval=60, warn_every=3600)
    try:
        events = [OrderPlaced() for _ in range(25)]
        for event in events:
            bus.publish(event)
    finally:
        store.gate.set()
        with caplog.at_level(logging.WARNING, logger="tidings.audit"):
            uninstall_audit()
    assert [r.event_id for r in store.records] == [e.event_id for e in events[-10:]]
    (warning,) = [r for r in caplog.records if r.name == "tidings.audit"]
    assert "15 record(s) dropped" in warning.getMessage()


def test_a_failing_store_is_reported_not_raised(caplog):
    """A store that raises loses its batch with a WARNING; the publisher never sees the error."""
    store = ListStore()
    store.fail = True
    bus = EventBus()
    bus.add_handler(lambda event: None, OrderPlaced, name="h")
    install_audit(store)
    try:
        bus.publish(OrderPlaced())
    finally:
        with caplog.at_level(logging.WARNING, logger="tidings.audit"):
            uninstall_audit()
    messages = [r.getMessage() for r in caplog.records if r.name == "tidings.audit"]
    assert any("2 because the store refused them" in m and "ConnectionError" in m for m in messages)


def test_install_audit_refuses_nonsense_bounds():
    """A batch, queue or interval that is not positive is a ValueError."""
    for bounds in ({"batch": 0}, {"max_queued": 0}, {"flush_interval": 0}, {"warn_every": -1}):
        with pytest.raises(ValueError, match="must be positive"):
            install_audit(ListStore(), **bounds)  # type: ignore[arg-type]
    assert not audit_installed()


def test_an_unknown_kind_is_refused():
    """An AuditRecord whose kind is not one of KINDS is a ValueError."""
    with pytest.raises(ValueError, match="kind"):
        AuditRecord("exploded", "e-1")


def test_open_audit_store_picks_the_store_by_scheme(tmp_path):
    """redis:// gives the Redis store (prefix and max_age from the URL), a SQL URL the SQL one."""
    redis_store = open_audit_store("redis://127.0.0.1:6379/0?max_age=60", name="app:audit")
    assert isinstance(redis_store, RedisAuditStore)
    assert (redis_store.prefix, redis_store.max_age) == ("app:audit", 60.0)
    redis_store.close()
    sql_store = open_audit_store(f"sqlite:///{tmp_path / 'a.db'}", name="my_audit")
    assert isinstance(sql_store, SqlAuditStore)
    assert sql_store.table.name == "my_audit"
    sql_store.close()
    with pytest.raises(ValueError, match="not an audit store URL"):
        open_audit_store("nowhere")


def test_outbox_add_and_the_relay_are_recorded_once_each(tmp_path):
    """Outbox.add and the relay are one record each; a handler's follow-up inside is recorded."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'outbox.db'}")
    outbox = Outbox()
    outbox.create_tables(engine)
    bus = EventBus()
    bus.add_handler(
        lambda event: bus.publish(PaymentTaken(order_id=event.order_id)),
        OrderPlaced,
        name="billing.inline",
    )
    store = ListStore()
    install_audit(store)
    try:
        with event_context(correlation_id="req-outbox"), orm.Session(engine) as session:
            order = OrderPlaced(order_id="o-2")
            outbox.add(session, order)
            session.commit()
        assert Relay(engine, outbox, bus, listen=False).run_once() == 1
    finally:
        uninstall_audit()
        engine.dispose()
    records = store.by_correlation("req-outbox")
    assert [(r.kind, r.event_type, r.handler, r.detail) for r in records] == [
        ("published", OrderPlaced.event_type, None, "into the outbox tidings_outbox"),
        ("relayed", OrderPlaced.event_type, None, "from the outbox tidings_outbox"),
        ("handled", OrderPlaced.event_type, "billing.inline", ""),
        ("published", PaymentTaken.event_type, None, "via tidings"),
    ]
    assert records[3].causation_id == order.event_id


def test_a_rejected_delivery_is_recorded_with_the_events_ids(unique_name):
    """Misaimed and undecodable deliveries are rejected records with whatever ids they carry."""
    letters = MemoryDeadLetterStore()
    broker = MemoryBroker()
    transport = MemoryTransport(dead_letters=letters, queue=unique_name, broker=broker)
    EventBus(transport=transport)
    store = ListStore()
    install_audit(store)
    transport.start()
    try:
        with event_context(correlation_id="req-rejected", tenant_id="acme"):
            order = OrderPlaced()
        body = default_codec.encode(order)
        broker.put(unique_name, Received(body, destination=unique_name, handler="nobody.here"))
        forged = b'{"id":"x-1","type":"nope.unknown","correlationid":"req-rejected","data":[]}'
        broker.put(unique_name, Received(forged, destination=unique_name))
        broker.put(unique_name, Received(b"\xff not json", destination=unique_name))
        wait_until(lambda: letters.count() == 3 and transport.idle(), what="the dead letters")
    finally:
        transport.close()
        uninstall_audit()
    (rejected,) = store.by_event(order.event_id)
    (letter,) = [letter for letter in letters.list() if letter.handler == "nobody.here"]
    assert (rejected.kind, rejected.handler, rejected.outcome) == (
        "rejected",
        "nobody.here",
        "rejected",
    )
    assert (rejected.correlation_id, rejected.tenant_id) == ("req-rejected", "acme")
    assert rejected.detail.startswith(f"dead letter {letter.id}: LookupError: no handler named")
    (undecodable,) = store.by_event("x-1")
    assert (undecodable.kind, undecodable.correlation_id) == ("rejected", "req-rejected")
    assert undecodable.handler is None
    (garbage,) = [r for r in store.records if r.event_id is None]
    assert garbage.kind == "rejected"
    assert garbage.correlation_id is None


def test_a_deeply_nested_rejected_message_is_recorded_without_raising(unique_name):
    """A body nested past the codec's depth is dead-lettered, and the audit records it calmly."""
    letters = MemoryDeadLetterStore()
    broker = MemoryBroker()
    transport = MemoryTransport(dead_letters=letters, queue=unique_name, broker=broker)
    EventBus(transport=transport)
    store = ListStore()
    install_audit(store)
    transport.start()
    try:
        for deep in (b'{"id":' + b"[" * 5000 + b"]" * 5000 + b"}",
                     b'{"id":"d-1","data":' + b"{\"a\":" * 5000 + b"1" + b"}" * 5001):  # fmt: skip
            broker.put(unique_name, Received(deep, destination=unique_name))
        wait_until(lambda: letters.count() == 2 and transport.idle(), what="the dead letters")
    finally:
        transport.close()
        uninstall_audit()
    assert [r.kind for r in store.records] == ["rejected", "rejected"]
    assert all(r.event_id is None for r in store.records)


@pytest.mark.integration
def test_redis_lookups_span_buckets_and_indexes_expire_after_max_age(redis_url, unique_name):
    """Records of one request in two buckets are found together; every index key expires."""
    client = redis.Redis.from_url(redis_url)
    store = RedisAuditStore(client, prefix=unique_name, max_age=2)
    try:
        store.write([record(event_id="first")])
        bucket = int(time.time() // 2)
        wait_until(lambda: int(time.time() // 2) > bucket, timeout=5, what="the next bucket")
        store.write([record(event_id="second")])
        assert [r.event_id for r in store.by_correlation("c-1")] == ["first", "second"]
        assert [r.event_id for r in store.by_tenant("acme", limit=1)] == ["second"]
        assert [r.event_id for r in store.by_tenant("acme")] == ["second", "first"]
        indexes = [
            key
            for key in client.scan_iter(f"{unique_name}:*")
            if not key.endswith((b":log", b":layout"))
        ]
        assert len(indexes) == 6
        assert all(0 < client.ttl(key) <= 2 + 2 + 1 for key in indexes)
    finally:
        for key in client.scan_iter(f"{unique_name}:*"):
            client.delete(key)
        client.close()


@pytest.mark.integration
def test_a_reader_finds_records_written_with_another_retention(redis_url, unique_name):
    """A store opened with the default max_age finds what a one-hour writer wrote, and back."""
    client = redis.Redis.from_url(redis_url)
    try:
        RedisAuditStore(client, prefix=unique_name, max_age=3600).write([record(event_id="h")])
        reader = RedisAuditStore(client, prefix=unique_name)
        assert [r.event_id for r in reader.by_correlation("c-1")] == ["h"]
        client.hset(f"{unique_name}:layout", mapping={"bucket": 1, "max_age": 10**9})
        assert reader.by_correlation("c-1") == [], "an untrusted layout: the reader's own"
    finally:
        for key in client.scan_iter(f"{unique_name}:*"):
            client.delete(key)
        client.close()


@pytest.mark.integration
def test_a_forked_child_writes_its_own_records_and_not_its_parents(store, unique_name):
    """After fork the child's writer records the child's runs; the parent's queue stays its own."""
    bus = EventBus()
    bus.add_handler(lambda event: None, OrderPlaced, name="h")
    install_audit(store, flush_interval=60)
    try:
        with event_context(correlation_id=f"{unique_name}-parent"):
            bus.publish(OrderPlaced())  # queued, not yet written, when the child is forked
        pid = os.fork()
        if pid == 0:  # the child: publish, flush, leave without running the parent's atexit
            code = 1
            try:
                with event_context(correlation_id=f"{unique_name}-child"):
                    bus.publish(OrderPlaced())
                uninstall_audit()
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        uninstall_audit()
    child = store.by_correlation(f"{unique_name}-child")
    assert [r.kind for r in child] == ["published", "handled"]
    assert {r.worker.rsplit(":", 1)[1] for r in child} == {str(pid)}
    parent = store.by_correlation(f"{unique_name}-parent")
    assert [r.kind for r in parent] == ["published", "handled"]
    assert {r.worker.rsplit(":", 1)[1] for r in parent} == {str(os.getpid())}


def test_a_redelivered_event_is_a_duplicate_record(unique_name):
    """The same envelope delivered twice behind an inbox is one handled and one duplicate record."""
    broker = MemoryBroker()
    transport = MemoryTransport(
        dead_letters=MemoryDeadLetterStore(), inbox=MemoryInbox(), queue=unique_name, broker=broker
    )
    bus = EventBus(transport=transport)
    bus.add_handler(lambda event: None, OrderPlaced, name="billing.once")
    store = ListStore()
    install_audit(store)
    transport.start()
    try:
        order = OrderPlaced()
        body = default_codec.encode(order)
        for _ in range(2):
            broker.put(unique_name, Received(body, destination=unique_name))
        wait_until(transport.idle, what="both deliveries")
    finally:
        transport.close()
        uninstall_audit()
    assert [(r.kind, r.outcome) for r in store.by_event(order.event_id)] == [
        ("handled", "ok"),
        ("duplicate", "duplicate"),
    ]


def test_the_audit_records_beside_opentelemetry_tracing():
    """With tracing installed too, both see every publish and run (the hooks fan out)."""
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415 - the otel extra
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: PLC0415
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: PLC0415
        InMemorySpanExporter,
    )

    from tidings.integrations.otel import install_tracing, uninstall_tracing  # noqa: PLC0415

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    store = ListStore()
    install_tracing(provider)
    install_audit(store)
    try:
        bus = EventBus()
        bus.add_handler(lambda event: None, OrderPlaced, name="h")
        bus.publish(OrderPlaced())
    finally:
        uninstall_audit()
        uninstall_tracing()
        provider.shutdown()
    assert sorted(r.kind for r in store.records) == ["handled", "published"]
    assert sorted(span.name.split()[0] for span in exporter.get_finished_spans()) == [
        "handle",
        "publish",
    ]


def test_records_still_queued_are_written_when_the_process_exits(tmp_path):
    """A process that exits without uninstall_audit still writes what its queue held."""
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    program = f"""
from dataclasses import dataclass
from typing import ClassVar

from tidings import DomainEvent, EventBus, event_context, register_event
from tidings.audit import install_audit
from tidings.audit.sql import SqlAuditStore


@register_event
@dataclass(frozen=True)
class OrderPlaced(DomainEvent):
    event_type: ClassVar[str] = "audit_exit.order_placed"


store = SqlAuditStore.from_url({url!r})
store.create_tables()
install_audit(store, flush_interval=3600)  # only the exit can write in time
bus = EventBus()
bus.add_handler(lambda event: None, OrderPlaced, name="h")
with event_context(correlation_id="at-exit"):
    bus.publish(OrderPlaced())
"""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)])}
    subprocess.run([sys.executable, "-c", program], check=True, cwd=root, env=env, timeout=60)  # noqa: S603
    store = SqlAuditStore.from_url(url)
    try:
        assert [r.kind for r in store.by_correlation("at-exit")] == ["published", "handled"]
    finally:
        store.close()


def _tracing_queue_length() -> int:
    installed = _tracing.installed("audit")
    assert installed is not None
    return len(installed.writer._queue)  # type: ignore[attr-defined]


def test_a_hung_store_cannot_hang_uninstall(monkeypatch, caplog):
    """With the store's write stuck, uninstall_audit returns after its timeouts and warns."""
    monkeypatch.setattr(_writer, "CLOSE_TIMEOUT", 0.2)
    store = ListStore()
    store.gate.clear()
    bus = EventBus()
    install_audit(store, batch=1, flush_interval=0.01)
    try:
        bus.publish(OrderPlaced())  # the writer takes it and hangs in write
        wait_until(lambda: not _tracing_queue_length(), what="the writer to take the record")
        bus.publish(OrderPlaced())  # this one waits in the queue
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="tidings.audit"):
            uninstall_audit()
        assert time.monotonic() - started < 5
    finally:
        store.gate.set()
    messages = [r.getMessage() for r in caplog.records if r.name == "tidings.audit"]
    assert any("1 because the store refused them" in m and "under way" in m for m in messages)
