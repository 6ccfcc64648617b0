"""The event of the Django tests, and the bus a ``tidings_relay`` subprocess publishes through.

The subprocess must know the event class to decode the rows; its bus has no handlers, so
relaying drains the outbox.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tidings import DomainEvent, EventBus, register_event


@register_event
@dataclass(frozen=True)
class DjangoOrderPlaced(DomainEvent):
    event_type: ClassVar[str] = "tests.django.order_placed"
    aggregate_id: str = ""
    n: int = 0


bus = EventBus()
