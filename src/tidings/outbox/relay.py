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
3. Each row's envelope is forwarded as stored (the relay is a pipe: it needs no event class;
   see :class:`~tidings.ports.EnvelopeSender`); only after the transport returned (the broker
   confirmed) are the rows marked published (or deleted) and the transaction committed. A row
   that fails on its own is counted, holds back its key, and after ``max_attempts`` moves to
   the quarantine table in this same transaction (its key then goes on). If the whole send
   fails, the transaction rolls back and the rows stay pending, unlocked, for the next
   attempt. If the relay dies, its connection dies and the database releases the locks:
   at-least-once.

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

from tidings._notify import idle
from tidings.bus import EventBus
from tidings.codec import Envelope
from tidings.events import DomainEvent
from tidings.outbox._common import (
    DEFAULT_MAX_ATTEMPTS,
    Backoff,
    BatchReport,
    RedactingFilter,
    forward_batch,
    in_key_order,
    log_failed,
    read_stored,
    relay_batch,
    resolve_publisher,
    secret_urls,
    send_stored,
)
from tidings.outbox._table import REASON_LENGTH, check_dialect, sa, utcnow
from tidings.outbox._table import postgresql as pg
from tidings.outbox.writer import Outbox
from tidings.ports import EnvelopeSender, StoredEnvelope, Transport

__all__ = ["Backoff", "BatchReport", "Publish", "Relay"]

Publish = Callable[[Sequence[DomainEvent]], None]

log = logging.getLogger("tidings.outbox.relay")

