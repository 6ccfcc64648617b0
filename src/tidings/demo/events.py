"""The shop's events: what the demo's requests and handlers say happened."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import TYPE_CHECKING, ClassVar

from tidings import DomainEvent, register_event

if TYPE_CHECKING:
    pass


class PaymentMethod(StrEnum):
    """How a customer paid."""

    CARD = "card"
    PAYPAL = "paypal"
    INVOICE = "invoice"


@dataclass(frozen=True)
class OrderLine:
    """``quantity`` units of ``sku`` at ``unit_price`` each."""

    sku: str
    quantity: int
    unit_price: Decimal


@register_event
@dataclass(frozen=True)
class OrderPlaced(DomainEvent):
    """A customer placed an order: the root of its request's causation tree."""

    event_type: ClassVar[str] = "shop.order_placed"
    order_id: str
    customer_id: uuid.UUID
    email: str
    lines: tuple[OrderLine, ...]
    total: Decimal
    currency: str = "EUR"


@register_event
@dataclass(frozen=True)
class StockReserved(DomainEvent):
    """Inventory holds every line of the order."""

    event_type: ClassVar[str] = "shop.stock_reserved"
    order_id: str
    reservation_id: uuid.UUID
    lines: tuple[OrderLine, ...]
    warehouse: str


@register_event
@dataclass(frozen=True)
class PaymentCaptured(DomainEvent):
    """The order's total was charged to the customer."""

    event_type: ClassVar[str] = "shop.payment_captured"
    order_id: str
    payment_id: uuid.UUID
    amount: Decimal
    currency: str
    method: PaymentMethod


@register_event
@dataclass(frozen=True)
class OrderConfirmed(DomainEvent):
    """Stock and payment are both in: the order will ship. Raised exactly once per order."""

    event_type: ClassVar[str] = "shop.order_confirmed"
    order_id: str
    customer_id: uuid.UUID
    email: str
    total: Decimal
    currency: str


@register_event
@dataclass(frozen=True)
class EmailSent(DomainEvent):
    """The confirmation email left the (fake) mailer."""

    event_type: ClassVar[str] = "shop.email_sent"
    order_id: str
    to: str
    subject: str
    message_id: uuid.UUID
