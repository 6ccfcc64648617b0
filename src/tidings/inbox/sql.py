"""A SQL inbox: the done mark is a row committed in the same transaction as the handler's writes.

Where the guarantee holds: a handler that writes through :func:`current_connection` (or a
``Session(bind=current_connection())``) commits its effects and the inbox row together, or
neither; in that database the effect happens exactly once. Effects elsewhere (another database,
Redis, an e-mail) are not in the transaction and happen at least once.

Two workers racing on one pair: the second insert waits on the first one's row lock (the
database does the waiting, so this store raises no :class:`~tidings.errors.InboxBusyError` while
a claim is held). When the first commits, the second sees the row: ``False``; when it rolls
back, the second proceeds: ``True``. If the database gives up waiting (PostgreSQL
``lock_timeout``, MariaDB ``innodb_lock_wait_timeout``, SQLite's busy ``timeout``), or picks the
waiter as a deadlock victim, the guard raises :class:`~tidings.errors.InboxBusyError` (with
``retry_after`` 1 s: how long the holder will take is unknown) so that the delivery is retried.
On PostgreSQL above READ COMMITTED, a conflict with a concurrent commit is a serialization
failure, reported the same way. SQLite allows one writer at a time: guards there run one after
another, and a guard opened inside another one in the same thread can only give up.

Keys are (handler, source, event id): the producer's CloudEvents ``source`` is part of the
primary key, so that an event id reused by another producer is not taken for a duplicate.
Tables of earlier versions, keyed (handler, event id), keep working:

- Until migrated (:meth:`SqlInbox.migrate`, or ``tidings inbox migrate --db URL``), a table
  without a ``source`` column is used as before, keyed (handler, event id), with one warning
  per inbox instance: nothing changes for it, producers are not told apart yet.
- Migrating adds the column; existing rows get the source :data:`~tidings.inbox._keys.LEGACY_SOURCE`
  (its column default), and with ``legacy_keys`` (the default) a claim whose (handler, event id)
  has such a row is answered "already done": an upgrade repeats no effect. Once the broker can
  no longer redeliver what those rows guard (after a prune, say), ``legacy_keys=False`` saves
  the lookup.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta

try:
    import sqlalchemy as sa
    from sqlalchemy.dialects import mysql, postgresql, sqlite
except ImportError as exc:
    msg = "tidings.inbox.sql needs SQLAlchemy: pip install 'tidings[sql]'"
    raise ImportError(msg) from exc

from tidings._untrusted import log_safe
from tidings.errors import InboxBusyError, TidingsError
from tidings.inbox._busy import is_busy
from tidings.inbox._keys import LEGACY_SOURCE, MAX_EMBEDDED, bounded

__all__ = ["NotInGuardError", "SqlInbox", "current_connection", "inbox_table"]

HANDLER_LENGTH = 200
SOURCE_LENGTH = 200
EVENT_ID_LENGTH = 64
PRUNE_BATCH = 1000
"""Rows :meth:`SqlInbox.prune` deletes per transaction."""

_connection: ContextVar[sa.Connection] = ContextVar("tidings_inbox_connection")
log = logging.getLogger("tidings.inbox")


class NotInGuardError(TidingsError, LookupError):
    """:func:`current_connection` was called outside a :meth:`SqlInbox.guard` block."""


def current_connection() -> sa.Connection:
    """Return the connection of the innermost open :meth:`SqlInbox.guard` in this context.

    Write the handler's effects through it so that they commit (or roll back) together with the
    inbox row. It belongs to the guard's thread or task: do not hand it to another thread.

    Raises:
        NotInGuardError: no guard is open in this thread or task.
    """
    try:
        return _connection.get()
    except LookupError:
        msg = (
            "no SqlInbox guard is open here: call current_connection() inside "
            "`with inbox.guard(handler, event_id):`, in the same thread or task"
        )
        raise NotInGuardError(msg) from None


def inbox_table(metadata: sa.MetaData, name: str = "tidings_inbox") -> sa.Table:
    """Define the inbox table on ``metadata`` (for Alembic autogenerate) and return it.

    Columns: ``handler`` (200 chars), ``source`` (200 chars: the producer's CloudEvents
    ``source``; rows of earlier versions have :data:`~tidings.inbox._keys.LEGACY_SOURCE`, the
    column's default) and ``event_id`` (64 chars), together the primary key, and
    ``processed_at``, when the effect was claimed (UTC; committed with the effect). A handler
    name or source longer than 128 characters, or an event id longer than 64, is stored as its
    marked SHA-256 (``~sha256~`` and hex digits, see :mod:`tidings.inbox._keys`), which fits.
    """
    return sa.Table(
        name,
        metadata,
        sa.Column("handler", sa.String(HANDLER_LENGTH), primary_key=True),
        sa.Column(
            "source",
            sa.String(SOURCE_LENGTH),
            primary_key=True,
            server_default=sa.text(f"'{LEGACY_SOURCE}'"),
        ),
        sa.Column("event_id", sa.String(EVENT_ID_LENGTH), primary_key=True),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=False),
    )


def _legacy_table(name: str) -> sa.Table:
    """The inbox table of earlier versions, keyed (handler, event_id), as it is on disk."""
    return sa.Table(
        name,
        sa.MetaData(),
        sa.Column("handler", sa.String(HANDLER_LENGTH), primary_key=True),
        sa.Column("event_id", sa.String(EVENT_ID_LENGTH), primary_key=True),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=False),
    )


class SqlInbox:
    """An :class:`~tidings.ports.Inbox` in a SQL table: effects in that database happen once.

    Args:
        engine: where the table lives: PostgreSQL (psycopg), MariaDB/MySQL (pymysql) or SQLite.
        table_name: the table's name.
        metadata: the application's ``MetaData`` to define the table on (so that Alembic sees
            it); a private one if omitted. A table of that name already on it is reused.
        legacy_keys: count rows written before keys had a source (see the module docstring)
            as done for every source.

    Contract: see :class:`~tidings.ports.Inbox` and the module docstring. A guard holds one
    pooled connection and one transaction for as long as it is open. Nothing is retried here:
    a database error propagates and the transaction rolls back, so the delivery can be retried.
    Thread-safe and process-safe (the database serializes claims); the instance holds no
    state but which layout its table has, looked up once, on first use), and
    :func:`current_connection` is per thread and per task.
    """

    by_source = True
    """Keys tell producers apart: the worker passes each event's ``source`` (see ports)."""

    def __init__(
        self,
        engine: sa.Engine,
        *,
        table_name: str = "tidings_inbox",
        metadata: sa.MetaData | None = None,
        legacy_keys: bool = True,
    ) -> None:
        metadata = sa.MetaData() if metadata is None else metadata
        existing = metadata.tables.get(table_name)
        self.engine = engine
        self.table = inbox_table(metadata, table_name) if existing is None else existing
        self.legacy_keys = legacy_keys
        _insert_ignoring_duplicates(engine.dialect.name, self.table)  # refuses other databases
        # Which layout the table on disk has: None until first use (see _in_use).
        self._layout: tuple[sa.Table, sa.Insert] | None = None

    def _in_use(self) -> tuple[sa.Table, sa.Insert]:
        """The table as it is on disk, and its insert: looked up once, on first use.

        A table without a ``source`` column (made by an earlier version) is used as it is,
        keyed (handler, event_id), with a warning saying how to migrate it.
        """
        if self._layout is not None:
            return self._layout
        table = self.table
        if "source" in table.c and not _has_source(self.engine, table.name):
            table = _legacy_table(table.name)
            log.warning(
                "the inbox table %s has the layout of earlier tidings versions (no source "
                "column): it is used as before, and an event id reused by another producer "
                "is taken for a duplicate until you run `tidings inbox migrate --db URL "
                "--table %s` (or SqlInbox.migrate())",
                log_safe(table.name),
                log_safe(table.name),
            )
        self._layout = (table, _insert_ignoring_duplicates(self.engine.dialect.name, table))
        return self._layout

    def create_tables(self) -> None:
        """Create the inbox table if it does not exist (use a migration in production)."""
        self.table.create(self.engine, checkfirst=True)
        self._layout = None  # looked up again: the table may have been there, older

    def migrate(self) -> bool:
        """Give a table of earlier versions its ``source`` column; return whether it had to.

        Existing rows get :data:`~tidings.inbox._keys.LEGACY_SOURCE` (done for any source, while
        ``legacy_keys``), and the primary key becomes (handler, source, event_id). PostgreSQL
        and SQLite do it in one transaction; MariaDB in one ``ALTER TABLE`` (which rebuilds the
        table: prune it first if it is large). Workers started before keep using the old
        layout until they restart, harmlessly (their rows count as done for every source).
        Safe to run again: a table that has the column is left alone.

        Raises:
            TidingsError: the table does not exist.
        """
        name = self.table.name
        inspector = sa.inspect(self.engine)
        if not inspector.has_table(name):
            msg = f"there is no inbox table {name!r} to migrate: create it with create_tables()"
            raise TidingsError(msg)
        if _has_source(self.engine, name):
            return False
        dialect = self.engine.dialect.name
        quote = self.engine.dialect.identifier_preparer.quote
        quoted = quote(name)
        column = f"source VARCHAR({SOURCE_LENGTH}) NOT NULL DEFAULT '{LEGACY_SOURCE}'"
        with self.engine.begin() as connection:
            if dialect == "postgresql":
                key = inspector.get_pk_constraint(name).get("name") or f"{name}_pkey"
                connection.exec_driver_sql(
                    f"ALTER TABLE {quoted} ADD COLUMN {column}, DROP CONSTRAINT {quote(key)}, "
                    "ADD PRIMARY KEY (handler, source, event_id)"
                )
            elif dialect in ("mysql", "mariadb"):
                connection.exec_driver_sql(
                    f"ALTER TABLE {quoted} ADD COLUMN {column} AFTER handler, DROP PRIMARY KEY, "
                    "ADD PRIMARY KEY (handler, source, event_id)"
                )
            else:  # SQLite cannot change a primary key: copy into a new table
                staging = inbox_table(sa.MetaData(), f"{name}__tidings_migrating")
                staging.create(connection)
                # Identifiers quoted by the dialect; the source is our own constant.
                connection.exec_driver_sql(
                    f"INSERT INTO {quote(staging.name)} (handler, source, event_id, processed_at) "  # noqa: S608
                    f"SELECT handler, '{LEGACY_SOURCE}', event_id, processed_at FROM {quoted}"
                )
                connection.exec_driver_sql(f"DROP TABLE {quoted}")
                connection.exec_driver_sql(f"ALTER TABLE {quote(staging.name)} RENAME TO {quoted}")
        self._layout = None
        return True

    @contextmanager
    def guard(self, handler: str, event_id: str, source: str | None = None) -> Iterator[bool]:
        """Claim (handler, source, event_id) in a new transaction; see the class and module.

        ``source`` is the producer's CloudEvents ``source`` (the worker passes it); ``None``
        claims the row of earlier versions' key, (handler, event_id) with the legacy source.

        While the block runs, :func:`current_connection` returns the guard's connection. The
        transaction commits when the block ends normally and rolls back when it raises.

        A handler name or event id too long for its column is claimed by its marked SHA-256
        (see :func:`inbox_table`), never truncated into a collision nor refused.

        Raises:
            InboxBusyError: the database gave up waiting for another worker's claim.
        """
        table, insert = self._in_use()
        handler_key, event_key = _keys(handler, event_id)
        row = {"handler": handler_key, "event_id": event_key, "processed_at": datetime.now(UTC)}
        source_key = _source_key(source)
        if "source" in table.c:
            row["source"] = source_key
        with self.engine.begin() as connection:
            try:
                fresh = connection.execute(insert, row).rowcount == 1
                if fresh and self.legacy_keys and "source" in table.c and source is not None:
                    # Done under the key of earlier versions: done (the new row commits too).
                    fresh = not _exists(connection, table, handler_key, LEGACY_SOURCE, event_key)
            except sa.exc.DBAPIError as exc:
                if not _is_busy(self.engine.dialect.name, exc):
                    raise
                msg = (
                    f"{log_safe(handler)} is already handling event {log_safe(event_id)} in "
                    "another worker and the database gave up waiting; deliver it again later"
                )
                raise InboxBusyError(msg, retry_after=1.0) from exc
            token = _connection.set(connection)
            try:
                yield fresh
            finally:
                _connection.reset(token)

    def is_done(self, handler: str, event_id: str, source: str | None = None) -> bool:
        """Whether (handler, source, event_id) took effect (its row is committed).

        With ``legacy_keys``, a row of earlier versions for (handler, event_id) counts.
        """
        table, _ = self._in_use()
        handler_key, event_key = _keys(handler, event_id)
        where = [table.c.handler == handler_key, table.c.event_id == event_key]
        if "source" in table.c:
            sources = {_source_key(source)}
            if self.legacy_keys:
                sources.add(LEGACY_SOURCE)
            where.append(table.c.source.in_(sorted(sources)))
        query = sa.select(sa.func.count()).where(*where)
        with self.engine.connect() as connection:
            return bool(connection.execute(query).scalar_one())

    def prune(self, before: datetime | timedelta, *, batch_size: int = PRUNE_BATCH) -> int:
        """Delete rows processed before ``before``; return how many went.

        ``before`` is a tz-aware instant, or a ``timedelta``: rows older than that (processed
        before now minus it). Every row is a done effect (a claim commits with its effect), so
        nothing in progress is touched. Rows go in batches of ``batch_size``, one short
        transaction each, so that pruning a large table never holds long locks; rows committed
        meanwhile with an older ``processed_at`` may survive this call. A redelivery of a
        pruned pair runs its effect again: keep rows longer than the broker may redeliver.

        Raises:
            ValueError: ``batch_size`` is below 1, or ``before`` is a negative ``timedelta``.
        """
        if batch_size < 1:
            msg = f"batch_size must be >= 1, not {batch_size}"
            raise ValueError(msg)
        if isinstance(before, timedelta):
            if before < timedelta(0):
                msg = f"a retention must not be negative, not {before}"
                raise ValueError(msg)
            before = datetime.now(UTC) - before
        table, _ = self._in_use()
        c = table.c
        key = list(table.primary_key.columns)
        older = c.processed_at < before
        pick = sa.select(*key).where(older).limit(batch_size)
        pruned = 0
        while True:
            with self.engine.begin() as connection:
                keys = [tuple(row) for row in connection.execute(pick)]
                if not keys:
                    return pruned
                statement = sa.delete(table).where(older, sa.tuple_(*key).in_(keys))
                pruned += connection.execute(statement).rowcount
            if len(keys) < batch_size:
                return pruned


