import re
import sys
from collections.abc import Iterator

import pytest
import redis
import sqlalchemy as sa

from conftest import require_server
from tidings import TidingsError
from tidings.deadletter import DeadLetterStoreURLError, find, iter_matching, open_store
from tidings.deadletter.redis import RedisDeadLetterStore
from tidings.deadletter.sql import SqlDeadLetterStore, dead_letters_table
from tidings.errors import UsageError
from tidings.memory import MemoryDeadLetterStore
from tidings.ports import DeadLetter, DeadLetterFilter, DeadLetterStore, FilteringDeadLetterStore
from tidings.testing.deadletter import DeadLetterStoreConformance, sample_letter


class TestMemoryDeadLetterStore(DeadLetterStoreConformance):
    def make_store(self) -> DeadLetterStore:
        return MemoryDeadLetterStore()


@pytest.mark.integration
class TestRedisDeadLetterStore(DeadLetterStoreConformance):
    @pytest.fixture
    def store(self, redis_url: str, unique_name: str) -> Iterator[DeadLetterStore]:
        store = RedisDeadLetterStore.from_url(redis_url, prefix=unique_name)
        client = redis.Redis.from_url(redis_url)
        try:
            yield store
        finally:
            keys = list(client.scan_iter(match=f"{unique_name}:*"))
            if keys:
                client.delete(*keys)
            client.close()
            store.close()


def _sql_store(url: str, table_name: str) -> Iterator[SqlDeadLetterStore]:
    engine = sa.create_engine(url)
    store = SqlDeadLetterStore(engine, table_name=table_name)
    store.create_tables()
    try:
        yield store
    finally:
        store.table.drop(engine, checkfirst=True)
        engine.dispose()


class TestSqliteDeadLetterStore(DeadLetterStoreConformance):
    @pytest.fixture
    def store(self, tmp_path) -> Iterator[DeadLetterStore]:
        yield from _sql_store(f"sqlite:///{tmp_path / 'dead.db'}", "tidings_dead_letters")


@pytest.mark.integration
class TestPostgresDeadLetterStore(DeadLetterStoreConformance):
    @pytest.fixture
    def store(self, unique_name: str) -> Iterator[DeadLetterStore]:
        yield from _sql_store(require_server("postgresql"), unique_name)


@pytest.mark.integration
class TestMariaDbDeadLetterStore(DeadLetterStoreConformance):
    @pytest.fixture
    def store(self, unique_name: str) -> Iterator[DeadLetterStore]:
        yield from _sql_store(require_server("mariadb"), unique_name)


def test_open_store_picks_the_store_by_scheme(tmp_path):
    """memory://, sqlite:/// and redis:// URLs give the in-process, SQL and Redis stores."""
    assert isinstance(open_store("memory://"), MemoryDeadLetterStore)
    sql_store = open_store(f"sqlite:///{tmp_path / 'dead.db'}", name="my_letters")
    assert isinstance(sql_store, SqlDeadLetterStore)
    assert sql_store.table.name == "my_letters"
    sql_store.close()
    redis_store = open_store("redis://127.0.0.1:6379/0", name="app:dlq")
    assert isinstance(redis_store, RedisDeadLetterStore)
    assert redis_store.prefix == "app:dlq"
    redis_store.close()


def test_open_store_takes_rediss_urls():
    """A rediss:// (TLS) URL gives a Redis store too."""
    store = open_store("rediss://127.0.0.1:6380/0")
    assert isinstance(store, RedisDeadLetterStore)
    store.close()


@pytest.mark.parametrize(
    ("module", "url", "fix"),
    [
        ("redis", "redis://127.0.0.1:6379/0", "pip install 'tidings[redis]'"),
        ("sqlalchemy", "sqlite:///dead.db", "pip install 'tidings[sql]'"),
        # mysql:// means PyMySQL (the driver tidings' mysql extra installs)
        ("pymysql", "mysql://root@127.0.0.1/test", "tidings[mysql]' and use a mysql+pymysql"),
    ],
)
def test_open_store_names_what_to_install_when_a_library_is_missing(monkeypatch, module, url, fix):
    """A missing extra or database driver raises ImportError saying what to install."""
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=re.escape(fix)):
        open_store(url)


