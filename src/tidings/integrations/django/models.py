"""``OutboxEvent`` and ``OutboxQuarantine``: the outbox tables, column for column SQLAlchemy's.

The table is ``tidings_outbox`` with the columns and indexes of
:func:`tidings.outbox.outbox_table`, so either relay (``manage.py tidings_relay`` or
``tidings relay``) can drain rows the other side wrote. ``InboxEntry`` is the table of
:class:`~tidings.integrations.django.inbox.DjangoInbox`.
"""

from __future__ import annotations

from django.db import models

from tidings.outbox._common import EVENT_ID_LENGTH, KEY_LENGTH

__all__ = ["InboxEntry", "OutboxEvent", "OutboxQuarantine"]

INBOX_KEY_LENGTH = 200
"""Length of the inbox's ``handler`` and ``source`` columns (values over 128 are hashed)."""
INBOX_EVENT_ID_LENGTH = 64
"""Length of the inbox's ``event_id`` column (longer ids are hashed to fit)."""


class OutboxEvent(models.Model):  # type: ignore[misc]  # Django ships no type information
    """One event waiting for the relay (or, with ``keep_published``, one already relayed).

    Columns: ``id`` (relay order), ``event_id`` (unique), ``event_type``, ``partition_key``
    (order is kept per key), ``payload`` (the CloudEvents JSON envelope of
    :func:`tidings.encode`), ``created_at``, ``published_at`` (``NULL`` until the broker
    confirmed), ``attempts`` (failed or completed publish attempts). Write rows with
    :func:`tidings.integrations.django.publish`, not by hand.
    """

    id = models.BigAutoField(primary_key=True)
    event_id = models.CharField(max_length=EVENT_ID_LENGTH, unique=True)
    event_type = models.CharField(max_length=KEY_LENGTH)
    partition_key = models.CharField(max_length=KEY_LENGTH)
    payload = models.TextField()
    created_at = models.DateTimeField()
    published_at = models.DateTimeField(null=True, blank=True)
    attempts = models.IntegerField(default=0)

    class Meta:
        """The table and indexes shared with the SQLAlchemy outbox."""

        db_table = "tidings_outbox"
        indexes = (
            models.Index(fields=["published_at", "id"], name="ix_tidings_outbox_pending"),
            models.Index(fields=["partition_key", "id"], name="ix_tidings_outbox_partition"),
        )

    def __str__(self) -> str:
        return f"{self.event_type} {self.event_id} (key {self.partition_key!r})"


class OutboxQuarantine(models.Model):  # type: ignore[misc]  # Django ships no type information
    """An outbox row the relay gave up on, with its reason: the outbox's dead letters.

    The table is ``tidings_outbox_quarantine``, that of
    :func:`tidings.outbox._table.quarantine_table` for the default outbox: ``id`` (the outbox
    row's id), ``event_id``, ``event_type``, ``partition_key``, ``payload`` (as stored),
    ``created_at`` (when the outbox row was written), ``quarantined_at``, ``attempts`` and
    ``reason``. ``tidings dlq outbox requeue`` puts a row back into the outbox.
    """

    id = models.BigIntegerField(primary_key=True)
    event_id = models.CharField(max_length=EVENT_ID_LENGTH)
    event_type = models.CharField(max_length=KEY_LENGTH)
    partition_key = models.CharField(max_length=KEY_LENGTH)
    payload = models.TextField()
    created_at = models.DateTimeField()
    quarantined_at = models.DateTimeField()
    attempts = models.IntegerField()
    reason = models.TextField()

    class Meta:
        """The quarantine table shared with the SQLAlchemy relay."""

        db_table = "tidings_outbox_quarantine"

    def __str__(self) -> str:
        return f"{self.event_type} {self.event_id} (row {self.id}, quarantined)"


class InboxEntry(models.Model):  # type: ignore[misc]  # Django ships no type information
    """One (handler, source, event id) that took effect: the Django inbox's done mark.

    The table is ``tidings_django_inbox`` (not SQLAlchemy's ``tidings_inbox``, whose primary
    key is the triple: both may live in one database). Columns: ``id``, ``handler``,
    ``source`` (the producer's CloudEvents ``source``), ``event_id``, unique together, and
    ``processed_at`` (when the effect was claimed; committed with it). Values too long for
    their column are stored as their marked SHA-256 (see :mod:`tidings.inbox._keys`). Rows
    are written by :meth:`~tidings.integrations.django.inbox.DjangoInbox.guard`, not by hand.
    """

    id = models.BigAutoField(primary_key=True)
    handler = models.CharField(max_length=INBOX_KEY_LENGTH)
    source = models.CharField(max_length=INBOX_KEY_LENGTH)
    event_id = models.CharField(max_length=INBOX_EVENT_ID_LENGTH)
    processed_at = models.DateTimeField(db_index=True)

    class Meta:
        """The inbox table and its key."""

        db_table = "tidings_django_inbox"
        constraints = (
            models.UniqueConstraint(
                fields=["handler", "source", "event_id"], name="uq_tidings_django_inbox_key"
            ),
        )

    def __str__(self) -> str:
        return f"{self.handler} took {self.event_id} from {self.source}"
