"""An :class:`~tidings.audit.AuditStore` in one SQL table (SQLite, PostgreSQL, MariaDB/MySQL).

One row per :class:`~tidings.audit.AuditRecord`, with an integer key in write order. Three
indexes make each lookup read only its own rows: ``(correlation_id, at)`` for
:meth:`SqlAuditStore.by_correlation`, ``(event_id, at)`` for ``by_event``, ``(tenant_id, at)``
for ``by_tenant`` (newest first from an index range), and ``(at)`` for ``trim``, which deletes
by age in batches. ``at`` is a double (Unix seconds), exact to the microsecond and compared
alike on every database. Ids are cut to 255 characters (the hooks keep no longer ones).

The table is declared on a :class:`sqlalchemy.MetaData` (yours, if you pass it, so Alembic's
autogenerate sees it); :meth:`SqlAuditStore.create_tables` creates it when missing.
"""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Sequence
from typing import Any

from tidings.audit._record import FIELDS, AuditRecord, storable

try:
    import sqlalchemy as sa
    from sqlalchemy.dialects import mysql
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    msg = "the SQL audit store needs SQLAlchemy: pip install 'tidings[sql]'"
    raise ImportError(msg, name=exc.name) from exc

__all__ = ["SqlAuditStore", "audit_table"]

_ID = 255
_TRIM_BATCH = 5000


def _id_column(name: str, *, nullable: bool = True) -> sa.Column[Any]:
    return sa.Column(name, sa.String(_ID), nullable=nullable)