def _source_key(source: str | None) -> str:
    """The ``source`` column value of a pair: the legacy source for none, hashed when long."""
    return LEGACY_SOURCE if source is None else bounded(source, MAX_EMBEDDED)


def _has_source(engine: sa.Engine, name: str) -> bool:
    """Whether table ``name`` on disk has a ``source`` column (a missing table: as if it had)."""
    inspector = sa.inspect(engine)
    if not inspector.has_table(name):
        return True  # created later by create_tables(), with the current layout
    return any(column["name"] == "source" for column in inspector.get_columns(name))


def _exists(
    connection: sa.Connection, table: sa.Table, handler: str, source: str, event_id: str
) -> bool:
    """Whether the row (handler, source, event_id) is there (committed, or ours)."""
    c = table.c
    query = sa.select(sa.literal(1)).where(
        c.handler == handler, c.source == source, c.event_id == event_id
    )
    return connection.execute(query).first() is not None


def _keys(handler: str, event_id: str) -> tuple[str, str]:
    """The (handler, event_id) column values of a pair: hashed when too long to fit."""
    return bounded(handler, MAX_EMBEDDED), bounded(event_id, EVENT_ID_LENGTH)


def _insert_ignoring_duplicates(dialect: str, table: sa.Table) -> sa.Insert:
    """Build "insert this row unless its key is present" in the dialect's own words.

    The answer is the row count, which SQLAlchemy keeps for an INSERT only when asked to.
    """
    statement: sa.Insert
    if dialect == "postgresql":
        statement = postgresql.insert(table).on_conflict_do_nothing()
    elif dialect == "sqlite":
        statement = sqlite.insert(table).on_conflict_do_nothing()
    elif dialect in ("mysql", "mariadb"):
        # Safe here because guard() bounds lengths first: IGNORE would otherwise truncate.
        statement = mysql.insert(table).prefix_with("IGNORE")
    else:
        msg = f"SqlInbox supports PostgreSQL, MariaDB/MySQL and SQLite, not {dialect!r}"
        raise NotImplementedError(msg)
    return statement.execution_options(preserve_rowcount=True)


def _is_busy(dialect: str, error: sa.exc.DBAPIError) -> bool:
    """Whether a driver error means another transaction holds the row (so: retry later)."""
    return is_busy(dialect, error.orig)
