"""The shop itself: requests, handlers, the run and its reconciliation.

The embedded default: each request writes its order and its ``OrderPlaced`` event in one
SQLite transaction (the transactional outbox), and the relay then publishes committed events to
the in-process bus, where handlers react inline and raise follow-up events.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final

import sqlalchemy as sa
from sqlalchemy.pool import StaticPool

from tidings import DomainEvent, EventBus, EventContext, event_context
from tidings.codec import decode, encode
from tidings.context import current_context

if TYPE_CHECKING:
    from rich.console import Console


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
from tidings.outbox import Outbox, Relay

CATALOGUE: Final = {
    "TEA-SENCHA-100G": Decimal("8.90"),
    "TEA-ASSAM-250G": Decimal("6.50"),
    "MUG-STONEWARE": Decimal("14.00"),
    "KETTLE-1L": Decimal("39.95"),
    "FILTERS-100": Decimal("3.20"),
}
TENANT_NAMES: Final = ("acme", "globex", "initech", "umbrella", "hooli", "stark")
INITIAL_STOCK: Final = 20
RESTOCK: Final = 50

log = logging.getLogger("tidings.demo")


@dataclass(frozen=True)
class TenantSales:
    """The sales read model of one tenant: confirmed orders and their revenue."""

    orders: int = 0
    revenue: Decimal = Decimal("0.00")


@dataclass(frozen=True)
class LogLine:
    """One log record with the context that was bound when it was written."""

    context: EventContext
    level: str
    logger: str
    message: str


@dataclass(frozen=True)
class DemoResult:
    """What one demo run did, for the report and for tests.

    Attributes:
        requests: orders placed, one request each.
        placed: orders placed per tenant.
        sales: the sales read model per tenant after the run.
        published: events published per ``event_type``.
        handler_runs: handler invocations per handler name.
        emails_sent: emails in the fake mailer.
        wire_bytes: total size of every encoded event.
        journal: every event published, in publication order (a pre-order of each request's
            causation tree, as the bus runs handlers inline).
        traced_correlation_id: the request followed in the report.
        traced: its events in causal order (parents before children, siblings by publication).
        traced_log: its log lines, in the order they were written.
        sample_wire: the encoded ``OrderPlaced`` of the traced request.
        problems: what :func:`reconcile` found wrong; empty when the run reconciles.
        seconds: wall-clock time of the run.
        outbox_rows: events the requests committed to the outbox with their orders.
        relayed: events the relay published from the outbox to the bus.
    """

    requests: int
    placed: Mapping[str, int]
    sales: Mapping[str, TenantSales]
    published: Mapping[str, int]
    handler_runs: Mapping[str, int]
    emails_sent: int
    wire_bytes: int
    journal: tuple[DomainEvent, ...]
    traced_correlation_id: str
    traced: tuple[DomainEvent, ...]
    traced_log: tuple[LogLine, ...]
    sample_wire: bytes
    problems: tuple[str, ...]
    seconds: float
    outbox_rows: int = 0
    relayed: int = 0


class _ContextLog(logging.Handler):
    """Keeps every record with the tidings context current when it was logged."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[LogLine] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = LogLine(current_context(), record.levelname, record.name, record.getMessage())
        self.lines.append(line)