def test_sql_store_urls_get_the_driver_tidings_installs():
    """postgres:// and mysql:// URLs open with psycopg 3 and PyMySQL, as users write them."""
    for url, driver in (("postgres://postgres@127.0.0.1:5432/test", "psycopg"),
                        ("mysql://root@127.0.0.1:3306/test", "pymysql")):  # fmt: skip
        store = SqlDeadLetterStore.from_url(url)
        try:
            assert store._engine.dialect.driver == driver
        finally:
            store.close()


@pytest.mark.parametrize(
    "url", ["amqp://guest@localhost//", "http://example.com/", "nonsense", "/var/dead.db", ""]
)
def test_open_store_refuses_unknown_schemes_and_lists_known_ones(url):
    """A URL that names no known store raises a TidingsError that shows URLs that work."""
    with pytest.raises(DeadLetterStoreURLError, match=r"redis://.*sqlite:///") as caught:
        open_store(url)
    assert isinstance(caught.value, TidingsError)
    assert isinstance(caught.value, ValueError)


def test_open_store_hides_the_password_in_its_error():
    """The error for a bad URL never repeats the password it held."""
    with pytest.raises(DeadLetterStoreURLError) as caught:
        open_store("//user:s3cret@host/db")
    assert "s3cret" not in str(caught.value)


def test_redis_store_refuses_a_client_that_decodes_responses():
    """A client made with decode_responses=True is refused, since a body may not be text."""
    client = redis.Redis(decode_responses=True)
    with pytest.raises(UsageError, match="decode_responses=False"):
        RedisDeadLetterStore(client)
    client.close()


def test_stores_refuse_a_negative_limit_or_offset(tmp_path):
    """A negative limit or offset raises ValueError rather than returning an odd slice."""
    sql_store = SqlDeadLetterStore.from_url(f"sqlite:///{tmp_path / 'dead.db'}")
    sql_store.create_tables()
    redis_store = RedisDeadLetterStore(redis.Redis())
    for store in (sql_store, redis_store):
        with pytest.raises(ValueError, match=">= 0"):
            store.list(limit=-1)
        with pytest.raises(ValueError, match=">= 0"):
            store.list(offset=-1)
    sql_store.close()


def test_sql_store_refuses_a_failed_at_that_is_not_iso(tmp_path):
    """A failed_at that is not ISO-8601 is refused with a message naming the field."""
    store = SqlDeadLetterStore.from_url(f"sqlite:///{tmp_path / 'dead.db'}")
    store.create_tables()
    with pytest.raises(ValueError, match="failed_at must be an ISO-8601"):
        store.add(sample_letter(failed_at="yesterday"))
    store.close()


def test_sql_store_normalises_failed_at_to_utc(tmp_path):
    """A failed_at written with another offset comes back as the same instant in UTC."""
    store = SqlDeadLetterStore.from_url(f"sqlite:///{tmp_path / 'dead.db'}")
    store.create_tables()
    letter = sample_letter(failed_at="2026-01-02T05:04:05+02:00")
    store.add(letter)
    got = store.get(letter.id)
    assert got is not None
    assert got.failed_at == "2026-01-02T03:04:05.000000+00:00"
    store.close()


def test_sql_table_lives_on_the_metadata_given_for_migrations():
    """The table is declared on the caller's MetaData (for Alembic), and redeclaring reuses it."""
    metadata = sa.MetaData()
    store = SqlDeadLetterStore(sa.create_engine("sqlite://"), metadata=metadata)
    assert metadata.tables["tidings_dead_letters"] is store.table
    assert dead_letters_table(metadata) is store.table
    assert [index.name for index in store.table.indexes] == ["ix_tidings_dead_letters_failed_at"]


def test_sql_table_name_taken_by_another_table_is_refused():
    """A MetaData holding an unrelated table of the same name is refused with a fix."""
    metadata = sa.MetaData()
    sa.Table("tidings_dead_letters", metadata, sa.Column("id", sa.Integer, primary_key=True))
    with pytest.raises(ValueError, match="pick another name"):
        dead_letters_table(metadata)


