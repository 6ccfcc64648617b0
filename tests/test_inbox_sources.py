"""The inbox key is (handler, source, event id), and entries of the old key still count."""

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import ClassVar

import pytest
import redis
import sqlalchemy as sa
from click.testing import CliRunner
from tests.conftest import require_server

from tidings import DomainEvent, EventBus, register_event
from tidings.cli import make_cli
from tidings.codec import Codec
from tidings.delivery import Dispatcher, Received
from tidings.inbox._keys import LEGACY_SOURCE
from tidings.inbox.redis import RedisInbox
from tidings.inbox.sql import SqlInbox
from tidings.memory import MemoryDeadLetterStore, MemoryInbox
from tidings.testing.workers import wait_until
from tidings.transports.redis_streams import RedisStreamsTransport

HANDLER = "sources.record"


@register_event
@dataclass(frozen=True)
class StockCounted(DomainEvent):
    event_type: ClassVar[str] = "inbox_sources.stock_counted"
    sku: str = ""


def _body(event: DomainEvent, source: str) -> bytes:
    return Codec(source=source).encode(event)


def _service(inbox) -> tuple[Dispatcher, list[str]]:
    bus = EventBus()
    ran: list[str] = []
    bus.add_handler(lambda e: ran.append(e.sku), StockCounted, name=HANDLER)
    return Dispatcher(bus, inbox=inbox, dead_letters=MemoryDeadLetterStore()), ran


def _legacy_table(engine: sa.Engine, name: str) -> None:
    """Create the inbox table as earlier versions did, keyed (handler, event_id)."""
    table = sa.Table(
        name,
        sa.MetaData(),
        sa.Column("handler", sa.String(200), primary_key=True),
        sa.Column("event_id", sa.String(64), primary_key=True),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=False),
    )
    table.create(engine)


def _old_row(engine: sa.Engine, name: str, event_id: str) -> None:
    with engine.begin() as connection:
        connection.execute(
            sa.text(f"INSERT INTO {name} (handler, event_id, processed_at) VALUES (:h, :e, :t)"),  # noqa: S608 - the test's own table
            {"h": HANDLER, "e": event_id, "t": datetime.now(UTC)},
        )


@pytest.fixture(params=["memory", "sqlite", "redis", "postgresql", "mariadb"])
def inbox(request, tmp_path, unique_name) -> Iterator[object]:
    """Each inbox of tidings, on its own keys or table."""
    kind = request.param
    if kind == "memory":
        yield MemoryInbox()
        return
    if kind == "redis":
        client = redis.Redis.from_url(require_server("redis"))
        yield RedisInbox(client, prefix=unique_name)
        for key in client.scan_iter(f"{unique_name}*"):
            client.delete(key)
        client.close()
        return
    url = f"sqlite:///{tmp_path / 'inbox.db'}" if kind == "sqlite" else require_server(kind)
    engine = sa.create_engine(url)
    store = SqlInbox(engine, table_name=unique_name[:60])
    store.create_tables()
    yield store
    store.table.drop(engine)
    engine.dispose()


def test_an_event_id_reused_by_another_source_is_not_a_duplicate(inbox):
    """Two producers (sources) sending one event id each run the handler: twice in all."""
    dispatcher, ran = _service(inbox)
    event = StockCounted(sku="a")
    reused = StockCounted(event_id=event.event_id, sku="b")
    dispatcher.dispatch(Received(_body(event, "/warehouse")))
    dispatcher.dispatch(Received(_body(reused, "/shop")))
    assert ran == ["a", "b"]


def test_the_same_source_and_event_id_runs_once(inbox):
    """A redelivery from the same source is a duplicate: the handler runs once."""
    dispatcher, ran = _service(inbox)
    body = _body(StockCounted(sku="a"), "/warehouse")
    first = dispatcher.dispatch(Received(body))
    again = dispatcher.dispatch(Received(body))
    assert ran == ["a"]
    assert first.handled == (HANDLER,)
    assert again.duplicates == (HANDLER,)


def test_a_batch_claims_by_source_too(inbox):
    """In one batch, the reused id of another source runs, the repeated (source, id) does not."""
    dispatcher, ran = _service(inbox)
    event = StockCounted(sku="a")
    bodies = [
        _body(event, "/warehouse"),
        _body(StockCounted(event_id=event.event_id, sku="b"), "/shop"),
        _body(event, "/warehouse"),
    ]
    dispatcher.dispatch_many([Received(body) for body in bodies])
    assert sorted(ran) == ["a", "b"]


@pytest.mark.integration
def test_a_redis_mark_under_the_old_key_still_suppresses(redis_url, unique_name):
    """A done mark written as {prefix}:{handler}:{event_id} keeps the handler from running."""
    client = redis.Redis.from_url(redis_url)
    try:
        store = RedisInbox(client, prefix=unique_name)
        event = StockCounted(sku="a")
        client.set(f"{unique_name}:{HANDLER}:{event.event_id}", "done")
        dispatcher, ran = _service(store)
        dispatcher.dispatch(Received(_body(event, "/warehouse")))
        later = StockCounted(sku="c")
        client.set(f"{unique_name}:{HANDLER}:{later.event_id}", "done")
        dispatcher.dispatch_many(
            [Received(_body(later, "/shop")), Received(_body(StockCounted(sku="d"), "/shop"))]
        )
        assert ran == ["d"]
        assert store.is_done(HANDLER, event.event_id, source="/anything")
        without = RedisInbox(client, prefix=unique_name, legacy_keys=False)
        assert not without.is_done(HANDLER, event.event_id, source="/anything")
    finally:
        for key in client.scan_iter(f"{unique_name}*"):
            client.delete(key)
        client.close()