class _Shop:
    """The shop's services wired to one bus. Single-threaded, as the demo drives it."""

    def __init__(self, tenants: Sequence[str], rng: random.Random) -> None:
        self.rng = rng
        self.bus = EventBus()
        self.journal: list[DomainEvent] = []
        self.published: Counter[str] = Counter()
        self.handler_runs: Counter[str] = Counter()
        self.wire: dict[str, bytes] = {}
        self.stock = {(t, sku): INITIAL_STOCK for t in tenants for sku in CATALOGUE}
        self.open_orders: dict[str, tuple[OrderPlaced, set[str]]] = {}
        self.mailbox: list[tuple[str, str]] = []
        self.sales = {t: TenantSales() for t in tenants}
        self.placed = Counter(dict.fromkeys(tenants, 0))
        self.customers = {
            t: [(self._uuid(), f"c{n}@{t}.example") for n in range(12)] for t in tenants
        }
        # The embedded default: an in-memory SQLite database holds the orders and the outbox;
        # the relay publishes what the requests committed.
        self.engine = sa.create_engine("sqlite://", poolclass=StaticPool)
        metadata = sa.MetaData()
        self.orders = sa.Table(
            "orders",
            metadata,
            sa.Column("order_id", sa.String(32), primary_key=True),
            sa.Column("tenant_id", sa.String(64)),
            sa.Column("total", sa.String(32)),
        )
        self.outbox = Outbox(metadata)
        metadata.create_all(self.engine)
        self.relay = Relay(self.engine, self.outbox, self.send_all, listen=False)
        self.outbox_rows = 0
        self.relayed = 0
        # Subscription order is run order: the journal first sees every event before its
        # handlers raise more, so it holds each causation tree parents first.
        handlers: list[tuple[str, Callable[[Any], None], tuple[type[DomainEvent], ...]]] = [
            ("audit.journal", self.journal.append, (DomainEvent,)),
            ("checkout.open", self.open_order, (OrderPlaced,)),
            ("inventory.reserve_stock", self.reserve_stock, (OrderPlaced,)),
            ("payments.capture", self.capture_payment, (OrderPlaced,)),
            ("checkout.confirm", self.confirm_when_ready, (StockReserved, PaymentCaptured)),
            ("notifications.send_confirmation", self.send_confirmation, (OrderConfirmed,)),
            ("reporting.project_sales", self.project_sales, (OrderConfirmed,)),
        ]
        for name, func, types in handlers:
            self.bus.add_handler(self._counted(name, func), *types, name=name)

    def _counted(self, name: str, func: Callable[[Any], None]) -> Callable[[Any], None]:
        def run(event: Any) -> None:
            self.handler_runs[name] += 1
            func(event)

        return run

    def _uuid(self) -> uuid.UUID:
        return uuid.UUID(int=self.rng.getrandbits(128), version=4)

    def send(self, event: DomainEvent) -> None:
        """Put ``event`` on the wire and back, then publish what arrived."""
        wire = encode(event)
        arrived = decode(wire, type(event))
        if arrived != event:
            msg = f"the wire changed {event!r} into {arrived!r}"
            raise RuntimeError(msg)
        self.wire[arrived.event_id] = wire
        self.published[type(arrived).event_type] += 1
        self.bus.publish(arrived)

    def send_all(self, events: Sequence[DomainEvent]) -> None:
        """The relay's publish: every committed event goes to the bus (through the wire)."""
        self.relayed += len(events)
        for event in events:
            self.send(event)

    def place_order(self, number: int) -> None:
        """One request: its own correlation id, a tenant, no causation (it is a root).

        The order and its event commit together; the relay publishes the event afterwards.
        """
        tenant = self.rng.choice(sorted(self.sales))
        customer = self.rng.choice(self.customers[tenant])
        self.placed[tenant] += 1
        with event_context(correlation_id=str(uuid.uuid4()), tenant_id=tenant, causation_id=None):
            skus = self.rng.sample(sorted(CATALOGUE), k=self.rng.randint(1, 3))
            lines = tuple(OrderLine(sku, self.rng.randint(1, 3), CATALOGUE[sku]) for sku in skus)
            total = sum((line.unit_price * line.quantity for line in lines), Decimal("0.00"))
            order_id = f"ord-{number:05d}"
            log.getChild("web").info(
                "POST /orders: %s places %s for %s EUR", customer[1], order_id, total
            )
            with self.engine.begin() as connection:
                connection.execute(
                    self.orders.insert().values(
                        order_id=order_id, tenant_id=tenant, total=str(total)
                    )
                )
                self.outbox.add(
                    connection, OrderPlaced(order_id, customer[0], customer[1], lines, total)
                )
            self.outbox_rows += 1
        self.relay.run_once()

    def open_order(self, order: OrderPlaced) -> None:
        self.open_orders[order.order_id] = (order, set())

    def reserve_stock(self, order: OrderPlaced) -> None:
        for line in order.lines:
            key = (order.tenant_id or "", line.sku)
            if self.stock[key] < line.quantity:
                self.stock[key] += RESTOCK
                log.getChild("inventory").info("restocked %s with %d units", line.sku, RESTOCK)
            self.stock[key] -= line.quantity
        log.getChild("inventory").info(
            "reserved %d line(s) for %s", len(order.lines), order.order_id
        )
        self.send(StockReserved(order.order_id, self._uuid(), order.lines, "main"))

    def capture_payment(self, order: OrderPlaced) -> None:
        method = self.rng.choice(list(PaymentMethod))
        log.getChild("payments").info(
            "captured %s EUR by %s for %s", order.total, method, order.order_id
        )
        self.send(PaymentCaptured(order.order_id, self._uuid(), order.total, "EUR", method))

    def confirm_when_ready(self, event: StockReserved | PaymentCaptured) -> None:
        entry = self.open_orders.get(event.order_id)
        if entry is None:
            log.getChild("checkout").warning(
                "%s: %s is not open, ignored", event.event_type, event.order_id
            )
            return
        order, done = entry
        done.add(event.event_type)
        if len(done) < 2:
            return
        del self.open_orders[event.order_id]
        log.getChild("checkout").info("confirmed %s", order.order_id)
        self.send(
            OrderConfirmed(order.order_id, order.customer_id, order.email, order.total, "EUR")
        )

    def send_confirmation(self, event: OrderConfirmed) -> None:
        subject = f"Your order {event.order_id} is confirmed"
        self.mailbox.append((event.email, subject))
        log.getChild("mailer").info("mailed %s: %r", event.email, subject)
        self.send(EmailSent(event.order_id, event.email, subject, self._uuid()))

    def project_sales(self, event: OrderConfirmed) -> None:
        tenant = event.tenant_id or ""
        before = self.sales[tenant]
        self.sales[tenant] = TenantSales(before.orders + 1, before.revenue + event.total)


