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
"""

from __future__ import annotations

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
from tidings.inbox._keys import MAX_EMBEDDED, bounded

__all__ = ["NotInGuardError", "SqlInbox", "current_connection", "inbox_table"]

HANDLER_LENGTH = 200
EVENT_ID_LENGTH = 64
PRUNE_BATCH = 1000
"""Rows :meth:`SqlInbox.prune` deletes per transaction."""

_connection: ContextVar[sa.Connection] = ContextVar("tidings_inbox_connection")

# Errors that mean "someone else holds the row, try later", by driver.
_PG_BUSY = {"55P03", "40P01", "40001"}  # lock_not_available, deadlock, serialization failure
_MYSQL_BUSY = {1205, 1213}  # lock wait timeout, deadlock
_SQLITE_BUSY = {5, 6}  # SQLITE_BUSY, SQLITE_LOCKED (primary codes)


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

    Columns: ``handler`` (200 chars) and ``event_id`` (64 chars), together the primary key, and
    ``processed_at``, when the effect was claimed (UTC; committed with the effect). A handler
    name longer than 128 characters, or an event id longer than 64, is stored as its marked
    SHA-256 (``~sha256~`` and hex digits, see :mod:`tidings.inbox._keys`), which fits.
    """
    return sa.Table(
        name,
        metadata,
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

    Contract: see :class:`~tidings.ports.Inbox` and the module docstring. A guard holds one
    pooled connection and one transaction for as long as it is open. Nothing is retried here:
    a database error propagates and the transaction rolls back, so the delivery can be retried.
    Thread-safe and process-safe (the database serializes claims); the instance holds no
    mutable state, and :func:`current_connection` is per thread and per task.
    """

    def __init__(
        self,
        engine: sa.Engine,
        *,
        table_name: str = "tidings_inbox",
        metadata: sa.MetaData | None = None,
    ) -> None:
        metadata = sa.MetaData() if metadata is None else metadata
        existing = metadata.tables.get(table_name)
        self.engine = engine
        self.table = inbox_table(metadata, table_name) if existing is None else existing
        self._insert = _insert_ignoring_duplicates(engine.dialect.name, self.table)

    def create_tables(self) -> None:
        """Create the inbox table if it does not exist (use a migration in production)."""
        self.table.create(self.engine, checkfirst=True)

    @contextmanager
    def guard(self, handler: str, event_id: str) -> Iterator[bool]:
        """Claim (handler, event_id) in a new transaction; see the class and module docstrings.

        While the block runs, :func:`current_connection` returns the guard's connection. The
        transaction commits when the block ends normally and rolls back when it raises.

        A handler name or event id too long for its column is claimed by its marked SHA-256
        (see :func:`inbox_table`), never truncated into a collision nor refused.

        Raises:
            InboxBusyError: the database gave up waiting for another worker's claim.
        """
        handler_key, event_key = _keys(handler, event_id)
        row = {"handler": handler_key, "event_id": event_key, "processed_at": datetime.now(UTC)}
        with self.engine.begin() as connection:
            try:
                fresh = connection.execute(self._insert, row).rowcount == 1
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

    def is_done(self, handler: str, event_id: str) -> bool:
        """Whether (handler, event_id) took effect (its row is committed)."""
        handler_key, event_key = _keys(handler, event_id)
        query = sa.select(sa.func.count()).where(
            self.table.c.handler == handler_key, self.table.c.event_id == event_key
        )
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
        c = self.table.c
        older = c.processed_at < before
        pick = sa.select(c.handler, c.event_id).where(older).limit(batch_size)
        pruned = 0
        while True:
            with self.engine.begin() as connection:
                keys = [tuple(row) for row in connection.execute(pick)]
                if not keys:
                    return pruned
                statement = sa.delete(self.table).where(
                    older, sa.tuple_(c.handler, c.event_id).in_(keys)
                )
                pruned += connection.execute(statement).rowcount
            if len(keys) < batch_size:
                return pruned


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
    original = error.orig
    if dialect == "postgresql":
        return getattr(original, "sqlstate", None) in _PG_BUSY
    if dialect == "sqlite":
        return (getattr(original, "sqlite_errorcode", 0) & 0xFF) in _SQLITE_BUSY
    args: tuple[object, ...] = getattr(original, "args", ())  # MySQL drivers: (errno, message)
    return bool(args) and args[0] in _MYSQL_BUSY
