import asyncio

import pytest
import sqlalchemy as sa
from sqlalchemy import orm
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

import tidings.outbox
from conftest import require_server
from tidings.errors import UsageError
from tidings.outbox import AggregateRoot, Backoff, Outbox, Relay, install_session_hook
from tidings.testing.outbox import Features, OutboxConformance, Probe, Recorder


class TestSqliteOutbox(OutboxConformance):
    features = Features()

    @pytest.fixture
    def outbox_engine(self, tmp_path):
        engine = sa.create_engine(f"sqlite:///{tmp_path / 'outbox.db'}")
        yield engine
        engine.dispose()


@pytest.fixture(scope="module")
def pg_engine():
    engine = sa.create_engine(require_server("postgresql"))
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def mariadb_engine():
    engine = sa.create_engine(require_server("mariadb"))
    yield engine
    engine.dispose()


@pytest.mark.integration
class TestPostgresOutbox(OutboxConformance):
    features = Features(skip_locked=True, concurrent_writers=True, listen_notify=True)

    @pytest.fixture
    def outbox_engine(self, pg_engine):
        return pg_engine


@pytest.mark.integration
class TestMariadbOutbox(OutboxConformance):
    features = Features(skip_locked=True, concurrent_writers=True)

    @pytest.fixture
    def outbox_engine(self, mariadb_engine):
        return mariadb_engine


# -- the aggregate root and the session hook -------------------------------------------------


def _mapped_order(metadata, name):
    class Base(orm.DeclarativeBase):
        pass

    Base.metadata = metadata

    class Order(AggregateRoot, Base):
        __tablename__ = name
        id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
        status: orm.Mapped[str] = orm.mapped_column(sa.String(20))

        def place(self):
            self.status = "placed"
            self.record(Probe(aggregate_id="ignored", seq=1))

        def remind(self):
            self.record(Probe(aggregate_id="ignored", seq=2))

    return Order


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def orm_setup(request, tmp_path, unique_name):
    if request.param == "sqlite":
        engine = sa.create_engine(f"sqlite:///{tmp_path / 'orm.db'}")
    else:
        engine = sa.create_engine(require_server("postgresql"))
    metadata = sa.MetaData()
    outbox = Outbox(metadata, table_name=f"{unique_name}_outbox")
    order = _mapped_order(metadata, f"{unique_name}_orders")
    metadata.create_all(engine)
    factory = orm.sessionmaker(engine, expire_on_commit=False)
    remove = install_session_hook(factory, outbox)
    try:
        yield engine, outbox, order, factory
    finally:
        remove()
        metadata.drop_all(engine)
        engine.dispose()


def test_session_hook_writes_recorded_events_at_flush_keyed_by_aggregate(orm_setup):
    """Changing an aggregate and committing stores its events, keyed by its new primary key."""
    engine, outbox, order_class, factory = orm_setup
    with factory() as session, session.begin():
        order = order_class()
        order.place()
        session.add(order)
    with engine.connect() as connection:
        rows = connection.execute(sa.select(outbox.table.c.partition_key)).scalars().all()
    assert rows == [str(order.id)]
    assert order.pull_events() == []


def test_session_hook_rollback_leaves_nothing(orm_setup):
    """A session that flushed recorded events and then rolled back leaves no outbox row."""
    engine, outbox, order_class, factory = orm_setup
    with factory() as session:
        order = order_class()
        order.place()
        session.add(order)
        session.flush()
        session.rollback()
    assert outbox.status(engine).pending == 0


def test_session_hook_writes_events_of_an_unchanged_aggregate_at_commit(orm_setup):
    """An aggregate that records an event without changing a column still gets it written."""
    engine, outbox, order_class, factory = orm_setup
    with factory() as session, session.begin():
        session.add(order_class(id=7, status="new"))
    with factory() as session, session.begin():
        session.get(order_class, 7).remind()
    recorder = Recorder()
    assert Relay(engine, outbox, recorder, listen=False).run_once() == 1
    assert [event.seq for event in recorder.events] == [2]
    assert outbox.table.name  # the table stays for the fixture to drop


@pytest.mark.integration
def test_add_async_stores_in_the_async_transaction(unique_name):
    """add_async writes in an AsyncSession's transaction: commit keeps it, rollback drops it."""
    pytest.importorskip("greenlet")
    url = require_server("postgresql")
    outbox = Outbox(table_name=unique_name)
    engine = sa.create_engine(url)
    outbox.create_tables(engine)

    async def scenario():
        async_engine = create_async_engine(url)
        try:
            async with AsyncSession(async_engine) as session:
                async with session.begin():
                    await outbox.add_async(session, Probe(aggregate_id="kept"))
                async with session.begin():
                    await outbox.add_async(session, Probe(aggregate_id="dropped"))
                    await session.rollback()
            async with async_engine.begin() as connection:
                await outbox.add_async(connection, Probe(aggregate_id="conn"))
        finally:
            await async_engine.dispose()

    try:
        asyncio.run(scenario())
        keys = {lag.partition_key for lag in outbox.status(engine).partitions}
        assert keys == {"kept", "conn"}
    finally:
        outbox.drop_tables(engine)
        engine.dispose()


# -- units ------------------------------------------------------------------------------------


def test_backoff_grows_to_its_bound():
    """Delays double from initial up to maximum and never exceed it."""
    backoff = Backoff(initial=1, maximum=5, jitter=0)
    assert [backoff.delay(n) for n in range(1, 6)] == [1, 2, 4, 5, 5]
    assert backoff.delay(10_000) == 5
    with pytest.raises(ValueError, match="initial <= maximum"):
        Backoff(initial=2, maximum=1)


def test_add_refuses_what_is_not_an_event_and_long_keys(tmp_path):
    """Add refuses non-events and over-long partition keys, writing nothing."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'o.db'}")
    outbox = Outbox()
    outbox.create_tables(engine)
    with engine.begin() as connection:
        with pytest.raises(UsageError, match="DomainEvent"):
            outbox.add(connection, "not an event")
        with pytest.raises(UsageError, match="partition keys"):
            outbox.add(connection, Probe(), partition_key="k" * 201)
        outbox.add(connection)  # nothing to add is fine
    assert outbox.status(engine).pending == 0
    engine.dispose()


def test_relay_rejects_bad_settings_and_dialects():
    """A relay needs a positive batch and poll interval, and a supported database."""
    engine = sa.create_engine("sqlite://")
    with pytest.raises(ValueError, match="batch_size"):
        Relay(engine, Outbox(), Recorder(), batch_size=0)
    engine.dialect.name = "oracle"
    with pytest.raises(NotImplementedError, match="PostgreSQL, MariaDB/MySQL and SQLite"):
        Relay(engine, Outbox(), Recorder())


def test_unknown_names_are_attribute_errors():
    """The package's lazy names do not hide a typo."""
    with pytest.raises(AttributeError, match="Outbx"):
        _ = tidings.outbox.Outbx
