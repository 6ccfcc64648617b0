"""The application the chaos rig runs: one event, two services, their tables and buses.

Built from the environment, and only when ``CHAOS_ROLE`` is set (nothing happens on import
otherwise): ``CHAOS_TRANSPORT`` (``streams`` or ``celery-redis``), ``CHAOS_REDIS`` (the rig's
Redis), ``CHAOS_DB`` (the rig's database) and ``CHAOS_ROLE`` (``ledger``, ``mailer`` or
``relay``). Worker and relay processes name it the standard way::

    tidings worker --app chaos.services:bus              # Redis Streams, a service's worker
    celery -A chaos.services worker -Q ledger            # Celery, a service's worker
    tidings relay --db $CHAOS_DB --transport chaos.services:bus
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar

import redis
import sqlalchemy as sa

from tidings import DomainEvent, EventBus, register_event
from tidings.deadletter.redis import RedisDeadLetterStore
from tidings.inbox.redis import RedisInbox
from tidings.inbox.sql import SqlInbox, current_connection
from tidings.outbox import Outbox
from tidings.retry import RetryPolicy

SERVICES = ("ledger", "mailer")
VISIBILITY_TIMEOUT = 8.0
"""Celery on Redis: seconds before an unacknowledged message is delivered again."""
HEARTBEAT = 4.0
"""Celery on RabbitMQ: AMQP heartbeat seconds (a stopped worker's connection is dropped after)."""
CLAIM_IDLE = 3.0
"""Redis Streams: seconds before a pending entry of a stopped consumer is claimed."""
RETRY = RetryPolicy(max_attempts=20, initial_delay=0.2, max_delay=2.0)
"""Handlers fail only while a server is down: retry long enough to outlast any fault."""


@register_event
@dataclass(frozen=True)
class OrderPlaced(DomainEvent):
    """The one event: an order committed by a producer."""

    event_type: ClassVar[str] = "chaos.order_placed"
    order_id: str = ""


metadata = sa.MetaData()
orders = sa.Table(
    "orders",
    metadata,
    sa.Column("order_id", sa.String(64), primary_key=True),
    sa.Column("event_id", sa.String(64), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
)
effects = {
    service: sa.Table(
        f"{service}_effects",
        metadata,
        sa.Column("n", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("event_id", sa.String(64), nullable=False, index=True),
        sa.Column("order_id", sa.String(64), nullable=False),
    )
    for service in SERVICES
}
outbox = Outbox(metadata)
ledger_inbox_table = "ledger_inbox"


def create_schema(engine: sa.Engine) -> None:
    """Create every table of the application (orders, effects, outbox, the SQL inbox)."""
    SqlInbox(engine, table_name=ledger_inbox_table, metadata=metadata)
    metadata.create_all(engine)


def _inbox(role: str, engine: sa.Engine, client: redis.Redis) -> Any:
    if role == "ledger":
        return SqlInbox(engine, table_name=ledger_inbox_table, metadata=metadata)
    return RedisInbox(client, prefix=f"chaos:{role}:inbox", lease=30.0)


def _subscribe(bus: EventBus, role: str, engine: sa.Engine) -> None:
    table = effects.get(role)
    if table is None:
        return  # the relay's bus publishes only
    if role == "ledger":

        def ledger(event: OrderPlaced) -> None:
            # In the inbox's transaction: the effect and the inbox row commit together.
            current_connection().execute(
                table.insert().values(event_id=event.event_id, order_id=event.order_id)
            )

        bus.add_handler(ledger, OrderPlaced, name="chaos.ledger", retry=RETRY)
    else:

        def mailer(event: OrderPlaced) -> None:
            with engine.begin() as connection:  # its own transaction: at least once
                connection.execute(
                    table.insert().values(event_id=event.event_id, order_id=event.order_id)
                )

        bus.add_handler(mailer, OrderPlaced, name="chaos.mailer", retry=RETRY)


def build(transport_kind: str, role: str, redis_url: str, db_url: str) -> tuple[EventBus, Any]:
    """Return ``(bus, celery app or None)`` for ``role`` on ``transport_kind``."""
    engine = sa.create_engine(db_url, pool_pre_ping=True, pool_size=4)
    client = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
    service = role if role in SERVICES else "ledger"
    dead_letters = RedisDeadLetterStore(client, prefix=f"chaos:{service}:dlq")
    app = None
    if transport_kind == "streams":
        from tidings.transports.redis_streams import RedisStreamsTransport  # noqa: PLC0415

        transport: Any = RedisStreamsTransport(
            client,
            service=service,
            stream_prefix="chaos:stream",
            inbox=_inbox(service, engine, client),
            dead_letters=dead_letters,
            retry=RETRY,
            claim_idle=CLAIM_IDLE,
            max_deliveries=50,
        )
    elif transport_kind in ("celery-redis", "celery-rabbitmq"):
        from celery import Celery  # noqa: PLC0415

        from tidings.transports.celery import CeleryTransport  # noqa: PLC0415

        rabbit = transport_kind == "celery-rabbitmq"
        app = Celery(f"chaos-{role}", broker=os.environ["CHAOS_AMQP"] if rabbit else redis_url)
        app.conf.update(
            broker_heartbeat=HEARTBEAT,
            task_default_queue=service,
            broker_connection_retry_on_startup=True,
            broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT},
            worker_prefetch_multiplier=1,
            worker_hijack_root_logger=False,
        )
        transport = CeleryTransport(
            app,
            queue=service,  # routed by type: each service's queue gets every OrderPlaced
            inbox=_inbox(service, engine, client),
            dead_letters=dead_letters,
            retry=RETRY,
        )
    else:
        msg = (
            f"CHAOS_TRANSPORT must be streams, celery-redis or celery-rabbitmq: {transport_kind!r}"
        )
        raise ValueError(msg)
    bus = EventBus(transport=transport)
    _subscribe(bus, role, engine)
    return bus, app


if os.environ.get("CHAOS_ROLE"):
    bus, app = build(
        os.environ["CHAOS_TRANSPORT"],
        os.environ["CHAOS_ROLE"],
        os.environ["CHAOS_REDIS"],
        os.environ["CHAOS_DB"],
    )
