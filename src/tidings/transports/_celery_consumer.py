"""The worker's message consumer, dead-lettering what Celery would log and drop.

Celery acknowledges (or rejects without requeue) a message it cannot decode, a JSON message
that is not a task, and a task of an unknown name, and only logs them. A worker whose app has a
``CeleryTransport`` uses this consumer instead (``worker_consumer`` setting), which first stores
such a message in the transport's dead-letter store with the reason, then lets Celery go on.
Imported only by Celery's worker, through that setting.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.consumer import Consumer

from tidings.ports import DeadLetter

__all__ = ["DeadLetteringConsumer", "dead_letter_stores"]

log = logging.getLogger("tidings.celery")

dead_letter_stores: dict[int, Any] = {}
"""``id(app)`` → the dead-letter store of the app's transport (filled by the transport)."""


class DeadLetteringConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, storing undecodable and unknown messages as dead letters first."""

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
