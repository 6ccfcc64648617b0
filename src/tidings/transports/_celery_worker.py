"""The worker side of routing by type: a consumer bootstep that subscribes at start-up.

:func:`install` adds :class:`Subscriptions` to a Celery app's consumer blueprint (the transport
does, when a bus is made with it). It runs once the consumer is connected, at start-up and after
each reconnection: every transport bound on the app subscribes its queue to its event types and
logs its handler table once (as Celery lists its tasks). A :class:`~tidings.errors.UsageError`
there (a handler of a class the codec does not know) stops the worker: Celery reports an
unrecoverable error and exits non-zero.
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps

__all__ = ["Subscriptions", "install"]


class Subscriptions(bootsteps.StartStopStep):  # type: ignore[misc]
    """Subscribe every tidings transport of the worker's app when its consumer connects."""

    requires = ("celery.worker.consumer.connection:Connection",)

    def start(self, parent: Any) -> None:
        """Subscribe each transport bound on the app, with the consumer's connection."""
        from tidings.transports._celery_transport import bound_transports  # noqa: PLC0415

        for transport in bound_transports(parent.app):
            transport.worker_started(parent.connection)


def install(app: Any) -> None:
    """Add :class:`Subscriptions` to ``app``'s consumer blueprint (once)."""
    steps = app.steps["consumer"]
    if Subscriptions not in steps:
        steps.add(Subscriptions)
