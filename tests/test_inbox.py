import contextlib
import functools
import importlib
import logging
import sys
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import orm

from conftest import require_server
from tidings.errors import InboxBusyError
from tidings.inbox.redis import RedisInbox
from tidings.inbox.sql import NotInGuardError, SqlInbox, current_connection
from tidings.memory import MemoryInbox
from tidings.testing.inbox import (
    BUSY,
    DEADLINE,
    Features,
    HandlerError,
    InboxConformance,
    attempt,
)


def _redis_inbox(url, prefix):
    return RedisInbox(redis.Redis.from_url(url), prefix=prefix)


def _sql_inbox(url, table_name):
    return SqlInbox(sa.create_engine(url), table_name=table_name)


def _wait_for(condition, what):
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        threading.Event().wait(0.01)


class TestMemoryInbox(InboxConformance):
    features = Features(busy_error_while_claimed=True)

    @pytest.fixture(autouse=True)
    def _store(self):
        self.inbox = MemoryInbox()

    def make_inbox(self):
        return self.inbox


@pytest.mark.integration
class TestRedisInbox(InboxConformance):
    features = Features(
        busy_error_while_claimed=True, claim_expires=True, shared_between_processes=True
    )

    @pytest.fixture(autouse=True)
    def _store(self, redis_client, redis_url, unique_name):
        self.client, self.url, self.prefix = redis_client, redis_url, unique_name
        yield
        keys = list(redis_client.scan_iter(f"{unique_name}:*"))
        if keys:
            redis_client.delete(*keys)

    def make_inbox(self):
        return RedisInbox(self.client, prefix=self.prefix)

    def make_expiring_inbox(self, lease):
        return RedisInbox(self.client, prefix=self.prefix, lease=lease)

    def inbox_factory(self):
        return functools.partial(_redis_inbox, self.url, self.prefix)

    def test_keys_are_readable_and_expire(self):
        """A claim is prefix:handler:event_id with the lease's TTL; the done mark has keep's."""
        inbox = RedisInbox(self.client, prefix=self.prefix, lease=30, keep=3600)
        key = f"{self.prefix}:orders.notify:e-1"
        with inbox.guard("orders.notify", "e-1"):
            assert 0 < self.client.pttl(key) <= 30_000
            assert self.client.get(key) != b"done"
        assert self.client.get(key) == b"done"
        assert 3_590_000 < self.client.pttl(key) <= 3_600_000
        assert inbox.is_done("orders.notify", "e-1")

    def test_late_finisher_warns_and_still_marks_unclaimed_pair(self, caplog):
        """A handler that outlived its lease, with nobody taking over, marks done and warns."""
        inbox = RedisInbox(self.client, prefix=self.prefix, lease=0.05)
        with caplog.at_level(logging.WARNING, "tidings.inbox"), inbox.guard("h", "e") as fresh:
            assert fresh
            _wait_for(lambda: not self.client.exists(inbox.key("h", "e")), "the lease to lapse")
        assert inbox.is_done("h", "e")
        assert "outlived its 0.1 s inbox lease" in caplog.text

    def test_failing_late_holder_leaves_the_new_claim_alone(self, caplog):
        """A handler that fails after its lease lapsed does not release the new holder's claim."""
        late, taker = RedisInbox(self.client, prefix=self.prefix, lease=0.05), self.make_inbox()

        def outlive_lease_then_fail():
            with late.guard("h", "e"):
                _wait_for(lambda: attempt(taker, "h", "e") is not BUSY, "the lease to lapse")
                raise HandlerError

        with caplog.at_level(logging.WARNING, "tidings.inbox"), pytest.raises(HandlerError):
            outlive_lease_then_fail()
        assert "had expired before its handler failed" in caplog.text
        assert late.is_done("h", "e")  # the taker's done mark was not deleted

    def test_a_mark_redis_refuses_is_logged_at_the_connection_next_use(self, caplog):
        """A done mark refused by Redis is reported when its reply is read, and nothing raises."""
        inbox = self.make_inbox()
        key = inbox.key("h", "e")
        with caplog.at_level(logging.ERROR, "tidings.inbox"):
            with inbox.guard("h", "e"):
                self.client.delete(key)
                self.client.hset(key, "not", "a claim")  # the mark script's GET now fails
            assert not inbox.is_done("h", "another")  # reads the reply the mark got
        assert "h on event e may not be marked done" in caplog.text

    def test_a_mark_is_seen_by_the_next_guard_of_any_instance(self, redis_url):
        """Once a guard returned, a guard of another instance or client sees the pair done."""
        first = self.make_inbox()
        other = RedisInbox(redis.Redis.from_url(redis_url), prefix=self.prefix)
        for n in range(50):
            with first.guard("h", f"seen-{n}") as fresh:
                assert fresh
            with other.guard("h", f"seen-{n}") as fresh:
                assert not fresh
        other.client.close()

    def test_busy_retry_after_is_the_remaining_lease(self):
        """retry_after is the holder's remaining lease, or the lease for a claim without TTL."""
        inbox = RedisInbox(self.client, prefix=self.prefix, lease=30)
        with inbox.guard("h", "e"), pytest.raises(InboxBusyError) as busy, inbox.guard("h", "e"):
            pass
        assert 29 < busy.value.retry_after <= 30
        self.client.set(inbox.key("h", "forever"), "someone")
        with pytest.raises(InboxBusyError) as busy, inbox.guard("h", "forever"):
            pass
        assert busy.value.retry_after == 30

    def test_works_with_decoded_responses(self, redis_url):
        """A client with decode_responses=True gives the same answers."""
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        try:
            inbox = RedisInbox(client, prefix=self.prefix)
            with inbox.guard("h", "e") as fresh:
                assert fresh
            assert inbox.is_done("h", "e")
            with inbox.guard("h", "e") as fresh:
                assert not fresh
        finally:
            client.close()

    def test_a_guard_after_its_connection_was_closed_reconnects(self):
        """An inbox connection closed by the server fails one claim, then is replaced."""
        inbox = self.make_inbox()
        with inbox.guard("h", "e1"):
            pass
        own_id = inbox._call("CLIENT", "ID")  # the one connection the inbox keeps so far
        self.client.client_kill_filter(_id=own_id)
        with pytest.raises(redis.ConnectionError), inbox.guard("h", "e2"):
            pass
        with inbox.guard("h", "e3") as fresh:
            assert fresh
        assert inbox.is_done("h", "e1")
        assert inbox.is_done("h", "e3")
        assert not inbox.is_done("h", "e2")

    def test_short_lived_threads_share_the_kept_connections(self):
        """Guards from threads that each run once leave one kept connection, not one each."""
        inbox = self.make_inbox()
        for n in range(20):
            thread = threading.Thread(target=attempt, args=(inbox, "h", f"e{n}"))
            thread.start()
            thread.join()
        assert len(inbox._idle) == 1
        assert all(inbox.is_done("h", f"e{n}") for n in range(20))

    def test_a_huge_event_id_makes_a_short_key(self):
        """A 1 MiB event id (or handler name) is hashed into the key; short ones are kept."""
        inbox = self.make_inbox()
        huge = "x" * (1024 * 1024)
        with inbox.guard("h", huge) as fresh:
            assert fresh
        assert inbox.is_done("h", huge)
        assert not inbox.is_done("h", huge[:-1] + "y")
        assert len(inbox.key("h", huge)) < len(self.prefix) + 100
        assert len(inbox.key(huge, "e")) < len(self.prefix) + 100
        assert inbox.key("h", "e" * 128) == f"{self.prefix}:h:{'e' * 128}"
        assert inbox.key("h", "e" * 129) != inbox.key("h", "e" * 128)
        keys = list(self.client.scan_iter(f"{self.prefix}:*"))
        assert keys
        assert all(len(k) < 200 for k in keys)

    def test_refuses_non_positive_durations(self):
        """A lease or keep of zero or less is refused with the values in the message."""
        with pytest.raises(ValueError, match="lease=0"):
            RedisInbox(self.client, lease=0)


