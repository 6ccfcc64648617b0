"""Writing to the outbox inside the business transaction: ``Outbox``, aggregates, session hook."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tidings import _tracing
from tidings.codec import Codec, default_codec
from tidings.errors import UsageError
from tidings.events import DomainEvent
from tidings.outbox._common import default_partition_key, row_key
from tidings.outbox._table import (
    as_utc,
    check_dialect,
    orm,
    outbox_table,
    quarantine_name,
    quarantine_table,
    sa,
    utcnow,
)

__all__ = [
    "AggregateRoot",
    "Outbox",
    "OutboxStatus",
    "PartitionLag",
    "QuarantinedRow",
    "StuckRow",
    "default_partition_key",
    "install_session_hook",
]

_PENDING = "_tidings_recorded_events"
_HELD = "tidings_recorded_aggregates"


@dataclass(frozen=True, slots=True)
class PartitionLag:
    """How far one partition key is behind: unpublished rows and the age of the oldest."""

    partition_key: str
    pending: int
    oldest_age: float


@dataclass(frozen=True, slots=True)
class StuckRow:
    """A pending row that failed at least once: its id, key, type, attempts and age (s)."""

    id: int
    partition_key: str
    event_type: str
    attempts: int
    age: float


@dataclass(frozen=True, slots=True)
class QuarantinedRow:
    """A row the relay gave up on, moved to the quarantine table with its reason.

    Attributes:
        id: the outbox row's id.
        event_id: the stored envelope's event id.
        event_type: the stored event type.
        partition_key: the row's partition key.
        payload: the envelope as stored.
        attempts: attempts made before it was quarantined.
        reason: the last failure.
        age: seconds since the outbox row was written.
        quarantined_age: seconds since it was quarantined.
    """

    id: int
    event_id: str
    event_type: str
    partition_key: str
    payload: str
    attempts: int
    reason: str
    age: float
    quarantined_age: float


@dataclass(frozen=True, slots=True)
class OutboxStatus:
    """What waits in the outbox, and what the relay could not relay.

    Attributes:
        pending: unpublished rows.
        oldest_age: the oldest unpublished row's age in seconds; ``None`` when nothing waits.
        partitions: the partition keys furthest behind, oldest first.
        stuck: pending rows that failed at least once (attempts > 0), oldest first.
        quarantined: rows in the quarantine table (``None`` when it does not exist).
        quarantined_rows: the oldest quarantined rows, named.
    """

    pending: int
    oldest_age: float | None
    partitions: tuple[PartitionLag, ...]
    stuck: tuple[StuckRow, ...] = ()
    quarantined: int | None = 0
    quarantined_rows: tuple[QuarantinedRow, ...] = ()


class Outbox:
    """The outbox table and how events get into it, in the caller's transaction.

    Args:
        metadata: the application's ``MetaData`` to define the table on (so Alembic sees it);
            a private one if omitted. A table of that name already on it is reused.
        table_name: the table's name; it is also the PostgreSQL NOTIFY channel. The quarantine
            table (rows the relay gave up on) is ``<table_name>_quarantine`` (shortened with a hash
            beyond 60 characters).
        codec: encodes events into CloudEvents envelopes (the default codec if omitted).
        partition_key: the key an event's order is kept by, when ``add`` is not given one
            (default :func:`default_partition_key`).

    ``add`` writes in the caller's transaction and commits nothing: the events are stored if
    and only if that transaction commits. On PostgreSQL it also issues ``NOTIFY <table_name>``,
    which PostgreSQL delivers only at commit, to wake relays at once. Thread-safe: it holds no
    mutable state.
    """

    def __init__(
        self,
        metadata: sa.MetaData | None = None,
        *,
        table_name: str = "tidings_outbox",
        codec: Codec | None = None,
        partition_key: Callable[[DomainEvent], str] = default_partition_key,
    ) -> None:
        metadata = sa.MetaData() if metadata is None else metadata
        existing = metadata.tables.get(table_name)
        self.table = outbox_table(metadata, table_name) if existing is None else existing
        quarantine = quarantine_name(table_name)
        held = metadata.tables.get(quarantine)
        self.quarantine = quarantine_table(metadata, quarantine) if held is None else held
        self.channel = table_name
        self.codec = default_codec if codec is None else codec
        self.partition_key = partition_key
        self._insert = sa.insert(self.table)
        self._notify = sa.select(sa.func.pg_notify(sa.literal(self.channel), sa.literal("")))
        # PostgreSQL: insert and notify in one round trip (repeats in a transaction collapse).
        self._insert_notify = self._insert.returning(
            sa.func.pg_notify(sa.literal(self.channel), sa.literal(""))
        )

    def create_tables(self, engine: sa.Engine) -> None:
        """Create the table, its indexes and the quarantine table if missing (or migrate)."""
        self.table.create(engine, checkfirst=True)
        self.quarantine.create(engine, checkfirst=True)

    def drop_tables(self, engine: sa.Engine) -> None:
        """Drop the tables if present (tests, teardown)."""
        self.quarantine.drop(engine, checkfirst=True)
        self.table.drop(engine, checkfirst=True)

    def rows(
        self, events: Iterable[DomainEvent], partition_key: str | None
    ) -> list[dict[str, Any]]:
        """Encode ``events`` into table rows (what ``add`` inserts).

        Raises:
            EventEncodeError: an event has a field with no JSON form.
            UsageError: not a ``DomainEvent``, or a key or event id longer than its column.
        """
        rows = []
        for event in events:
            key = row_key(event, partition_key, self.partition_key, "Outbox.add")
            rows.append(
                {
                    "event_id": event.event_id,
                    "event_type": type(event).event_type,
                    "partition_key": key,
                    "payload": self.codec.encode(event).decode("utf-8"),
                    "created_at": datetime.now(UTC),
                    "attempts": 0,
                }
            )
        return rows

    def add(
        self,
        target: orm.Session | sa.Connection,
        *events: DomainEvent,
        partition_key: str | None = None,
    ) -> None:
        """Store ``events`` in the transaction of ``target`` (a ``Session`` or ``Connection``).

        Nothing is committed here; a rollback of that transaction leaves no row. Events keep
        their order (ids ascend in argument order). ``partition_key`` overrides the outbox's
        key function for these events. With tracing installed, each row's envelope carries
        the ``traceparent`` of a publish span around this call, the relay's parent.

        Raises:
            EventEncodeError, UsageError: see :meth:`rows`; nothing is written then.
            sqlalchemy.exc.IntegrityError: an event id is already in the outbox.
        """
        with _tracing.publishing(events, "tidings", self.channel):
            connection = target.connection() if isinstance(target, orm.Session) else target
            insert = self._insert_for(connection.dialect.name, events, partition_key)
            if insert is not None:
                connection.execute(*insert).close()

    async def add_async(
        self, target: Any, *events: DomainEvent, partition_key: str | None = None
    ) -> None:
        """:meth:`add` for an ``AsyncSession`` or ``AsyncConnection`` (same contract).

        Needs SQLAlchemy's asyncio extra (greenlet) and an async driver.
        """
        from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession  # noqa: PLC0415

        if isinstance(target, AsyncSession):
            target = await target.connection()
        if not isinstance(target, AsyncConnection):
            msg = f"add_async takes an AsyncSession or AsyncConnection, not {type(target).__name__}"
            raise UsageError(msg)
        with _tracing.publishing(events, "tidings", self.channel):
            insert = self._insert_for(target.dialect.name, events, partition_key)
            if insert is not None:
                await target.execute(*insert)

    def _insert_for(
        self, dialect: str, events: Iterable[DomainEvent], partition_key: str | None
    ) -> tuple[sa.Executable, list[dict[str, Any]]] | None:
        """The statement and rows that store ``events`` (``None`` for no events).

        On PostgreSQL the insert also notifies listening relays, in the same round trip.
        """
        check_dialect(dialect)
        rows = self.rows(events, partition_key)
        if not rows:
            return None
        for row in rows:
            row["created_at"] = utcnow(dialect)
        return (self._insert_notify if dialect == "postgresql" else self._insert), rows

    def status(self, engine: sa.Engine, *, partitions: int = 20, rows: int = 20) -> OutboxStatus:
        """Report what waits and what is stuck or quarantined.

        Pending rows, the oldest one's age, the ``partitions`` keys furthest behind, and up to
        ``rows`` stuck rows (pending, attempts > 0) and quarantined rows, oldest first.
        """
        table = self.table
        pending = table.c.published_at.is_(None)
        total = sa.select(sa.func.count(), sa.func.min(table.c.created_at)).where(pending)
        per_key = (
            sa.select(table.c.partition_key, sa.func.count(), sa.func.min(table.c.created_at))
            .where(pending)
            .group_by(table.c.partition_key)
            .order_by(sa.func.min(table.c.created_at), table.c.partition_key)
            .limit(partitions)
        )
        stuck = (
            sa.select(
                table.c.id,
                table.c.partition_key,
                table.c.event_type,
                table.c.attempts,
                table.c.created_at,
            )
            .where(pending, table.c.attempts > 0)
            .order_by(table.c.id)
            .limit(rows)
        )
        now = datetime.now(UTC)
        with engine.connect() as connection:
            count, oldest = connection.execute(total).one()
            lags = tuple(
                PartitionLag(key, n, (now - as_utc(first)).total_seconds())
                for key, n, first in connection.execute(per_key)
            )
            failing = tuple(
                StuckRow(i, key, kind, n, (now - as_utc(first)).total_seconds())
                for i, key, kind, n, first in connection.execute(stuck)
            )
        quarantined: int | None = None
        named: tuple[QuarantinedRow, ...] = ()
        if sa.inspect(engine).has_table(self.quarantine.name):
            quarantined = self.count_quarantined(engine)
            named = tuple(self.quarantined(engine, limit=rows))
        age = None if oldest is None else (now - as_utc(oldest)).total_seconds()
        return OutboxStatus(int(count), age, lags, failing, quarantined, named)

    # -- the quarantine ---------------------------------------------------------------------

    def count_quarantined(self, engine: sa.Engine) -> int:
        """Return how many rows are in the quarantine table."""
        with engine.connect() as connection:
            statement = sa.select(sa.func.count()).select_from(self.quarantine)
            return int(connection.execute(statement).scalar_one())

    def quarantined(
        self, engine: sa.Engine, *, limit: int = 100, offset: int = 0, ids: Iterable[int] = ()
    ) -> list[QuarantinedRow]:
        """Return quarantined rows, oldest outbox id first (only ``ids`` when given)."""
        q = self.quarantine
        statement = sa.select(q).order_by(q.c.id).limit(limit).offset(offset)
        wanted = list(ids)
        if wanted:
            statement = statement.where(q.c.id.in_(wanted))
        now = datetime.now(UTC)
        with engine.connect() as connection:
            return [
                QuarantinedRow(
                    id=row.id,
                    event_id=row.event_id,
                    event_type=row.event_type,
                    partition_key=row.partition_key,
                    payload=row.payload,
                    attempts=row.attempts,
                    reason=row.reason,
                    age=(now - as_utc(row.created_at)).total_seconds(),
                    quarantined_age=(now - as_utc(row.quarantined_at)).total_seconds(),
                )
                for row in connection.execute(statement)
            ]

    def requeue(self, engine: sa.Engine, ids: Iterable[int] | None = None) -> int:
        """Move quarantined rows (``ids``, or all) back into the outbox; return how many.

        Each goes back as a new pending row (a new id, attempts 0, its ``created_at`` kept),
        oldest first, and leaves the quarantine in the same transaction, so the relay tries it
        again. Its order relative to the later rows of its key, which went on meanwhile, is
        not kept (as with any replay of a dead letter).

        Raises:
            sqlalchemy.exc.IntegrityError: its event id is in the outbox again (a published row
                kept with ``keep_published``); nothing is moved then.
        """
        q = self.quarantine
        select = sa.select(q).order_by(q.c.id).with_for_update()
        wanted = None if ids is None else list(ids)
        if wanted is not None:
            if not wanted:
                return 0
            select = select.where(q.c.id.in_(wanted))
        dialect = engine.dialect.name
        with engine.begin() as connection:
            found = connection.execute(select).all()
            if not found:
                return 0
            rows = [
                {
                    "event_id": row.event_id,
                    "event_type": row.event_type,
                    "partition_key": row.partition_key,
                    "payload": row.payload,
                    "created_at": row.created_at,
                    "attempts": 0,
                }
                for row in found
            ]
            connection.execute(sa.insert(self.table), rows)
            moved = [row.id for row in found]
            connection.execute(sa.delete(q).where(q.c.id.in_(moved)))
            if dialect == "postgresql":
                connection.execute(self._notify)
        return len(found)

    def discard_quarantined(self, engine: sa.Engine, ids: Iterable[int] | None = None) -> int:
        """Delete quarantined rows (``ids``, or all) for good; return how many."""
        q = self.quarantine
        statement = sa.delete(q)
        if ids is not None:
            wanted = list(ids)
            if not wanted:
                return 0
            statement = statement.where(q.c.id.in_(wanted))
        with engine.begin() as connection:
            return int(connection.execute(statement).rowcount)

    def purge(self, engine: sa.Engine, *, published_before: datetime) -> int:
        """Delete published rows published before ``published_before`` (aware); return how many.

        Unpublished rows are never deleted here.
        """
        dialect = engine.dialect.name
        cutoff = published_before.astimezone(UTC)
        if dialect != "postgresql":
            cutoff = cutoff.replace(tzinfo=None)
        statement = sa.delete(self.table).where(
            self.table.c.published_at.is_not(None), self.table.c.published_at < cutoff
        )
        with engine.begin() as connection:
            return connection.execute(statement).rowcount


class AggregateRoot:
    """A mixin for aggregates (ORM-mapped or not) that record the events their changes raise.

    ``record`` keeps an event on the instance; ``pull_events`` hands them over once. With
    :func:`install_session_hook`, a session writes the recorded events of every aggregate it
    holds to the outbox when it flushes, in the same transaction, so application code only
    changes aggregates and commits. Not thread-safe (neither are sessions or their objects).
    """

    def record(self, event: DomainEvent) -> None:
        """Keep ``event`` until it is pulled (by the session hook, at the next flush)."""
        pending: list[DomainEvent] | None = self.__dict__.get(_PENDING)
        if pending is None:
            pending = []
            object.__setattr__(self, _PENDING, pending)
            try:
                session = orm.object_session(self)
            except orm.exc.UnmappedInstanceError:
                session = None
            if session is not None:
                # The identity map holds unchanged objects weakly: keep this one until flushed.
                session.info.setdefault(_HELD, []).append(self)
        pending.append(event)

    def pull_events(self) -> list[DomainEvent]:
        """Return the recorded events, oldest first, and forget them."""
        pending: list[DomainEvent] = self.__dict__.pop(_PENDING, None) or []
        return pending

    def outbox_partition_key(self) -> str | None:
        """Return the partition key of this aggregate's events.

        It is the primary key if the class is mapped (parts joined with ``:``), else ``None``
        (the outbox's key function decides). Override to choose another.
        """
        try:
            mapper = sa.inspect(type(self))
        except sa.exc.NoInspectionAvailable:
            return None
        values = mapper.primary_key_from_instance(self)
        if any(value is None for value in values):
            return None
        return ":".join(str(value) for value in values)


def _write_recorded(session: orm.Session, outbox: Outbox) -> None:
    # New objects are not in the identity map until the flush is over.
    held: list[object] = session.info.pop(_HELD, [])
    candidates: list[object] = [*held, *session.new, *session.identity_map.values()]
    seen: set[int] = set()
    for candidate in candidates:
        if not isinstance(candidate, AggregateRoot) or id(candidate) in seen:
            continue
        seen.add(id(candidate))
        events = candidate.pull_events()
        if events:
            outbox.add(session, *events, partition_key=candidate.outbox_partition_key())


def install_session_hook(target: Any, outbox: Outbox) -> Callable[[], None]:
    """Make sessions of ``target`` write aggregates' recorded events to ``outbox``.

    ``target`` is a ``sessionmaker``, a ``Session`` subclass or instance (for ``AsyncSession``
    pass its ``sync_session_class``, or ``Session``). Events are written after each flush,
    once the aggregate's own INSERT or UPDATE ran (so a new aggregate has its id for the
    partition key, and an updated one holds its row lock before its outbox ids are taken), and
    before commit for aggregates that recorded events without changing a column. Every flush
    scans the session's objects: sessions of a few thousand objects are fine.

    Returns:
        a function that removes the hook.
    """

    def after_flush(session: orm.Session, context: Any) -> None:
        _write_recorded(session, outbox)

    def before_commit(session: orm.Session) -> None:
        session.flush()
        _write_recorded(session, outbox)

    sa.event.listen(target, "after_flush", after_flush)
    sa.event.listen(target, "before_commit", before_commit)

    def remove() -> None:
        sa.event.remove(target, "after_flush", after_flush)
        sa.event.remove(target, "before_commit", before_commit)

    return remove
