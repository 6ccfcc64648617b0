"""Worker-side customisations of Celery: nothing Celery would drop or loop on is lost.

:class:`DeadLetteringConsumer` dead-letters messages Celery cannot decode or route, and on a
Redis broker makes its channel cheaper and takes each message and records it as unacknowledged
in one step, so that no worker death loses one (:mod:`tidings.transports._celery_redis`);
:class:`WorkerLosses` (through :func:`delivery_request`, the tasks' request class) dead-letters
a message that keeps killing its worker process.

The consumer:

Celery acknowledges (or rejects without requeue) a message it cannot decode, a JSON message
that is not a task, and a task of an unknown name, and only logs them. A worker whose app has a
``CeleryTransport`` uses this consumer instead (``worker_consumer`` setting), which first stores
such a message in the transport's dead-letter store with the reason, then lets Celery go on.

Some messages make Celery's own task strategy raise instead (a raw ``application/data`` body,
a body that is not ``(args, kwargs, embed)``, headers of the wrong types, a missing ``id``):
Celery calls that an unrecoverable error and its worker process exits, and the message, never
acknowledged, kills the next worker too. This consumer checks the shape of every message naming
one of tidings' tasks before Celery sees it, and catches whatever Celery's strategy raises for
any task message: such a message is dead-lettered with the reason and acknowledged, and the
worker goes on. Imported only by Celery's worker, through that setting.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery.exceptions import WorkerLostError
from celery.worker.consumer import Consumer
from celery.worker.request import Request
from celery.worker.state import task_ready

from tidings._letters import bounded_letter_fields
from tidings._untrusted import log_safe, parse_counter
from tidings.codec import Limits
from tidings.events import DomainEvent
from tidings.ports import DeadLetter
from tidings.transports._celery_redis import (
    acknowledge_without_waiting,
    check_persistence,
    close_fetch_window,
    forget_stale_transports,
    refuse_malformed_items,
    restore_promptly,
    reuse_redis_clients,
)
from tidings.transports._celery_transport import DELIVER, DELIVER_BATCH, one_arguments

if TYPE_CHECKING:
    from tidings.transports._celery_transport import CeleryTransport

__all__ = [
    "DeadLetteringConsumer",
    "WorkerLosses",
    "dead_letter_stores",
    "delivery_request",
    "transports",
    "unrunnable",
]

log = logging.getLogger("tidings.celery")

dead_letter_stores: dict[int, Any] = {}
"""``id(app)`` → the dead-letter store of the app's transport (filled by the transport)."""

transports: dict[int, CeleryTransport] = {}
"""``id(app)`` → the app's transport (filled by the transport): its codec's size limit."""

_OURS = frozenset({DELIVER, DELIVER_BATCH})
# Headers Celery reads as text (ids, names, log text, dates): anything else there is refused.
_TEXT_HEADERS = (
    "id", "task", "shadow", "root_id", "parent_id", "group", "argsrepr", "kwargsrepr",
    "origin", "lang", "eta", "expires",
)  # fmt: skip
_LOGGED_HEADERS = ("id", "shadow", "root_id", "parent_id", "group")
_LONGEST_ID = 255
_EMBED_KEYS = frozenset({"callbacks", "errbacks", "chord", "chain"})


def unrunnable(message: Any) -> str | None:
    """Why a message naming one of tidings' tasks cannot be run, or ``None`` if it can.

    Messages naming other tasks, or no task, are Celery's to judge (``None``). Tidings' tasks
    are sent as protocol 2 JSON: headers a map with an ``id``, text where Celery expects text,
    a ``retries`` counter, no time limits of the wrong shape; a body decoding to ``[args,
    kwargs, embed]`` with a list, a map, and no callbacks, errbacks, chord or chain (tidings
    never sends any, and Celery would send the tasks they name).
    """
    headers = message.headers
    if not isinstance(headers, dict):
        return None  # Celery takes it for a protocol 1 message, or not a task at all
    name = headers.get("task")
    if not isinstance(name, str):
        return None if name is None else "the task header is not text"
    if name not in _OURS:
        return None
    if message.content_type != "application/json":
        return f"content type {log_safe(message.content_type, 64)}, not application/json"
    # decode() caches the body on the message: Celery's strategy reuses it, no second parse.
    return _header_problem(headers) or _body_problem(message.decode())


