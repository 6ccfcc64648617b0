"""The shop's events: what the demo's requests and handlers say happened."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import ClassVar

from tidings import DomainEvent, register_event


@dataclass(frozen=True)
class OrderLine:
    """``quantity`` units of ``sku`` at ``unit_price`` each."""

    sku: str
    quantity: int
    unit_price: Decimal


@register_event
@dataclass(frozen=True)
class OrderPlaced(DomainEvent):
    """A customer placed an order: written to the outbox with the order, root of its request."""

    event_type: ClassVar[str] = "shop.order_placed"
    order_id: str
    email: str
    lines: tuple[OrderLine, ...]
    total: Decimal
    currency: str = "EUR"

    @property
    def aggregate_id(self) -> str:
        """The order: the relay keeps the order of an order's events (its partition key)."""
        return self.order_id


@register_event
@dataclass(frozen=True)
class StockReserved(DomainEvent):
    """The warehouse holds every line of an order: the follow-up raised by a handler."""

    event_type: ClassVar[str] = "shop.stock_reserved"
    order_id: str
    warehouse: str
    units: int
