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

import logging
import threading
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tidings._ids import new_event_id
from tidings._letters import bounded_letter_fields
from tidings._untrusted import log_safe, parse_counter
from tidings.codec import Codec, default_codec
from tidings.context import EventContext, bind, reset
from tidings.delivery import Dispatcher, Received
from tidings.errors import PublishError, UsageError
from tidings.events import DomainEvent
from tidings.ports import DeadLetter, DeadLetterStore, Inbox, StoredEnvelope
from tidings.retry import RetryPolicy
from tidings.transports._celery_redis import check_persistence, reuse_redis_clients
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

__all__ = ["CeleryTransport"]

log = logging.getLogger("tidings.celery")

DELIVER = "tidings.deliver"
DELIVER_BATCH = "tidings.deliver_batch"
# The largest exponent of an infrastructure retry's backoff (2**6 s, then capped at 60 s).
_MAX_BACKOFF_EXPONENT = 6
# Celery's default for the Redis broker: an unacknowledged message is handed out again after it.
DEFAULT_VISIBILITY_TIMEOUT = 3600.0


def _celery() -> Any:
    try:
        import celery  # noqa: PLC0415 - optional extra, imported when a transport is made
    except ImportError as exc:  # pragma: no cover - depends on the environment
        msg = "the Celery transport needs Celery: pip install 'tidings[celery]'"
        raise ImportError(msg) from exc
    return celery