def _header_problem(headers: dict[Any, Any]) -> str | None:
    for key in _TEXT_HEADERS:
        if not isinstance(headers.get(key, ""), str | None):
            return f"the {key} header is not text"
    if not isinstance(headers.get("id"), str) or not headers["id"]:
        return "the message has no id"
    # Celery's own log lines show these raw ("Task name[id] received"): plain text only.
    for key in _LOGGED_HEADERS:
        value = headers.get(key)
        if value is not None and log_safe(value, _LONGEST_ID) != value:
            return f"the {key} header has control characters or is too long"
    retries = headers.get("retries")
    # Celery adds one to it for a retry: an int (not "3", which parse_counter takes).
    if retries is not None and (not isinstance(retries, int) or parse_counter(retries) is None):
        return "the message's retries header is not a counter"
    limits = headers.get("timelimit")
    if limits is not None and not (
        isinstance(limits, list | tuple)
        and len(limits) == 2  # (soft, hard)
        and all(v is None or (isinstance(v, int | float) and 0 <= v < 1e9) for v in limits)
    ):
        return "the timelimit header is not (soft, hard)"
    return None


def _body_problem(body: Any) -> str | None:
    if not (isinstance(body, list | tuple) and len(body) == 3):
        return "the body is not [args, kwargs, embed]"
    args, kwargs, embed = body
    if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
        return "the body's args are not a list or its kwargs not a map"
    if embed is not None and (
        not isinstance(embed, dict) or any(embed.get(key) for key in _EMBED_KEYS)
    ):
        return "the body's embed is not a map without callbacks, errbacks, chord or chain"
    return None


class UnrunnableTaskError(ValueError):
    """A task message Celery's strategy cannot run (the reason is the message)."""


class DeadLetteringConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, storing undecodable and unknown messages as dead letters first."""

    def loop_args(self) -> tuple[Any, ...]:
        """Start the consumer's loop, its Redis channel made cheaper and safer first.

        See :mod:`tidings.transports._celery_redis`: clients reused, index writes without
        waiting, malformed items dead-lettered, each message taken and recorded in one
        server-side step (no message lost to a worker killed while fetching), and a dead
        worker's messages restored soon after the visibility timeout. The loop forgets the
        transports of earlier connections (kombu keeps each one alive, its timers firing) and
        collects them at once.
        """
        if (
            self.hub is not None
            and self.connection is not None
            and forget_stale_transports(self.hub, self.connection.transport)
        ):
            # The old transports are cycles: collect them now (a few tens of ms, once per
            # reconnection) rather than when the interpreter next runs a full collection,
            # which in a worker's large, long-lived heap comes after dozens of reconnections.
            gc.collect()
        if self.task_consumer is not None:
            reuse_redis_clients(self.task_consumer.channel)
            acknowledge_without_waiting(self.task_consumer.channel)
            refuse_malformed_items(self.task_consumer.channel)
            # Last: it takes over the QoS's append that acknowledge_without_waiting set.
            close_fetch_window(self.task_consumer.channel)
            restore_promptly(self.task_consumer.channel)
            check_persistence(self.task_consumer.channel, "the Celery broker, from a worker")
        return super().loop_args()  # type: ignore[no-any-return]

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], None]:
        """Celery's task message handler, that no message can make raise (but connection errors).

        A message naming one of tidings' tasks is checked first (:func:`unrunnable`); whatever
        Celery's strategy raises on any task message is caught. Either way the message is
        dead-lettered with the reason and acknowledged. A connection error propagates, as in
        Celery (its consumer reconnects; the broker keeps the unacknowledged message).
        """
        handle = super().create_task_handler(*args, **kwargs)
        errors = tuple(self.connection_errors or ()) + tuple(self.channel_errors or ())

        def on_task_received(message: Any) -> None:
            try:
                why = unrunnable(message)
            except errors:
                raise
            except Exception as exc:  # noqa: BLE001 - a message's problem is data here
                why = f"{type(exc).__name__}: {exc}"
            if why is None:
                try:
                    handle(message)
                except errors:
                    raise
                except Exception as exc:  # noqa: BLE001 - a message's problem is data here
                    self._refuse(message, exc)
                return
            self._refuse(message, UnrunnableTaskError(why))

        return on_task_received

    def _refuse(self, message: Any, exc: Exception) -> None:
        """Dead-letter a task message Celery cannot run, then acknowledge it."""
        self._dead_letter(message, exc)
        if not message.acknowledged:
            message.ack_log_error(log, tuple(self.connection_errors or ()))

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        """Dead-letter a message whose body cannot be decoded (garbage, pickle), then ack it."""
        self._dead_letter(message, exc)
        super().on_decode_error(message, exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        """Dead-letter a message that is not a task message, then reject it."""
        self._dead_letter(message, ValueError("not a Celery task message"))
        super().on_unknown_message(body, message)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        """Dead-letter a task message naming a task this worker does not have."""
        self._dead_letter(message, exc)
        super().on_unknown_task(body, message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        """Dead-letter a task message Celery finds malformed."""
        self._dead_letter(message, exc)
        super().on_invalid_task(body, message, exc)

    def _dead_letter(self, message: Any, exc: Exception) -> None:
        store = dead_letter_stores.get(id(self.app))
        if store is None:
            return
        body = message.body
        if isinstance(body, str):
            body = body.encode("utf-8", "surrogateescape")
        transport = transports.get(id(self.app))
        keep = (Limits() if transport is None else transport.codec.limits).max_bytes
        raw_headers = message.headers if isinstance(message.headers, dict) else {}
        kept, headers, note = bounded_letter_fields(bytes(body or b""), raw_headers, keep)
        headers["content-type"] = log_safe(message.content_type, 128)
        # The queue the worker serves, not the message's routing key (on RabbitMQ, routed by
        # type, that is the event type): a replay goes there.
        delivery = message.delivery_info if isinstance(message.delivery_info, dict) else {}
        destination = delivery.get("routing_key") if transport is None else transport.queue
        letter = DeadLetter(
            body=kept,
            reason=f"{type(exc).__name__}: {exc}"[:4096] + note,
            headers=headers,
            transport="celery",
            destination=destination if isinstance(destination, str) else "",
        )
        # If the store is down this raises a connection error: the consumer restarts, and the
        # broker keeps the unacknowledged message (nothing is dropped silently). Any other
        # error would make Celery's worker exit ("unrecoverable error").
        try:
            store.add(letter)
        except Exception as failed:
            msg = f"the dead-letter store failed ({type(failed).__name__}); the message is kept"
            raise ConnectionError(msg) from failed
        log.error(
            "dead-lettered an undeliverable message as %s: %s", letter.id, log_safe(letter.reason)
        )


class WorkerLosses:
    """Counts worker deaths per message and dead-letters a poison pill (worker's main process).

    Celery puts a message whose worker process died (killed, out of memory, ``os._exit`` in a
    handler) back on the queue without counting (``reject_on_worker_lost``). This counts deaths
    per message body, bounded in memory, and after ``max_worker_losses`` stores a dead letter
    instead; a batch message is split into single messages at its first death.
    """

    def __init__(self, transport: CeleryTransport) -> None:
        self.transport = transport
        self._losses: dict[bytes, int] = {}
        self._lock = threading.Lock()

    def handle(self, request: Any, exc: BaseException) -> str | None:
        """Handle a message whose worker process died; ``None`` lets Celery requeue it.

        Returns what became of it otherwise, for Celery's monitors: ``"task-retried"`` (a
        batch sent again as single messages) or ``"task-failed"`` (dead-lettered).

        Runs in the worker's main process. A batch is split into single messages at once, so
        that one poison event does not take the others down with it; a single message is
        dead-lettered at its ``max_worker_losses``-th death. Until the dead letter is stored
        (or the split sent), the message is not acknowledged.
        """
        transport = self.transport
        deliver = transport._deliver
        if deliver is None:  # pragma: no cover - tasks exist once bound
            return None
        # The service's own queue, never one read from the message (routed by type, its
        # routing key is the event type).
        queue = transport.queue
        args, kwargs = tuple(request.args or ()), dict(request.kwargs or {})
        try:
            if request.name == DELIVER_BATCH:
                bodies = args[0] if len(args) == 1 and isinstance(args[0], list) else [args]
                for body in bodies:
                    # Shown as a first delivery is (``<type id>``), never the envelope.
                    shown = transport._shown([body])
                    deliver.apply_async(args=(body,), queue=queue, argsrepr=shown, kwargsrepr="{}")
                log.error("a worker died on a batch of %d events; sent one by one", len(bodies))
                outcome = "task-retried"
            else:
                body, handler, _ = one_arguments(args, kwargs)
                text = body if isinstance(body, str) else repr(body)
                # Keyed by a digest: a few dozen bytes per message however large its body.
                key = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16)
                digest = key.digest()
                with self._lock:
                    losses = self._losses.pop(digest, 0) + 1
                    if losses < transport.max_worker_losses:
                        self._losses[digest] = losses
                        while len(self._losses) > 10_000:
                            del self._losses[next(iter(self._losses))]
                        return None
                letter = self._letter(request, text, handler, losses, exc)
                transport.dead_letters.add(letter)
                log.error(
                    "the worker died %d times on a delivery of %s; dead-lettered as %s",
                    losses,
                    log_safe(letter.event_id),
                    letter.id,
                )
                outcome = "task-failed"
        except Exception:
            log.exception("could not settle a delivery whose worker died; requeueing it")
            return None
        request.acknowledge()
        return outcome

    def _letter(
        self,
        request: Any,
        text: str,
        handler: str | None,
        losses: int,
        exc: BaseException,
    ) -> DeadLetter:
        raw = text.encode("utf-8", "surrogateescape")
        try:
            event: DomainEvent | None = self.transport.codec.decode(raw)
        except Exception:  # noqa: BLE001 - the letter is worth more than the decoding
            event = None
        request_dict = getattr(request, "request_dict", None)
        body, headers, note = bounded_letter_fields(
            raw,
            request_dict if isinstance(request_dict, dict) else {},
            self.transport.codec.limits.max_bytes,
        )
        return DeadLetter(
            body=body,
            reason=(
                f"WorkerLostError: the worker process died {losses} times handling this "
                f"message ({exc}); dead-lettered so that it stops crashing workers{note}"
            ),
            traceback="",
            attempts=losses,
            handler=handler,
            event_type=None if event is None else event.event_type,
            event_id=None if event is None else event.event_id,
            headers=headers,
            transport=self.transport.name,
            destination=self.transport.queue,  # its own queue, not the message's routing key
        )


def delivery_request(losses: WorkerLosses) -> type[Any]:
    """A Celery request class that hands worker deaths to ``losses`` before requeueing."""

    class DeliveryRequest(Request):  # type: ignore[misc]
        def on_failure(
            self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
        ) -> None:
            exc = getattr(exc_info.exception, "exc", exc_info.exception)
            outcome = losses.handle(self, exc) if isinstance(exc, WorkerLostError) else None
            if outcome is not None:
                task_ready(self)
                # Settled by tidings (split, or dead-lettered): what Celery's monitors see.
                self.send_event(
                    outcome,
                    exception=log_safe(repr(exc), 500),
                    traceback=log_safe(getattr(exc_info, "traceback", "") or "", 2000),
                )
                return
            super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    return DeliveryRequest
