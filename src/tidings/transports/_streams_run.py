"""Running a service's stream consumers: threads, and a graceful stop on SIGTERM or SIGINT."""

from __future__ import annotations

import signal
import threading
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tidings.transports._streams_worker import StreamConsumer, Streams

if TYPE_CHECKING:
    from tidings.delivery import Dispatcher
    from tidings.transports.redis_streams import RedisStreamsTransport

__all__ = ["run_consumers", "run_until_signalled"]


def run_consumers(
    transport: RedisStreamsTransport,
    dispatcher: Dispatcher,
    streams: Streams,
    stop: threading.Event | None,
    concurrency: int,
) -> None:
    """Run ``concurrency`` consumer threads until ``stop`` is set, then wait for each to finish.

    Consumers are named ``{worker}-{n}``, ``worker`` being random per call, so that a restarted
    process never takes over its predecessor's name (its pending entries are reclaimed instead).
    """
    stop = threading.Event() if stop is None else stop
    worker = uuid.uuid4().hex[:8]
    consumers = [
        StreamConsumer(transport, dispatcher, streams, f"{worker}-{n}", stop)
        for n in range(concurrency)
    ]
    threads = [
        threading.Thread(target=c.run, name=f"tidings-streams-{c.name}", daemon=True)
        for c in consumers
    ]
    for thread in threads:
        thread.start()
    try:
        # A timed wait, so that the main thread stays responsive to signals.
        while not stop.wait(0.2):
            if not any(thread.is_alive() for thread in threads):  # pragma: no cover
                break
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def run_until_signalled(run: Callable[[threading.Event], None]) -> None:
    """Call ``run(stop)``, setting ``stop`` on SIGTERM or SIGINT; restore the old handlers after.

    Must be called from the main thread (Python delivers signals there only).
    """
    stop = threading.Event()
    previous: dict[signal.Signals, Any] = {}

    def request_stop(_signum: int, _frame: object) -> None:
        stop.set()

    for number in (signal.SIGTERM, signal.SIGINT):
        previous[number] = signal.signal(number, request_stop)
    try:
        run(stop)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
