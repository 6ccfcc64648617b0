"""``CeleryTransport``: events as Celery tasks, handled by workers once in effect.

Publishing sends one task message per event (``tidings.deliver``), or for several events at once
a few batch messages (``tidings.deliver_batch``, up to ``batch_size`` events each). Workers run
the bus's handlers through a :class:`~tidings.delivery.Dispatcher`: the inbox guards every
(handler, event) pair, a failing handler is retried alone as a new ``tidings.deliver`` message
(with ``countdown``) naming that handler and attempt, and what cannot be handled is
dead-lettered. Tasks use late acks and are rejected on worker loss, so a killed worker's message
is delivered again.

Task messages carry the envelope as a JSON string argument; Celery's JSON serializer is the
only one the tasks accept.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import warnings
import weakref
from collections import Counter
from collections.abc import Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from tidings import _tracing
from tidings._ids import new_event_id
from tidings._letters import bounded_letter_fields
from tidings._untrusted import log_safe, parse_counter, redact_text
from tidings.codec import Codec, default_codec
from tidings.context import EventContext, bind, reset
from tidings.delivery import Dispatcher, Received
from tidings.errors import PublishError, TidingsError, UsageError
from tidings.events import DomainEvent
from tidings.ports import DeadLetter, DeadLetterStore, Inbox, StoredEnvelope
from tidings.retry import RetryPolicy
from tidings.transports._celery_redis import check_persistence, reuse_redis_clients
from tidings.transports._celery_routing import (
    DEFAULT_EXCHANGE,
    SubscriptionRegistry,
    describe,
    driver_of,
    subscriptions,
)
from tidings.transports._defaults import (
    DEFAULT,
    Default,
    redis_dead_letters,
    redis_inbox,
    redis_py_url,
    refuse_without_redis,
)

if TYPE_CHECKING:
    from celery import Celery, Task

    from tidings.bus import EventBus, Handler

__all__ = ["CeleryTransport", "DeliveryFailed", "DeliveryRetried", "handler_task_name"]

log = logging.getLogger("tidings.celery")

DELIVER = "tidings.deliver"
DELIVER_BATCH = "tidings.deliver_batch"
# What monitors are told of one delivery's retries and dead letters: this many, then a count.
_LISTED = 5
# The longest handler name a task name (Celery's shadow header, logged raw) carries.
_LONGEST_HANDLER = 200
# The largest exponent of an infrastructure retry's backoff (2**6 s, then capped at 60 s).
_MAX_BACKOFF_EXPONENT = 6
# Celery's default for the Redis broker: an unacknowledged message is handed out again after it.
DEFAULT_VISIBILITY_TIMEOUT = 3600.0
# Brokers routing by event type is built for; on others the default sends to the own queue.
_ROUTED_DRIVERS = ("amqp", "redis")

# App -> the transport bound on it (one per app: the task names are the app's).
_bound: weakref.WeakKeyDictionary[Any, list[CeleryTransport]] = weakref.WeakKeyDictionary()
_bound_lock = threading.Lock()


def _celery() -> Any:
    try:
        import celery  # noqa: PLC0415 - optional extra, imported when a transport is made
    except ImportError as exc:  # pragma: no cover - depends on the environment
        msg = "the Celery transport needs Celery: pip install 'tidings[celery]'"
        raise ImportError(msg) from exc
    return celery


class DeliveryFailed(TidingsError):  # noqa: N818 - named for what monitors show
    """A delivery task's end when something of it was dead-lettered (the dead letters are stored).

    Raised by ``tidings.deliver`` and ``tidings.deliver_batch`` after every dead letter of the
    message was stored and every retry of it accepted by the broker, so that Celery records
    the task as FAILURE: ``task-failed`` in its events (Flower, ``celery events``,
    celery-exporter), its ``task_failure`` signal (Sentry's Celery integration) and its log.
    The message is acknowledged all the same (the tasks set ``acks_on_failure_or_timeout``).
    Its text names each handler, event (``<type id>``) and dead letter, bounded; never the
    event's data (each letter keeps the handler's traceback). Chained (``__cause__``) to the
    store's or broker's error when the delivery was dead-lettered for want of them.
    """


class DeliveryRetried(TidingsError):  # noqa: N818 - named for what monitors show
    """Why a delivery task ended as RETRY: the handlers sent again, and why (the ``exception``).

    The ``exc`` of the :class:`celery.exceptions.Retry` a delivery task raises once every
    retry of it was accepted by the broker (and nothing was dead-lettered): Celery records the
    task as RETRY (``task-retried``) and acknowledges its message. Bounded text naming each
    handler, event (``<type id>``), next attempt and error; never the event's data.
    """


def handler_task_name(handler: str) -> str:
    """The task name monitors show for a delivery to one handler: ``tidings.deliver[handler]``.

    Retries and replays naming a handler are sent under it (Celery's ``shadow`` option), so
    Flower and ``celery events`` tell each handler's deliveries apart; the task run is still
    ``tidings.deliver``. A name longer than 200 characters is cut (it is logged raw).
    """
    return f"{DELIVER}[{log_safe(handler, _LONGEST_HANDLER)}]"


def short_repr(event: DomainEvent | None) -> str:
    """What monitors show of a delivery's arguments: ``<type id>``, never the event's data."""
    if event is None:
        return "<undecodable message>"
    return f"<{log_safe(event.event_type, 200)} {log_safe(event.event_id, 100)}>"


class CeleryTransport:
    """Sends events as Celery tasks and runs the bus's handlers in Celery workers.

    Args:
        app: the Celery app; workers start the standard way, ``celery -A module worker``:
            without ``-Q`` a worker of this app consumes ``queue`` as well as the app's own
            queues; with ``-Q`` exactly the queues named (name ``queue`` among them).
        queue: the queue this service's workers consume (and where retries go).
        publish_to: the legacy fan-out: when given, every event is sent to every one of these
            queues, whatever the services there handle. By default (``None``) events are
            routed by type: each goes to the queues of the services subscribed to its type
            (:mod:`tidings.transports._celery_routing`).
        dead_letters: where failures and undecodable messages end (nothing is dropped). Left
            out on a Redis broker (``redis://``, ``rediss://``): a
            :class:`~tidings.deadletter.redis.RedisDeadLetterStore` on the broker's Redis,
            prefix ``tidings:dlq:{queue}``. On any other broker it must be given.
        inbox: the idempotency guard every (handler, event) passes. Left out on a Redis broker:
            a :class:`~tidings.inbox.redis.RedisInbox` on the broker's Redis, prefix
            ``tidings:inbox:{queue}``. On any other broker it must be given. ``inbox=None``
            is the explicit opt-out: handlers run unguarded (at-least-once effects).
        codec: encodes and decodes envelopes (the default codec if omitted).
        retry: the policy of handlers without their own.
        batch_size: the most events one batch message carries.
        max_worker_losses: a message whose worker process dies (killed, out of memory,
            ``os._exit`` in a handler) is delivered again, up to this many deaths counted by one
            worker; then it is dead-lettered instead of crashing workers for ever. A batch
            message whose worker died is split into one message per event first.
        max_infrastructure_retries: a delivery that cannot be finished because the dead-letter
            store or the broker fails is sent again (after 1, 2, 4 … at most 60 s) up to this
            many times, counted by Celery's ``retries`` header; then it is dead-lettered with
            the reason. While the dead letter cannot be stored either, it is sent again every
            60 s. A retry that cannot be sent leaves the message on the broker (rejected with
            requeue, or unacknowledged until the broker hands it out again), never
            acknowledged in silence; such unsent retries count toward this bound too (per
            worker process, by task id).
        exchange: routing by type: the RabbitMQ exchange, or on Redis the prefix of the
            subscription registry's keys (``tidings.events``).
        subscription_ttl: on Redis, how long a publisher uses the subscriptions it read before
            reading them again, in seconds (a new service's first worker is seen within it).

    ``EventBus(transport=CeleryTransport(app, ...))`` registers the two tasks on ``app``,
    installs context propagation for all of the app's tasks and sets the app's
    ``worker_consumer``: a consumer that dead-letters (and acknowledges) what Celery cannot
    decode or run, whatever its content type or shape, and, on a Redis
    broker, records and acknowledges deliveries without waiting for each reply (every task of
    the worker gains; :mod:`tidings.transports._celery_redis`). Nothing happens before that.
    Thread-safe for publishing: concurrent sends each use a publishing connection of their own
    (kept for the next send), so no publisher waits for another's broker round trips.
    """

    name = "celery"

    def __init__(
        self,
        app: Celery,
        *,
        dead_letters: DeadLetterStore | Default = DEFAULT,
        queue: str = "tidings",
        publish_to: Sequence[str] | None = None,
        inbox: Inbox | Default | None = DEFAULT,
        codec: Codec | None = None,
        retry: RetryPolicy | None = None,
        batch_size: int = 500,
        max_worker_losses: int = 3,
        max_infrastructure_retries: int = 10,
        exchange: str = DEFAULT_EXCHANGE,
        subscription_ttl: float = 5.0,
    ) -> None:
        _celery()
        if batch_size < 1:
            msg = "batch_size must be >= 1"
            raise ValueError(msg)
        if max_worker_losses < 1:
            msg = "max_worker_losses must be >= 1"
            raise ValueError(msg)
        if max_infrastructure_retries < 0:
            msg = "max_infrastructure_retries must be >= 0"
            raise ValueError(msg)
        if subscription_ttl < 0:
            msg = "subscription_ttl must be >= 0"
            raise ValueError(msg)
        if not exchange:
            msg = "exchange must be a non-empty name"
            raise ValueError(msg)
        self.app = app
        self.queue = queue
        self.publish_to = tuple(publish_to) if publish_to else (queue,)
        self.routes_by_type = not publish_to
        """Whether events are routed by type (the default) rather than to ``publish_to``."""
        self.exchange = exchange
        self.unrouted: Counter[str] = Counter()
        """Events published that no service subscribes to, by event type (normal pub/sub)."""
        self._registry = SubscriptionRegistry(exchange, subscription_ttl)
        self._driver = ""
        self._bus: EventBus | None = None
        self._serving: dict[str, tuple[str, ...]] | None = None
        self._declared: set[str] = set()
        self._table_logged = False
        self._routing: bool | None = None
        self.dead_letters, self.inbox, self._owned_client = _stores_for(
            app, queue, dead_letters, inbox
        )
        self.codec = default_codec if codec is None else codec
        self.retry = RetryPolicy() if retry is None else retry
        self.batch_size = batch_size
        self.max_worker_losses = max_worker_losses
        self.max_infrastructure_retries = max_infrastructure_retries
        self._unsent_retries = _Counts()  # retries that could not be sent, per task id
        self._dispatcher: Dispatcher | None = None
        self._deliver: Task | None = None
        self._deliver_batch: Task | None = None
        # The transport's own broker connection for publishing (kombu pools are shared by
        # every app of a process, so closing one would break the others); one lock, because a
        # producer is not thread-safe.
        # Publishing connections, one per send under way: concurrent publishers never wait
        # for each other's broker round trips. Idle ones wait here for the next send.
        self._pool_lock = threading.Lock()
        self._idle: list[_Publisher] = []
        self._generation = 0

    # -- wiring -----------------------------------------------------------------------------

    def bind(self, bus: EventBus) -> None:
        """Register the delivery tasks on the app and check the bus's handlers."""
        if self._dispatcher is not None:
            msg = "a CeleryTransport serves one EventBus; make one transport per bus"
            raise UsageError(msg)
        self._check_accept_content()
        self._check_delay(self.retry, "the transport's default retry policy")
        self._claim_app()
        self._bus = bus
        self._dispatcher = Dispatcher.serving(bus, self)
        # Worker-side customisations of Celery, which need Celery itself.
        from tidings.transports import _celery_consumer  # noqa: PLC0415

        options: dict[str, Any] = {
            "bind": True,
            "acks_late": True,
            "reject_on_worker_lost": True,
            "serializer": "json",
            "ignore_result": True,
            # A delivery that dead-lettered something ends FAILURE (DeliveryFailed), after the
            # letters were stored: its message is acknowledged, whatever the app's setting.
            "acks_on_failure_or_timeout": True,
            "acks_on_failure": True,
            # Celery's own bound off: _infrastructure_failed bounds the retries it asks for.
            "max_retries": None,
            # The app's own tasks: not offered to every other app of the process, whose own
            # transport registers its own (Celery would warn of duplicate task names).
            "shared": False,
            # Celery requeues a message whose worker process died (reject_on_worker_lost),
            # without counting: this request class counts and dead-letters a poison pill.
            "Request": _celery_consumer.delivery_request(_celery_consumer.WorkerLosses(self)),
        }
        # Plain functions, so that Celery binds the task instance as their first argument.
        transport = self

        def deliver(task: Task, *args: Any, **kwargs: Any) -> None:
            transport._run_one(task, *args, **kwargs)

        def deliver_batch(task: Task, *args: Any, **kwargs: Any) -> None:
            transport._run_batch(task, *args, **kwargs)

        self._deliver = self.app.task(name=DELIVER, **options)(deliver)
        self._deliver_batch = self.app.task(name=DELIVER_BATCH, **options)(deliver_batch)
        from tidings.transports._celery_worker import install  # noqa: PLC0415 - needs Celery

        install(self.app)
        from tidings.transports.celery import install_context_propagation  # noqa: PLC0415

        install_context_propagation(self.app)
        from tidings.transports._celery_queues import consume_by_default  # noqa: PLC0415

        consume_by_default(self.app, self.queue)
        # Messages Celery cannot decode or route would only be logged and dropped: make the
        # worker's consumer dead-letter them first.
        _celery_consumer.dead_letter_stores[id(self.app)] = self.dead_letters
        _celery_consumer.transports[id(self.app)] = self
        ours = "tidings.transports._celery_consumer:DeadLetteringConsumer"
        current = self.app.conf.worker_consumer
        if current in (None, "celery.worker.consumer:Consumer", ours):
            self.app.conf.worker_consumer = ours
        else:
            warnings.warn(
                f"this Celery app uses its own worker_consumer {current!r}: messages Celery "
                "cannot decode are dropped by it, not dead-lettered; subclass "
                f"{ours.replace(':', '.')} instead to keep them",
                UserWarning,
                stacklevel=3,
            )
        for handler in bus.handlers:
            self.subscribed(handler)

    def _claim_app(self) -> None:
        """Register this transport as its app's one transport.

        Raises:
            UsageError: the app has a transport already. Task names are the app's: a second
                transport's tasks would replace the first's (Celery's duplicate task name), and
                a message for either service would run one bus's handlers. Routed by type, a
                message's task is named by the receiving service, which a publisher cannot
                tell apart on a shared app.
        """
        with _bound_lock:
            bound = _bound.setdefault(self.app, [])
            if bound:
                msg = (
                    f"this Celery app already has a CeleryTransport (queue {bound[0].queue!r}): "
                    "a second one would take the same task names, and one bus would run the "
                    "other's events. Make one Celery app per service, "
                    f"Celery({self.queue!r}, broker=...), each with its own transport and "
                    "queue, or subscribe every handler on the first transport's bus"
                )
                raise UsageError(msg)
            bound.append(self)

    def subscribed(self, handler: Handler) -> None:
        """Refuse a handler whose retry delay could outlast the broker's visibility timeout."""
        if handler.retry is not None:
            self._check_delay(handler.retry, f"handler {handler.name!r}")
        self._serving = None  # the subscriptions change with the handlers

    def _visibility_timeout(self) -> float | None:
        """The broker's visibility timeout, or ``None`` for brokers without one (AMQP)."""
        # On Redis (and SQS) a message with a countdown waits unacknowledged in a worker; if it
        # waits longer than the visibility timeout the broker hands it to another worker too.
        broker = str(self.app.conf.broker_url or "")
        if not broker.startswith(("redis", "rediss", "sqs")):
            return None
        options = self.app.conf.broker_transport_options or {}
        return float(options.get("visibility_timeout", DEFAULT_VISIBILITY_TIMEOUT))

    def _check_delay(self, policy: RetryPolicy, whose: str) -> None:
        timeout = self._visibility_timeout()
        if timeout is not None and policy.longest_delay >= timeout:
            msg = (
                f"{whose} may wait {policy.longest_delay:.0f} s before a retry, but the broker's "
                f"visibility_timeout is {timeout:.0f} s, so a waiting retry would run twice: "
                "lower max_delay, or raise broker_transport_options['visibility_timeout']"
            )
            raise UsageError(msg)

    def _check_accept_content(self) -> None:
        accepted = {str(c).lower() for c in (self.app.conf.accept_content or ())}
        if accepted & {"pickle", "application/x-python-serialize"}:
            warnings.warn(
                "this Celery app accepts pickle: any message on its queues can run code in "
                "the worker. tidings' tasks use JSON only; set accept_content=['json']",
                UserWarning,
                stacklevel=3,
            )

    # -- publishing -------------------------------------------------------------------------

    def send(self, events: Sequence[DomainEvent]) -> None:
        """Encode every event first (nothing is sent if one fails), then send each where it goes.

        Routed by type (the default), each event goes to the queues subscribed to its type,
        once each; an event no service subscribes to is counted in :attr:`unrouted` and logged
        at DEBUG (normal pub/sub: nothing to deliver). With ``publish_to``, every event goes to
        every queue listed. Several events go as batch messages of up to ``batch_size``.

        Raises:
            UsageError: not bound to a bus; or (routing by type) a handler of the bus
                subscribes to a class the codec does not know.
            PublishError: the broker did not accept every message (send again).
        """
        if self._deliver is None or self._deliver_batch is None:
            msg = "create the EventBus with this transport before publishing"
            raise UsageError(msg)
        bodies = [self.codec.encode(event).decode() for event in events]
        if self.routes_by_type and self._serving is None:
            self._own_subscriptions()  # a UsageError here is the developer's, not the broker's
        self._send_all(events, bodies)

    def _send_all(self, items: Sequence[DomainEvent | StoredEnvelope], bodies: list[str]) -> None:
        """Send each of ``items`` (events or stored envelopes), whose bodies are ``bodies``."""
        publisher: _Publisher | None = None
        try:
            publisher = self._take_publisher()
            producer = publisher.producer
            reuse_redis_clients(producer.channel)
            serving = self._serving
            if serving is not None and self._declared != serving.keys() and self._routes_here():
                self._subscribe(producer.channel, list(serving))  # a handler was added
            types = [item.event_type for item in items]
            for queue, routing_key, indices in self._plan(types, producer):
                self._send_group(items, bodies, indices, queue, routing_key, publisher)
        except Exception as exc:
            if publisher is not None:
                publisher.release()  # a connection that failed is not used again
            msg = (
                f"the broker did not accept all of {len(bodies)} event(s) ({exc!r}); send "
                "them again: handlers' inboxes make the ones already sent harmless"
            )
            raise PublishError(msg) from exc
        self._give_back(publisher)

    def _take_publisher(self) -> _Publisher:
        """An idle publishing connection, or a new one (opened outside any lock)."""
        with self._pool_lock:
            if self._idle:
                return self._idle.pop()
            generation = self._generation
        return self._open_producer(generation)

    def _give_back(self, publisher: _Publisher) -> None:
        """Keep ``publisher`` for the next send, unless the transport was closed meanwhile."""
        with self._pool_lock:
            if publisher.generation == self._generation:
                self._idle.append(publisher)
                return
        publisher.release()

    def send_envelopes(self, envelopes: Sequence[StoredEnvelope]) -> None:
        """Send stored envelopes unchanged, where ``send`` would send their events.

        Routed by type (or to ``publish_to``) by the envelope's ``type``; an envelope alone on
        its queue goes as one task message whose headers carry its own context ids, several as
        batch messages of up to ``batch_size``: the messages ``send`` sends, so workers cannot
        tell a relayed envelope from a published event. Needs no event class
        (:class:`~tidings.ports.EnvelopeSender`).

        Raises:
            UsageError: the transport is not bound to a bus yet (also for an empty batch).
            PublishError: the broker did not accept them all (send again).
        """
        if self._deliver is None or self._deliver_batch is None:
            msg = "create the EventBus with this transport before relaying through it"
            raise UsageError(msg)
        if envelopes:
            self._send_all(envelopes, [envelope.body.decode() for envelope in envelopes])

    def _plan(
        self, types: Sequence[str], producer: Any
    ) -> list[tuple[str | None, str | None, list[int]]]:
        """Where each event goes, by type: (queue, routing key, indices of its events), in order.

        A queue for a direct send (the legacy fan-out, an eager app, a broker without routing,
        a queue the Redis registry names), or a routing key (its event type) for the exchange.
        """
        everything = list(range(len(types)))
        if not self._routes_here():
            queues = self.publish_to if not self.routes_by_type else (self.queue,)
            return [(queue, None, everything) for queue in queues]
        if len(types) == 1:  # the common case, kept short
            event_type = types[0]
            if self._driver == "amqp":
                return [(None, event_type, everything)]
            queues = self._registry.queues_of(producer.channel, event_type)
            if not queues:
                self._no_subscriber(event_type, 1)
            return [(queue, None, everything) for queue in queues]
        by_type: dict[str, list[int]] = {}
        if len(set(types)) == 1:  # one type: every event, in order
            by_type[types[0]] = everything
        else:
            for index, event_type in enumerate(types):
                by_type.setdefault(event_type, []).append(index)
        if self._driver == "amqp":
            return [(None, event_type, indices) for event_type, indices in by_type.items()]
        subscribed = self._registry.queues_for(producer.channel.client, by_type)
        by_queue: dict[str, list[int]] = {}
        for event_type, indices in by_type.items():
            queues = subscribed.get(event_type, ())
            if not queues:
                self._no_subscriber(event_type, len(indices))
            for queue in queues:
                by_queue.setdefault(queue, []).extend(indices)
        # Each queue's events in publishing order, whatever their types.
        one = len(by_type) == 1
        return [(q, None, ids if one else sorted(ids)) for q, ids in by_queue.items()]

    def _routes_here(self) -> bool:
        """Whether this publisher routes by type: not eager, on a broker that routes.

        Decided when the publisher connects (reading Celery's configuration costs more than
        routing an event): an app made eager later reconnects first (:meth:`close`).
        """
        routing = self._routing
        if routing is None:
            routing = self._routing = (
                self.routes_by_type
                and not self.app.conf.task_always_eager
                and self._driver in _ROUTED_DRIVERS
            )
        return routing

    def _send_group(  # noqa: PLR0917 - one group's parts
        self,
        items: Sequence[DomainEvent | StoredEnvelope],
        bodies: list[str],
        indices: list[int],
        queue: str | None,
        routing_key: str | None,
        publisher: _Publisher,
    ) -> None:
        """Send the events at ``indices`` to one queue or routing key: alone, or in batches."""
        assert self._deliver_batch is not None  # noqa: S101 - checked by send
        producer = publisher.producer
        if len(indices) == 1:
            index = indices[0]
            self._send_one(items[index], bodies[index], queue, producer, routing_key)
            self._check_returned(publisher, routing_key, 1)
            return
        every = len(indices) == len(bodies)  # then the indices are 0 … n-1, in order
        for start in range(0, len(indices), self.batch_size):
            end = start + self.batch_size
            chunk = bodies[start:end] if every else [bodies[i] for i in indices[start:end]]
            self._send_task(
                self._deliver_batch, (chunk,), f"<{len(chunk)} events>", queue, producer,
                routing_key,
            )  # fmt: skip
            self._check_returned(publisher, routing_key, len(chunk))

    def _check_returned(self, publisher: _Publisher, routing_key: str | None, count: int) -> None:
        """Count a message the exchange returned (it came back before the broker's confirm)."""
        if publisher.returned:
            publisher.returned.clear()
            self._no_subscriber(routing_key or "", count)

    def _no_subscriber(self, event_type: str, count: int) -> None:
        self.unrouted[event_type] += count
        if _tracing.hooks is not None:
            _tracing.hooks.unrouted(event_type, count, system=self.name)
        log.debug(
            "no service subscribes to %s: %d event(s) not sent (counted in unrouted)",
            log_safe(event_type, 200),
            count,
        )

    def _send_one(
        self,
        event: DomainEvent | StoredEnvelope,
        body: str,
        queue: str | None,
        producer: Any,
        routing_key: str | None = None,
    ) -> None:
        """Send one event's message, its headers carrying the event's own context ids.

        So that Celery's log lines about the message, in a worker, carry them even when it was
        sent with no context bound (by the outbox relay, say).
        """
        assert self._deliver is not None  # noqa: S101 - checked by send
        token = bind(EventContext(event.correlation_id, event.causation_id, event.tenant_id))
        try:
            self._send_task(
                self._deliver, (body,), f"<{event.event_type} {event.event_id}>", queue,
                producer, routing_key,
            )  # fmt: skip
        finally:
            reset(token)

    def _send_task(  # noqa: PLR0917 - one message's parts
        self,
        task: Task,
        args: tuple[Any, ...],
        argsrepr: str,
        queue: str | None,
        producer: Any,
        routing_key: str | None = None,
    ) -> None:
        """Send one task message on the transport's producer: what ``apply_async`` would send.

        ``apply_async`` also merges options, routes and makes a result object that tidings'
        tasks never use, a quarter of the CPU of a single-event publish. This builds the same
        protocol 2 message (with the parent and root ids of the task it is sent from) and hands
        it to Celery's own sender, which sends the publish signals and applies the app's
        publish retry policy. An eager app (``task_always_eager``), or one on task protocol 1,
        takes ``apply_async``. ``argsrepr`` is what Celery's logs and monitors show of the
        arguments (the envelope is in them). With a ``routing_key`` (an event type) the message
        goes to the transport's exchange instead of a queue, ``mandatory`` (see ``_on_return``).
        """
        route: dict[str, Any] = (
            {"queue": queue}
            if routing_key is None
            else {
                "exchange": self.exchange,
                "routing_key": routing_key,
                "exchange_type": "direct",
                "mandatory": True,
            }
        )
        app = self.app
        conf = app.conf
        if conf.task_always_eager or conf.task_protocol != 2:
            task.apply_async(args=args, argsrepr=argsrepr, producer=producer, declare=[], **route)
            return
        parent = app.current_worker_task
        request = None if parent is None else parent.request
        message = app.amqp.create_task_message(
            new_event_id(),  # a uuid4 string, as Celery makes its task ids
            task.name,
            args,
            {},
            argsrepr=argsrepr,
            ignore_result=True,
            root_id=None if request is None else (request.root_id or request.id),
            parent_id=None if request is None else request.id,
            create_sent_event=conf.task_send_sent_event,
        )
        app.amqp.send_task_message(
            producer, task.name, message, declare=[], serializer="json", **route
        )

    def _open_producer(self, generation: int) -> _Publisher:
        """Connect for publishing and declare where messages go; a new pooled publisher.

        Publisher confirms on AMQP: a publish waits for the broker's ack and raises on a nack,
        so ``send`` returns only once the broker accepted every message. The queues are
        declared once here rather than with every message (Celery's default, a third of the
        cost of a publish), so that a message sent before any worker started is kept. Routed
        by type, that is the exchange (RabbitMQ) and this bus's own subscriptions.

        A broker that accepts connections and never answers must fail a publish rather than
        hold it for ever: the connection times out after Celery's ``broker_connection_timeout``
        (4 s by default) to connect and, unless the app's ``broker_transport_options`` set
        them, 5 s for each reply (Redis ``socket_timeout``/``socket_connect_timeout``, AMQP
        ``read_timeout``/``write_timeout``). Set those options to change them.
        """
        send_timeout = 5.0
        configured = self.app.conf.broker_transport_options or {}
        url = str(self.app.conf.broker_write_url or self.app.conf.broker_url or "")
        names = (
            ("socket_timeout", "socket_connect_timeout")
            if url.startswith(("redis:", "rediss:", "redis+socket:"))
            else ("read_timeout", "write_timeout")
        )
        options: dict[str, Any] = {"confirm_publish": True}
        options.update({name: send_timeout for name in names if configured.get(name) is None})
        connection = self.app.connection_for_write(transport_options=options)
        try:
            driver = driver_of(connection)
            publisher = _Publisher(connection, generation)
            on_return = publisher.on_return if driver == "amqp" else None
            producer = publisher.producer = self.app.amqp.Producer(connection, on_return=on_return)
            self._driver = driver
            self._declared = set()
            self._routing = None
            if self.routes_by_type and driver not in _ROUTED_DRIVERS:
                warnings.warn(
                    f"routing by event type needs RabbitMQ or Redis, not a {driver!r} broker: "
                    f"events go to this transport's queue {self.queue!r} only; pass "
                    "publish_to=[...] to send them to other services' queues",
                    UserWarning,
                    stacklevel=2,
                )
            if self._routes_here():
                if driver == "amqp":
                    self._declare_exchange(producer.channel)
                self._subscribe(producer.channel, list(self._own_subscriptions()))
            else:
                for queue in self.publish_to if not self.routes_by_type else (self.queue,):
                    producer.maybe_declare(self.app.amqp.queues[queue])
            check_persistence(producer.channel, "the Celery broker, publishing")
        except BaseException:
            connection.release()
            raise
        return publisher

    # -- subscriptions ----------------------------------------------------------------------

    def _own_subscriptions(self) -> dict[str, tuple[str, ...]]:
        """This bus's event types and their handlers (computed again after a subscribe)."""
        serving = self._serving
        if serving is None:
            if self._bus is None:  # pragma: no cover - bound before anything calls it
                msg = "the transport is not bound to a bus"
                raise UsageError(msg)
            serving = self._serving = subscriptions(self._bus, self.codec.registry)
        return serving

    def _declare_exchange(self, channel: Any) -> None:
        from kombu import Exchange  # type: ignore[attr-defined]  # noqa: PLC0415 - optional

        Exchange(self.exchange, type="direct", durable=True)(channel).declare()  # type: ignore[no-untyped-call]

    def _subscribe(self, channel: Any, event_types: list[str]) -> None:
        """Subscribe this transport's queue to ``event_types`` on the broker (idempotent)."""
        if self._driver == "amqp":
            self._declare_exchange(channel)
            bound = self.app.amqp.queues[self.queue](channel)
            bound.declare()  # as Celery declares it: its own exchange, arguments and binding
            for event_type in event_types:
                bound.bind_to(exchange=self.exchange, routing_key=event_type)
        elif self._driver == "redis":
            self._registry.subscribe(channel.client, self.queue, event_types)
        self._declared = set(event_types)

    def unsubscribe(self, *event_types: str) -> None:
        """Stop routing ``event_types`` to this transport's queue (when the service drops them).

        Subscriptions are durable: a worker that no longer has a handler for a type its queue
        was subscribed to dead-letters those events, naming this method as one fix. Events
        of these types already in the queue stay there. With no types given, on Redis every
        subscription of the queue is removed (a service retired); RabbitMQ drops a queue's
        bindings with the queue.
        """
        with self.app.connection_for_write() as connection:
            channel = connection.channel()
            try:
                driver = driver_of(connection)
                if driver == "amqp":
                    for event_type in event_types:
                        channel.queue_unbind(
                            queue=self.queue, exchange=self.exchange, routing_key=event_type
                        )
                elif driver == "redis":
                    self._registry.unsubscribe(channel.client, self.queue, event_types or None)
            finally:
                channel.close()

    def worker_started(self, connection: Any) -> None:
        """Subscribe this service's queue to its event types and log the handler table.

        Called by the worker's consumer at start-up and after each reconnection, with its
        broker connection (a connection error makes the consumer reconnect and call again).

        Raises:
            UsageError: a handler subscribes to a class the codec does not know (the worker
                exits: a start-up error).
        """
        table = self._own_subscriptions()
        driver = driver_of(connection)
        if not self.routes_by_type:
            how = f"each receiving every event sent to publish_to {list(self.publish_to)}"
        elif driver in _ROUTED_DRIVERS:
            how = (
                f"routed by type through exchange {self.exchange!r}"
                if driver == "amqp"
                else f"routed by type through the Redis registry {self.exchange!r}"
            )
            channel = connection.channel()
            try:
                self._driver = self._driver or driver
                self._subscribe(channel, list(table))
            finally:
                channel.close()
        else:
            how = f"not routed by type (a {driver!r} broker): only what is sent to this queue"
        if not self._table_logged:
            self._table_logged = True
            log.info("%s", describe(self.queue, table, how))

    def replay(self, letter: DeadLetter) -> None:
        """Send a dead letter back to this transport's queue, to its handler when it names one.

        Always this service's own queue, never a destination read from the letter.
        """
        if self._deliver is None:
            msg = "create the EventBus with this transport before replaying"
            raise UsageError(msg)
        body = letter.body.decode("utf-8", "replace")
        self._deliver.apply_async(
            args=(body, letter.handler, 1),
            queue=self.queue,
            shadow=None if letter.handler is None else handler_task_name(letter.handler),
            argsrepr=self._shown([body]),
            kwargsrepr="{}",
        )

    async def aopen(self) -> None:
        """Open the publishing connection now, in a thread (an ASGI app's start-up).

        What the first send would do (connect, declare, subscribe this bus's handlers), done
        before the first request instead. A broker that is away is logged, not raised: the app
        starts, and each publish connects again.
        """

        def connect() -> None:
            self._give_back(self._take_publisher())

        try:
            await asyncio.to_thread(connect)
        except Exception as exc:  # noqa: BLE001 - a broker down at start-up is not fatal
            broker = str(self.app.conf.broker_url or "")
            log.warning(
                "could not connect to the Celery broker at start-up (%s); each publish "
                "connects again",
                log_safe(redact_text(f"{type(exc).__name__}: {exc}", broker)),
            )

    def close(self) -> None:
        """Close the transport's publishing connection (a later send opens a new one).

        Also disconnects the Redis client of the default inbox and dead-letter store, if this
        transport made them (a later use connects again).
        """
        with self._pool_lock:
            self._generation += 1  # sends under way release theirs when they finish
            idle, self._idle = self._idle, []
        for publisher in idle:
            publisher.release()
        if self._owned_client is not None:
            self._owned_client.connection_pool.disconnect()

    # -- working ----------------------------------------------------------------------------

    # The task functions take anything, so that a malformed task message reaches the
    # dispatcher (and the dead-letter store) instead of failing inside Celery and vanishing.
    def _run_one(self, task: Task, *args: Any, **kwargs: Any) -> None:
        body, handler, attempt = one_arguments(args, kwargs)
        if attempt is None:
            retries = task.request.retries
            try:
                letters = self._refuse(
                    task, [body], handler, "the message's attempt argument is not a counter"
                )
            except Exception as exc:
                if not isinstance(retries, int) or parse_counter(retries) is None:
                    raise  # pragma: no cover - tidings' consumer refuses such a header first
                self._infrastructure_failed(task, [body], handler, retries, exc)
                return
            _report(task, [], letters)
            return
        self._run(task, [body], handler, attempt)

    def _run_batch(self, task: Task, *args: Any, **kwargs: Any) -> None:
        bodies = args[0] if len(args) == 1 and not kwargs and isinstance(args[0], list) else [args]
        self._run(task, bodies, None, 1)

    def _run(self, task: Task, bodies: list[Any], handler: str | None, attempt: int) -> None:
        dispatcher, deliver = self._dispatcher, self._deliver
        if dispatcher is None or deliver is None:  # pragma: no cover - tasks exist once bound
            msg = "the transport is not bound to a bus"
            raise UsageError(msg)
        request = task.request
        # Celery adds one to it for a retry: only an int will do (parse_counter takes "3" too).
        raw_retries = 0 if request.retries is None else request.retries
        retries = parse_counter(raw_retries) if isinstance(raw_retries, int) else None
        if retries is None:
            letters = self._refuse(
                task, bodies, handler, "the message's retries header is not a counter"
            )
            _report(task, [], letters)
            return
        # Retries go to this service's own queue, never to a destination read from the message
        # (on RabbitMQ its routing key is the event type).
        queue = self.queue
        _, headers, _ = bounded_letter_fields(b"", request.headers or {}, 0)
        messages = [
            Received(
                body.encode() if isinstance(body, str) else repr(body).encode(),
                headers=headers,
                destination=queue,
                handler=handler,
                attempt=attempt,
            )
            for body in bodies
        ]
        retried: list[str] = []
        dead: list[str] = []
        try:
            for message, outcome in zip(messages, dispatcher.dispatch_many(messages), strict=True):
                shown = short_repr(outcome.event)
                if outcome.event is not None and not (
                    outcome.handled or outcome.duplicates or outcome.retries or outcome.dead
                ):
                    letter = self._no_handler(dispatcher, message, outcome.event)
                    dead.append(_dead_line(letter, shown))
                for again in outcome.retries:
                    deliver.apply_async(
                        args=(again.body.decode(), again.handler, again.attempt),
                        countdown=self._countdown(again.delay),
                        queue=queue,
                        # What monitors show: the handler in the name, never the envelope.
                        shadow=handler_task_name(again.handler),
                        argsrepr=shown,
                        kwargsrepr="{}",
                    )
                    retried.append(
                        f"{log_safe(again.handler)} on {shown} (attempt {again.attempt} next): "
                        f"{again.error or 'retried'}"
                    )
                dead.extend(_dead_line(letter, shown) for letter in outcome.dead)
        except Exception as exc:  # noqa: BLE001 - retried, bounded, below
            # The dead-letter store or the broker failed: send this message again later rather
            # than acknowledge it, a bounded number of times. Effects already done are guarded
            # by the inbox.
            self._infrastructure_failed(task, bodies, handler, retries, exc)
            return
        # Everything is settled (letters stored, retries accepted): now tell Celery's monitors.
        _report(task, retried, dead)

    def _infrastructure_failed(
        self,
        task: Task,
        bodies: list[Any],
        handler: str | None,
        retries: int,
        exc: Exception,
    ) -> None:
        """Retry a delivery that failed for want of the store or broker; bounded, never acked."""
        from celery.exceptions import Reject  # noqa: PLC0415 - Celery is optional

        exponent = min(retries, _MAX_BACKOFF_EXPONENT)
        if retries >= self.max_infrastructure_retries:
            exponent = _MAX_BACKOFF_EXPONENT  # if the store is down too: the longest backoff
            reason = (
                f"could not finish the delivery after {retries} retries: "
                f"{type(exc).__name__}: {exc}"
            )
            try:
                letters = self._refuse(task, bodies, handler, reason)
            except Exception:
                # The store is down too: keep the message on the broker, sent again at the
                # longest backoff, until the dead letter can be stored.
                log.exception("could not dead-letter a delivery either; keeping it for later")
            else:
                _report(task, [], letters, exc)
                return
        log.error(
            "could not finish a delivery (%s); it will be tried again (retry %d, bound %d)",
            log_safe(repr(exc)),
            retries + 1,
            self.max_infrastructure_retries,
        )
        # Bounded before it is computed: whatever the retries header said, 2**6 at most.
        countdown = self._countdown(min(60, 2**exponent))
        try:
            # Celery's retry sends the same arguments again: shown as the first delivery was.
            raise task.retry(
                exc=exc,
                countdown=countdown,
                argsrepr=self._shown(bodies),
                kwargsrepr="{}",
                shadow=None if handler is None else handler_task_name(handler),
            ) from exc
        except Reject as failed:
            # Celery acknowledges a message whose retry it could not send (Reject without
            # requeue): the event would be gone, neither run, retried nor dead-lettered.
            self._retry_not_sent(task, bodies, handler, retries=retries, exc=exc, failed=failed)

    def _retry_not_sent(
        self,
        task: Task,
        bodies: list[Any],
        handler: str | None,
        *,
        retries: int,
        exc: Exception,
        failed: Exception,
    ) -> None:
        """Leave a delivery whose retry could not be sent on the broker, bounded.

        The message is rejected with requeue (kombu puts it back in its queue), or, if the
        broker cannot take even that, left unacknowledged: the broker hands it out again
        (Redis after its visibility timeout). Its ``retries`` header does not grow that way, so
        this process counts the unsent retries per task id: once they and the retries sent
        reach ``max_infrastructure_retries``, the delivery is dead-lettered (and acknowledged)
        instead, if the store takes it; if not, it is left on the broker again.
        """
        from celery.exceptions import Reject  # noqa: PLC0415 - Celery is optional

        task_id = task.request.id
        key = task_id if isinstance(task_id, str) else repr(bodies)[:256]
        unsent = self._unsent_retries.add(key)
        if retries + unsent >= self.max_infrastructure_retries:
            reason = (
                f"could not send a retry of the delivery {unsent} times ({retries} sent "
                f"before): {type(exc).__name__}: {exc}"
            )
            try:
                letters = self._refuse(task, bodies, handler, reason)
            except Exception:
                log.exception("could not dead-letter a delivery either; leaving it on the broker")
            else:
                self._unsent_retries.forget(key)
                _report(task, [], letters, exc)
                return
        log.error(
            "could not send the retry of a delivery (%s); leaving it on the broker for "
            "redelivery (unsent retry %d, bound %d)",
            log_safe(repr(getattr(failed, "reason", failed))),
            unsent,
            self.max_infrastructure_retries,
        )
        raise Reject(getattr(failed, "reason", failed), requeue=True) from exc

    def _refuse(self, task: Task, bodies: list[Any], handler: str | None, reason: str) -> list[str]:
        """Dead-letter each of a message's bodies with ``reason`` (raises if the store fails).

        Returns what monitors are told of each letter (see :func:`_report`).
        """
        request = task.request
        queue = self.queue
        shown: list[str] = []
        for body in bodies:
            raw = body.encode() if isinstance(body, str) else repr(body).encode()
            raw, headers, note = bounded_letter_fields(
                raw, request.headers or {}, self.codec.limits.max_bytes
            )
            letter = DeadLetter(
                body=raw,
                reason=reason + note,
                handler=handler,
                headers=headers,
                transport=self.name,
                destination=queue,
            )
            self.dead_letters.add(letter)
            log.error("dead-lettered a delivery as %s: %s", letter.id, log_safe(letter.reason))
            shown.append(_dead_line(letter, self._shown([body])))
        return shown

    def _shown(self, bodies: list[Any]) -> str:
        """What monitors show of a message's arguments: ``<type id>``, or ``<N events>``."""
        if len(bodies) != 1:
            return f"<{len(bodies)} events>"
        body = bodies[0]
        try:
            raw = body.encode() if isinstance(body, str) else b""
            return short_repr(self.codec.read(raw).event)
        except Exception:  # noqa: BLE001 - what cannot be decoded is shown as such
            return short_repr(None)

    def _no_handler(
        self, dispatcher: Dispatcher, message: Received, event: DomainEvent
    ) -> DeadLetter:
        """Dead-letter an event that reached this worker with no handler for its type here."""
        fix = (
            ", or, if this service no longer handles them, "
            f"transport.unsubscribe({event.event_type!r})"
            if self.routes_by_type
            else ""
        )
        refused = LookupError(
            f"no handler for event type {event.event_type!r} in this worker (queue "
            f"{self.queue!r}): the module that subscribes them is not imported; use "
            "bus.autodiscover(...) in the composition root the worker imports" + fix
        )
        letter = dispatcher._dead_letter(  # the dispatcher's own letter format
            message, refused, attempts=0, handler=None, event=event
        )
        log.error("dead-lettered a delivery as %s: %s", letter.id, log_safe(letter.reason))
        return letter

    def _countdown(self, delay: float) -> float:
        """A retry's countdown: its delay, below the broker's visibility timeout.

        A busy inbox asks for a look after the other claim's lease, which nothing bounds by
        the visibility timeout: look sooner rather than have the broker copy the message.
        """
        timeout = self._visibility_timeout()
        return delay if timeout is None else min(delay, timeout * 0.9)


def _dead_line(letter: DeadLetter, shown: str) -> str:
    """One dead letter as monitors are told of it: handler, event, reason, letter id (bounded)."""
    who = "no handler" if letter.handler is None else log_safe(letter.handler)
    return f"{who} on {shown}: {log_safe(letter.reason, 300)} (dead letter {letter.id})"


def _listing(entries: list[str]) -> str:
    """``entries`` joined, the first few only, then how many more (bounded for monitors)."""
    text = "; ".join(entries[:_LISTED])
    more = len(entries) - _LISTED
    return f"{text}; and {more} more" if more > 0 else text


def _report(
    task: Task, retried: list[str], dead: list[str], cause: BaseException | None = None
) -> None:
    """End a settled delivery task as Celery's monitors should see it: FAILURE, RETRY or success.

    Called only once every dead letter of the message is stored and every retry accepted by
    the broker. Something dead-lettered: raises :class:`DeliveryFailed` (``task-failed``);
    else something retried: raises Celery's ``Retry`` with a :class:`DeliveryRetried`
    (``task-retried``); else returns (``task-succeeded``). Either way Celery acknowledges the
    message (late acks on failure and on retry). An eager app (``task_always_eager``) runs
    deliveries inside ``publish``: nothing is raised there.
    """
    if not (retried or dead) or task.request.is_eager:
        return
    from celery.exceptions import Retry  # noqa: PLC0415 - Celery is optional

    if dead:
        text = f"dead-lettered: {_listing(dead)}"
        if retried:
            text += f"; retried: {_listing(retried)}"
        raise DeliveryFailed(text) from cause
    raise Retry(f"retried: {_listing(retried)}", DeliveryRetried(_listing(retried)))


def _stores_for(
    app: Celery,
    queue: str,
    dead_letters: DeadLetterStore | Default,
    inbox: Inbox | Default | None,
) -> tuple[DeadLetterStore, Inbox | None, Any]:
    """The dead-letter store, the inbox, and the Redis client made for them (or ``None``).

    Those given are kept; one left out is made on the broker's Redis, with one client for both.

    Raises:
        UsageError: one is left out and the broker is not Redis; the message says what to pass.
    """
    if not isinstance(dead_letters, Default) and not isinstance(inbox, Default):
        return dead_letters, inbox, None
    # kombu takes several URLs, `;`-separated, for fail-over: the first is the broker.
    broker = str(app.conf.broker_url or "").split(";", 1)[0].strip()
    if not broker.lower().startswith(("redis://", "rediss://")):
        missing = [
            name
            for name, value in (("inbox", inbox), ("dead_letters", dead_letters))
            if isinstance(value, Default)
        ]
        raise refuse_without_redis(broker or "amqp:// (Celery's default)", missing)
    try:
        import redis  # noqa: PLC0415 - the celery extra brings it (kombu's Redis transport)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        msg = "CeleryTransport's default inbox needs redis-py: pip install 'tidings[celery]'"
        raise ImportError(msg, name=exc.name) from exc
    # One client for both, made here but connected on first use (nothing is contacted now).
    client = redis.Redis.from_url(redis_py_url(broker))
    return (
        redis_dead_letters(client, queue) if isinstance(dead_letters, Default) else dead_letters,
        redis_inbox(client, queue) if isinstance(inbox, Default) else inbox,
        client,
    )


def bound_transports(app: Any) -> tuple[CeleryTransport, ...]:
    """The transports bound on ``app``, in binding order."""
    with _bound_lock:
        return tuple(_bound.get(app, ()))


def one_arguments(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, str | None, int | None]:
    """Read ``(body, handler=None, attempt=1)``; anything else becomes an undecodable body.

    The attempt is ``None`` when it is not a sane counter (see
    :func:`~tidings._untrusted.parse_counter`): the caller dead-letters such a message.
    """
    try:
        body, handler, attempt = (*args, None, 1)[:3] if len(args) <= 3 else (args, None, 1)
        handler = kwargs.pop("handler", handler)
        attempt = kwargs.pop("attempt", attempt)
    except (TypeError, ValueError):  # pragma: no cover - defensive
        return (args, kwargs), None, 1
    if kwargs or not (handler is None or isinstance(handler, str)):
        return (args, kwargs), None, 1
    counted = parse_counter(attempt)
    return body, handler, None if counted is None else max(1, counted)


class _Counts:
    """Counts per key, the oldest forgotten past ``limit`` keys; thread-safe."""

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, key: str) -> int:
        """Count one more for ``key``; the new count."""
        with self._lock:
            count = self._counts.pop(key, 0) + 1
            self._counts[key] = count
            while len(self._counts) > self.limit:
                del self._counts[next(iter(self._counts))]
            return count

    def forget(self, key: str) -> None:
        """Drop ``key``'s count."""
        with self._lock:
            self._counts.pop(key, None)


class _Publisher:
    """One publishing connection of a transport, its producer, and what the broker returned."""

    __slots__ = ("connection", "generation", "producer", "returned")

    def __init__(self, connection: Any, generation: int) -> None:
        self.connection = connection
        self.generation = generation
        self.producer: Any = None
        self.returned: list[str] = []

    def on_return(self, exc: Any, exchange: Any, routing_key: Any, message: Any) -> None:
        """Called by kombu (``on_return``): a ``mandatory`` message no binding took came back."""
        self.returned.append(str(routing_key))

    def release(self) -> None:
        """Give the connection back to Celery's pool (it may be closed)."""
        with suppress(Exception):
            self.connection.release()
