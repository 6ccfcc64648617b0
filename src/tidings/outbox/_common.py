"""What every outbox shares, with no database library: limits, partition keys, backoff, order.

The SQLAlchemy outbox (:mod:`tidings.outbox`) and the Django one
(:mod:`tidings.integrations.django`) both build on these, so they agree on the table's
limits, on which key an event's order is kept by, and on which claimed rows may go out.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from tidings import _tracing
from tidings.codec import Codec
from tidings.context import EventContext, bind, reset
from tidings.errors import EventDecodeError, UsageError
from tidings.events import DomainEvent

__all__ = [
    "EVENT_ID_LENGTH",
    "KEY_LENGTH",
    "Backoff",
    "ClaimedRow",
    "decode_batch",
    "default_partition_key",
    "in_key_order",
    "row_key",
]

EVENT_ID_LENGTH = 64
KEY_LENGTH = 200

log = logging.getLogger("tidings.outbox.relay")


def default_partition_key(event: DomainEvent) -> str:
    """Return the key whose order the relay keeps for ``event``.

    It is ``str(event.aggregate_id)`` if the event has that field and it is not ``None``, else
    the ``event_type`` (so events without an aggregate keep their order per type).
    """
    aggregate_id = getattr(event, "aggregate_id", None)
    return type(event).event_type if aggregate_id is None else str(aggregate_id)


def row_key(
    event: object, key: str | None, key_of: Callable[[DomainEvent], str], caller: str
) -> str:
    """Check that ``event`` fits an outbox row and return its partition key.

    ``key`` overrides ``key_of(event)``. ``caller`` names the API in the error message.

    Raises:
        UsageError: not a ``DomainEvent``, or a key or event id longer than its column.
    """
    if not isinstance(event, DomainEvent):
        msg = f"{caller} takes DomainEvent instances, not {type(event).__name__}"
        raise UsageError(msg)
    key = key_of(event) if key is None else key
    if len(key) > KEY_LENGTH or len(event.event_id) > EVENT_ID_LENGTH:
        msg = (
            f"the outbox keeps partition keys up to {KEY_LENGTH} and event ids up to "
            f"{EVENT_ID_LENGTH} characters: shorten {key[:40]!r} / {event.event_id[:40]!r}"
        )
        raise UsageError(msg)
    return key


@dataclass(frozen=True, slots=True)
class Backoff:
    """How long the relay waits after consecutive failures, bounded.

    The n-th failure in a row waits ``initial * factor**(n-1)`` seconds, at most ``maximum``,
    each delay shortened by up to ``jitter`` (a fraction) at random.
    """

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum or self.factor < 1 or not 0 <= self.jitter < 1:
            msg = "Backoff needs 0 < initial <= maximum, factor >= 1 and 0 <= jitter < 1"
            raise ValueError(msg)

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failure in a row (``failures`` >= 1)."""
        exponent = min(max(failures - 1, 0), 64)
        delay = min(self.maximum, self.initial * self.factor**exponent)
        return delay * (1 - self.jitter * random.random())  # noqa: S311 - not cryptographic


class ClaimedRow(Protocol):
    """A claimed outbox row, as either relay reads it."""

    @property
    def id(self) -> int:
        """The row's id (relay order)."""

    @property
    def partition_key(self) -> str:
        """The key whose order is kept."""

    @property
    def payload(self) -> str:
        """The CloudEvents JSON envelope."""


R = TypeVar("R", bound=ClaimedRow)


def in_key_order(rows: Sequence[R], first_outside: dict[str, int]) -> list[R]:
    """Keep, per key, only the claimed rows older than the key's oldest pending row not claimed.

    ``first_outside`` maps a key to the smallest id of its pending rows outside the batch.
    """
    return [row for row in rows if row.id < first_outside.get(row.partition_key, row.id + 1)]


def decode_batch(
    rows: Sequence[ClaimedRow],
    codec: Codec,
    traceparents: list[str | None] | None = None,
) -> tuple[list[DomainEvent], list[int], list[int]]:
    """Decode claimed rows into (events, their ids, ids of undecodable rows).

    An undecodable row is logged; it and the later rows of its key are left out, so the key
    waits until the row can be decoded (an event class registered, say). With
    ``traceparents`` given, the ``traceparent`` of each decoded row is appended to it.
    """
    events: list[DomainEvent] = []
    ids: list[int] = []
    bad: list[int] = []
    stuck: set[str] = set()
    for row in rows:
        if row.partition_key in stuck:
            continue
        try:
            if traceparents is None:
                events.append(codec.decode(row.payload))
            else:
                envelope = codec.read(row.payload)
                events.append(envelope.event)
                traceparents.append(envelope.traceparent)
        except EventDecodeError as exc:
            log.error(
                "outbox row %s (key %r) cannot be decoded; it and the later rows of its key "
                "wait until it can: %s",
                row.id,
                row.partition_key,
                exc,
            )
            bad.append(row.id)
            stuck.add(row.partition_key)
            continue
        ids.append(row.id)
    return events, ids, bad


def relay_batch(
    publish: Callable[[Sequence[DomainEvent]], None],
    events: Sequence[DomainEvent],
    traceparents: Sequence[str | None] | None,
    destination: str,
) -> None:
    """Publish one relayed batch, then log each of its events at DEBUG in its own context.

    With tracing installed, ``publish`` runs inside the events' relay spans (``traceparents``
    are the stored envelopes'). Each log line ("relayed <type> <id>") is written with the
    event's correlation and tenant ids bound, its id as the causation id, so that a log filter
    such as :class:`~tidings.integrations.logging.ContextFilter` ties it to the request.
    """
    stored = [None] * len(events) if traceparents is None else traceparents
    _tracing.relayed(publish, events, stored, destination)
    if not log.isEnabledFor(logging.DEBUG):
        return
    for event in events:
        token = bind(EventContext(event.correlation_id, event.event_id, event.tenant_id))
        try:
            log.debug("relayed %s %s from %s", event.event_type, event.event_id, destination)
        finally:
            reset(token)
