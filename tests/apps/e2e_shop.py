"""The shop of the end-to-end correlation test: web view, outbox relay, worker, plain task.

Every process of the test imports this module with ``E2E_QUEUE`` (the Celery queue),
``E2E_PREFIX`` (every Redis key of the test starts with it) and ``E2E_DB`` (the SQLite file
holding the orders and the outbox) set, and :func:`make` builds the same service in each:

- the web process (the test itself) serves :attr:`Shop.web`, a Starlette app behind
  :class:`~tidings.integrations.asgi.CorrelationMiddleware`, whose view commits an order and
  its :class:`OrderPlaced` through the SQLAlchemy outbox and logs;
- ``tidings relay --transport tests.apps.e2e_shop:bus`` publishes through :attr:`Shop.bus` (a
  :class:`~tidings.transports.celery.CeleryTransport` on Redis) and logs each event it relayed
  (``tidings.outbox.relay`` at DEBUG, with the event's context bound);
- ``celery -A tests.apps.e2e_shop worker -Q <queue>`` runs :func:`on_order_placed`, which logs
  and sends the plain Celery task ``send_receipt`` with ``.delay()``; the task logs too.

Logging in each process goes through :class:`~tidings.integrations.logging.ContextFilter` to a
handler that appends each formatted record to the Redis list ``{prefix}:logs``, as
``correlation_id|tenant_id|causation_id|message``; each of the shop's messages starts with
where it was written (``view:``, ``handler:``, ``task:``); the relay's own starts ``relayed``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import redis
import sqlalchemy as sa
from celery import Celery
from celery.signals import setup_logging
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tidings import DomainEvent, EventBus, register_event
from tidings.deadletter.redis import RedisDeadLetterStore
from tidings.inbox.redis import RedisInbox
from tidings.integrations.asgi import CorrelationMiddleware, tenant_from_header
from tidings.integrations.logging import ContextFilter
from tidings.outbox import Outbox
from tidings.transports.celery import CeleryTransport

REDIS_URL = os.environ.get("TIDINGS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
LOG_FORMAT = "%(correlation_id)s|%(tenant_id)s|%(causation_id)s|%(message)s"

log = logging.getLogger("e2e_shop")


@register_event
@dataclass(frozen=True)
class OrderPlaced(DomainEvent):
    event_type: ClassVar[str] = "e2e_shop.order_placed"
    order_id: str = ""


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[str] = mapped_column(primary_key=True)


OUTBOX = Outbox(Base.metadata)


class RedisListHandler(logging.Handler):
    """Append each formatted record to a Redis list, so every process logs to one place."""

    def __init__(self, client: redis.Redis, key: str) -> None:
        super().__init__()
        self.client = client
        self.key = key

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.client.rpush(self.key, self.format(record))
        except Exception:  # noqa: BLE001 - logging must not fail the caller
            self.handleError(record)


def configure_logging(client: redis.Redis, prefix: str) -> None:
    """Send this process's shop and relay records, with the context ids, to ``{prefix}:logs``."""
    handler = RedisListHandler(client, f"{prefix}:logs")
    handler.addFilter(ContextFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    relay_log = logging.getLogger("tidings.outbox.relay")
    relay_log.handlers[:] = [handler]
    relay_log.setLevel(logging.DEBUG)
    relay_log.propagate = False


@dataclass
class Shop:
    """One process's view of the shop: its database, broker, bus and web app."""

    client: redis.Redis
    engine: sa.Engine
    app: Celery
    bus: EventBus
    web: Any


def make(queue: str, prefix: str, db_url: str) -> Shop:
    """Build the shop: SQLite outbox, Celery app and transport, handler, task and web app."""
    client = redis.Redis.from_url(REDIS_URL)
    engine = sa.create_engine(db_url)
    app = Celery("e2e-shop", broker=REDIS_URL)
    app.conf.update(
        task_default_queue=queue,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    transport = CeleryTransport(
        app,
        queue=queue,
        inbox=RedisInbox(client, prefix=f"{prefix}:inbox"),
        dead_letters=RedisDeadLetterStore(client, prefix=f"{prefix}:dlq"),
    )
    bus = EventBus(transport=transport)

    @app.task(name=f"{queue}.send_receipt")
    def send_receipt(order_id: str) -> None:
        log.info("task: receipt sent for %s", order_id)

    @bus.subscribe(OrderPlaced, name="e2e_shop.on_order_placed")
    def on_order_placed(event: OrderPlaced) -> None:
        log.info("handler: order %s placed", event.order_id)
        send_receipt.delay(event.order_id)

    def place_order(request: Request) -> JSONResponse:
        order_id = request.path_params["order_id"]
        with Session(engine) as session, session.begin():
            session.add(Order(id=order_id))
            OUTBOX.add(session, OrderPlaced(order_id=order_id))
        log.info("view: order %s committed", order_id)
        return JSONResponse({"order_id": order_id})

    web = CorrelationMiddleware(
        Starlette(routes=[Route("/orders/{order_id}", place_order, methods=["POST"])]),
        tenant=tenant_from_header("X-Tenant-ID"),
    )
    return Shop(client, engine, app, bus, web)


def _keep_our_logging(**_: object) -> None:
    """In the worker: a receiver of ``setup_logging`` stops Celery configuring logging."""


if os.environ.get("E2E_QUEUE"):
    shop = make(os.environ["E2E_QUEUE"], os.environ["E2E_PREFIX"], os.environ["E2E_DB"])
    app = shop.app
    bus = shop.bus
    configure_logging(shop.client, os.environ["E2E_PREFIX"])
    setup_logging.connect(_keep_our_logging, weak=False)