@pytest.fixture
def redis_prefix(redis_url: str, unique_name: str) -> Iterator[tuple[redis.Redis, str]]:
    """A client and a key prefix of the test's own, deleted afterwards."""
    client = redis.Redis.from_url(redis_url)
    try:
        yield client, unique_name
    finally:
        keys = list(client.scan_iter(match=f"{unique_name}:*"))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.mark.integration
def test_redis_store_keeps_at_most_max_letters_oldest_going_first(redis_prefix):
    """Past max_letters, each add removes the oldest letters: the newest max_letters stay."""
    client, prefix = redis_prefix
    store = RedisDeadLetterStore(client, prefix=prefix, max_letters=5)
    letters = [sample_letter(reason=f"E: {n}") for n in range(12)]
    for letter in letters:
        store.add(letter)
    assert store.count() == 5
    assert [got.id for got in store.list()] == [letter.id for letter in reversed(letters[-5:])]
    assert store.get(letters[0].id) is None
    assert not client.exists(f"{prefix}:letter:{letters[0].id}"), "the hash was left behind"


@pytest.mark.integration
def test_redis_store_forgets_letters_older_than_max_age(redis_prefix):
    """Letters older than max_age go at the next add (or trim); younger ones stay."""
    client, prefix = redis_prefix
    old = sample_letter(reason="E: old")
    RedisDeadLetterStore(client, prefix=prefix).add(old)
    client.zadd(f"{prefix}:index", {old.id: 1000.0})  # written long ago
    store = RedisDeadLetterStore(client, prefix=prefix, max_age=3600)
    young = sample_letter(reason="E: young")
    store.add(young)
    assert [got.id for got in store.list()] == [young.id]
    assert not client.exists(f"{prefix}:letter:{old.id}")
    client.zadd(f"{prefix}:index", {young.id: 1000.0})
    assert store.trim() == 1
    assert store.count() == 0


@pytest.mark.integration
def test_redis_store_retention_defaults_and_url_options(redis_url, unique_name):
    """The defaults are 14 days and 100,000 letters; the store URL can change or turn them off."""
    store = RedisDeadLetterStore.from_url(redis_url, prefix=unique_name)
    assert (store.max_age, store.max_letters, store.max_body_bytes) == (
        14 * 24 * 3600,
        100_000,
        1024 * 1024,
    )
    store.close()
    url = f"{redis_url}?max_age=60&max_letters=none&max_body_bytes=100&socket_timeout=5"
    store = open_store(url, name=unique_name)
    assert isinstance(store, RedisDeadLetterStore)
    assert (store.max_age, store.max_letters, store.max_body_bytes) == (60.0, None, 100)
    store.close()
    with pytest.raises(ValueError, match="positive"):
        RedisDeadLetterStore.from_url(f"{redis_url}?max_letters=0")


def _cut_letter() -> DeadLetter:
    headers = {f"h{n}": "v" for n in range(5000)}
    headers["long"] = "x" * 100_000
    return sample_letter(
        body=b"\x00\xff" * (1024 * 1024),
        reason="E: " + "r" * 100_000,
        traceback="t" * 100_000 + "END",
        event_id="i" * 1_000_000,
        headers=headers,
    )


def _assert_cut(got: DeadLetter | None) -> None:
    assert got is not None
    assert got.body == (b"\x00\xff" * (1024 * 1024))[: 1024 * 1024]
    assert len(got.reason) < 10_000
    assert "cut by the store" in got.reason
    assert "body from 2097152 to 1048576 bytes" in got.reason
    assert got.traceback.endswith("END")
    assert len(got.traceback) <= 16_001
    assert got.event_id is not None
    assert len(got.event_id) == 1024
    assert len(got.headers) == 64
    assert all(len(k) <= 1024 and len(v) <= 1024 for k, v in got.headers.items())


@pytest.mark.integration
def test_redis_store_cuts_over_long_letters_instead_of_refusing_them(redis_prefix):
    """A 2 MiB body, 5000 headers and a 1 MB event id are stored cut, the cut noted."""
    client, prefix = redis_prefix
    store = RedisDeadLetterStore(client, prefix=prefix)
    letter = _cut_letter()
    store.add(letter)
    _assert_cut(store.get(letter.id))


