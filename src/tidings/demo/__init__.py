"""``tidings demo``: a small shop on the embedded default, an in-process :class:`EventBus`.

Each request places an order inside ``event_context(correlation_id=..., tenant_id=...)``.
Handlers reserve stock and capture the payment, confirm the order once both are done, send a
(fake, in-memory) email and project sales per tenant. Every event crosses the wire format once
(``encode`` then ``decode``) before its handlers see it, and every log line is recorded with the
context it was written in. The run is then reconciled: every order confirmed exactly once, every
causation chain leading back to its request's ``OrderPlaced``, with correlation, tenant and order
ids unchanged along it.

Importing this module registers the ``shop.*`` event types in the default registry; only the CLI
imports it.
"""

from tidings.demo.events import (
    EmailSent,
    OrderConfirmed,
    OrderLine,
    OrderPlaced,
    PaymentCaptured,
    PaymentMethod,
    StockReserved,
)
from tidings.demo.report import print_report
from tidings.demo.shop import DemoResult, LogLine, TenantSales, causal_order, reconcile, run_demo

__all__ = [
    "DemoResult",
    "EmailSent",
    "LogLine",
    "OrderConfirmed",
    "OrderLine",
    "OrderPlaced",
    "PaymentCaptured",
    "PaymentMethod",
    "StockReserved",
    "TenantSales",
    "causal_order",
    "print_report",
    "reconcile",
    "run_demo",
]
