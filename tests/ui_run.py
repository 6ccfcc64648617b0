"""A real run for the ops page's tests: the ui_shop on Redis Streams, audited, plus an outbox.

:func:`shop_run` starts a consumer of the shop in this process with the audit installed on a
store of the test's own, places one order (whose confirmation mail is dead-lettered) and waits
until its seven records are in the trail; it also makes an SQLite outbox holding pending rows on
two partition keys and one quarantined row. The consumer keeps running for the block, so a
replayed letter is handled.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis
import sqlalchemy as sa
from tests.apps import ui_shop
from tests.audit_run import audit_store, auditing, settled, store_url

from tidings import EventBus, event_context
from tidings.audit import AuditStore
from tidings.deadletter.redis import RedisDeadLetterStore
from tidings.memory import MemoryDeadLetterStore
from tidings.outbox import Outbox, Relay
from tidings.testing.workers import wait_until
from tidings.transports.memory import MemoryBroker, MemoryTransport

DEADLINE = 30.0
RECORDS = 7
"""2 published; billing.charge retried, handled; mail.confirm retried, dead-lettered; ledger.record
handled."""


@dataclass
class Scene:
    """What a run left, and where."""

    prefix: str
    audit: AuditStore
    audit_url: str
    letters: RedisDeadLetterStore
    outbox_url: str
    order: ui_shop.OrderPlaced
    client: redis.Redis
    bus: EventBus


def _outbox(tmp_path: Path) -> str:
    """An SQLite outbox with pending rows on keys ``k-a`` and ``k-b`` and one quarantined row."""
    url = f"sqlite:///{tmp_path / 'outbox.db'}"
    engine = sa.create_engine(url)
    outbox = Outbox()
    outbox.create_tables(engine)
    with engine.begin() as connection:
        connection.execute(
            sa.insert(outbox.table).values(
                event_id="poison-1", event_type="ui_shop.poison", partition_key="k-poison",
                payload="not an envelope <script>", created_at=sa.func.now(), attempts=0,
            )
        )  # fmt: skip
    transport = MemoryTransport(dead_letters=MemoryDeadLetterStore(), broker=MemoryBroker())
    Relay(engine, outbox, EventBus(transport=transport), listen=False, max_attempts=1).run_batch()
    with engine.begin() as connection:
        outbox.add(connection, ui_shop.OrderPlaced(order_id="w-1"), partition_key="k-a")
        outbox.add(connection, ui_shop.OrderPlaced(order_id="w-2"), partition_key="k-a")
        outbox.add(connection, ui_shop.OrderPlaced(order_id="w-3"), partition_key="k-b")
    engine.dispose()
    return url


@contextmanager
def shop_run(kind: str, name: str, tmp_path: Path) -> Iterator[Scene]:
    """Run the shop once with the audit on a ``kind`` store; yield the scene, clean up after."""
    bus, transport, client = ui_shop.make(name)
    client.set(f"{name}:broken", "1")
    stopping = threading.Event()
    consumer = threading.Thread(target=transport.run, args=(stopping,), daemon=True)
    try:
        with audit_store(kind, f"a_{name}", tmp_path) as audit, auditing(audit):
            transport.streams()  # the groups exist before the first publish
            consumer.start()
            with event_context(correlation_id=f"req-{uuid.uuid4().hex[:8]}", tenant_id="acme"):
                order = ui_shop.OrderPlaced(order_id="o-1")
                bus.publish(order)
            wait_until(lambda: transport.dead_letters.count() == 1, what="the dead letter")
            settled(audit, order.correlation_id, RECORDS)
            yield Scene(
                prefix=name,
                audit=audit,
                audit_url=store_url(kind, tmp_path),
                letters=transport.dead_letters,  # type: ignore[arg-type]
                outbox_url=_outbox(tmp_path),
                order=order,
                client=client,
                bus=bus,
            )
    finally:
        stopping.set()
        if consumer.ident is not None:
            consumer.join(DEADLINE)
        for key in client.scan_iter(f"{name}*"):
            client.delete(key)
        transport.close()
        client.close()
