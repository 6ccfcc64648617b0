"""``DomainEvent``: the immutable record every event derives from.

A subclass is a frozen dataclass with its own ``event_type`` and is registered with
``@register_event`` so that decoding can find it::

    @register_event
    @dataclass(frozen=True)
    class OrderPlaced(DomainEvent):
        event_type: ClassVar[str] = "orders.order_placed"
        order_id: str = ""

The base fields are keyword-only, so subclasses may declare required fields of their own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from tidings._ids import new_event_id, utc_now_iso
from tidings.context import _current

__all__ = ["DomainEvent"]


def _correlation_id() -> str:
    return _current.get().correlation_id or new_event_id()


def _tenant_id() -> str | None:
    return _current.get().tenant_id


def _causation_id() -> str | None:
    return _current.get().causation_id


@dataclass(frozen=True, kw_only=True)
class DomainEvent:
    """Base class of all domain events: an immutable, JSON-serialisable record of a change.

    Attributes:
        event_id: unique id (uuid4 string); the idempotency key with the handler's name.
        correlation_id: links the originating request to everything it caused. Taken from the
            current :func:`~tidings.event_context`; outside any context a fresh uuid4.
        occurred_at: when the event was created, ISO-8601 in UTC with microseconds.
        tenant_id: the tenant, from the current context unless given; ``None`` if none.
        causation_id: the ``event_id`` of the event whose handler raised this one, from the
            current context unless given; ``None`` for events raised by a request.
        event_type: class-level name of the event on the wire, e.g. ``"orders.order_placed"``.
        event_version: class-level schema version; bump it and register an upcaster when a
            change is not backward compatible.

    Instances are frozen: equal field values mean equal events, and they are safe to share
    between threads.
    """

    event_type: ClassVar[str] = "domain_event"
    event_version: ClassVar[int] = 1

    event_id: str = field(default_factory=new_event_id)
    correlation_id: str = field(default_factory=_correlation_id)
    occurred_at: str = field(default_factory=utc_now_iso)
    tenant_id: str | None = field(default_factory=_tenant_id)
    causation_id: str | None = field(default_factory=_causation_id)

    def to_dict(self) -> dict[str, Any]:
        """Return every field plus ``"event_type"`` as plain JSON types.

        The values are str, int, float, bool, None, list and dict: datetime/date/time become
        ISO-8601 strings, UUID and Decimal strings, Enum its value, tuple/frozenset/set lists,
        nested dataclasses dicts. :meth:`from_dict` restores them.

        Raises:
            EventEncodeError: a field holds a value with no JSON form.
        """
        from tidings import codec  # noqa: PLC0415 - codec imports this module

        return codec.event_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Build an event from a dict such as :meth:`to_dict` returns; ``data`` is not changed.

        The class is chosen by ``data["event_type"]`` through the registry (aliases included);
        with no ``event_type`` key it is ``cls``. Keys that are not fields are ignored, so older
        code reads newer payloads. Field values are validated and converted to the annotated
        types (``"2026-01-01"`` becomes a ``date`` for a ``date`` field, a list a tuple for a
        tuple field).

        Raises:
            UnknownEventTypeError: ``event_type`` is not registered.
            EventTypeMismatchError: it names a registered class that is not ``cls`` or a
                subclass of it.
            EventDecodeError: a field is missing or has the wrong type (``.field`` names it).
        """
        from tidings import codec  # noqa: PLC0415 - codec imports this module

        return codec.event_from_dict(data, cls)