class CeleryTransport:
    """Sends events as Celery tasks and runs the bus's handlers in Celery workers.

    Args:
        app: the Celery app; workers start the standard way, ``celery -A module worker``:
            without ``-Q`` a worker of this app consumes ``queue`` as well as the app's own
            queues; with ``-Q`` exactly the queues named (name ``queue`` among them).
        queue: the queue this service's workers consume (and where retries go).
        publish_to: the queues events are sent to: every service that handles them has its
            own queue there, and each receives every event. Defaults to ``[queue]``.
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

    ``EventBus(transport=CeleryTransport(app, ...))`` registers the two tasks on ``app``,
    installs context propagation for all of the app's tasks and sets the app's
    ``worker_consumer``: a consumer that dead-letters (and acknowledges) what Celery cannot
    decode or run, whatever its content type or shape, and, on a Redis
    broker, records and acknowledges deliveries without waiting for each reply (every task of
    the worker gains; :mod:`tidings.transports._celery_redis`). Nothing happens before that.
    Thread-safe for publishing.
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
        self.app = app
        self.queue = queue
        self.publish_to = tuple(publish_to) if publish_to else (queue,)
        self.dead_letters, self.inbox = _stores_for(app, queue, dead_letters, inbox)
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
        self._send_lock = threading.Lock()
        self._connection: Any = None
        self._producer: Any = None

    # -- wiring -----------------------------------------------------------------------------

    def bind(self, bus: EventBus) -> None:
        """Register the delivery tasks on the app and check the bus's handlers."""
        if self._dispatcher is not None:
            msg = "a CeleryTransport serves one EventBus; make one transport per bus"
            raise UsageError(msg)
        self._check_accept_content()
        self._check_delay(self.retry, "the transport's default retry policy")
        self._dispatcher = Dispatcher.serving(bus, self)
        # Worker-side customisations of Celery, which need Celery itself.
        from tidings.transports import _celery_consumer  # noqa: PLC0415

        options: dict[str, Any] = {
            "bind": True,
            "acks_late": True,
            "reject_on_worker_lost": True,
            "serializer": "json",
            "ignore_result": True,
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

    def subscribed(self, handler: Handler) -> None:
        """Refuse a handler whose retry delay could outlast the broker's visibility timeout."""
        if handler.retry is not None:
            self._check_delay(handler.retry, f"handler {handler.name!r}")

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
        """Encode every event first (nothing is sent if one fails), then send to each queue."""
        if self._deliver is None or self._deliver_batch is None:
            msg = "create the EventBus with this transport before publishing"
            raise UsageError(msg)
        bodies = [self.codec.encode(event).decode() for event in events]
        with self._send_lock:
            try:
                producer = self._producer or self._open_producer()
                reuse_redis_clients(producer.channel)
                for queue in self.publish_to:
                    if len(bodies) == 1:
                        self._send_one(events[0], bodies[0], queue, producer)
                        continue
                    for start in range(0, len(bodies), self.batch_size):
                        chunk = bodies[start : start + self.batch_size]
                        self._send_task(
                            self._deliver_batch, (chunk,), f"<{len(chunk)} events>", queue, producer
                        )
            except Exception as exc:
                msg = (
                    f"the broker did not accept all of {len(bodies)} event(s) ({exc!r}); send "
                    "them again: handlers' inboxes make the ones already sent harmless"
                )
                raise PublishError(msg) from exc

    def send_envelopes(self, envelopes: Sequence[StoredEnvelope]) -> None:
        """Send stored envelopes unchanged, to the queues of their type (as ``send`` does).

        An envelope alone on its queue goes as one task message whose headers carry its own
        context ids, several as batch messages of up to ``batch_size``: the messages ``send``
        sends, so workers cannot tell a relayed envelope from a published event. Needs no event
        class (:class:`~tidings.ports.EnvelopeSender`).

        Raises:
            UsageError: the transport is not bound to a bus yet (also for an empty batch).
            PublishError: the broker did not accept them all (send again).
        """
        if self._deliver is None or self._deliver_batch is None:
            msg = "create the EventBus with this transport before relaying through it"
            raise UsageError(msg)
        if not envelopes:
            return
        by_queue: dict[str, list[StoredEnvelope]] = {}
        for envelope in envelopes:
            for queue in self._destinations(envelope.event_type):
                by_queue.setdefault(queue, []).append(envelope)
        with self._send_lock:
            try:
                producer = self._producer or self._open_producer()
                reuse_redis_clients(producer.channel)
                for queue, group in by_queue.items():
                    if len(group) == 1:
                        one = group[0]
                        token = bind(
                            EventContext(one.correlation_id, one.causation_id, one.tenant_id)
                        )
                        try:
                            shown = f"<{one.event_type} {one.event_id}>"
                            args = (one.body.decode(),)
                            self._send_task(self._deliver, args, shown, queue, producer)
                        finally:
                            reset(token)
                        continue
                    for start in range(0, len(group), self.batch_size):
                        chunk = [e.body.decode() for e in group[start : start + self.batch_size]]
                        self._send_task(self._deliver_batch, (chunk,), f"<{len(chunk)} events>",
                                        queue, producer)  # fmt: skip
            except Exception as exc:
                msg = (
                    f"the broker did not accept all of {len(envelopes)} envelope(s) ({exc!r}); "
                    "send them again: handlers' inboxes make the ones already sent harmless"
                )
                raise PublishError(msg) from exc

    def _destinations(self, event_type: str) -> Sequence[str]:
        """The queues events of ``event_type`` are sent to: every queue of ``publish_to``."""
        return self.publish_to

    def _send_one(self, event: DomainEvent, body: str, queue: str, producer: Any) -> None:
        """Send one event's message, its headers carrying the event's own context ids.

        So that Celery's log lines about the message, in a worker, carry them even when it was
        sent with no context bound (by the outbox relay, say).
        """
        assert self._deliver is not None  # noqa: S101 - checked by send
        token = bind(EventContext(event.correlation_id, event.causation_id, event.tenant_id))
        try:
            self._send_task(
                self._deliver, (body,), f"<{event.event_type} {event.event_id}>", queue, producer
            )
        finally:
            reset(token)

    def _send_task(
        self, task: Task, args: tuple[Any, ...], argsrepr: str, queue: str, producer: Any
    ) -> None:
        """Send one task message on the transport's producer: what ``apply_async`` would send.

        ``apply_async`` also merges options, routes and makes a result object that tidings'
        tasks never use, a quarter of the CPU of a single-event publish. This builds the same
        protocol 2 message (with the parent and root ids of the task it is sent from) and hands
        it to Celery's own sender, which sends the publish signals and applies the app's
        publish retry policy. An eager app (``task_always_eager``), or one on task protocol 1,
        takes ``apply_async``. ``argsrepr`` is what Celery's logs and monitors show of the
        arguments (the envelope is in them).
        """
        app = self.app
        conf = app.conf
        if conf.task_always_eager or conf.task_protocol != 2:
            task.apply_async(
                args=args, argsrepr=argsrepr, queue=queue, producer=producer, declare=[]
            )
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
            producer, task.name, message, queue=queue, declare=[], serializer="json"
        )

    def _open_producer(self) -> Any:
        """Connect for publishing and declare the queues (under the send lock).

        Publisher confirms on AMQP: a publish waits for the broker's ack and raises on a nack,
        so ``send`` returns only once the broker accepted every message. The queues are
        declared once here rather than with every message (Celery's default, a third of the
        cost of a publish), so that a message sent before any worker started is kept.

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
            producer = self.app.amqp.Producer(connection)
            for queue in self.publish_to:
                producer.maybe_declare(self.app.amqp.queues[queue])
            check_persistence(producer.channel, "the Celery broker, publishing")
        except BaseException:
            connection.release()
            raise
        self._connection, self._producer = connection, producer
        return producer

    def replay(self, letter: DeadLetter) -> None:
        """Send a dead letter back to its queue, to its handler only when it names one."""
        if self._deliver is None:
            msg = "create the EventBus with this transport before replaying"
            raise UsageError(msg)
        queue = letter.destination or self.queue
        self._deliver.apply_async(
            args=(letter.body.decode("utf-8", "replace"), letter.handler, 1), queue=queue
        )

    def close(self) -> None:
        """Close the transport's publishing connection (a later send opens a new one)."""
        with self._send_lock:
            if self._connection is not None:
                self._connection.release()
            self._connection = self._producer = None

    # -- working ----------------------------------------------------------------------------

    # The task functions take anything, so that a malformed task message reaches the
    # dispatcher (and the dead-letter store) instead of failing inside Celery and vanishing.
    def _run_one(self, task: Task, *args: Any, **kwargs: Any) -> None:
        body, handler, attempt = one_arguments(args, kwargs)
        if attempt is None:
            retries = task.request.retries
            try:
                self._refuse(
                    task, [body], handler, "the message's attempt argument is not a counter"
                )
            except Exception as exc:
                if not isinstance(retries, int) or parse_counter(retries) is None:
                    raise  # pragma: no cover - tidings' consumer refuses such a header first
                self._infrastructure_failed(task, [body], handler, retries, exc)
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
            self._refuse(task, bodies, handler, "the message's retries header is not a counter")
            return
        queue = self._queue_of(request)
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
        try:
            for outcome in dispatcher.dispatch_many(messages):
                for again in outcome.retries:
                    deliver.apply_async(
                        args=(again.body.decode(), again.handler, again.attempt),
                        countdown=self._countdown(again.delay),
                        queue=queue,
                    )
        except Exception as exc:  # noqa: BLE001 - retried, bounded, below
            # The dead-letter store or the broker failed: send this message again later rather
            # than acknowledge it, a bounded number of times. Effects already done are guarded
            # by the inbox.
            self._infrastructure_failed(task, bodies, handler, retries, exc)

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
                self._refuse(task, bodies, handler, reason)
            except Exception:
                # The store is down too: keep the message on the broker, sent again at the
                # longest backoff, until the dead letter can be stored.
                log.exception("could not dead-letter a delivery either; keeping it for later")
            else:
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
            raise task.retry(exc=exc, countdown=countdown) from exc
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
                self._refuse(task, bodies, handler, reason)
            except Exception:
                log.exception("could not dead-letter a delivery either; leaving it on the broker")
            else:
                self._unsent_retries.forget(key)
                return
        log.error(
            "could not send the retry of a delivery (%s); leaving it on the broker for "
            "redelivery (unsent retry %d, bound %d)",
            log_safe(repr(getattr(failed, "reason", failed))),
            unsent,
            self.max_infrastructure_retries,
        )
        raise Reject(getattr(failed, "reason", failed), requeue=True) from exc

    def _refuse(self, task: Task, bodies: list[Any], handler: str | None, reason: str) -> None:
        """Dead-letter each of a message's bodies with ``reason`` (raises if the store fails)."""
        request = task.request
        queue = self._queue_of(request)
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

    def _queue_of(self, request: Any) -> str:
        delivery = request.delivery_info
        queue = delivery.get("routing_key") if isinstance(delivery, dict) else None
        return queue if isinstance(queue, str) and queue else self.queue

    def _countdown(self, delay: float) -> float:
        """A retry's countdown: its delay, below the broker's visibility timeout.

        A busy inbox asks for a look after the other claim's lease, which nothing bounds by
        the visibility timeout: look sooner rather than have the broker copy the message.
        """
        timeout = self._visibility_timeout()
        return delay if timeout is None else min(delay, timeout * 0.9)


def _stores_for(
    app: Celery,
    queue: str,
    dead_letters: DeadLetterStore | Default,
    inbox: Inbox | Default | None,
) -> tuple[DeadLetterStore, Inbox | None]:
    """The transport's dead-letter store and inbox: those given, else on the broker's Redis.

    Raises:
        UsageError: one is left out and the broker is not Redis; the message says what to pass.
    """
    if not isinstance(dead_letters, Default) and not isinstance(inbox, Default):
        return dead_letters, inbox
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
    )


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
