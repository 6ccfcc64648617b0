"""The benchmark's events: the same ten mixed-type fields declared on both base classes."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from enum import Enum
from typing import Any, ClassVar

from benchmarks.seed_baseline import SeedDomainEvent, seed_register_event
from tidings import DomainEvent, register_event


class Status(Enum):
    """An order status."""

    PLACED = "placed"
    PAID = "paid"


@dataclass(frozen=True)
class Line:
    """One order line, a nested dataclass."""

    sku: str
    quantity: int


@register_event
@dataclass(frozen=True)
class OrderPlaced(DomainEvent):
    """Ten fields of mixed types on the tidings base."""

    event_type: ClassVar[str] = "bench.order_placed"
    order_id: str
    customer_id: uuid.UUID
    total: Decimal
    currency: str
    placed_at: datetime
    delivery_date: date
    status: Status
    lines: tuple[Line, ...]
    tags: frozenset[str]
    note: str | None = None


@seed_register_event
@dataclass(frozen=True)
class SeedOrderPlaced(SeedDomainEvent):
    """The same ten fields on the seed base."""

    event_type: ClassVar[str] = "bench.order_placed"
    order_id: str = ""
    customer_id: uuid.UUID | None = None
    total: Decimal = Decimal(0)
    currency: str = ""
    placed_at: datetime | None = None
    delivery_date: date | None = None
    status: Status = Status.PLACED
    lines: tuple[Line, ...] = ()
    tags: frozenset[str] = frozenset()
    note: str | None = None


CUSTOMER = uuid.UUID("8c1d5e62-3f0b-4f2e-9a57-0d7f4c1b9e21")
PLACED_AT = datetime(2026, 11, 26, 12, 30, tzinfo=UTC)
DELIVERY = date(2026, 12, 1)
LINES = (Line("sku-1", 2), Line("sku-2", 1))
TAGS = frozenset({"gift", "express"})


def fields() -> dict[str, Any]:
    """Keyword arguments for one event, identical for both classes."""
    return {
        "order_id": "o-1001",
        "customer_id": CUSTOMER,
        "total": Decimal("149.90"),
        "currency": "EUR",
        "placed_at": PLACED_AT,
        "delivery_date": DELIVERY,
        "status": Status.PLACED,
        "lines": LINES,
        "tags": TAGS,
        "note": "leave at the door",
    }
