"""The shop: its tables, what a request does, and the handlers, in every mode alike.

A request writes its order and its ``OrderPlaced`` event in one transaction (the outbox).
Handlers of ``OrderPlaced``: a (fake) confirmation email, the sales read model, stock
reservation (which raises the follow-up ``StockReserved``) and loyalty points, a handler that
fails now and then, by a plan drawn from the seed, to show retries and a dead letter.
``StockReserved`` has one handler, which books a pickup. Every handler run, failure and log
line is journaled (:mod:`tidings.demo.journal`) with its context.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

import sqlalchemy as sa

from tidings._sql import create_engine
from tidings.bus import EventBus
from tidings.context import current_context
from tidings.demo.events import OrderLine, OrderPlaced, StockReserved
from tidings.demo.journal import Journal, record
from tidings.events import DomainEvent
from tidings.outbox import Outbox
from tidings.retry import RetryPolicy

__all__ = [
    "ALWAYS",
    "CATALOGUE",
    "HANDLERS",
    "RETRY",
    "TENANTS",
    "LoyaltyUnavailableError",
    "Shop",
    "event_entry",
    "make_engine",
    "planned_failures",
]

CATALOGUE: Final = {
    "TEA-SENCHA-100G": Decimal("8.90"),
    "TEA-ASSAM-250G": Decimal("6.50"),
    "MUG-STONEWARE": Decimal("14.00"),
    "KETTLE-1L": Decimal("39.95"),
    "FILTERS-100": Decimal("3.20"),
}
TENANTS: Final = ("acme", "globex")
RETRY: Final = RetryPolicy(max_attempts=3, initial_delay=0.05, max_delay=0.2)
"""Every handler's policy: three tries in all, 50 ms then 100 ms apart (20 % jitter)."""

ALWAYS: Final = 1_000_000
"""What :func:`planned_failures` returns for an order the loyalty handler never gets through."""

HANDLERS: Final = {
    OrderPlaced.event_type: (
        "notifications.send_confirmation",
        "reporting.project_sales",
        "inventory.reserve_stock",
        "loyalty.award_points",
    ),
    StockReserved.event_type: ("shipping.book_pickup",),
}
"""The handlers of each event type: what reconciliation expects to run once per event."""

log = logging.getLogger("tidings.demo")


class LoyaltyUnavailableError(Exception):
    """The (simulated) loyalty service did not answer."""


def planned_failures(seed: int, order_id: str) -> int:
    """Return how many times ``loyalty.award_points`` fails on an order before it succeeds.

    One order in 97 (numbers 13, 110, 207, ...) fails every attempt and ends as a dead
    letter; of the others about one in nine fails once or twice (drawn from ``seed``), and is
    then retried into success.
    """
    number = int(order_id.rsplit("-", 1)[-1])
    if number % 97 == 13:
        return ALWAYS
    draw = random.Random(f"{seed}:{order_id}").random()  # noqa: S311 - a demo's dice
    return 2 if draw < 0.03 else 1 if draw < 0.12 else 0


def make_engine(url: str) -> sa.Engine:
    """Create an engine for ``url``; ``postgres(ql)://`` uses psycopg 3 (:mod:`tidings._sql`).

    SQLite files get a 30 s busy timeout and write-ahead logging, so the web thread, the relay
    and the workers (threads or processes) can share one file.
    """
    if not url.startswith("sqlite"):
        return create_engine(url)
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @sa.event.listens_for(engine, "connect")
    def _wal(connection: Any, _record: Any) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return engine


def event_entry(kind: str, event: DomainEvent) -> Any:
    """Return a journal entry of ``kind`` about ``event``, with the event's own ids."""
    return record(
        kind,
        event_id=event.event_id,
        causation_id=event.causation_id,
        event_type=event.event_type,
        correlation_id=event.correlation_id,
        tenant_id=event.tenant_id,
        detail=str(getattr(event, "order_id", "")),
    )