class _SqlStore(InboxConformance):
    features = Features(
        waits_for_holder=True,
        gives_up_waiting=True,
        rollback_discards_effects=True,
        shared_between_processes=True,
    )
    single_writer = False

    def open_store(self, url, engine, impatient, table_name):
        self.url, self.engine, self.impatient, self.table_name = url, engine, impatient, table_name
        metadata = sa.MetaData()
        self.inbox = SqlInbox(engine, table_name=table_name, metadata=metadata)
        self.effects = sa.Table(
            f"{table_name}_fx", metadata, sa.Column("value", sa.String(64), primary_key=True)
        )
        self.inbox.create_tables()
        self.effects.create(engine)
        return metadata

    def make_inbox(self):
        return SqlInbox(self.engine, table_name=self.table_name)

    def make_impatient_inbox(self):
        return SqlInbox(self.impatient, table_name=self.table_name)

    def record_effect(self, value):
        current_connection().execute(self.effects.insert().values(value=value))

    def committed_effects(self):
        with self.engine.connect() as connection:
            return list(connection.execute(sa.select(self.effects.c.value)).scalars())

    def inbox_factory(self):
        return functools.partial(_sql_inbox, self.url, self.table_name)

    def blocked_claimers(self):
        raise NotImplementedError

    def wait_for_blocked_claimer(self):
        _wait_for(lambda: self.blocked_claimers() > 0, "a claimer to wait on the row lock")

    def test_current_connection_outside_a_guard_says_how_to_use_it(self):
        """current_connection() outside a guard raises NotInGuardError, a LookupError."""
        with pytest.raises(NotInGuardError, match=r"inside `with inbox\.guard") as raised:
            current_connection()
        assert isinstance(raised.value, LookupError)

    def test_nested_guards_restore_the_outer_connection(self):
        """A guard inside another exposes its own connection, then the outer one again."""
        if self.single_writer:
            pytest.skip("one writer at a time: see test_nested_claim_waits_for_the_single_writer")
        with self.inbox.guard("outer", "e") as fresh:
            outer = current_connection()
            with self.inbox.guard("inner", "e"):
                assert current_connection() is not outer
            assert fresh
            assert current_connection() is outer
        with pytest.raises(NotInGuardError):
            current_connection()

    def test_orm_session_on_the_guard_connection_joins_its_transaction(self):
        """A Session bound to current_connection() commits only when the guard does."""
        for event_id, fail in (("kept", False), ("dropped", True)):
            with contextlib.suppress(HandlerError), self.inbox.guard("h", event_id):
                with orm.Session(bind=current_connection()) as session:
                    session.execute(self.effects.insert().values(value=event_id))
                    session.commit()
                if fail:
                    raise HandlerError
        assert self.committed_effects() == ["kept"]

    def test_keys_longer_than_their_columns_are_hashed_not_refused(self):
        """An over-long handler or event id claims its hashed key: once, distinct, never cut."""
        long_id, other = "e" * 65, "e" * 64 + "f"
        with self.inbox.guard("h" * 201, long_id) as fresh:
            assert fresh
        with self.inbox.guard("h" * 201, long_id) as fresh:
            assert not fresh
        assert self.inbox.is_done("h" * 201, long_id)
        assert not self.inbox.is_done("h" * 201, other)
        with self.inbox.guard("h", "e" * 64) as fresh:  # at the bound: stored as it is
            assert fresh
        with self.engine.connect() as connection:
            rows = connection.execute(sa.select(self.inbox.table.c.event_id)).scalars().all()
        assert "e" * 64 in rows
        assert all(len(value) <= 64 for value in rows)

    def test_prune_deletes_only_older_rows(self):
        """prune() removes rows processed before the cut-off and reports how many."""
        for event_id in ("a", "b"):
            with self.inbox.guard("h", event_id):
                pass
        assert self.inbox.prune(datetime.now(UTC) - timedelta(hours=1)) == 0
        assert self.inbox.prune(datetime.now(UTC) + timedelta(minutes=1)) == 2
        assert not self.inbox.is_done("h", "a")

    def test_prune_by_age_goes_in_batches(self):
        """prune() takes a retention or an instant and deletes older rows in small batches."""
        for n in range(7):
            with self.inbox.guard("h", f"e{n}"):
                pass
        assert self.inbox.prune(timedelta(hours=1), batch_size=3) == 0
        assert self.inbox.prune(datetime.now(UTC) + timedelta(minutes=1), batch_size=3) == 7
        assert not self.inbox.is_done("h", "e6")