def test_a_redis_source_with_colons_cannot_spell_another_pairs_key():
    """Sources and ids containing ':' give distinct keys: the source's length is in the key."""
    store = RedisInbox(redis.Redis(), prefix="p")
    assert store.key("h", "c", "a:b") != store.key("h", "b:c", "a")
    assert store.key("h", "e", "/x") == "p:h:s2:/x:e"
    assert store.key("h", "e") == "p:h:e"


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def old_table(request, tmp_path, unique_name) -> Iterator[tuple[sa.Engine, str]]:
    """An inbox table of the layout of earlier versions, with no source column."""
    url = (
        f"sqlite:///{tmp_path / 'old.db'}"
        if request.param == "sqlite"
        else require_server(request.param)
    )
    engine = sa.create_engine(url)
    name = unique_name[:60]
    _legacy_table(engine, name)
    yield engine, name
    with engine.begin() as connection:
        connection.execute(sa.text(f"DROP TABLE IF EXISTS {name}"))
    engine.dispose()


def test_an_unmigrated_sql_table_keeps_working_as_before(old_table, caplog):
    """A table without a source column is used as it is, its rows suppress, with a warning."""
    engine, name = old_table
    event = StockCounted(sku="a")
    _old_row(engine, name, event.event_id)
    dispatcher, ran = _service(SqlInbox(engine, table_name=name))
    with caplog.at_level("WARNING", "tidings.inbox"):
        dispatcher.dispatch(Received(_body(event, "/warehouse")))
        dispatcher.dispatch(Received(_body(StockCounted(sku="b"), "/warehouse")))
    assert ran == ["b"]
    assert "tidings inbox migrate" in caplog.text


def test_a_migrated_sql_table_keeps_old_rows_done_and_tells_sources_apart(old_table):
    """After migrate() old rows still suppress, and a reused id of two sources runs twice."""
    engine, name = old_table
    event = StockCounted(sku="a")
    _old_row(engine, name, event.event_id)
    store = SqlInbox(engine, table_name=name)
    assert store.migrate() is True
    assert store.migrate() is False  # already done: left alone
    columns = {column["name"] for column in sa.inspect(engine).get_columns(name)}
    assert "source" in columns
    with engine.connect() as connection:
        (source,) = connection.execute(sa.text(f"SELECT source FROM {name}")).one()  # noqa: S608
    assert source == LEGACY_SOURCE
    dispatcher, ran = _service(store)
    dispatcher.dispatch(Received(_body(event, "/warehouse")))
    fresh = StockCounted(sku="b")
    dispatcher.dispatch(Received(_body(fresh, "/warehouse")))
    dispatcher.dispatch(Received(_body(StockCounted(event_id=fresh.event_id, sku="c"), "/shop")))
    dispatcher.dispatch(Received(_body(fresh, "/warehouse")))
    assert ran == ["b", "c"]


@contextmanager
def _consuming(transport: RedisStreamsTransport) -> Iterator[None]:
    stopping = threading.Event()
    thread = threading.Thread(target=transport.run, args=(stopping,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stopping.set()
        thread.join(30)
        assert not thread.is_alive(), "the consumers did not stop"


@pytest.mark.integration
def test_a_worker_runs_an_id_reused_by_two_producers_twice(redis_url, unique_name):
    """On Redis Streams, two producers publishing one event id both reach the handler."""
    client = redis.Redis.from_url(redis_url)
    common = {"stream_prefix": f"{unique_name}:stream", "block_ms": 100}

    def transport(source: str) -> RedisStreamsTransport:
        return RedisStreamsTransport(
            client,
            service=unique_name,
            codec=Codec(source=source),
            inbox=RedisInbox(client, prefix=f"{unique_name}:inbox"),
            dead_letters=MemoryDeadLetterStore(),
            **common,
        )

    try:
        worker = transport("/tidings")
        bus = EventBus(transport=worker)
        bus.add_handler(
            lambda e: client.rpush(f"{unique_name}:ran", e.sku), StockCounted, name=HANDLER
        )
        warehouse, shop = (
            EventBus(transport=transport("/warehouse")),
            EventBus(transport=transport("/shop")),
        )
        event = StockCounted(sku="a")
        warehouse.publish(event)
        shop.publish(StockCounted(event_id=event.event_id, sku="b"))
        warehouse.publish(event)  # the warehouse's retry: a duplicate
        shop.publish(StockCounted(sku="end"))
        with _consuming(worker):
            wait_until(lambda: b"end" in client.lrange(f"{unique_name}:ran", 0, -1), what="end")
        assert client.lrange(f"{unique_name}:ran", 0, -1) == [b"a", b"b", b"end"]
    finally:
        for key in client.scan_iter(f"{unique_name}*"):
            client.delete(key)
        client.close()


def test_the_inbox_migrate_command_migrates_once_and_says_so(old_table):
    """`tidings inbox migrate` adds the source column, then finds nothing more to do."""
    engine, name = old_table
    _old_row(engine, name, "e-1")
    url = engine.url.render_as_string(hide_password=False)
    first = CliRunner().invoke(make_cli(), ["inbox", "migrate", "--db", url, "--table", name])
    assert first.exit_code == 0, first.output
    assert "Migrated" in first.output
    assert SqlInbox(engine, table_name=name).is_done(HANDLER, "e-1", source="/any")
    again = CliRunner().invoke(make_cli(), ["inbox", "migrate", "--db", url, "--table", name])
    assert again.exit_code == 0, again.output
    assert "already keyed" in again.output
