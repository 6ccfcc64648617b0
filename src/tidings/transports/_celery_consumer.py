"""Worker-side customisations of Celery: nothing Celery would drop or loop on is lost.

:class:`DeadLetteringConsumer` dead-letters messages Celery cannot decode or route, and on a
Redis broker makes its channel cheaper (:mod:`tidings.transports._celery_redis`);
:class:`WorkerLosses` (through :func:`delivery_request`, the tasks' request class) dead-letters
a message that keeps killing its worker process.

The consumer:

Celery acknowledges (or rejects without requeue) a message it cannot decode, a JSON message
that is not a task, and a task of an unknown name, and only logs them. A worker whose app has a
``CeleryTransport`` uses this consumer instead (``worker_consumer`` setting), which first stores
such a message in the transport's dead-letter store with the reason, then lets Celery go on.
Imported only by Celery's worker, through that setting.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from celery.exceptions import WorkerLostError
from celery.worker.consumer import Consumer
from celery.worker.request import Request
from celery.worker.state import task_ready

from tidings.events import DomainEvent
from tidings.ports import DeadLetter
from tidings.transports._celery_redis import acknowledge_without_waiting, reuse_redis_clients
from tidings.transports._celery_transport import DELIVER_BATCH, one_arguments

if TYPE_CHECKING:
    from tidings.transports._celery_transport import CeleryTransport

__all__ = ["DeadLetteringConsumer", "WorkerLosses", "dead_letter_stores", "delivery_request"]

log = logging.getLogger("tidings.celery")

dead_letter_stores: dict[int, Any] = {}
"""``id(app)`` → the dead-letter store of the app's transport (filled by the transport)."""


class DeadLetteringConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, storing undecodable and unknown messages as dead letters first."""

    def loop_args(self) -> tuple[Any, ...]:
        """Start the consumer's loop, its Redis channel made cheaper first (``_celery_redis``)."""
        if self.task_consumer is not None:
            reuse_redis_clients(self.task_consumer.channel)
            acknowledge_without_waiting(self.task_consumer.channel)
        return super().loop_args()  # type: ignore[no-any-return]

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
        headers = {
            str(key): str(value)
            for key, value in (message.headers or {}).items()
            if isinstance(value, str | int | float)
        }
        headers["content-type"] = str(message.content_type)
        letter = DeadLetter(
            body=bytes(body or b""),
            reason=f"{type(exc).__name__}: {exc}",
            headers=headers,
            transport="celery",
            destination=str((message.delivery_info or {}).get("routing_key") or ""),
        )
        # If the store is down this raises, the consumer restarts, and the broker keeps the
        # unacknowledged message: nothing is dropped silently.
        store.add(letter)
        log.error("dead-lettered an undeliverable message as %s: %s", letter.id, letter.reason)


class WorkerLosses:
    """Counts worker deaths per message and dead-letters a poison pill (worker's main process).

    Celery puts a message whose worker process died (killed, out of memory, ``os._exit`` in a
    handler) back on the queue without counting (``reject_on_worker_lost``). This counts deaths
    per message body, bounded in memory, and after ``max_worker_losses`` stores a dead letter
    instead; a batch message is split into single messages at its first death.
    """

    def __init__(self, transport: CeleryTransport) -> None:
        self.transport = transport
        self._losses: dict[str, int] = {}
        self._lock = threading.Lock()

    def handle(self, request: Any, exc: BaseException) -> bool:
        """Handle a message whose worker process died; ``False`` lets Celery requeue it.

        Runs in the worker's main process. A batch is split into single messages at once, so
        that one poison event does not take the others down with it; a single message is
        dead-lettered at its ``max_worker_losses``-th death. Until the dead letter is stored
        (or the split sent), the message is not acknowledged.
        """
        transport = self.transport
        deliver = transport._deliver
        if deliver is None:  # pragma: no cover - tasks exist once bound
            return False
        queue = (request.delivery_info or {}).get("routing_key") or transport.queue
        args, kwargs = tuple(request.args or ()), dict(request.kwargs or {})
        try:
            if request.name == DELIVER_BATCH:
                bodies = args[0] if len(args) == 1 and isinstance(args[0], list) else [args]
                for body in bodies:
                    deliver.apply_async(args=(body,), queue=queue)
                log.error("a worker died on a batch of %d events; sent one by one", len(bodies))
            else:
                body, handler, _ = one_arguments(args, kwargs)
                text = body if isinstance(body, str) else repr(body)
                with self._lock:
                    losses = self._losses.pop(text, 0) + 1
                    if losses < transport.max_worker_losses:
                        self._losses[text] = losses
                        while len(self._losses) > 10_000:
                            del self._losses[next(iter(self._losses))]
                        return False
                letter = self._letter(request, text, handler, losses, exc)
                transport.dead_letters.add(letter)
                log.error(
                    "the worker died %d times on a delivery of %s; dead-lettered as %s",
                    losses,
                    letter.event_id,
                    letter.id,
                )
        except Exception:
            log.exception("could not settle a delivery whose worker died; requeueing it")
            return False
        request.acknowledge()
        return True

    def _letter(
        self,
        request: Any,
        text: str,
        handler: str | None,
        losses: int,
        exc: BaseException,
    ) -> DeadLetter:
        try:
            event: DomainEvent | None = self.transport.codec.decode(text.encode())
        except Exception:  # noqa: BLE001 - the letter is worth more than the decoding
            event = None
        return DeadLetter(
            body=text.encode(),
            reason=(
                f"WorkerLostError: the worker process died {losses} times handling this "
                f"message ({exc}); dead-lettered so that it stops crashing workers"
            ),
            traceback="",
            attempts=losses,
            handler=handler,
            event_type=None if event is None else event.event_type,
            event_id=None if event is None else event.event_id,
            headers={
                str(key): str(value)
                for key, value in (getattr(request, "request_dict", None) or {}).items()
                if isinstance(value, str | int | float)
            },
            transport=self.transport.name,
            destination=(request.delivery_info or {}).get("routing_key") or self.transport.queue,
        )


def delivery_request(losses: WorkerLosses) -> type[Any]:
    """A Celery request class that hands worker deaths to ``losses`` before requeueing."""

    class DeliveryRequest(Request):  # type: ignore[misc]
        def on_failure(
            self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
        ) -> None:
            exc = getattr(exc_info.exception, "exc", exc_info.exception)
            if isinstance(exc, WorkerLostError) and losses.handle(self, exc):
                task_ready(self)
                return
            super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    return DeliveryRequest