class TestSqliteInbox(_SqlStore):
    single_writer = True

    @pytest.fixture(autouse=True)
    def _store(self, tmp_path, unique_name):
        url = f"sqlite:///{tmp_path / 'inbox.db'}"
        engine = sa.create_engine(url)
        impatient = sa.create_engine(url, connect_args={"timeout": 0.2})
        self.inserts = 0
        sa.event.listen(engine, "before_cursor_execute", self._count_insert)
        self.open_store(url, engine, impatient, unique_name)
        yield
        engine.dispose()
        impatient.dispose()

    def _count_insert(self, conn, cursor, statement, *args):
        # SQLite waits inside its busy handler, invisible from outside: count claims sent.
        if statement.startswith(f"INSERT INTO {self.table_name} "):
            self.inserts += 1

    def blocked_claimers(self):
        return self.inserts - 1

    def test_nested_claim_waits_for_the_single_writer(self):
        """On SQLite a guard that claims inside another waits for it, then gives up: busy."""
        inner = self.make_impatient_inbox()
        with self.inbox.guard("outer", "e"), pytest.raises(InboxBusyError), inner.guard("in", "e"):
            pass

    def test_rejects_an_unsupported_dialect(self):
        """An engine of another database is refused, naming the supported ones."""
        engine = sa.create_engine("sqlite://")
        engine.dialect.name = "oracle"
        with pytest.raises(NotImplementedError, match="PostgreSQL, MariaDB/MySQL and SQLite"):
            SqlInbox(engine)


