"""The Django relay: moves committed ``OutboxEvent`` rows to the broker, in order per key.

It runs the algorithm of :mod:`tidings.outbox.relay` (read that docstring for the why) through
the Django ORM, so a Django project needs no SQLAlchemy:

1. In one ``transaction.atomic`` block, claim the oldest pending rows
   (``published_at IS NULL ORDER BY id LIMIT n``) with
   ``select_for_update(skip_locked=True)`` on PostgreSQL and MySQL/MariaDB; rows another relay
   holds are skipped, not waited for. SQLite has one writer and no row locks: run one relay
   per SQLite database.
2. Per partition key only a prefix of the key's pending rows may be in flight: a claimed row
   is dropped if an older pending row of its key was not claimed here.
3. Forward each row's envelope as stored (the relay is a pipe: no event class needed) when
   the bus's transport can (:class:`~tidings.ports.EnvelopeSender`), else decode and publish;
   only after the transport returned are the rows deleted (or marked published) and the
   block committed. A failure rolls back (the rows stay pending) and counts an attempt.

No high-water mark is kept, so a row whose transaction commits late (the gap problem) is
claimed as soon as it is visible. MySQL/MariaDB: keep Django's default isolation level,
READ COMMITTED; REPEATABLE READ would read a stale snapshot of pending rows.

Waking up: on PostgreSQL (psycopg 3), :func:`~tidings.integrations.django.publish` notifies
``tidings_outbox`` in its insert, which PostgreSQL delivers at commit; the relay LISTENs on a
connection of its own and claims at once. Polling stays the fallback: a lost notification, a
listener that cannot connect or dies, or another database only delays work until the next poll
(the listener is opened again at most once per ``poll_interval``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any
from urllib.parse import quote

from django.db import DEFAULT_DB_ALIAS, connections, router, transaction
from django.db.models import F, Min
from django.utils import timezone

from tidings._notify import idle
from tidings.bus import EventBus
from tidings.codec import Codec, Envelope, default_codec
from tidings.errors import UsageError
from tidings.events import DomainEvent
from tidings.integrations.django.models import OutboxEvent, OutboxQuarantine
from tidings.outbox._common import (
    DEFAULT_MAX_ATTEMPTS,
    REASON_LENGTH,
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
from tidings.ports import EnvelopeSender, StoredEnvelope, Transport

__all__ = ["Backoff", "BatchReport", "Publish", "Relay", "database_secrets"]

Publish = Callable[[Sequence[DomainEvent]], None]
"""Publishes a batch in order; returns only once the broker accepted all, raises otherwise."""

log = logging.getLogger("tidings.integrations.django.relay")

_PURGE_EVERY = 60.0
_CHANNEL = "tidings_outbox"  # what publish() notifies


class _Listener:
    """A Django connection of its own (not the thread's), in autocommit, LISTENing on the channel.

    Only psycopg 3 waits for notifications here; with another driver, opening fails (and the
    relay polls).
    """

    def __init__(self, using: str) -> None:
        wrapper = connections.create_connection(using)
        try:
            wrapper.ensure_connection()
            raw = wrapper.connection
            if not callable(getattr(raw, "notifies", None)):
                msg = "waking on NOTIFY needs psycopg 3 (the relay polls)"
                raise UsageError(msg)
            with wrapper.cursor() as cursor:
                cursor.execute(f"LISTEN {wrapper.ops.quote_name(_CHANNEL)}")
        except BaseException:
            wrapper.close()
            raise
        self._wrapper, self._raw = wrapper, raw

    def wait(self, timeout: float) -> bool:
        """Whether a notification arrived within ``timeout`` seconds."""
        return any(True for _ in self._raw.notifies(timeout=timeout, stop_after=1))

    def close(self) -> None:
        """Close the connection (errors ignored: it may be dead already)."""
        try:
            self._wrapper.close()
        except Exception:
            log.debug("closing the outbox listener failed", exc_info=True)


class Relay:
    """Publishes committed outbox rows and deletes (or marks) them only after the broker confirmed.

    Args:
        publish: an :class:`~tidings.EventBus` or a transport. A transport that forwards
            stored envelopes (memory, Redis Streams, Celery), or a bus with one, gets each
            row's envelope as stored, no event class needed; otherwise (a bus without a
            transport, or a callable taking each batch's events in order, returning only once
            the broker accepted them all) rows are decoded. A class is refused.
        using: the database alias (default: the router's write database for ``OutboxEvent``).
        batch_size: most rows per claim.
        poll_interval: seconds between claims when idle.
        keep_published: ``None`` deletes rows once published; a duration marks them published
            instead, and :meth:`run` deletes those older than it (at most once a minute).
        backoff: waits after consecutive failures (of the broker or the database).
        codec: decodes the stored envelopes (the default codec if omitted).
        decode: ``None`` forwards envelopes when ``publish`` can, else decodes; ``True``
            always decodes; ``False`` refuses a ``publish`` that cannot forward envelopes.
        max_attempts: failures of a row of its own (undecodable, refused by the transport)
            after which it is quarantined; failures of a whole batch never quarantine a row.
        listen: on PostgreSQL with psycopg 3, wake on ``NOTIFY`` when idle (polling stays the
            fallback); ignored on other databases.

    Delivery is at least once: a crash between the broker's confirmation and the commit sends
    a batch again (the inbox makes that harmless). Order is kept per partition key, also across
    several relays. A row that cannot be relayed (undecodable, or refused by the transport) is
    logged (its data escaped) and left pending with its attempts counted; it holds back the
    later rows of its key, and only those, until after ``max_attempts`` it moves to
    :class:`~tidings.integrations.django.models.OutboxQuarantine` with its reason, in the
    block that deletes it, and its key goes on (until the quarantine table is migrated, it
    waits, and a warning says so). Log lines and tracebacks never show the database
    password. Several
    relays may run at once (threads or processes, PostgreSQL or MySQL); one
    object runs one loop at a time, and each thread uses its own Django connection.
    """

    def __init__(
        self,
        publish: Publish | EventBus | Transport | EnvelopeSender,
        *,
        using: str | None = None,
        batch_size: int = 500,
        poll_interval: float = 1.0,
        keep_published: timedelta | None = None,
        backoff: Backoff | None = None,
        codec: Codec | None = None,
        decode: bool | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        listen: bool = True,
    ) -> None:
        if batch_size < 1 or poll_interval <= 0 or max_attempts < 1:
            msg = "Relay needs batch_size >= 1, poll_interval > 0 and max_attempts >= 1"
            raise ValueError(msg)
        self.max_attempts = max_attempts
        self._quarantine_seen: bool | None = None
        self._quarantine_checked = 0.0
        self.sender, self.publish = resolve_publisher(publish, decode)
        self.using: str = using or router.db_for_write(OutboxEvent) or DEFAULT_DB_ALIAS
        self.secrets = (*database_secrets(self.using), *secret_urls(publish))
        RedactingFilter.install(log, *self.secrets)
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.keep_published = keep_published
        self.backoff = Backoff() if backoff is None else backoff
        self.listen = listen
        self.codec = default_codec if codec is None else codec
        self._next_purge = 0.0

    def _rows(self) -> Any:
        return OutboxEvent.objects.using(self.using)

    # -- one batch --------------------------------------------------------------------------

    def run_once(self) -> int:
        """Claim one batch, relay it, delete or mark it; return how many rows were relayed.

        See :meth:`run_batch` (this is its ``relayed``).
        """
        return self.run_batch().relayed

    def run_batch(self) -> BatchReport:
        """Claim one batch, relay it, delete or mark it; report what was relayed and failed.

        Raises:
            Exception: whatever the transport (for the whole batch) or the database raised;
                the batch stays pending (its attempts counted) and may be claimed again.
        """
        counted: list[int] = []
        failed: list[tuple[Any, str]] = []
        moved: set[int] = set()
        try:
            with transaction.atomic(using=self.using):
                claimed = self._claim()
                if not claimed:
                    return BatchReport()
                rows = self._in_order(claimed)
                quarantining = self._quarantine_exists()

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
                    self._quarantine([(r, why) for r, why in failed if r.id in moved])
                if ids:
                    self._mark(ids)
            log_failed(failed, moved, OutboxEvent._meta.db_table)
            return BatchReport(len(ids), tuple(counted), tuple(sorted(moved)))
        finally:
            if counted:
                self._count_attempts(counted)

    @property
    def quarantining(self) -> bool:
        """Whether the last batch found the quarantine table (rows can be quarantined)."""
        return bool(self._quarantine_seen)

    def _quarantine_exists(self) -> bool:
        """Whether the quarantine table exists (looked up once, again a minute after a miss)."""
        if self._quarantine_seen or (
            self._quarantine_seen is False and time.monotonic() < self._quarantine_checked
        ):
            return bool(self._quarantine_seen)
        connection = connections[self.using]
        name = OutboxQuarantine._meta.db_table
        found = name in connection.introspection.table_names()
        if not found and self._quarantine_seen is None:
            log.warning(
                "the outbox quarantine table %s does not exist: a row that cannot be relayed "
                "will hold its key instead of being quarantined; run `manage.py migrate`",
                name,
            )
        self._quarantine_seen = found
        self._quarantine_checked = time.monotonic() + 60.0
        return found

    def _quarantine(self, rows: list[tuple[Any, str]]) -> None:
        """Move ``rows`` to the quarantine table with their reasons (this atomic block)."""
        reasons = {row.id: reason for row, reason in rows}
        now = timezone.now()
        found = self._rows().filter(id__in=list(reasons))
        OutboxQuarantine.objects.using(self.using).bulk_create(
            [
                OutboxQuarantine(
                    id=row.id,
                    event_id=row.event_id,
                    event_type=row.event_type,
                    partition_key=row.partition_key,
                    payload=row.payload,
                    created_at=row.created_at,
                    quarantined_at=now,
                    attempts=row.attempts + 1,
                    reason=reasons[row.id][:REASON_LENGTH],
                )
                for row in found
            ]
        )
        self._rows().filter(id__in=list(reasons)).delete()

    def _forward(
        self, rows: list[Any], goes_on: Callable[[Any], bool]
    ) -> tuple[list[int], list[tuple[Any, str]]]:
        """Send the rows through the pipe (or decoded, through ``publish``)."""
        table = OutboxEvent._meta.db_table
        sender = self.sender
        if sender is not None:

            def read(row: Any) -> StoredEnvelope:
                return read_stored(row, self.codec.limits)

            def send(envelopes: list[StoredEnvelope]) -> None:
                send_stored(sender, envelopes, table)

            return forward_batch(rows, read, send, goes_on)
        codec = self.codec
        publish = self.publish
        assert publish is not None  # noqa: S101 - resolve_publisher gives a sender or this

        def decode(row: Any) -> Envelope:
            return codec.read(row.payload)

        def publish_decoded(envelopes: list[Envelope]) -> None:
            events = [envelope.event for envelope in envelopes]
            relay_batch(publish, events, [e.traceparent for e in envelopes], table)

        return forward_batch(rows, decode, publish_decoded, goes_on)

    def _claim(self) -> list[Any]:
        pending = self._rows().filter(published_at__isnull=True)
        if connections[self.using].features.has_select_for_update_skip_locked:
            pending = pending.select_for_update(skip_locked=True)
        claim = pending.order_by("id").values_list(
            "id", "partition_key", "payload", "attempts", named=True
        )
        return list(claim[: self.batch_size])

    def _in_order(self, rows: list[Any]) -> list[Any]:
        """Keep, per key, only the claimed rows older than any pending row not claimed here."""
        ids = [row.id for row in rows]
        older = (
            self._rows()
            .filter(
                published_at__isnull=True,
                partition_key__in={row.partition_key for row in rows},
                id__lt=max(ids),
            )
            .exclude(id__in=ids)
            .order_by()
            .values("partition_key")
            .annotate(first=Min("id"))
            .values_list("partition_key", "first")
        )
        first_outside: dict[str, int] = dict(older)
        return in_key_order(rows, first_outside)

    def _mark(self, ids: list[int]) -> None:
        rows = self._rows().filter(id__in=ids)
        if self.keep_published is None:
            rows.delete()
        else:
            rows.update(published_at=timezone.now(), attempts=F("attempts") + 1)

    def _count_attempts(self, ids: list[int]) -> None:
        try:
            with transaction.atomic(using=self.using):
                self._rows().filter(id__in=ids).update(attempts=F("attempts") + 1)
        except Exception:
            log.warning("could not count a failed attempt on outbox rows", exc_info=True)

    def purge(self, *, published_before: timedelta) -> int:
        """Delete rows published more than ``published_before`` ago; return how many.

        Unpublished rows are never deleted here.
        """
        cutoff = timezone.now() - published_before
        deleted, _ = (
            self._rows().filter(published_at__isnull=False, published_at__lt=cutoff).delete()
        )
        return int(deleted)

    # -- the loop ---------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Relay until ``stop`` is set; return within about a quarter second after it is.

        Drains the backlog batch after batch; when idle, waits for a notification (see the
        module docstring) or ``poll_interval``. After a failure (broker or database) it waits
        per ``backoff``, longer each time in a row, and never busy-loops; the first success
        resets it. Failures are logged, never raised. A broken database connection is closed,
        and Django opens a new one on the next claim.
        """
        failures = 0
        connection = connections[self.using]
        listener: _Listener | None = None
        next_listen = 0.0
        listening = self.listen and connection.vendor == "postgresql"
        try:
            while not stop.is_set():
                # LISTEN before claiming: a commit between the claim and the wait still wakes us.
                if listening and listener is None and time.monotonic() >= next_listen:
                    listener = self._open_listener()
                    next_listen = time.monotonic() + self.poll_interval
                connection.close_if_unusable_or_obsolete()
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
                if not count:
                    listener = idle(stop, listener, self.poll_interval, log)
        finally:
            if listener is not None:
                listener.close()
            connection.close()

    def _open_listener(self) -> _Listener | None:
        try:
            return _Listener(self.using)
        except Exception:
            log.warning("cannot LISTEN for outbox notifications; polling", exc_info=True)
            return None

    def _purge_now_and_then(self) -> None:
        if self.keep_published is None:
            return
        now = time.monotonic()
        if now < self._next_purge:
            return
        self._next_purge = now + _PURGE_EVERY
        self.purge(published_before=self.keep_published)


def database_secrets(using: str) -> list[str]:
    """The password of Django database ``using``, as a URL for :class:`RedactingFilter`.

    Django keeps ``PASSWORD`` apart from any URL; wrapped in one, every spelling of it (as
    written, percent-encoded) is redacted from the relay's log lines and error messages.
    """
    settings = connections.settings.get(using, {})
    password = str(settings.get("PASSWORD") or "")
    if not password:
        return []
    user = quote(str(settings.get("USER") or "user"), safe="")
    return [f"db://{user}:{quote(password, safe='')}@{settings.get('HOST') or 'localhost'}/"]
