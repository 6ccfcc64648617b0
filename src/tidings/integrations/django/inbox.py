"""``DjangoInbox``: the done mark is a row of the handler's own ``transaction.atomic`` block.

Give the transport a ``DjangoInbox`` and write the handler's effects with the ORM, to the
inbox's database::

    from tidings.integrations.django.inbox import DjangoInbox

    transport = CeleryTransport(app, queue="shop", inbox=DjangoInbox())

    @bus.subscribe(OrderPlaced, name="shipping.book")
    def book(event: OrderPlaced) -> None:
        Shipment.objects.create(order_id=event.order_id)   # commits with the inbox row

Where the guarantee holds: :meth:`DjangoInbox.guard` opens ``transaction.atomic(using=...)``,
inserts the claim row and runs the handler inside that block. The effects written there to
that database commit together with the row, or roll back with it when the handler raises:
in that database the effect happens exactly once, on PostgreSQL, MariaDB/MySQL and SQLite.
Effects elsewhere (another database, Redis, an e-mail) happen at least once. A guard opened
inside an outer ``atomic`` block is a savepoint of it and commits when that block does.

Two workers racing on one key: the second insert waits on the first one's uncommitted row
(the database does the waiting). When the first commits, the second's insert finds the key
and adds nothing: ``False``; when the first rolls back, the second's row goes in: ``True``.
If the database gives up waiting (PostgreSQL ``lock_timeout``, MariaDB
``innodb_lock_wait_timeout``, SQLite's ``timeout`` option), or picks the waiter as a deadlock
victim, the guard raises :class:`~tidings.errors.InboxBusyError` (``retry_after`` 1 s) so the
delivery is retried. SQLite has one writer at a time: guards there run one after another.

Needs the ``tidings`` app installed and migrated (the table is ``tidings_django_inbox``, see
:class:`~tidings.integrations.django.models.InboxEntry`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

try:
    from django.db import DEFAULT_DB_ALIAS, DatabaseError, router, transaction
    from django.utils import timezone
except ImportError as exc:
    msg = "tidings.integrations.django.inbox needs Django: pip install 'tidings[django]'"
    raise ImportError(msg) from exc

from tidings._untrusted import log_safe
from tidings.errors import InboxBusyError
from tidings.inbox._busy import is_busy
from tidings.inbox._keys import LEGACY_SOURCE, MAX_EMBEDDED, bounded

__all__ = ["DjangoInbox"]

PRUNE_BATCH = 1000
"""Rows :meth:`DjangoInbox.prune` deletes per transaction."""


def _model() -> Any:
    from tidings.integrations.django.models import InboxEntry  # noqa: PLC0415 - app registry

    return InboxEntry


def _key(handler: str, event_id: str, source: str | None) -> dict[str, str]:
    """The column values of a key: hashed when too long to fit (see :mod:`tidings.inbox._keys`)."""
    from tidings.integrations.django.models import INBOX_EVENT_ID_LENGTH  # noqa: PLC0415

    return {
        "handler": bounded(handler, MAX_EMBEDDED),
        "source": LEGACY_SOURCE if source is None else bounded(source, MAX_EMBEDDED),
        "event_id": bounded(event_id, INBOX_EVENT_ID_LENGTH),
    }


class DjangoInbox:
    """An :class:`~tidings.ports.Inbox` in a Django model: ORM effects in its database happen once.

    Args:
        using: the database alias of the inbox table and of the handlers' effects (default:
            the router's write database for
            :class:`~tidings.integrations.django.models.InboxEntry`, looked up at each guard).

    Contract: see :class:`~tidings.ports.Inbox` and the module docstring. A guard holds the
    thread's Django connection and one transaction for as long as it is open. Nothing is
    retried here: a database error propagates and the block rolls back, so the delivery can
    be retried. Thread-safe and process-safe (the database serializes claims; Django gives
    each thread its own connection); the instance holds only ``using``.
    """

    by_source = True
    """Keys tell producers apart: the worker passes each event's ``source`` (see ports)."""

    def __init__(self, *, using: str | None = None) -> None:
        self.using = using

    def _alias(self) -> str:
        alias: str = self.using or router.db_for_write(_model()) or DEFAULT_DB_ALIAS
        return alias

    @contextmanager
    def guard(self, handler: str, event_id: str, source: str | None = None) -> Iterator[bool]:
        """Claim (handler, source, event_id) in ``transaction.atomic``; see the class and module.

        ``source`` is the producer's CloudEvents ``source`` (the worker passes it); ``None``
        claims the key with no source. The handler's ORM writes to the inbox's database inside
        the block commit with the claim row when the block ends normally, and roll back with it
        when it raises. A handler name or event id too long for its column is claimed by its
        marked SHA-256, never truncated into a collision nor refused.

        Raises:
            InboxBusyError: the database gave up waiting for another worker's claim.
        """
        alias = self._alias()
        key = _key(handler, event_id, source)
        with transaction.atomic(using=alias):
            yield self._claim(alias, key, handler, event_id)

    def _claim(self, alias: str, key: dict[str, str], handler: str, event_id: str) -> bool:
        """Insert the claim row unless its key is there; ``False`` if it was (a duplicate).

        One statement, no savepoint: ``INSERT ... ON CONFLICT DO NOTHING`` (PostgreSQL,
        SQLite) or ``INSERT IGNORE`` (MariaDB/MySQL; safe because every value was bounded to
        fit its column), whose row count is the answer.
        """
        connection = transaction.get_connection(alias)
        table = connection.ops.quote_name(_model()._meta.db_table)
        now = connection.ops.adapt_datetimefield_value(timezone.now())
        columns = "(handler, source, event_id, processed_at) VALUES (%s, %s, %s, %s)"
        if connection.vendor == "mysql":
            sql = f"INSERT IGNORE INTO {table} {columns}"
        else:
            sql = f"INSERT INTO {table} {columns} ON CONFLICT DO NOTHING"
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql, [key["handler"], key["source"], key["event_id"], now])
                return bool(cursor.rowcount == 1)
        except DatabaseError as exc:
            if not is_busy(connection.vendor, exc.__cause__):
                raise
            msg = (
                f"{log_safe(handler)} is already handling event {log_safe(event_id)} in "
                "another worker and the database gave up waiting; deliver it again later"
            )
            raise InboxBusyError(msg, retry_after=1.0) from exc

    def is_done(self, handler: str, event_id: str, source: str | None = None) -> bool:
        """Whether (handler, source, event_id) took effect (its row is committed, or ours)."""
        return bool(
            _model().objects.using(self._alias()).filter(**_key(handler, event_id, source)).exists()
        )

    def prune(self, before: datetime | timedelta, *, batch_size: int = PRUNE_BATCH) -> int:
        """Delete rows processed before ``before``; return how many went.

        ``before`` is a tz-aware instant, or a ``timedelta``: rows older than now minus it.
        Every row is a done effect (a claim commits with its effect), so nothing in progress
        is touched. Rows go in batches of ``batch_size``, one short transaction each. A
        redelivery of a pruned key runs its effect again: keep rows longer than the broker
        may redeliver.

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
            before = timezone.now() - before
        alias = self._alias()
        rows = _model().objects.using(alias)
        pruned = 0
        while True:
            with transaction.atomic(using=alias):
                ids = list(
                    rows.filter(processed_at__lt=before)
                    .order_by()
                    .values_list("id", flat=True)[:batch_size]
                )
                if ids:
                    deleted, _ = rows.filter(id__in=ids, processed_at__lt=before).delete()
                    pruned += int(deleted)
            if len(ids) < batch_size:
                return pruned