_LOCKING = ("postgresql", "mysql", "mariadb")
_RECHECK = 60.0  # seconds before looking again for a missing quarantine table


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
        publish: where rows go. A transport that forwards stored envelopes
            (:class:`~tidings.ports.EnvelopeSender`: memory, Redis Streams, Celery), or an
            :class:`~tidings.EventBus` with one, gets each row's envelope as stored, with no
            event class needed (the relay is a pipe). Otherwise (an ``EventBus`` without a
            transport, or a function) rows are decoded and the events published; a function
            must return only once the broker accepted them all, and raise otherwise. A class
            (an event class, say) is refused.
        batch_size: most rows per claim.
        poll_interval: seconds between claims when idle and no notification arrives.
        listen: on PostgreSQL with psycopg 3, wake on ``NOTIFY`` (polling stays the fallback).
        keep_published: ``None`` deletes rows once published; a duration marks them published
            instead, and :meth:`run` purges those older than it (at most once a minute).
        backoff: waits after consecutive failures (of the broker or the database).
        max_attempts: failures of a row of its own (undecodable, or refused by the transport)
            after which it moves to the outbox's quarantine table with its reason, in the
            transaction that deletes it, and its key goes on. Failures of a whole batch (the
            broker down) count attempts too but never quarantine a row by themselves.
        decode: ``None`` forwards envelopes when ``publish`` can, else decodes; ``True``
            always decodes (the event classes must be registered); ``False`` refuses, with
            :class:`~tidings.errors.UsageError`, a ``publish`` that cannot forward envelopes.
        redact: URLs (database, broker) whose passwords must never appear in the relay's log
            lines and tracebacks; the engine's URL and the broker URL or password of
            ``publish``'s transport (Celery, Redis) are always included (see ``secrets``).

    Delivery is at least once: a crash between the broker's confirmation and the commit sends
    a batch again (the inbox makes that harmless). Order is kept per partition key, also
    across several relays (see the module docstring). A row that cannot be relayed is logged
    and left pending with its attempt counted, holding back the later rows of its key (and
    only those); after ``max_attempts`` it is quarantined (see ``Outbox.requeue``). Without the
    quarantine table (``Outbox.create_tables`` or your migration makes it) such a row waits,
    as before, and a warning says so. Several ``Relay``
    objects may run at once (threads or processes); one object runs one loop at a time.
    """

    def __init__(
        self,
        engine: sa.Engine,
        outbox: Outbox,
        publish: Publish | EventBus | Transport | EnvelopeSender,
        *,
        batch_size: int = 500,
        poll_interval: float = 1.0,
        listen: bool = True,
        keep_published: timedelta | None = None,
        backoff: Backoff | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        decode: bool | None = None,
        redact: Sequence[str] = (),
    ) -> None:
        check_dialect(engine.dialect.name)
        if batch_size < 1 or poll_interval <= 0 or max_attempts < 1:
            msg = "Relay needs batch_size >= 1, poll_interval > 0 and max_attempts >= 1"
            raise ValueError(msg)
        self.engine = engine
        self.outbox = outbox
        self.sender, self.publish = resolve_publisher(publish, decode)
        self.max_attempts = max_attempts
        database = engine.url.render_as_string(hide_password=False)
        self.secrets = (database, *redact, *secret_urls(publish))
        RedactingFilter.install(log, *self.secrets)
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.listen = listen and engine.dialect.name == "postgresql"
        self.listen = self.listen and engine.dialect.driver == "psycopg"
        self.keep_published = keep_published
        self.backoff = Backoff() if backoff is None else backoff
        self._dialect = engine.dialect.name
        self._next_purge = 0.0
        self._quarantine_seen: bool | None = None
        self._quarantine_checked = 0.0
        table = outbox.table
        claim = (
            sa.select(table.c.id, table.c.partition_key, table.c.payload, table.c.attempts)
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
        """Claim one batch, relay it, mark it; return how many rows were relayed.

        See :meth:`run_batch` (this is its ``relayed``).
        """
        return self.run_batch().relayed

    def run_batch(self) -> BatchReport:
        """Claim one batch, relay it, mark it; report what was relayed, failed, quarantined.

        Rows that fail on their own are counted (or quarantined, after ``max_attempts``) and
        the rest of the batch goes on; see the class docstring.

        Raises:
            Exception: whatever the transport (for the whole batch) or the database raised;
                the batch stays pending (its attempts counted) and may be claimed again.
        """
        counted: list[int] = []
        failed: list[tuple[Any, str]] = []
        moved: set[int] = set()
        try:
            with self._connect() as connection, connection.begin():
                rows = connection.execute(self._claim).all()
                if not rows:
                    return BatchReport()
                rows = self._in_order(connection, rows)
                quarantining = self._quarantine_exists(connection)

                def goes_on(row: Any) -> bool:
                    return quarantining and row.attempts + 1 >= self.max_attempts

                try:
                    ids, failed = self._forward(rows, goes_on)
                except BaseException:
                    counted = [row.id for row in rows]
                    raise
                moved = {row.id for row, _ in failed if goes_on(row)}
                counted = [row.id for row, _ in failed if row.id not in moved]
                if moved:
                    self._quarantine(connection, [(r, why) for r, why in failed if r.id in moved])
                if ids:
                    self._mark(connection, ids)
            log_failed(failed, moved, self.outbox.table.name)
            return BatchReport(len(ids), tuple(counted), tuple(sorted(moved)))
        finally:
            if counted:
                self._count_attempts(counted)

    def _forward(
        self, rows: Sequence[Any], goes_on: Callable[[Any], bool]
    ) -> tuple[list[int], list[tuple[Any, str]]]:
        """Send the rows through the pipe (or decoded, through ``publish``)."""
        channel = self.outbox.channel
        sender = self.sender
        if sender is not None:

            def read(row: Any) -> StoredEnvelope:
                return read_stored(row, self.outbox.codec.limits)

            def send(envelopes: list[StoredEnvelope]) -> None:
                send_stored(sender, envelopes, channel)

            return forward_batch(rows, read, send, goes_on)
        codec = self.outbox.codec
        publish = self.publish
        assert publish is not None  # noqa: S101 - resolve_publisher gives a sender or this

        def decode(row: Any) -> Envelope:
            return codec.read(row.payload)

        def publish_decoded(envelopes: list[Envelope]) -> None:
            events = [envelope.event for envelope in envelopes]
            relay_batch(publish, events, [e.traceparent for e in envelopes], channel)

        return forward_batch(rows, decode, publish_decoded, goes_on)

    @property
    def quarantining(self) -> bool:
        """Whether the last batch found the quarantine table (rows can be quarantined)."""
        return bool(self._quarantine_seen)

    def _quarantine_exists(self, connection: sa.Connection) -> bool:
        """Whether the quarantine table exists (looked up once, again a minute after a miss)."""
        if self._quarantine_seen or (
            self._quarantine_seen is False and time.monotonic() < self._quarantine_checked
        ):
            return bool(self._quarantine_seen)
        found = sa.inspect(connection).has_table(self.outbox.quarantine.name)
        if not found and self._quarantine_seen is None:
            log.warning(
                "the outbox quarantine table %s does not exist: a row that cannot be relayed "
                "will hold its key instead of being quarantined; create it (Outbox.create_tables "
                "or your migration)",
                self.outbox.quarantine.name,
            )
        self._quarantine_seen = found
        self._quarantine_checked = time.monotonic() + _RECHECK
        return found

    def _quarantine(self, connection: sa.Connection, rows: Sequence[tuple[Any, str]]) -> None:
        """Move ``rows`` to the quarantine table with their reasons (this transaction)."""
        table = self.outbox.table
        reasons = {row.id: reason for row, reason in rows}
        found = connection.execute(
            sa.select(
                table.c.id, table.c.event_id, table.c.event_type, table.c.partition_key,
                table.c.payload, table.c.created_at, table.c.attempts,
            ).where(table.c.id.in_(list(reasons)))
        ).all()  # fmt: skip
        now = utcnow(self._dialect)
        connection.execute(
            sa.insert(self.outbox.quarantine),
            [
                {
                    "id": row.id,
                    "event_id": row.event_id,
                    "event_type": row.event_type,
                    "partition_key": row.partition_key,
                    "payload": row.payload,
                    "created_at": row.created_at,
                    "quarantined_at": now,
                    "attempts": row.attempts + 1,
                    "reason": reasons[row.id][:REASON_LENGTH],
                }
                for row in found
            ],
        )
        connection.execute(sa.delete(table).where(table.c.id.in_(list(reasons))))

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
                listener = idle(stop, listener, self.poll_interval, log)
        finally:
            if listener is not None:
                listener.close()

    def _open_listener(self) -> _Listener | None:
        try:
            return _Listener(self.engine, self.outbox.channel)
        except Exception:
            log.warning("cannot LISTEN for outbox notifications; polling", exc_info=True)
            return None

    def _purge_now_and_then(self) -> None:
        if self.keep_published is None or time.monotonic() < self._next_purge:
            return
        self._next_purge = time.monotonic() + 60.0
        cutoff = utcnow("postgresql") - self.keep_published
        self.outbox.purge(self.engine, published_before=cutoff)
