"""A service whose handler writes to PostgreSQL in the inbox's transaction (exactly-once effect).

Configured by ``SQLSHOP_QUEUE``, ``SQLSHOP_PREFIX`` (Redis keys of the dead letters) and
``SQLSHOP_TABLE`` (the shipments table; the inbox table is ``<table>_inbox``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import redis
import sqlalchemy as sa
from celery import Celery

from tidings import DomainEvent, EventBus, register_event
from tidings.deadletter.redis import RedisDeadLetterStore
from tidings.inbox.sql import SqlInbox, current_connection
from tidings.transports.celery import CeleryTransport

REDIS_URL = os.environ.get("TIDINGS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get(
    "TIDINGS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@register_event
@dataclass(frozen=True)
class ShipmentRequested(DomainEvent):
    event_type: ClassVar[str] = "celery_sql_shop.shipment_requested"
    order_id: str = ""


def make(
    queue: str, prefix: str, table_name: str
) -> tuple[EventBus, CeleryTransport, sa.Engine, sa.Table, redis.Redis]:
    """Build the service; the shipments table gets one row per handled event."""
    client = redis.Redis.from_url(REDIS_URL)
    engine = sa.create_engine(POSTGRES_URL)
    metadata = sa.MetaData()
    shipments = sa.Table(
        table_name,
        metadata,
        sa.Column("event_id", sa.String(64), primary_key=False),
        sa.Column("order_id", sa.String(64)),
    )
    inbox = SqlInbox(engine, table_name=f"{table_name}_inbox", metadata=metadata)
    metadata.create_all(engine)
    app = Celery("sqlshop", broker=REDIS_URL)
    app.conf.update(task_default_queue=queue, broker_connection_retry_on_startup=True)
    transport = CeleryTransport(
        app,
        queue=queue,
        inbox=inbox,
        dead_letters=RedisDeadLetterStore(client, prefix=f"{prefix}:dlq"),
    )
    bus = EventBus(transport=transport)

    @bus.subscribe(ShipmentRequested, name="shipping.book")
    def book(event: ShipmentRequested) -> None:
        current_connection().execute(
            shipments.insert().values(event_id=event.event_id, order_id=event.order_id)
        )

    return bus, transport, engine, shipments, client


if os.environ.get("SQLSHOP_QUEUE"):
    bus, transport, engine, shipments, _client = make(
        os.environ["SQLSHOP_QUEUE"], os.environ["SQLSHOP_PREFIX"], os.environ["SQLSHOP_TABLE"]
    )
    app = transport.app