@pytest.mark.parametrize("server", ["sqlite", "postgresql"])
def test_sql_store_cuts_over_long_letters_instead_of_refusing_them(server, tmp_path, unique_name):
    """The SQL store cuts an over-long letter as the Redis store does, and notes it."""
    url = f"sqlite:///{tmp_path / 'dead.db'}" if server == "sqlite" else require_server(server)
    for store in _sql_store(url, unique_name):
        letter = _cut_letter()
        store.add(letter)
        _assert_cut(store.get(letter.id))
        small = sample_letter(body=b"x" * 100)
        bounded = SqlDeadLetterStore(store._engine, table_name=unique_name, max_body_bytes=10)
        bounded.add(small)
        got = store.get(small.id)
        assert got is not None
        assert got.body == b"x" * 10
        assert got.reason.endswith("[cut by the store: body from 100 to 10 bytes]")


class _PlainStore:
    """A third-party store: the DeadLetterStore protocol and nothing more."""

    def __init__(self) -> None:
        self._inner = MemoryDeadLetterStore()
        self.add, self.get, self.list = self._inner.add, self._inner.get, self._inner.list
        self.remove, self.purge, self.count = (
            self._inner.remove,
            self._inner.purge,
            self._inner.count,
        )


class TestPlainDeadLetterStore(DeadLetterStoreConformance):
    def make_store(self) -> DeadLetterStore:
        store = _PlainStore()
        assert isinstance(store, DeadLetterStore)
        assert not isinstance(store, FilteringDeadLetterStore)
        return store


def test_iter_matching_pages_a_plain_store_through_list_once_each():
    """A store without iter_matching is read through list, a page at a time, each letter once."""
    store = _PlainStore()
    letters = [sample_letter(n, handler=("a", "b")[n % 2]) for n in range(7)]
    for letter in letters:
        store.add(letter)
    calls = []
    listing = store.list

    def counting_list(*, limit: int = 100, offset: int = 0) -> list[DeadLetter]:
        calls.append((limit, offset))
        return listing(limit=limit, offset=offset)

    store.list = counting_list
    got = list(iter_matching(store, DeadLetterFilter(handler="b"), page_size=2))
    assert got == letters[5::-2]
    assert calls == [(2, 0), (2, 2), (2, 4), (2, 6), (2, 7)]
    with pytest.raises(ValueError, match="page_size"):
        iter_matching(store, DeadLetterFilter(), page_size=0)


@pytest.mark.integration
def test_redis_filter_reads_past_one_index_page_and_fetches_only_matches(redis_prefix):
    """A filter over more letters than one index page finds every match, newest first."""
    client, prefix = redis_prefix
    store = RedisDeadLetterStore(client, prefix=prefix)
    letters = [sample_letter(n, handler="rare" if n % 100 == 7 else "common") for n in range(1050)]
    for letter in letters:
        store.add(letter)
    rare = [letter for letter in reversed(letters) if letter.handler == "rare"]
    assert list(store.iter_matching(DeadLetterFilter(handler="rare"), page_size=2)) == rare
    assert find(store, DeadLetterFilter(handler="rare"), limit=3, offset=9) == rare[9:]


@pytest.mark.integration
def test_redis_iter_matching_reads_letters_of_one_score_once_each(redis_prefix):
    """Letters indexed at the same score (two writers at once) are each yielded once, in pages."""
    client, prefix = redis_prefix
    store = RedisDeadLetterStore(client, prefix=prefix)
    letters = [sample_letter(n) for n in range(7)]
    for letter in letters:
        store.add(letter)
    client.zadd(f"{prefix}:index", {letter.id: 1_700_000_000.5 for letter in letters[2:6]})
    got = [letter.id for letter in store.iter_matching(DeadLetterFilter(), page_size=2)]
    assert sorted(got) == sorted(letter.id for letter in letters)
    assert len(got) == len(letters)
    where = DeadLetterFilter(reason="EventDecodeError")
    assert len(list(store.iter_matching(where, page_size=1))) == len(letters)
