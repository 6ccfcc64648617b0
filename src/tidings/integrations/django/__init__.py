"""Django: the transactional outbox as an app, ``publish`` inside ``transaction.atomic``, a relay.

Install ``pip install 'tidings[django]'``, add ``"tidings.integrations.django"`` (app label
``tidings``) to ``INSTALLED_APPS`` and run ``manage.py migrate``. Then, in the view or service
that changes data::

    from django.db import transaction
    from tidings.integrations.django import publish

    with transaction.atomic():
        order.save()
        publish(OrderPlaced(order_id=str(order.pk)))   # stored iff this transaction commits

and run ``manage.py tidings_relay --bus myproject.events:bus`` beside the web processes: it
publishes committed rows through your :class:`~tidings.EventBus` and marks them only after
the broker confirmed (at least once, in order per partition key; see
:mod:`tidings.integrations.django.relay`).

Two modes, two promises:

* :func:`publish` (the outbox) loses nothing once the transaction committed: the event is a
  row of that transaction, and the relay retries it until the broker takes it.
* :func:`publish_on_commit` (direct) hands the events to the bus in a
  ``transaction.on_commit`` callback, with no table and no relay. It is weaker: if the process
  dies, or the broker is unreachable, between the commit and the end of the publish, the change
  is committed and **the event is lost**, silently for the caller (the failure is only logged).
  Use it where losing an event now and then is acceptable (cache invalidation, notifications).

The outbox table is the one :mod:`tidings.outbox` defines (same name, columns and indexes), so
the SQLAlchemy relay, ``tidings relay``, can drain it too. On PostgreSQL, :func:`publish`'s
insert also issues ``NOTIFY tidings_outbox`` (in the same round trip), which wakes a listening
relay (``manage.py tidings_relay`` or ``tidings relay``) at commit.

Handlers whose effects are ORM writes get them exactly once with
:class:`tidings.integrations.django.inbox.DjangoInbox` as the transport's inbox: the claim row
commits in the handler's own ``transaction.atomic`` block.

This package imports no models on import (Django imports it while loading apps), so
``publish`` and ``Relay`` need the app registry to be ready when they are called.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

try:
    from django.db import DEFAULT_DB_ALIAS, router, transaction
    from django.utils import timezone
except ImportError as exc:
    msg = "tidings.integrations.django needs Django: pip install 'tidings[django]'"
    raise ImportError(msg) from exc

from tidings import _tracing
from tidings.bus import EventBus
from tidings.codec import encode
from tidings.errors import UsageError
from tidings.events import DomainEvent
from tidings.outbox._common import default_partition_key, row_key

if TYPE_CHECKING:
    from tidings.integrations.django.relay import Backoff, Relay

__all__ = ["Backoff", "Relay", "default_partition_key", "publish", "publish_on_commit"]

log = logging.getLogger("tidings.integrations.django")

_CHANNEL = "tidings_outbox"


def _rows(events: Sequence[DomainEvent], partition_key: str | None) -> list[Any]:
    from tidings.integrations.django.models import OutboxEvent  # noqa: PLC0415 - app registry

    now = timezone.now()
    rows = []
    for event in events:
        key = row_key(event, partition_key, default_partition_key, "publish")
        rows.append(
            OutboxEvent(
                event_id=event.event_id,
                event_type=type(event).event_type,
                partition_key=key,
                payload=encode(event).decode("utf-8"),
                created_at=now,
                attempts=0,
            )
        )
    return rows


def publish(
    *events: DomainEvent, using: str | None = None, partition_key: str | None = None
) -> None:
    """Store ``events`` in the outbox, in the current ``transaction.atomic`` block of ``using``.

    Nothing is committed here: the events are stored if and only if the enclosing transaction
    commits, and the relay publishes them after that. Events keep their order (ids ascend in
    argument order). ``using`` is the database alias (default: the router's write database
    for the outbox model); ``partition_key`` overrides :func:`default_partition_key` for these
    events.

    Raises:
        UsageError: not inside ``transaction.atomic(using=...)`` (a row written in autocommit
            would be committed even if the caller's change later fails), an argument that is
            not a ``DomainEvent``, or a key or event id longer than its column.
        EventEncodeError: an event has a field with no JSON form; nothing is written then.
        django.db.IntegrityError: an event id is already in the outbox.
    """
    from tidings.integrations.django.models import OutboxEvent  # noqa: PLC0415

    alias: str = using or router.db_for_write(OutboxEvent) or DEFAULT_DB_ALIAS
    connection = transaction.get_connection(alias)
    if not connection.in_atomic_block:
        msg = (
            f"tidings publish() must run inside transaction.atomic(using={alias!r}), so the "
            "events commit or roll back with your change: wrap the change and the publish in "
            "`with transaction.atomic():`, or use publish_on_commit(..., bus=bus) for the "
            "weaker direct mode"
        )
        raise UsageError(msg)
    with _tracing.publishing(events, "tidings", _CHANNEL):
        rows = _rows(events, partition_key)
        if rows and connection.vendor == "postgresql":
            _insert_notifying(connection, rows)
        elif rows:
            OutboxEvent.objects.using(alias).bulk_create(rows)


_COLUMNS = ("event_id", "event_type", "partition_key", "payload", "created_at", "attempts")
_CHUNK = 1000  # rows per statement: 6 parameters each, far below PostgreSQL's 65,535


def _insert_notifying(connection: Any, rows: list[Any]) -> None:
    """Insert ``rows`` and ``NOTIFY`` the relays in one round trip per chunk (PostgreSQL).

    ``INSERT ... RETURNING pg_notify(...)``, as the SQLAlchemy outbox does: the notification
    is delivered at commit (repeats in one transaction collapse into one). Ids ascend in the
    order of ``rows``.
    """
    from tidings.integrations.django.models import OutboxEvent  # noqa: PLC0415

    quote = connection.ops.quote_name
    table = quote(OutboxEvent._meta.db_table)
    columns = ", ".join(quote(name) for name in _COLUMNS)
    one = "(" + ", ".join(["%s"] * len(_COLUMNS)) + ")"
    with connection.cursor() as cursor:
        for first in range(0, len(rows), _CHUNK):
            chunk = rows[first : first + _CHUNK]
            values = ", ".join([one] * len(chunk))
            params = [getattr(row, name) for row in chunk for name in _COLUMNS]
            cursor.execute(
                f"INSERT INTO {table} ({columns}) VALUES {values} "  # noqa: S608 - our names
                "RETURNING pg_notify(%s, '')",
                [*params, _CHANNEL],
            )


def publish_on_commit(*events: DomainEvent, bus: EventBus, using: str | None = None) -> None:
    """Publish ``events`` through ``bus`` once the transaction of ``using`` commits (weaker).

    The direct mode: ``transaction.on_commit`` runs ``bus.publish(*events)`` right after the
    commit, and never on rollback. Outside ``transaction.atomic`` Django runs it at once.

    What it loses, compared with :func:`publish`: the events live only in this process's
    memory between the commit and the broker's confirmation. If the process crashes, is
    killed or restarted in that window, or the broker or bus fails, the change stays committed
    and **the event is lost**: no row, no relay, no retry. A failure of ``bus.publish`` is
    logged (logger ``tidings.integrations.django``), not raised, because the caller's
    transaction has already committed and must not look failed.

    Raises:
        UsageError: an argument is not a ``DomainEvent`` or ``bus`` is not an ``EventBus``
            (checked now, not after the commit).
    """
    for event in events:
        if not isinstance(event, DomainEvent):
            msg = f"publish_on_commit takes DomainEvent instances, not {type(event).__name__}"
            raise UsageError(msg)
    if not isinstance(bus, EventBus):
        msg = f"publish_on_commit(bus=...) takes an EventBus, not {type(bus).__name__}"
        raise UsageError(msg)
    if not events:
        return
    batch = tuple(events)

    def send() -> None:
        try:
            bus.publish(*batch)
        except Exception:
            log.exception(
                "publish_on_commit: the transaction committed but publishing %d event(s) "
                "failed; they are lost (use publish() and the relay to keep them): %s",
                len(batch),
                ", ".join(event.event_id for event in batch),
            )

    transaction.on_commit(send, using=using)


_LAZY: dict[str, str] = {"Backoff": "relay", "Relay": "relay"}


def __getattr__(name: str) -> Callable[..., Any]:
    module = _LAZY.get(name)
    if module is None:
        msg = f"module 'tidings.integrations.django' has no attribute {name!r}"
        raise AttributeError(msg)
    found: Callable[..., Any] = getattr(
        importlib.import_module(f"tidings.integrations.django.{module}"), name
    )
    return found
