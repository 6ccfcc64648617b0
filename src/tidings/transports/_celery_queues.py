"""A worker started the standard way consumes the transport's queue: ``celery -A app worker``.

Celery's worker without ``-Q`` consumes the app's queues as they stand when it starts: the
``celery`` queue and whatever ``task_queues`` lists, so a transport's queue (``tidings`` by
default) would sit unread unless the user remembered ``-Q tidings,celery``. When a worker of the
app starts without ``-Q``, :func:`consume_by_default` adds the transport's queue to the ones it
consumes; ``-Q other`` still means only ``other``, and ``-X tidings`` still excludes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["consume_by_default"]


def consume_by_default(app: Celery, queue: str) -> None:
    """Make workers of ``app`` started without ``-Q`` consume ``queue`` too.

    Connects a ``celeryd_init`` receiver (Celery sends it in the worker, before the queues are
    selected), which acts only for a worker of ``app``. Called when a transport is bound:
    nothing is connected on import.
    """
    from celery import signals  # noqa: PLC0415 - optional extra, imported when bound

    def add_queue(instance: Any = None, options: Any = None, **_: Any) -> None:
        if id(getattr(instance, "app", None)) != id(app):  # another app's worker
            return
        if isinstance(options, dict) and options.get("queues"):
            return  # -Q names exactly the queues to consume
        # Added to the default selection; -X (applied after this) can still remove it.
        app.amqp.queues.select_add(queue)

    # weak=False: the receiver is a closure nobody else holds.
    signals.celeryd_init.connect(add_queue, weak=False)