def causal_order(events: Sequence[DomainEvent]) -> list[tuple[int, DomainEvent]]:
    """Return ``(depth, event)`` pairs, parents before children, siblings in the given order.

    Roots are events whose ``causation_id`` is ``None`` or names no event in ``events``.
    """
    ids = {e.event_id for e in events}
    children: dict[str | None, list[DomainEvent]] = {}
    for event in events:
        parent = event.causation_id if event.causation_id in ids else None
        children.setdefault(parent, []).append(event)
    ordered: list[tuple[int, DomainEvent]] = []
    stack = [(0, e) for e in reversed(children.get(None, []))]
    while stack:
        depth, event = stack.pop()
        ordered.append((depth, event))
        stack.extend((depth + 1, c) for c in reversed(children.get(event.event_id, [])))
    return ordered


def reconcile(journal: Sequence[DomainEvent], sales: Mapping[str, TenantSales]) -> tuple[str, ...]:
    """Return every inconsistency found in a run's journal and read model (empty: all good).

    Checks that each request has its own correlation id, every order is confirmed exactly
    once, every event's causation chain leads to an ``OrderPlaced`` whose ``causation_id`` is
    ``None`` with the same correlation, tenant and order ids all along, and that each tenant's
    sales equal the orders it placed.
    """
    problems: list[str] = []
    by_id = {e.event_id: e for e in journal}
    roots = [e for e in journal if isinstance(e, OrderPlaced)]
    if len({r.correlation_id for r in roots}) != len(roots):
        problems.append("two requests share a correlation id")
    confirmed = Counter(e.order_id for e in journal if isinstance(e, OrderConfirmed))
    for root in roots:
        if confirmed.pop(root.order_id, 0) != 1:
            problems.append(f"{root.order_id} was not confirmed exactly once")
    problems.extend(f"{order} confirmed but never placed" for order in confirmed)
    for event in journal:
        node = event
        while node.causation_id is not None:
            parent = by_id.get(node.causation_id)
            if parent is None:
                problems.append(f"{event.event_id}: cause {node.causation_id} is unknown")
                break
            same = ("correlation_id", "tenant_id", "order_id")
            if any(getattr(parent, a, None) != getattr(node, a, None) for a in same):
                problems.append(f"{event.event_id}: ids change between {parent.event_id} and it")
            node = parent
        if not isinstance(node, OrderPlaced):
            problems.append(f"{event.event_id}: its chain starts at a {node.event_type}")
    for tenant, sold in sales.items():
        own = [r for r in roots if r.tenant_id == tenant]
        revenue = sum((r.total for r in own), Decimal("0.00"))
        if (sold.orders, sold.revenue) != (len(own), revenue):
            problems.append(f"tenant {tenant}: read model {sold} != {len(own)} orders, {revenue}")
    return tuple(problems)


def run_demo(
    orders: int = 200, tenants: int = 2, seed: int | None = 0, console: Console | None = None
) -> DemoResult:
    """Run the shop for ``orders`` requests spread over ``tenants`` tenants; return the result.

    The same ``seed`` gives the same orders, customers, tenants and totals (ids of events and
    requests are always fresh); ``None`` seeds from the operating system. With a ``console``,
    the report is printed to it (see :func:`print_report`). Single-threaded; the default
    registry gains the ``shop.*`` types when this module is imported.

    Raises:
        ValueError: ``orders`` or ``tenants`` is below 1.
    """
    if orders < 1 or tenants < 1:
        msg = f"the demo needs at least one order and one tenant, not {orders} and {tenants}"
        raise ValueError(msg)
    started = time.perf_counter()
    rng = random.Random(seed)  # noqa: S311 - demo data, not secrets
    names = [TENANT_NAMES[i] if i < len(TENANT_NAMES) else f"tenant-{i}" for i in range(tenants)]
    shop, recorder, level = _Shop(names, rng), _ContextLog(), log.level
    log.addHandler(recorder)
    log.setLevel(logging.INFO)
    try:
        for number in range(1, orders + 1):
            shop.place_order(number)
    finally:
        log.removeHandler(recorder)
        log.setLevel(level)
    journal = tuple(shop.journal)
    traced_id = journal[0].correlation_id
    traced = tuple(
        e for _, e in causal_order([e for e in journal if e.correlation_id == traced_id])
    )
    result = DemoResult(
        requests=orders,
        placed=dict(shop.placed),
        sales=dict(shop.sales),
        published=dict(shop.published),
        handler_runs=dict(shop.handler_runs),
        emails_sent=len(shop.mailbox),
        wire_bytes=sum(len(w) for w in shop.wire.values()),
        journal=journal,
        traced_correlation_id=traced_id,
        traced=traced,
        traced_log=tuple(
            line for line in recorder.lines if line.context.correlation_id == traced_id
        ),
        sample_wire=shop.wire[journal[0].event_id],
        problems=reconcile(journal, shop.sales)
        + (
            ()
            if shop.relayed == shop.outbox_rows == orders
            else (f"{shop.outbox_rows} events committed to the outbox, {shop.relayed} relayed",)
        ),
        seconds=time.perf_counter() - started,
        outbox_rows=shop.outbox_rows,
        relayed=shop.relayed,
    )
    shop.engine.dispose()
    if console is not None:
        print_report(result, console)
    return result
