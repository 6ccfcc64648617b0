"""The relay: moves committed outbox rows to the broker, in order per partition key.

How a batch is claimed, and why nothing is skipped or reordered
---------------------------------------------------------------

One batch is one transaction:

1. ``SELECT ... WHERE published_at IS NULL ORDER BY id LIMIT n FOR UPDATE SKIP LOCKED``
   (PostgreSQL, MariaDB/MySQL; on SQLite a plain SELECT: SQLite has a single writer, so run
   one relay per SQLite database). Rows another relay holds are skipped, not waited for.
2. Per partition key, only a *prefix* of that key's pending rows may be in flight: a claimed
   row is dropped from the batch if an older pending row of its key is not in the batch (it is
   held by another relay, or was dropped). So with several relays a key's rows still reach the
   broker one batch after another, in id order.
3. The events are published; only after ``publish`` returned (the broker confirmed) are the
   rows marked published (or deleted) and the transaction committed. If publishing fails, the
   transaction rolls back and the rows stay pending, unlocked, for the next attempt. If the
   relay dies, its connection dies and the database releases the locks: at-least-once.

The gap problem: ids are taken when a row is inserted, but rows become visible when their
transaction commits, so id N+1 can be visible (and relayed) while N is not yet. A relay that
remembered "everything up to N+1 is done" would never deliver N. This relay keeps no
high-water mark: every claim asks for *all* pending rows, whatever their id, so N is claimed
as soon as it commits, merely later. Per key, order is the order in which rows became visible;
when transactions on one aggregate are serialized (a row lock or a version check on the
aggregate, which the session hook's after-flush write respects), that is also id order.

Waking up: on PostgreSQL, ``Outbox.add`` issues ``NOTIFY`` in the writing transaction, which
PostgreSQL delivers at commit; the relay LISTENs on a connection of its own and claims at once.
A lost notification, or a dead listener connection, only delays work until the next poll.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from tidings import _tracing
from tidings.bus import EventBus
from tidings.events import DomainEvent
from tidings.outbox._common import Backoff, decode_batch, in_key_order, relay_batch
from tidings.outbox._table import check_dialect, sa, utcnow
from tidings.outbox._table import postgresql as pg
from tidings.outbox.writer import Outbox

__all__ = ["Backoff", "Publish", "Relay"]

Publish = Callable[[Sequence[DomainEvent]], None]

log = logging.getLogger("tidings.outbox.relay")

_LOCKING = ("postgresql", "mysql", "mariadb")
_SLICE = 0.25  # longest a wait goes without looking at the stop event


class _Listener:
    """A dedicated autocommit psycopg 3 connection LISTENing on the outbox's channel."""

    def __init__(self, engine: sa.Engine, channel: str) -> None:
        raw = engine.raw_connection()
        connection: Any = raw.driver_connection
        raw.detach()  # a listening connection never goes back to the pool
        self._raw = raw
        try:
            connection.rollback()
            connection.autocommit = True
            quoted = engine.dialect.identifier_preparer.quote_identifier(channel)
            connection.execute(f"LISTEN {quoted}")
        except BaseException:
            raw.close()
            raise
        self._connection = connection

    def wait(self, timeout: float) -> bool:
        """Whether a notification arrived within ``timeout`` seconds."""
        return any(True for _ in self._connection.notifies(timeout=timeout, stop_after=1))

    def close(self) -> None:
        """Close the connection (errors ignored: it may be dead already)."""
        try:
            self._raw.close()
        except Exception:
            log.debug("closing the outbox listener failed", exc_info=True)


