"""What every part of the demo records, so the run can be summarised, traced and reconciled.

The web view, the relay, the handlers, the inbox and the log all write :class:`Entry` rows to
one :class:`Journal`: in memory for the embedded mode, a SQL table when handlers run in
Celery worker processes (the parent reads their entries back from it).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import astuple, dataclass
from typing import Any, Final, Protocol

import sqlalchemy as sa

from tidings.context import current_context
from tidings.errors import InboxBusyError
from tidings.integrations.logging import ContextFilter
from tidings.ports import Inbox

__all__ = [
    "KINDS",
    "BufferedJournal",
    "CountingInbox",
    "Entry",
    "Journal",
    "JournalLogHandler",
    "MemoryJournal",
    "SqlJournal",
    "record",
]

KINDS: Final = (
    "request",  # the view ran: name is the route, detail the order id
    "committed",  # an event was written to the outbox with its order
    "published",  # an event was handed to the transport (relay or handler)
    "handled",  # a handler ran to completion (name: the handler)
    "failed",  # a handler raised (detail: the error); the dispatcher retries or dead-letters
    "duplicate",  # the inbox skipped a handler whose effect had already taken place
    "log",  # a log line (name: the logger, detail: "LEVEL message")
    "ready",  # a worker process is consuming
)
"""The kinds of entry, each with what its ``name`` and ``detail`` hold."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One thing that happened, with the context it happened in.

    Attributes:
        kind: one of :data:`KINDS`.
        at: wall-clock time (``time.time()``), comparable across the demo's processes.
        correlation_id: the request it belongs to.
        tenant_id: the tenant it was done for.
        event_id: the event it concerns (for a log line: the event being handled, if any).
        causation_id: for ``committed`` and ``published``: the event's cause.
        event_type: the event's type, where one is concerned.
        name: the route, handler or logger.
        detail: the order id, error or message.
    """

    kind: str
    at: float
    correlation_id: str | None = None
    tenant_id: str | None = None
    event_id: str | None = None
    causation_id: str | None = None
    event_type: str | None = None
    name: str = ""
    detail: str = ""


def record(kind: str, *, name: str = "", detail: str = "", **ids: str | None) -> Entry:
    """Return an :class:`Entry` of ``kind`` made now, with the bound context's ids.

    ``ids`` (``event_id``, ``causation_id``, ``event_type``, ``correlation_id``,
    ``tenant_id``) override what the context gives; ``event_id`` defaults to the event being
    handled (the context's causation id).
    """
    context = current_context()
    fields: dict[str, Any] = {
        "correlation_id": context.correlation_id,
        "tenant_id": context.tenant_id,
        "event_id": context.causation_id,
        **ids,
    }
    return Entry(kind, time.time(), name=name, detail=detail, **fields)


class Journal(Protocol):
    """Where entries go. Thread-safe; a SQL journal is also process-safe."""

    def add(self, entry: Entry) -> None:
        """Store one entry."""
        ...

    def entries(self) -> list[Entry]:
        """Return every entry, oldest first."""
        ...

    def count(self, kind: str) -> int:
        """Return how many entries of ``kind`` are stored."""
        ...

    def failures(self, handler: str, event_id: str) -> int:
        """Return how many times ``handler`` failed on ``event_id`` so far."""
        ...

    def flush(self) -> None:
        """Make every entry added so far visible to readers (in every process)."""
        ...


class MemoryJournal:
    """A :class:`Journal` in a list: for handlers that run in this process."""

    def __init__(self) -> None:
        self._entries: list[Entry] = []
        self._lock = threading.Lock()

    def add(self, entry: Entry) -> None:
        """Store one entry."""
        with self._lock:
            self._entries.append(entry)

    def flush(self) -> None:
        """Nothing to do: entries are visible as soon as they are added."""

    def entries(self) -> list[Entry]:
        """Return every entry, oldest first."""
        with self._lock:
            return sorted(self._entries, key=lambda e: e.at)

    def count(self, kind: str) -> int:
        """Return how many entries of ``kind`` are stored."""
        with self._lock:
            return sum(1 for e in self._entries if e.kind == kind)

    def failures(self, handler: str, event_id: str) -> int:
        """Return how many times ``handler`` failed on ``event_id`` so far."""
        with self._lock:
            return sum(
                1
                for e in self._entries
                if e.kind == "failed" and e.name == handler and e.event_id == event_id
            )


class SqlJournal:
    """A :class:`Journal` in a SQL table, shared by the demo and its worker processes.

    Each ``add`` commits on its own connection. Create the table with :meth:`create_tables`.
    """

    def __init__(self, engine: sa.Engine, *, table_name: str = "demo_journal") -> None:
        self.engine = engine
        metadata = sa.MetaData()
        self.table = sa.Table(
            table_name,
            metadata,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("kind", sa.String(16), nullable=False, index=True),
            sa.Column("at", sa.Float, nullable=False),
            sa.Column("correlation_id", sa.String(128)),
            sa.Column("tenant_id", sa.String(128)),
            sa.Column("event_id", sa.String(64)),
            sa.Column("causation_id", sa.String(64)),
            sa.Column("event_type", sa.String(200)),
            sa.Column("name", sa.String(200), nullable=False),
            sa.Column("detail", sa.Text, nullable=False),
        )
        self._metadata = metadata
        self._columns = [c.name for c in self.table.columns if c.name != "id"]

    def flush(self) -> None:
        """Nothing to do: each ``add`` commits."""

    def create_tables(self) -> None:
        """Create the journal table if it does not exist."""
        self._metadata.create_all(self.engine)

    def drop_tables(self) -> None:
        """Drop the journal table if it exists."""
        self._metadata.drop_all(self.engine)

    def add(self, entry: Entry) -> None:
        """Store one entry, committed when this returns."""
        self.add_many([entry])

    def add_many(self, entries: Sequence[Entry]) -> None:
        """Store several entries in one transaction, committed when this returns."""
        if not entries:
            return
        rows = [dict(zip(self._columns, astuple(entry), strict=True)) for entry in entries]
        for row in rows:
            row["detail"] = row["detail"][:2000]
        with self.engine.begin() as connection:
            connection.execute(self.table.insert(), rows)

    def entries(self) -> list[Entry]:
        """Return every entry, oldest first."""
        columns = [self.table.c[name] for name in self._columns]
        with self.engine.connect() as connection:
            rows = connection.execute(sa.select(*columns).order_by(self.table.c.at)).all()
        return [Entry(*row) for row in rows]

    def count(self, kind: str) -> int:
        """Return how many entries of ``kind`` are stored."""
        query = sa.select(sa.func.count()).where(self.table.c.kind == kind)
        with self.engine.connect() as connection:
            return int(connection.execute(query).scalar_one())

    def failures(self, handler: str, event_id: str) -> int:
        """Return how many times ``handler`` failed on ``event_id`` so far."""
        c = self.table.c
        query = sa.select(sa.func.count()).where(
            c.kind == "failed", c.name == handler, c.event_id == event_id
        )
        with self.engine.connect() as connection:
            return int(connection.execute(query).scalar_one())


class BufferedJournal:
    """Wraps a :class:`SqlJournal`: entries are written in batches, by a thread.

    ``add`` queues the entry; a daemon thread inserts what is queued every ``interval``
    seconds in one transaction. A ``failed`` entry is written at once, with everything queued
    before it, because the handler's next attempt counts it (:meth:`failures`). A forked child
    starts with an empty queue and a thread of its own. :meth:`flush` writes what waits now.
    """

    def __init__(self, inner: SqlJournal, *, interval: float = 0.05) -> None:
        self.inner = inner
        self.interval = interval
        self._pid = -1
        self._queue: list[Entry] = []
        self._lock = threading.Lock()

    def add(self, entry: Entry) -> None:
        """Queue one entry (write it at once, with the queue, when it is a failure)."""
        with self._lock:
            if self._pid != os.getpid():
                self._pid, self._queue = os.getpid(), []
                threading.Thread(
                    target=self._flush_forever, name="demo-journal", daemon=True
                ).start()
            self._queue.append(entry)
        if entry.kind == "failed":
            self.flush()

    def flush(self) -> None:
        """Write every queued entry now; on failure they stay queued for the next try."""
        with self._lock:
            batch, self._queue = self._queue, []
        try:
            self.inner.add_many(batch)
        except BaseException:
            with self._lock:
                self._queue[:0] = batch
            raise

    def _flush_forever(self) -> None:
        pid = os.getpid()
        while self._pid == pid:
            time.sleep(self.interval)
            try:
                self.flush()
            except Exception:  # the journal must not kill the worker
                logging.getLogger(__name__).warning(
                    "could not write journal entries", exc_info=True
                )

    def entries(self) -> list[Entry]:
        """Return every entry written, oldest first."""
        return self.inner.entries()

    def count(self, kind: str) -> int:
        """Return how many entries of ``kind`` are written."""
        return self.inner.count(kind)

    def failures(self, handler: str, event_id: str) -> int:
        """Return how many times ``handler`` failed on ``event_id`` (failures are never queued)."""
        return self.inner.failures(handler, event_id)


class JournalLogHandler(logging.Handler):
    """A logging handler that writes each record to a journal with its context ids.

    It carries a :class:`~tidings.integrations.logging.ContextFilter`, so each record gets
    ``correlation_id``, ``tenant_id`` and ``event_id`` from the context it was logged in, as
    any handler configured the documented way would. A record the journal cannot store is
    dropped through ``handleError`` (logging must not fail the work it describes).
    """

    def __init__(self, journal: Journal, level: int = logging.INFO) -> None:
        super().__init__(level)
        self.journal = journal
        self.addFilter(ContextFilter(default=""))

    def emit(self, record: logging.LogRecord) -> None:
        """Store ``record`` as a ``log`` entry."""
        try:
            ids = {
                key: getattr(record, key, "") or None
                for key in ("correlation_id", "tenant_id", "event_id")
            }
            message = f"{record.levelname} {record.getMessage()}"
            self.journal.add(Entry("log", record.created, name=record.name, detail=message, **ids))
        except Exception:  # noqa: BLE001 - see the class docstring
            self.handleError(record)


class CountingInbox:
    """Wraps an inbox and journals every duplicate it suppresses (a ``duplicate`` entry).

    A claim found busy elsewhere (:class:`~tidings.errors.InboxBusyError`, which the worker
    retries) is journaled as ``busy``. Only ``guard`` is offered (not the batch capability),
    so each (handler, event) pair is claimed on its own and every skip can be counted.
    """

    def __init__(self, inner: Inbox, journal: Journal) -> None:
        self.inner = inner
        self.journal = journal

    @contextmanager
    def guard(self, handler: str, event_id: str) -> Iterator[bool]:
        """Claim through the wrapped inbox; journal the pair when it is a duplicate or busy."""
        with ExitStack() as claim:
            try:
                fresh = claim.enter_context(self.inner.guard(handler, event_id))
            except InboxBusyError:
                self.journal.add(record("busy", name=handler, event_id=event_id))
                raise
            if not fresh:
                self.journal.add(record("duplicate", name=handler, event_id=event_id))
            yield fresh
