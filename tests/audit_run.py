"""A real run for the audit tests: stores on every server, and a small shop on a real transport.

The shop: an ``OrderPlaced`` for tenant ``acme`` has two handlers, ``billing.charge`` (fails its
first attempt, then publishes a ``PaymentTaken`` follow-up) and ``mail.confirm`` (always fails:
retried once, then dead-lettered); ``ledger.record`` handles the ``PaymentTaken``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import redis
import sqlalchemy as sa

from conftest import require_server
from tidings import DomainEvent, EventBus, event_context, register_event
from tidings.audit import AuditStore, flush_audit, install_audit, uninstall_audit
from tidings.audit.redis import RedisAuditStore
from tidings.audit.sql import SqlAuditStore
from tidings.memory import MemoryDeadLetterStore, MemoryInbox
from tidings.retry import RetryPolicy
from tidings.testing.workers import wait_until
from tidings.transports.memory import MemoryBroker, MemoryTransport

STORES = ("sqlite", "postgresql", "mariadb", "redis")
RETRY = RetryPolicy(max_attempts=2, initial_delay=0.01, jitter=0)
DEADLINE = 30.0


@register_event
@dataclass(frozen=True)
class OrderPlaced(DomainEvent):
    event_type: ClassVar[str] = "audit_test.order_placed"
    order_id: str = ""


@register_event
@dataclass(frozen=True)
class PaymentTaken(DomainEvent):
    event_type: ClassVar[str] = "audit_test.payment_taken"
    order_id: str = ""


class MailDown(Exception):
    pass


class CardDeclined(Exception):
    pass


def store_url(kind: str, tmp_path: Path) -> str:
    """The URL of the test's audit store of ``kind`` (skipped when its server is absent)."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'audit.db'}"
    return require_server(kind)


@contextmanager
def audit_store(kind: str, name: str, tmp_path: Path) -> Iterator[AuditStore]:
    """An empty audit store of ``kind`` (one of :data:`STORES`) of the test's own, removed after."""
    url = store_url(kind, tmp_path)
    if kind == "redis":
        store = RedisAuditStore.from_url(url, prefix=name)
        try:
            yield store
        finally:
            store.close()
            client = redis.Redis.from_url(url)
            keys = list(client.scan_iter(match=f"{name}:*"))
            if keys:
                client.delete(*keys)
            client.close()
        return
    engine = sa.create_engine(url)
    sql_store = SqlAuditStore(engine, table_name=name)
    sql_store.create_tables()
    try:
        yield sql_store
    finally:
        sql_store.table.drop(engine, checkfirst=True)
        engine.dispose()


@contextmanager
def auditing(store: AuditStore) -> Iterator[None]:
    """The audit installed on ``store`` for the block, uninstalled (flushed) after."""
    install_audit(store, flush_interval=0.05)
    try:
        yield
    finally:
        uninstall_audit()


@dataclass
class Shop:
    """The shop's handlers on ``bus``, and what they did."""

    bus: EventBus
    charged: list[str]
    recorded: list[str]
    failures: dict[str, int]

    def place(self, correlation_id: str) -> OrderPlaced:
        """Publish one order under ``correlation_id`` for tenant ``acme``."""
        with event_context(correlation_id=correlation_id, tenant_id="acme"):
            order = OrderPlaced(order_id="o-1")
            self.bus.publish(order)
        return order


def shop(bus: EventBus) -> Shop:
    """Subscribe the shop's three handlers to ``bus``."""
    made = Shop(bus, [], [], {})
    lock = threading.Lock()

    @bus.subscribe(OrderPlaced, name="billing.charge")
    def charge(event: OrderPlaced) -> None:
        with lock:
            made.failures[event.event_id] = made.failures.get(event.event_id, 0) + 1
            first = made.failures[event.event_id] == 1
        if first:
            raise CardDeclined("card declined\x1b[2J, try again")
        made.charged.append(event.event_id)
        bus.publish(PaymentTaken(order_id=event.order_id))

    @bus.subscribe(OrderPlaced, name="mail.confirm")
    def confirm(event: OrderPlaced) -> None:
        raise MailDown("smtp down")

    @bus.subscribe(PaymentTaken, name="ledger.record")
    def record(event: PaymentTaken) -> None:
        made.recorded.append(event.event_id)

    return made


def settled(store: AuditStore, correlation_id: str, count: int) -> list[object]:
    """Wait until ``store`` holds ``count`` records of ``correlation_id``; return them."""

    def found() -> list[object]:
        flush_audit()
        records = store.by_correlation(correlation_id)
        return list(records) if len(records) >= count else []

    return wait_until(found, timeout=DEADLINE, what=f"{count} audit records")


EXPECTED = 7
"""Records the shop's run leaves: 2 published, 2 retried, 2 handled, 1 dead-lettered."""


def run_shop(store: AuditStore, name: str) -> tuple[OrderPlaced, list[object]]:
    """Run the shop on a memory transport with the audit on ``store``; the order, its records."""
    letters = MemoryDeadLetterStore()
    transport = MemoryTransport(
        dead_letters=letters, inbox=MemoryInbox(), retry=RETRY, queue=name, broker=MemoryBroker()
    )
    made = shop(EventBus(transport=transport))
    with auditing(store):
        transport.start()
        try:
            order = made.place(f"{name}-request")
            wait_until(
                lambda: letters.count() == 1 and made.recorded and transport.idle(),
                timeout=DEADLINE,
                what="the run to settle",
            )
        finally:
            transport.close()
        records = settled(store, order.correlation_id, EXPECTED)
    return order, records