class Relay:
    """Publishes committed outbox rows and marks them only after the broker confirmed.

    Args:
        engine: the database holding the outbox.
        outbox: the outbox (its table and codec).
        publish: called with each batch's events in order; it must return only once the
            broker accepted them all, and raise otherwise. An :class:`~tidings.EventBus` is
            used through its ``publish``.
        batch_size: most rows per claim.
        poll_interval: seconds between claims when idle and no notification arrives.
        listen: on PostgreSQL with psycopg 3, wake on ``NOTIFY`` (polling stays the fallback).
        keep_published: ``None`` deletes rows once published; a duration marks them published
            instead, and :meth:`run` purges those older than it (at most once a minute).
        backoff: waits after consecutive failures (of the broker or the database).

    Delivery is at least once: a crash between the broker's confirmation and the commit sends
    a batch again (the inbox makes that harmless). Order is kept per partition key, also
    across several relays (see the module docstring). An undecodable row (an event type this
    process does not know, say) is logged and left pending with its attempts counted; it holds
    back the later rows of its key, and only those, until it is fixed. Several ``Relay``
    objects may run at once (threads or processes); one object runs one loop at a time.
    """

    def __init__(
        self,
        engine: sa.Engine,
        outbox: Outbox,
        publish: Publish | EventBus,
        *,
        batch_size: int = 500,
        poll_interval: float = 1.0,
        listen: bool = True,
        keep_published: timedelta | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        check_dialect(engine.dialect.name)
        if batch_size < 1 or poll_interval <= 0:
            msg = "Relay needs batch_size >= 1 and poll_interval > 0"
            raise ValueError(msg)
        self.engine = engine
        self.outbox = outbox
        self.publish: Publish = (
            (lambda events: publish.publish(*events)) if isinstance(publish, EventBus) else publish
        )
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.listen = listen and engine.dialect.name == "postgresql"
        self.listen = self.listen and engine.dialect.driver == "psycopg"
        self.keep_published = keep_published
        self.backoff = Backoff() if backoff is None else backoff
        self._dialect = engine.dialect.name
        self._next_purge = 0.0
        table = outbox.table
        claim = (
            sa.select(table.c.id, table.c.partition_key, table.c.payload)
            .where(table.c.published_at.is_(None))
            .order_by(table.c.id)
            .limit(batch_size)
        )
        if self._dialect in _LOCKING:
            claim = claim.with_for_update(skip_locked=True)
        self._claim = claim
        # Pending rows up to the batch's newest id: when that is the batch alone, no key has an
        # older pending row outside it, and the per-key query below is not needed.
        self._behind = (
            sa.select(sa.func.count())
            .select_from(table)
            .where(table.c.published_at.is_(None), table.c.id <= sa.bindparam("newest"))
        )
        self._older: sa.Select[Any] | None = None
        self._delete: sa.Delete | None = None
        if self._dialect == "postgresql":
            # One array parameter, not hundreds of expanded IN parameters: no per-batch
            # rendering, query parsing and planning of a statement 500 binds long.
            ids = sa.bindparam("ids", type_=pg.ARRAY(sa.BigInteger))
            keys = sa.bindparam("keys", type_=pg.ARRAY(sa.String))
            self._older = (
                sa.select(table.c.partition_key, sa.func.min(table.c.id))
                .where(
                    table.c.published_at.is_(None),
                    table.c.partition_key == sa.any_(keys),
                    sa.not_(table.c.id == sa.any_(ids)),
                    table.c.id < sa.bindparam("newest"),
                )
                .group_by(table.c.partition_key)
            )
            self._delete = sa.delete(table).where(table.c.id == sa.any_(ids))

    # -- one batch --------------------------------------------------------------------------

    def run_once(self) -> int:
        """Claim one batch, publish it, mark it; return how many rows were relayed.

        Raises:
            Exception: whatever ``publish`` or the database raised; the batch stays pending
                (its attempts counted) and may be claimed again.
        """
        failed: list[int] = []
        try:
            with self._connect() as connection, connection.begin():
                rows = connection.execute(self._claim).all()
                if not rows:
                    return 0
                rows = self._in_order(connection, rows)
                traceparents: list[str | None] | None = None if _tracing.hooks is None else []
                events, ids, failed = self._decoded(rows, traceparents)
                if not events:
                    return 0
                try:
                    relay_batch(self.publish, events, traceparents, self.outbox.channel)
                except BaseException:
                    failed.extend(ids)
                    raise
                self._mark(connection, ids)
            return len(ids)
        finally:
            if failed:
                self._count_attempts(failed)

    def _connect(self) -> sa.Connection:
        connection = self.engine.connect()
        if self._dialect in ("mysql", "mariadb"):
            # REPEATABLE READ would take gap locks and read a stale snapshot of pending rows.
            connection = connection.execution_options(isolation_level="READ COMMITTED")
        return connection

    def _in_order(self, connection: sa.Connection, rows: Sequence[Any]) -> list[Any]:
        """Keep, per key, only the claimed rows older than any pending row not claimed here."""
        table = self.outbox.table
        keys = {row.partition_key for row in rows}
        ids = [row.id for row in rows]
        newest = max(ids)
        if connection.execute(self._behind, {"newest": newest}).scalar_one() == len(ids):
            # Every pending row up to the batch's newest id is in the batch: no key can have an
            # older pending row outside it.
            return list(rows)
        if self._older is not None:
            found = connection.execute(
                self._older, {"ids": ids, "keys": list(keys), "newest": newest}
            )
        else:
            older = (
                sa.select(table.c.partition_key, sa.func.min(table.c.id))
                .where(
                    table.c.published_at.is_(None),
                    table.c.partition_key.in_(keys),
                    table.c.id.not_in(ids),
                    table.c.id < newest,
                )
                .group_by(table.c.partition_key)
            )
            found = connection.execute(older)
        first_outside: dict[str, int] = dict(found.all())
        return in_key_order(rows, first_outside)

    def _decoded(
        self, rows: Sequence[Any], traceparents: list[str | None] | None
    ) -> tuple[list[DomainEvent], list[int], list[int]]:
        return decode_batch(rows, self.outbox.codec, traceparents)

    def _mark(self, connection: sa.Connection, ids: list[int]) -> None:
        table = self.outbox.table
        statement: sa.Delete | sa.Update
        if self.keep_published is None and self._delete is not None:
            connection.execute(self._delete, {"ids": ids})
            return
        if self.keep_published is None:
            statement = sa.delete(table).where(table.c.id.in_(ids))
        else:
            statement = (
                sa.update(table)
                .where(table.c.id.in_(ids))
                .values(published_at=utcnow(self._dialect), attempts=table.c.attempts + 1)
            )
        connection.execute(statement)

    def _count_attempts(self, ids: list[int]) -> None:
        table = self.outbox.table
        statement = (
            sa.update(table).where(table.c.id.in_(ids)).values(attempts=table.c.attempts + 1)
        )
        try:
            with self._connect() as connection, connection.begin():
                connection.execute(statement)
        except Exception:
            log.warning("could not count a failed attempt on outbox rows", exc_info=True)

    # -- the loop ---------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Relay until ``stop`` is set; return within about a quarter second after it is.

        Drains the backlog batch after batch; when idle, waits for a notification or
        ``poll_interval``. After a failure (broker or database) it waits per ``backoff``,
        longer each time in a row, and never busy-loops; the first success resets it.
        Failures are logged, never raised.
        """
        listener: _Listener | None = None
        next_listen = 0.0
        failures = 0
        try:
            while not stop.is_set():
                # LISTEN before claiming: a commit between the claim and the wait still wakes us.
                if self.listen and listener is None and time.monotonic() >= next_listen:
                    listener = self._open_listener()
                    next_listen = time.monotonic() + self.poll_interval
                try:
                    count = self.run_once()
                    self._purge_now_and_then()
                except Exception:
                    failures += 1
                    delay = self.backoff.delay(failures)
                    log.exception("outbox relay failed (%s in a row); next try in %.1f s",
                                  failures, delay)  # fmt: skip
                    stop.wait(delay)
                    continue
                failures = 0
                if count:
                    continue
                listener = self._idle(stop, listener)
        finally:
            if listener is not None:
                listener.close()

    def _open_listener(self) -> _Listener | None:
        try:
            return _Listener(self.engine, self.outbox.channel)
        except Exception:
            log.warning("cannot LISTEN for outbox notifications; polling", exc_info=True)
            return None

    def _idle(self, stop: threading.Event, listener: _Listener | None) -> _Listener | None:
        """Wait up to ``poll_interval`` for a notification or ``stop``.

        Returns the listener if still usable, ``None`` once it failed.
        """
        deadline = time.monotonic() + self.poll_interval
        while not stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if listener is None:
                stop.wait(remaining)
                break
            try:
                if listener.wait(min(remaining, _SLICE)):
                    break
            except Exception:
                log.warning("the outbox listener failed; polling until it is back", exc_info=True)
                listener.close()
                listener = None
        return listener

    def _purge_now_and_then(self) -> None:
        if self.keep_published is None or time.monotonic() < self._next_purge:
            return
        self._next_purge = time.monotonic() + 60.0
        cutoff = utcnow("postgresql") - self.keep_published
        self.outbox.purge(self.engine, published_before=cutoff)
