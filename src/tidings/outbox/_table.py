"""The outbox table: its columns, its indexes, and the statements every dialect needs."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

try:
    import sqlalchemy as sa
    from sqlalchemy import orm
    from sqlalchemy.dialects import mysql, postgresql
except ImportError as exc:
    msg = "tidings.outbox needs SQLAlchemy: pip install 'tidings[sql]'"
    raise ImportError(msg) from exc

from tidings.outbox._common import EVENT_ID_LENGTH, KEY_LENGTH, REASON_LENGTH

__all__ = [
    "EVENT_ID_LENGTH",
    "KEY_LENGTH",
    "REASON_LENGTH",
    "SUPPORTED",
    "as_utc",
    "check_dialect",
    "orm",
    "outbox_table",
    "postgresql",
    "quarantine_name",
    "quarantine_table",
    "sa",
    "utcnow",
]

SUPPORTED = ("postgresql", "sqlite", "mysql", "mariadb")

# MariaDB: DATETIME keeps whole seconds unless asked; TEXT stops at 64 KiB, envelopes may not.
_TIME = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
_PAYLOAD = sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")
# SQLite: INTEGER PRIMARY KEY is the rowid; BIGINT would not autoincrement.
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def outbox_table(metadata: sa.MetaData, name: str = "tidings_outbox") -> sa.Table:
    """Define the outbox table on ``metadata`` (for Alembic autogenerate) and return it.

    Columns: ``id`` (autoincrement; relay order), ``event_id`` (unique), ``event_type``,
    ``partition_key`` (order is kept per key), ``payload`` (the CloudEvents JSON envelope),
    ``created_at``, ``published_at`` (``NULL`` until the broker confirmed; rows kept after
    publishing have it set), ``attempts`` (failed or completed publish attempts). Indexes:
    pending rows by id, and rows by (partition_key, id).
    """
    return sa.Table(
        name,
        metadata,
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(EVENT_ID_LENGTH), nullable=False, unique=True),
        sa.Column("event_type", sa.String(KEY_LENGTH), nullable=False),
        sa.Column("partition_key", sa.String(KEY_LENGTH), nullable=False),
        sa.Column("payload", _PAYLOAD, nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("published_at", _TIME, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Index(_index_name(name, "pending"), "published_at", "id"),
        sa.Index(_index_name(name, "partition"), "partition_key", "id"),
        sqlite_autoincrement=True,  # never reuse an id, even after the newest row is deleted
    )


def quarantine_name(table: str) -> str:
    """``<table>_quarantine``, shortened with a hash to fit 60 characters (PostgreSQL: 63)."""
    name = f"{table}_quarantine"
    if len(name) <= 60:
        return name
    digest = hashlib.sha1(name.encode(), usedforsecurity=False).hexdigest()[:10]
    return f"{table[:38]}_{digest}_quarantine"


def quarantine_table(metadata: sa.MetaData, name: str) -> sa.Table:
    """Define the outbox's quarantine table (its dead letters) on ``metadata`` and return it.

    A row the relay could not relay after its bound of attempts moves here, in the transaction
    that deletes it from the outbox. Columns: ``id`` (the outbox row's id), ``event_id``,
    ``event_type``, ``partition_key``, ``payload`` (as stored), ``created_at`` (when the outbox
    row was written), ``quarantined_at``, ``attempts`` and ``reason`` (the last failure).
    """
    return sa.Table(
        name,
        metadata,
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("event_id", sa.String(EVENT_ID_LENGTH), nullable=False),
        sa.Column("event_type", sa.String(KEY_LENGTH), nullable=False),
        sa.Column("partition_key", sa.String(KEY_LENGTH), nullable=False),
        sa.Column("payload", _PAYLOAD, nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("quarantined_at", _TIME, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
    )


def _index_name(table: str, purpose: str) -> str:
    """``ix_<table>_<purpose>``, shortened with a hash to fit 60 characters (PostgreSQL: 63)."""
    name = f"ix_{table}_{purpose}"
    if len(name) <= 60:
        return name
    digest = hashlib.sha1(name.encode(), usedforsecurity=False).hexdigest()[:10]
    return f"ix_{table[:36]}_{digest}_{purpose}"


def check_dialect(name: str) -> None:
    """Raise ``NotImplementedError`` unless the outbox supports the dialect ``name``."""
    if name not in SUPPORTED:
        msg = f"the outbox supports PostgreSQL, MariaDB/MySQL and SQLite, not {name!r}"
        raise NotImplementedError(msg)


def utcnow(dialect: str) -> datetime:
    """Now in UTC, as the dialect stores it: aware for PostgreSQL, naive UTC elsewhere."""
    now = datetime.now(UTC)
    return now if dialect == "postgresql" else now.replace(tzinfo=None)


def as_utc(value: datetime) -> datetime:
    """Read a stored time back as an aware UTC datetime (naive values are UTC)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
