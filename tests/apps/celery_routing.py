"""Two Celery services that subscribe to each other's events, for the routing-by-type tests.

Worker subprocesses start as ``celery -A tests.apps.celery_routing worker -Q <queue>`` with:

- ``ROUTING_PREFIX``: the test's own name: queues ``<prefix>.shop`` and ``<prefix>.billing``,
  exchange (RabbitMQ) or registry key prefix (Redis) ``<prefix>.events``, and the Redis keys
  of inboxes, dead letters and effects under ``<prefix>:``.
- ``ROUTING_SERVICE``: ``shop``, ``billing``, ``unknown`` (a handler of an unregistered
  class) or ``pair`` (a transport on queue ``<prefix>.a``, and a second one on the same app,
  queue ``<prefix>.b``, which is refused).
- ``ROUTING_BROKER``: the broker URL (default: the test Redis).
- ``ROUTING_HANDLERS``: ``0`` builds the service without importing its handlers, as a worker
  that forgot the module subscribing them.

The shop handles ``InvoicePaid``; billing handles ``OrderPlaced`` and publishes an
``InvoicePaid`` for each, from inside its worker (an order id starting ``flaky`` fails its
first attempt, counted in ``<prefix>:attempts:<order id>``). Each handler appends
``<type>|<id>`` to the list ``<prefix>:effects:<service>``. The test process calls
:func:`make` to publish and look.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import redis
from celery import Celery

from tidings import DomainEvent, EventBus, register_event
from tidings.deadletter.redis import RedisDeadLetterStore
from tidings.errors import UsageError
from tidings.inbox.redis import RedisInbox
from tidings.retry import RetryPolicy
from tidings.transports.celery import CeleryTransport

REDIS_URL = os.environ.get("TIDINGS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@register_event
@dataclass(frozen=True)
class OrderPlaced(DomainEvent):
    event_type: ClassVar[str] = "routing_shop.order_placed"
    order_id: str = ""


@register_event
@dataclass(frozen=True)
class InvoicePaid(DomainEvent):
    event_type: ClassVar[str] = "routing_billing.invoice_paid"
    order_id: str = ""


@register_event
@dataclass(frozen=True)
class NobodyCares(DomainEvent):
    event_type: ClassVar[str] = "routing_audit.nobody_cares"


@dataclass(frozen=True)
class NotRegistered(DomainEvent):
    event_type: ClassVar[str] = "routing_unknown.not_registered"


def app_for(prefix: str, broker: str) -> Celery:
    """A Celery app like a user's, on the test's broker (the worker logs the Celery way)."""
    app = Celery(f"routing-{prefix}", broker=broker)
    app.conf.update(broker_connection_retry_on_startup=True)
    return app


def transport_for(app: Celery, prefix: str, queue: str, client: redis.Redis) -> CeleryTransport:
    """A transport routing by type (the default) through the test's own exchange."""
    return CeleryTransport(
        app,
        queue=queue,
        exchange=f"{prefix}.events",
        inbox=RedisInbox(client, prefix=f"{prefix}:inbox:{queue}"),
        dead_letters=RedisDeadLetterStore(client, prefix=f"{prefix}:dlq:{queue}"),
        retry=RetryPolicy(max_attempts=3, initial_delay=0.05, max_delay=0.2),
    )


def make(
    service: str, prefix: str, broker: str = REDIS_URL, *, handlers: bool = True
) -> tuple[Celery, EventBus, CeleryTransport, redis.Redis]:
    """Build one service (``shop``, ``billing`` or ``unknown``) with or without handlers."""
    client = redis.Redis.from_url(REDIS_URL)
    app = app_for(prefix, broker)
    transport = transport_for(app, prefix, f"{prefix}.{service}", client)
    bus = EventBus(transport=transport)
    effects = f"{prefix}:effects:{service}"
    if not handlers:
        return app, bus, transport, client
    if service == "shop":

        @bus.subscribe(InvoicePaid, name="shop.mark_paid")
        def mark_paid(event: InvoicePaid) -> None:
            client.rpush(effects, f"{event.event_type}|{event.order_id}")

    elif service == "billing":

        @bus.subscribe(OrderPlaced, name="billing.invoice")
        def invoice(event: OrderPlaced) -> None:
            flaky = event.order_id.startswith("flaky")
            if flaky and client.incr(f"{prefix}:attempts:{event.order_id}") == 1:
                raise RuntimeError("the first attempt of a flaky order fails")
            client.rpush(effects, f"{event.event_type}|{event.order_id}")
            bus.publish(InvoicePaid(order_id=event.order_id))

    elif service == "unknown":

        @bus.subscribe(NotRegistered, name="unknown.handle")
        def handle(event: NotRegistered) -> None:  # pragma: no cover - never routed
            client.rpush(effects, event.event_id)

    return app, bus, transport, client


def make_pair(prefix: str, broker: str = REDIS_URL) -> tuple[Celery, EventBus, str, redis.Redis]:
    """One app, a transport on queue ``.a``, and a second one refused: (app, bus, refusal)."""
    client = redis.Redis.from_url(REDIS_URL)
    app = app_for(prefix, broker)
    bus_a = EventBus(transport=transport_for(app, prefix, f"{prefix}.a", client))

    @bus_a.subscribe(OrderPlaced, name="a.record")
    def record_a(event: OrderPlaced) -> None:
        client.rpush(f"{prefix}:effects:a", f"{event.event_type}|{event.order_id}")

    try:
        EventBus(transport=transport_for(app, prefix, f"{prefix}.b", client))
    except UsageError as refused:
        return app, bus_a, str(refused), client
    msg = "a second transport on one app was accepted"
    raise AssertionError(msg)


if os.environ.get("ROUTING_PREFIX"):
    _service = os.environ.get("ROUTING_SERVICE", "shop")
    _broker = os.environ.get("ROUTING_BROKER", REDIS_URL)
    if _service == "pair":
        app, bus, _refused, _client = make_pair(os.environ["ROUTING_PREFIX"], _broker)
    else:
        app, bus, transport, _client = make(
            _service,
            os.environ["ROUTING_PREFIX"],
            _broker,
            handlers=os.environ.get("ROUTING_HANDLERS", "1") != "0",
        )
