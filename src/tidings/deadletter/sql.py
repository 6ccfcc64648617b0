"""A :class:`~tidings.ports.DeadLetterStore` in one SQL table (SQLite, PostgreSQL, MariaDB/MySQL).

The table is declared on a :class:`sqlalchemy.MetaData` (yours, if you pass it, so Alembic's
autogenerate sees it; or the store's own), and :meth:`SqlDeadLetterStore.create_tables` creates
it when missing. Columns: ``id`` (primary key), ``failed_at`` (UTC, indexed, microseconds),
``transport``, ``destination``, ``handler``, ``event_type``, ``event_id``, ``attempts``,
``reason``, ``traceback``, ``headers`` (JSON text) and ``body`` (the message bytes, exactly).
On MariaDB/MySQL the text and body columns are LONGTEXT/LONGBLOB, so a large message fits (up to
the server's ``max_allowed_packet``), and the table is utf8mb4 with binary collation.

Listing is newest first by ``failed_at`` (then by id). ``failed_at`` comes back in the form
:func:`~tidings._ids.utc_now_iso` writes (``2026-01-02T03:04:05.000006+00:00``): a value written
with another offset or spelling comes back as the same instant in that form.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from tidings.deadletter._bounds import MAX_BODY_BYTES, bounded_letter
from tidings.ports import DeadLetter, DeadLetterFilter

try:
    import sqlalchemy as sa
    from sqlalchemy.dialects import mysql
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    msg = "the SQL dead-letter store needs SQLAlchemy: pip install 'tidings[sql]'"
    raise ImportError(msg, name=exc.name) from exc

__all__ = ["SqlDeadLetterStore", "dead_letters_table"]

_ISO = "%Y-%m-%dT%H:%M:%S.%f+00:00"
_COLUMNS = (
    "id",
    "failed_at",
    "transport",
    "destination",
    "handler",
    "event_type",
    "event_id",
    "attempts",
    "reason",
    "traceback",
    "headers",
    "body",
)


def _text() -> sa.types.TypeEngine[str]:
    return sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")


def dead_letters_table(metadata: sa.MetaData, name: str = "tidings_dead_letters") -> sa.Table:
    """Declare the dead-letter table on ``metadata`` and return it (reusing one declared before).

    Raises:
        ValueError: ``metadata`` already holds a table of that name with other columns.
    """
    existing = metadata.tables.get(name)
    if existing is not None:
        if tuple(existing.columns.keys()) != _COLUMNS:
            msg = f"table {name!r} on this MetaData is not a dead-letter table: pick another name"
            raise ValueError(msg)
        return existing
    return sa.Table(
        name,
        metadata,
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column(
            "failed_at",
            sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb"),
            nullable=False,
            index=True,
        ),
        sa.Column("transport", _text(), nullable=False),
        sa.Column("destination", _text(), nullable=False),
        sa.Column("handler", _text(), nullable=True),
        sa.Column("event_type", _text(), nullable=True),
        sa.Column("event_id", _text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("reason", _text(), nullable=False),
        sa.Column("traceback", _text(), nullable=False),
        sa.Column("headers", _text(), nullable=False),
        sa.Column(
            "body",
            sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb"),
            nullable=False,
        ),
        mysql_charset="utf8mb4",
        mysql_collate="utf8mb4_bin",
        mariadb_charset="utf8mb4",
        mariadb_collate="utf8mb4_bin",
    )


class SqlDeadLetterStore:
    """Keeps dead letters in the table ``table_name``; one short transaction per call.

    ``table`` and ``metadata`` expose the table for migrations. Letter ids are at most 36
    characters (a UUID, as :class:`~tidings.ports.DeadLetter` makes them). Thread-safe and
    process-safe (the engine's pool gives each call its own connection). An engine passed in
    stays the caller's; :meth:`close` disposes only one made by :meth:`from_url`.

    ``add`` refuses nothing for its size: the body is cut to ``max_body_bytes`` (1 MiB by
    default), and reason, traceback, text fields and headers to the bounds of
    :mod:`tidings.deadletter._bounds`, each cut noted at the end of the reason.

    Raises:
        ValueError: ``max_body_bytes`` is below 1.
    """

    def __init__(
        self,
        engine: sa.Engine,
        *,
        table_name: str = "tidings_dead_letters",
        metadata: sa.MetaData | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        if max_body_bytes < 1:
            msg = f"max_body_bytes must be >= 1, not {max_body_bytes}"
            raise ValueError(msg)
        self.max_body_bytes = max_body_bytes
        self._engine = engine
        self.metadata = metadata if metadata is not None else sa.MetaData()
        self.table = dead_letters_table(self.metadata, table_name)
        self._owns_engine = False

    @classmethod
    def from_url(
        cls, url: str, *, table_name: str = "tidings_dead_letters", must_exist: bool = False
    ) -> SqlDeadLetterStore:
        """Return a store on a new engine for ``url`` (see :func:`tidings._sql.create_engine`).

        ``postgres://`` and driverless URLs get the driver tidings' extras install; with
        ``must_exist``, a SQLite file that does not exist is refused (``UsageError``).
        """
        from tidings._sql import create_engine  # noqa: PLC0415 - SQLAlchemy is imported here

        store = cls(create_engine(url, must_exist=must_exist), table_name=table_name)
        store._owns_engine = True
        return store

    def create_tables(self) -> None:
        """Create the table and its index if they do not exist (use migrations in production)."""
        self.metadata.create_all(self._engine, tables=[self.table])

    def add(self, letter: DeadLetter) -> None:
        """Store ``letter``, replacing one with the same id; committed when this returns.

        An over-long letter is cut, not refused (see the class docstring).

        Raises:
            ValueError: ``letter.failed_at`` is not an ISO-8601 timestamp.
        """
        try:
            failed_at = datetime.fromisoformat(letter.failed_at)
        except ValueError as exc:
            msg = f"failed_at must be an ISO-8601 timestamp, not {letter.failed_at!r}"
            raise ValueError(msg) from exc
        letter = bounded_letter(letter, self.max_body_bytes)
        if failed_at.tzinfo is None:
            failed_at = failed_at.replace(tzinfo=UTC)
        row = {
            "id": letter.id,
            # Every database gets UTC; SQLite and MariaDB would drop any other offset silently.
            "failed_at": failed_at.astimezone(UTC),
            "transport": _storable(letter.transport),
            "destination": _storable(letter.destination),
            "handler": _storable(letter.handler),
            "event_type": _storable(letter.event_type),
            "event_id": _storable(letter.event_id),
            "attempts": letter.attempts,
            "reason": _storable(letter.reason),
            "traceback": _storable(letter.traceback),
            # ensure_ascii keeps any str exactly, lone surrogates included, in any charset.
            "headers": json.dumps(letter.headers, default=str),
            "body": bytes(letter.body),
        }
        # Replacing lets a transport that derives the letter's id from the message dead-letter a
        # redelivered message again without a duplicate. Insert first, update on conflict:
        # portable, and unlike delete-then-insert it takes no gap locks that deadlock on MariaDB.
        try:
            with self._engine.begin() as conn:
                conn.execute(self.table.insert(), row)
        except sa.exc.IntegrityError:
            update = self.table.update().where(self.table.c.id == letter.id)
            with self._engine.begin() as conn:
                replaced = conn.execute(update, row).rowcount
            if not replaced:  # removed between the two statements: insert it after all
                with self._engine.begin() as conn:
                    conn.execute(self.table.insert(), row)

    def get(self, letter_id: str) -> DeadLetter | None:
        """Return the dead letter with this id, or ``None``."""
        query = self.table.select().where(self.table.c.id == letter_id)
        with self._engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return None if row is None else _letter(row)

    def list(self, *, limit: int = 100, offset: int = 0) -> list[DeadLetter]:
        """Return up to ``limit`` dead letters, newest first, skipping ``offset``.

        Raises:
            ValueError: ``limit`` or ``offset`` is negative.
        """
        if limit < 0 or offset < 0:
            msg = f"limit and offset must be >= 0, not {limit} and {offset}"
            raise ValueError(msg)
        query = (
            self.table.select()
            .order_by(self.table.c.failed_at.desc(), self.table.c.id.desc())
            .limit(limit)
            .offset(offset)
        )
        with self._engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [_letter(row) for row in rows]

    def iter_matching(
        self, where: DeadLetterFilter, *, page_size: int = 500
    ) -> Iterator[DeadLetter]:
        """Yield the letters ``where`` matches, newest first, one query per ``page_size``.

        The filter is a WHERE clause (``since`` on the indexed ``failed_at``; ``reason`` a
        case-sensitive substring search), and the pages follow ``(failed_at, id)``, not an
        offset, so removing letters meanwhile skips none.

        Raises:
            ValueError: ``page_size`` is below 1.
        """
        if page_size < 1:
            msg = f"page_size must be >= 1, not {page_size}"
            raise ValueError(msg)
        return self._matching(where, page_size)

    def _matching(self, where: DeadLetterFilter, page_size: int) -> Iterator[DeadLetter]:
        c = self.table.c
        conditions = self._conditions(where)
        after: tuple[Any, str] | None = None
        while True:
            page_conditions = conditions
            if after is not None:
                at, letter_id = after
                page_conditions += (
                    sa.or_(c.failed_at < at, sa.and_(c.failed_at == at, c.id < letter_id)),
                )
            query = (
                self.table.select()
                .where(sa.true(), *page_conditions)
                .order_by(c.failed_at.desc(), c.id.desc())
                .limit(page_size)
            )
            with self._engine.connect() as conn:
                rows = conn.execute(query).mappings().all()
            for row in rows:
                yield _letter(row)
            if len(rows) < page_size:
                return
            after = (rows[-1]["failed_at"], rows[-1]["id"])

    def _conditions(self, where: DeadLetterFilter) -> tuple[sa.ColumnElement[bool], ...]:
        c = self.table.c
        conditions = []
        if where.handler is not None:
            conditions.append(c.handler == _storable(where.handler))
        if where.event_type is not None:
            conditions.append(c.event_type == _storable(where.event_type))
        if where.since is not None:
            conditions.append(c.failed_at >= where.since.astimezone(UTC))
        if where.reason is not None:
            needle = _storable(where.reason)
            dialect = self._engine.dialect.name
            if dialect == "postgresql":
                conditions.append(sa.func.strpos(c.reason, needle) > 0)
            elif dialect in ("sqlite", "mysql", "mariadb"):  # binary collation: case-sensitive
                conditions.append(sa.func.instr(c.reason, needle) > 0)
            else:
                conditions.append(c.reason.contains(needle, autoescape=True))
        return tuple(conditions)

    def remove(self, letter_id: str) -> bool:
        """Delete one dead letter; return whether it existed."""
        with self._engine.begin() as conn:
            result = conn.execute(self.table.delete().where(self.table.c.id == letter_id))
        return result.rowcount > 0

    def purge(self) -> int:
        """Delete every dead letter in one transaction; return how many there were."""
        with self._engine.begin() as conn:
            result = conn.execute(self.table.delete())
        return result.rowcount

    def count(self) -> int:
        """Return how many dead letters are stored."""
        query = sa.select(sa.func.count()).select_from(self.table)
        with self._engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def close(self) -> None:
        """Dispose of the engine if :meth:`from_url` made it; one passed in is left alone."""
        if self._owns_engine:
            self._engine.dispose()


def _storable(text: str | None) -> str | None:
    # PostgreSQL refuses NUL in text and every driver refuses lone surrogates; escaping them
    # beats losing the letter. Ordinary text passes unchanged.
    if text is None or ("\x00" not in text and text.isascii()):
        return text
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


def _letter(row: Any) -> DeadLetter:
    failed_at: datetime = row["failed_at"]
    if failed_at.tzinfo is None:  # SQLite and MariaDB hand back the UTC value without offset
        failed_at = failed_at.replace(tzinfo=UTC)
    return DeadLetter(
        body=bytes(row["body"]),
        reason=row["reason"],
        traceback=row["traceback"],
        attempts=row["attempts"],
        handler=row["handler"],
        event_type=row["event_type"],
        event_id=row["event_id"],
        headers=json.loads(row["headers"]),
        transport=row["transport"],
        destination=row["destination"],
        id=row["id"],
        failed_at=failed_at.astimezone(UTC).strftime(_ISO),
    )
