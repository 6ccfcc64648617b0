"""Pub/sub by event type for :class:`~tidings.transports.celery.CeleryTransport`.

A service's queue is subscribed to the event types its handlers receive, and a publisher sends
each event only to the queues subscribed to its type (as MassTransit and NServiceBus bind each
service's queue to the message types it handles):

- **RabbitMQ** (any AMQP broker): a durable direct exchange (``tidings.events`` by default)
  with one binding per subscribed event type to the service's queue. The publisher sends each
  message once to the exchange, its event type as the routing key, ``mandatory``: a message no
  binding takes comes back to the publisher (before the broker's confirm), which counts it as
  having no subscriber.
- **Redis**: kombu's exchanges on Redis keep their bindings but deliver an unrouted message
  to a list nobody reads, and its fanout is Redis pub/sub (lost while no one listens). So the
  workers keep a subscription registry in Redis instead: a set per event type of the queues
  subscribed (``tidings.events:subscribers:<event type>``), a set per queue of its types
  (``tidings.events:subscriptions:<queue>``) and the set of subscribed queues
  (``tidings.events:queues``). The publisher reads the sets of the types it
  sends (cached for ``subscription_ttl`` seconds, then read again) and sends one task message
  per subscribed queue.

Subscriptions are written by each worker at start-up (and again after each reconnection),
and by a publisher for its own bus's handlers when it first connects, so that events sent
before the service's first worker started wait in its queue. They are durable and additive:
a deploy that drops a handler leaves its type subscribed, and its events then reach a worker
with no handler for them, which dead-letters them naming the likely fix, instead of dropping
them unseen. :meth:`CeleryTransport.unsubscribe` removes a type the service no longer handles.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tidings.errors import UsageError

if TYPE_CHECKING:
    from tidings.bus import EventBus
    from tidings.registry import EventRegistry

__all__ = [
    "DEFAULT_EXCHANGE",
    "SubscriptionRegistry",
    "describe",
    "driver_of",
    "subscriptions",
]

log = logging.getLogger("tidings.celery")

DEFAULT_EXCHANGE = "tidings.events"
"""The exchange (RabbitMQ) or key prefix (Redis) of routing by event type."""


def subscriptions(bus: EventBus, registry: EventRegistry) -> dict[str, tuple[str, ...]]:
    """The event types ``bus``'s handlers receive, each with the names of its handlers.

    A handler of a class receives the registered subclasses too (a handler of
    :class:`~tidings.DomainEvent` receives every registered type).

    Raises:
        UsageError: a handler subscribes to a class that is not registered with the codec and
            has no registered subclass: its events could be neither routed nor decoded.
    """
    classes = {name: cls for name in registry if (cls := registry.get(name)) is not None}
    table: dict[str, tuple[str, ...]] = {}
    for name, cls in classes.items():
        handlers = bus.handlers_for(cls)
        if handlers:
            table[name] = tuple(h.name for h in handlers)
    for handler in bus.handlers:
        for event_class in handler.event_types:
            if not any(issubclass(cls, event_class) for cls in classes.values()):
                msg = (
                    f"handler {handler.name!r} subscribes to {event_class.__qualname__} "
                    f"(event type {getattr(event_class, 'event_type', '?')!r}), which is not "
                    "registered with the transport's codec: this service could neither be "
                    "routed its events nor decode them. Decorate the class with "
                    "@register_event (or register it in the codec's registry) in a module the "
                    "worker imports"
                )
                raise UsageError(msg)
    return table


def describe(queue: str, table: Mapping[str, Sequence[str]], how: str) -> str:
    """The handler table a worker logs at start-up: event type → handlers, one line each."""
    if not table:
        return f"tidings: queue {queue!r} serves no event type (no handlers subscribed)"
    rows = [f"  {event_type} -> {', '.join(names)}" for event_type, names in table.items()]
    head = f"tidings: queue {queue!r} serves {len(table)} event type(s), {how}:"
    return "\n".join([head, *rows])


def driver_of(connection: Any) -> str:
    """``"amqp"``, ``"redis"`` or another kombu driver type for a kombu connection."""
    return str(getattr(connection.transport, "driver_type", "") or "")


class SubscriptionRegistry:
    """The Redis side: which queues subscribe to which event types, kept in Redis sets.

    Args:
        prefix: the key prefix (the transport's ``exchange``).
        ttl: how long a publisher trusts what it read before reading again, in seconds.

    Publishing reads through :meth:`queues_for` under the transport's send lock; the cache is
    not otherwise shared.
    """

    def __init__(self, prefix: str, ttl: float) -> None:
        self.prefix = prefix
        self.ttl = ttl
        self._cache: dict[str, tuple[float, tuple[str, ...]]] = {}

    def subscribers_key(self, event_type: str) -> str:
        """The set of the queues subscribed to ``event_type``."""
        return f"{self.prefix}:subscribers:{event_type}"

    def subscriptions_key(self, queue: str) -> str:
        """The set of the event types ``queue`` is subscribed to."""
        return f"{self.prefix}:subscriptions:{queue}"

    @property
    def queues_key(self) -> str:
        """The set of the queues subscribed to any event type."""
        return f"{self.prefix}:queues"

    def queues(self, client: Any) -> set[str]:
        """Every queue subscribed to some event type."""
        return {_text(q) for q in client.smembers(self.queues_key)}

    def subscribe(self, client: Any, queue: str, event_types: Iterable[str]) -> None:
        """Subscribe ``queue`` to ``event_types`` (idempotent, one round trip)."""
        types = list(event_types)
        if not types:
            return
        pipe = client.pipeline(transaction=True)
        for event_type in types:
            pipe.sadd(self.subscribers_key(event_type), queue)
        pipe.sadd(self.subscriptions_key(queue), *types)
        pipe.sadd(self.queues_key, queue)
        pipe.execute()
        for event_type in types:
            self._cache.pop(event_type, None)

    def unsubscribe(
        self, client: Any, queue: str, event_types: Iterable[str] | None = None
    ) -> None:
        """Remove ``queue``'s subscriptions to ``event_types``, or all of them (idempotent).

        Removing all of them also finds the types whose record of the queue's own set was lost
        (that key deleted by hand, say): every type's set is looked at then.
        """
        if event_types is None:
            types = self.subscribed(client, queue)
            for key in client.scan_iter(match=f"{self.prefix}:subscribers:*", count=1000):
                if client.sismember(key, queue):
                    types.add(_text(key)[len(f"{self.prefix}:subscribers:") :])
        else:
            types = set(event_types)
        if not types:
            client.srem(self.queues_key, queue)
            return
        pipe = client.pipeline(transaction=True)
        for event_type in types:
            pipe.srem(self.subscribers_key(event_type), queue)
        pipe.srem(self.subscriptions_key(queue), *types)
        pipe.execute()
        if not client.exists(self.subscriptions_key(queue)):
            client.srem(self.queues_key, queue)
        for event_type in types:
            self._cache.pop(event_type, None)

    def subscribed(self, client: Any, queue: str) -> set[str]:
        """The event types ``queue`` is subscribed to."""
        return {_text(t) for t in client.smembers(self.subscriptions_key(queue))}

    def queues_of(self, channel: Any, event_type: str) -> tuple[str, ...]:
        """The queues subscribed to one event type (:meth:`queues_for` of one, shorter).

        Takes the kombu channel, whose client is looked up only when Redis must be read.
        """
        cached = self._cache.get(event_type)
        if cached is not None and time.monotonic() - cached[0] < self.ttl:
            return cached[1]
        return self.queues_for(channel.client, (event_type,))[event_type]

    def queues_for(self, client: Any, event_types: Iterable[str]) -> dict[str, tuple[str, ...]]:
        """The queues subscribed to each of ``event_types``, read again once ``ttl`` passed.

        The types whose cached answer is stale are read in one round trip.
        """
        now = time.monotonic()
        found: dict[str, tuple[str, ...]] = {}
        stale: list[str] = []
        for event_type in event_types:
            cached = self._cache.get(event_type)
            if cached is not None and now - cached[0] < self.ttl:
                found[event_type] = cached[1]
            elif event_type not in stale:
                stale.append(event_type)
        if stale:
            pipe = client.pipeline(transaction=False)
            for event_type in stale:
                pipe.smembers(self.subscribers_key(event_type))
            for event_type, members in zip(stale, pipe.execute(), strict=True):
                queues = tuple(sorted(_text(m) for m in members))
                self._cache[event_type] = (now, queues)
                found[event_type] = queues
        return found


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