def audit_table(metadata: sa.MetaData, name: str = "tidings_audit") -> sa.Table:
    """Declare the audit table and its indexes on ``metadata`` (reusing one declared before).

    Raises:
        ValueError: ``metadata`` already holds a table of that name with other columns.
    """
    existing = metadata.tables.get(name)
    if existing is not None:
        if tuple(existing.columns.keys()) != ("id", *FIELDS):
            msg = f"table {name!r} on this MetaData is not an audit table: pick another name"
            raise ValueError(msg)
        return existing
    table = sa.Table(
        name,
        metadata,
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("kind", sa.String(16), nullable=False),
        _id_column("event_id"),
        _id_column("event_type"),
        _id_column("correlation_id"),
        _id_column("causation_id"),
        _id_column("tenant_id"),
        _id_column("handler"),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("duration", sa.Double(), nullable=True),
        _id_column("worker", nullable=False),
        sa.Column("at", sa.Double(), nullable=False),
        sa.Column("detail", sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")),
        mysql_charset="utf8mb4",
        mysql_collate="utf8mb4_bin",
        mariadb_charset="utf8mb4",
        mariadb_collate="utf8mb4_bin",
    )
    sa.Index(f"{name}_corr", table.c.correlation_id, table.c.at)
    sa.Index(f"{name}_evt", table.c.event_id, table.c.at)
    sa.Index(f"{name}_ten", table.c.tenant_id, table.c.at)
    sa.Index(f"{name}_at", table.c.at)
    return table


class SqlAuditStore:
    """Keeps audit records in the table ``table_name``; each call one short transaction.

    ``write`` inserts a whole batch in one statement (``executemany``). Thread-safe and
    process-safe (the engine's pool gives each call its own connection). An engine passed in
    stays the caller's; :meth:`close` disposes only one made by :meth:`from_url`.
    """

    def __init__(
        self,
        engine: sa.Engine,
        *,
        table_name: str = "tidings_audit",
        metadata: sa.MetaData | None = None,
    ) -> None:
        self._engine = engine
        self.metadata = metadata if metadata is not None else sa.MetaData()
        self.table = audit_table(self.metadata, table_name)
        self._owns_engine = False
        _fresh_pool_in_children(engine)

    @classmethod
    def from_url(
        cls, url: str, *, table_name: str = "tidings_audit", must_exist: bool = False
    ) -> SqlAuditStore:
        """Return a store on a new engine for ``url`` (see :func:`tidings._sql.create_engine`).

        With ``must_exist``, a SQLite file that does not exist is refused (``UsageError``).
        """
        from tidings._sql import create_engine  # noqa: PLC0415 - SQLAlchemy is imported here

        store = cls(create_engine(url, must_exist=must_exist), table_name=table_name)
        store._owns_engine = True
        return store

    def create_tables(self) -> None:
        """Create the table and its indexes if they do not exist (use migrations in production)."""
        self.metadata.create_all(self._engine, tables=[self.table])

    def write(self, records: Sequence[AuditRecord]) -> None:
        """Insert ``records`` in one transaction; committed when this returns."""
        if not records:
            return
        rows = [_row(record) for record in records]
        with self._engine.begin() as conn:
            conn.execute(self.table.insert(), rows)

    def by_correlation(self, correlation_id: str) -> list[AuditRecord]:
        """Every record of this correlation id, oldest first (one index range)."""
        return self._select(self.table.c.correlation_id == correlation_id)

    def by_event(self, event_id: str) -> list[AuditRecord]:
        """Every record of this event, oldest first (one index range)."""
        return self._select(self.table.c.event_id == event_id)

    def by_tenant(
        self, tenant_id: str, *, limit: int = 100, since: float | None = None
    ) -> list[AuditRecord]:
        """Up to ``limit`` records of this tenant, newest first, none before ``since``.

        Raises:
            ValueError: ``limit`` is negative.
        """
        if limit < 0:
            msg = f"limit must be >= 0, not {limit}"
            raise ValueError(msg)
        condition = self.table.c.tenant_id == tenant_id
        if since is not None:
            condition = sa.and_(condition, self.table.c.at >= since)
        query = (
            self.table.select()
            .where(condition)
            .order_by(self.table.c.at.desc(), self.table.c.id.desc())
            .limit(limit)
        )
        with self._engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [_record(row) for row in rows]

    def _select(self, condition: sa.ColumnElement[bool]) -> list[AuditRecord]:
        query = self.table.select().where(condition).order_by(self.table.c.at, self.table.c.id)
        with self._engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [_record(row) for row in rows]

    def trim(self, older_than: float) -> int:
        """Delete the records more than ``older_than`` seconds old, in batches; return how many.

        Each batch is its own short transaction, so writers are never held up for long.

        Raises:
            ValueError: ``older_than`` is negative.
        """
        if older_than < 0:
            msg = f"older_than must be >= 0 seconds, not {older_than}"
            raise ValueError(msg)
        cutoff = time.time() - older_than
        table = self.table
        removed = 0
        while True:
            # MariaDB refuses LIMIT in a subquery of IN: pick the ids first, then delete them.
            with self._engine.begin() as conn:
                ids = (
                    conn.execute(
                        sa.select(table.c.id).where(table.c.at < cutoff).limit(_TRIM_BATCH)
                    )
                    .scalars()
                    .all()
                )
                if ids:
                    conn.execute(table.delete().where(table.c.id.in_(ids)))
            removed += len(ids)
            if len(ids) < _TRIM_BATCH:
                return removed

    def close(self) -> None:
        """Dispose of the engine if :meth:`from_url` made it; one passed in is left alone."""
        if self._owns_engine:
            self._engine.dispose()


def _fresh_pool_in_children(engine: sa.Engine) -> None:
    """In a forked child (a Celery prefork worker), drop the parent's pooled connections.

    The child's audit writer would otherwise talk on sockets the parent uses too; this is
    SQLAlchemy's advice (``dispose(close=False)``), and leaves the parent's connections alone.
    """
    ref = weakref.ref(engine)

    def after_fork() -> None:
        found = ref()
        if found is not None:
            found.dispose(close=False)

    os.register_at_fork(after_in_child=after_fork)


def _row(record: AuditRecord) -> dict[str, Any]:
    row = record.to_dict()
    for name in ("event_id", "event_type", "correlation_id", "causation_id", "tenant_id"):
        value = row[name]
        if value is not None:
            row[name] = storable(value)[:_ID]
    row["handler"] = None if record.handler is None else storable(record.handler)[:_ID]
    row["worker"] = storable(record.worker)[:_ID]
    row["detail"] = storable(record.detail)
    return row


def _record(row: Any) -> AuditRecord:
    return AuditRecord(**{name: row[name] for name in FIELDS})