@pytest.fixture(scope="module")
def pg_engines():
    url = require_server("postgresql")
    engine = sa.create_engine(url)
    impatient = sa.create_engine(url, connect_args={"options": "-c lock_timeout=300"})
    yield url, engine, impatient
    engine.dispose()
    impatient.dispose()


@pytest.fixture(scope="module")
def mariadb_engines():
    url = require_server("mariadb")
    engine = sa.create_engine(url)
    wait = "SET SESSION innodb_lock_wait_timeout = 1"
    impatient = sa.create_engine(url, connect_args={"init_command": wait})
    yield url, engine, impatient
    engine.dispose()
    impatient.dispose()


@pytest.mark.integration
class TestPostgresInbox(_SqlStore):
    @pytest.fixture(autouse=True)
    def _store(self, pg_engines, unique_name):
        metadata = self.open_store(*pg_engines, unique_name)
        yield
        metadata.drop_all(self.engine)

    def blocked_claimers(self):
        query = sa.text(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE wait_event_type = 'Lock' AND query LIKE :pattern"
        )
        with self.engine.connect() as connection:
            return connection.execute(query, {"pattern": f"%{self.table_name}%"}).scalar_one()


@pytest.mark.integration
class TestMariadbInbox(_SqlStore):
    @pytest.fixture(autouse=True)
    def _store(self, mariadb_engines, unique_name):
        metadata = self.open_store(*mariadb_engines, unique_name)
        yield
        metadata.drop_all(self.engine)

    def blocked_claimers(self):
        # A claim that has not returned yet is still listed with its statement.
        query = sa.text(
            "SELECT count(*) FROM information_schema.processlist WHERE info LIKE :pattern"
        )
        pattern = f"INSERT IGNORE INTO {self.table_name} %"
        with self.engine.connect() as connection:
            return connection.execute(query, {"pattern": pattern}).scalar_one()


@pytest.mark.parametrize(
    ("module", "dependency", "extra"),
    [("tidings.inbox.redis", "redis", "redis"), ("tidings.inbox.sql", "sqlalchemy", "sql")],
)
def test_adapter_without_its_dependency_names_the_extra(monkeypatch, module, dependency, extra):
    """Importing an adapter whose library is missing says which extra to install."""
    monkeypatch.setitem(sys.modules, dependency, None)
    monkeypatch.delitem(sys.modules, module)
    with pytest.raises(ImportError, match=rf"pip install 'tidings\[{extra}\]'"):
        importlib.import_module(module)