@dataclass
class Shop:
    """The shop's database, journal and handlers; the same in the web process and workers.

    Args:
        engine: the database of orders, the outbox and the sales read model.
        journal: where everything is recorded.
        seed: decides which orders the loyalty handler fails on (:func:`planned_failures`).
        prefix: the first part of the shop's table names, so runs do not collide.
    """

    engine: sa.Engine
    journal: Journal
    seed: int = 0
    prefix: str = "demo"

    def __post_init__(self) -> None:
        self.metadata = sa.MetaData()
        self.orders = sa.Table(
            f"{self.prefix}_orders",
            self.metadata,
            sa.Column("order_id", sa.String(32), primary_key=True),
            sa.Column("tenant_id", sa.String(64), nullable=False),
            sa.Column("email", sa.String(200), nullable=False),
            sa.Column("total_cents", sa.Integer, nullable=False),
        )
        self.sales = sa.Table(
            f"{self.prefix}_tenant_sales",
            self.metadata,
            sa.Column("tenant_id", sa.String(64), primary_key=True),
            sa.Column("orders", sa.Integer, nullable=False),
            sa.Column("revenue_cents", sa.Integer, nullable=False),
        )
        self.outbox = Outbox(self.metadata, table_name=f"{self.prefix}_outbox")
        self.bus: EventBus | None = None

    def create_tables(self, tenants: Sequence[str]) -> None:
        """Create the tables and an empty read-model row per tenant."""
        self.metadata.create_all(self.engine)
        with self.engine.begin() as connection:
            connection.execute(
                self.sales.insert(),
                [{"tenant_id": t, "orders": 0, "revenue_cents": 0} for t in tenants],
            )

    def drop_tables(self) -> None:
        """Drop the shop's tables."""
        self.metadata.drop_all(self.engine)

    # -- the request --------------------------------------------------------------------------

    def place_order(
        self, order_id: str, email: str, items: Sequence[tuple[str, int]]
    ) -> OrderPlaced:
        """Write the order and its ``OrderPlaced`` in one transaction, in the bound context.

        Raises:
            KeyError: an unknown SKU.
        """
        lines = tuple(OrderLine(sku, qty, CATALOGUE[sku]) for sku, qty in items)
        total = sum((line.unit_price * line.quantity for line in lines), Decimal("0.00"))
        tenant = current_context().tenant_id or ""
        log.getChild("web").info("POST /orders: %s places %s for %s EUR", email, order_id, total)
        event = OrderPlaced(order_id, email, lines, total)
        with self.engine.begin() as connection:
            cents = int(total * 100)
            connection.execute(
                self.orders.insert().values(
                    order_id=order_id, tenant_id=tenant, email=email, total_cents=cents
                )
            )
            self.outbox.add(connection, event)
        self.journal.add(event_entry("committed", event))
        return event

    # -- the handlers -------------------------------------------------------------------------

    def subscribe(self, bus: EventBus) -> None:
        """Subscribe the shop's handlers to ``bus``, each journaling its runs and failures."""
        self.bus = bus
        handlers: list[tuple[str, Callable[[Any], None], type[DomainEvent]]] = [
            ("notifications.send_confirmation", self.send_confirmation, OrderPlaced),
            ("reporting.project_sales", self.project_sales, OrderPlaced),
            ("inventory.reserve_stock", self.reserve_stock, OrderPlaced),
            ("loyalty.award_points", self.award_points, OrderPlaced),
            ("shipping.book_pickup", self.book_pickup, StockReserved),
        ]
        for name, func, event_type in handlers:
            bus.add_handler(self._journaled(name, func), event_type, name=name, retry=RETRY)

    def _journaled(self, name: str, func: Callable[[Any], None]) -> Callable[[Any], None]:
        journal = self.journal

        def run(event: Any) -> None:
            try:
                func(event)
            except Exception as exc:
                journal.add(record("failed", name=name, detail=f"{type(exc).__name__}: {exc}"))
                raise
            journal.add(record("handled", name=name, event_type=event.event_type))

        return run

    def send_confirmation(self, event: OrderPlaced) -> None:
        """The fake mailer: nothing leaves the machine, the log says what would have."""
        subject = f"Your order {event.order_id} ({event.total} {event.currency})"
        log.getChild("mailer").info("mailed %s: %r", event.email, subject)

    def project_sales(self, event: OrderPlaced) -> None:
        """Add the order to its tenant's row of the sales read model."""
        update = (
            self.sales.update()
            .where(self.sales.c.tenant_id == (event.tenant_id or ""))
            .values(
                orders=self.sales.c.orders + 1,
                revenue_cents=self.sales.c.revenue_cents + int(event.total * 100),
            )
        )
        with self._effects() as connection:
            connection.execute(update)
        log.getChild("reporting").info("sales of %s += %s EUR", event.tenant_id, event.total)

    def _effects(self) -> AbstractContextManager[sa.Connection]:
        """The inbox's transaction when it is a SQL inbox on this database, else a new one.

        In the inbox's transaction the read model and the inbox row commit together: the
        effect happens exactly once, whatever is redelivered.
        """
        try:
            from tidings.inbox.sql import current_connection  # noqa: PLC0415

            connection = current_connection()
        except LookupError:  # not inside a SqlInbox guard
            return self.engine.begin()
        if connection.engine.url != self.engine.url:
            return self.engine.begin()
        return nullcontext(connection)

    def reserve_stock(self, event: OrderPlaced) -> None:
        """Reserve the order's units and raise ``StockReserved`` (caused by ``event``)."""
        units = sum(line.quantity for line in event.lines)
        warehouse = "north" if len(event.order_id) % 2 else "south"
        log.getChild("inventory").info("reserved %d unit(s) for %s", units, event.order_id)
        follow_up = StockReserved(event.order_id, warehouse, units)
        if self.bus is None:  # pragma: no cover - subscribe() sets it
            msg = "Shop.subscribe(bus) must run before handlers"
            raise RuntimeError(msg)
        self.bus.publish(follow_up)
        self.journal.add(event_entry("published", follow_up))

    def award_points(self, event: OrderPlaced) -> None:
        """Award loyalty points; fails as :func:`planned_failures` says, like a flaky service."""
        failed = self.journal.failures("loyalty.award_points", event.event_id)
        planned = planned_failures(self.seed, event.order_id)
        if planned == ALWAYS:
            msg = f"loyalty service has no account for {event.email}"
            raise LoyaltyUnavailableError(msg)
        if failed < planned:
            msg = f"loyalty service timed out for {event.order_id} (attempt {failed + 1})"
            raise LoyaltyUnavailableError(msg)
        log.getChild("loyalty").info("awarded %d points on %s", int(event.total), event.order_id)

    def book_pickup(self, event: StockReserved) -> None:
        """Book the carrier's pickup at the warehouse."""
        log.getChild("shipping").info(
            "pickup of %d unit(s) booked at %s for %s", event.units, event.warehouse, event.order_id
        )
