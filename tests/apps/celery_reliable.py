"""A service for the Celery-over-Redis reliability tests (``tests/test_celery_reliable.py``).

Worker subprocesses start as ``celery -A tests.apps.celery_reliable worker -Q <queue>`` with
these environment variables; the test process calls :func:`make` with the same values:

- ``RELIABLE_QUEUE``: the queue (required; without it nothing is built on import).
- ``RELIABLE_PREFIX``: the first part of every Redis key of the test (inbox, dead letters,
  counters) and of the broker's unacknowledged hash, index and mutex, so that a short
  visibility timeout restores only this test's messages. The broker's Redis connections are
  named ``<prefix>`` (``CLIENT LIST`` tells the test when the worker waits in its fetch).
- ``RELIABLE_BROKER_URL``: the broker (default: the test Redis; a test puts a proxy there).
- ``RELIABLE_VISIBILITY_TIMEOUT``: seconds before Redis hands an unacknowledged message out
  again.

Counters and the inbox always live on the test Redis (``TIDINGS_TEST_REDIS_URL``), never
behind the broker's URL, so that cutting the broker does not touch them. Per event, under
``{prefix}:``: ``effect:<id>`` counts the handler's completed effects (the test wants 1).

- ``RELIABLE_POLLING_INTERVAL``: kombu's ``polling_interval`` (how long its ``BRPOP`` blocks).
- ``RELIABLE_DEFAULT_SWEEP``: when set, the app leaves kombu's restore sweep options
  (``unacked_restore_interval``, ``unacked_restore_throttle``) unset, as a user would; else
  it sweeps every second.

While the key ``{prefix}:gate-on`` exists, the inbox fails the first claim of each event as an
unreachable inbox would (``redis.ConnectionError``), after setting ``{prefix}:claimed`` and
waiting (at most :data:`GATE_LIMIT` s) for ``{prefix}:cut``: the test cuts the worker off its
broker in between, so that the retry the transport then sends cannot be sent either.

While ``{prefix}:fail`` exists the handler raises, and while ``{prefix}:refuse-sends`` exists
the app's router refuses every task the worker sends (as a broker refusing writes would): the
handler's retries and the transport's own cannot be sent. ``{prefix}:started:<id>`` counts the
handler's runs, ``{prefix}:ran`` the tasks the worker finished (Celery's ``task_postrun``).
The plain task :data:`TICKS`, run by a solo worker, sets ``{prefix}:ticks`` to the number of
kombu Redis callbacks in its event loop's ``on_tick`` (one per registered transport), and
``{prefix}:transports`` to the number of kombu Redis transports alive in the process.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import redis
from celery import Celery
from celery.signals import task_postrun
from kombu.asynchronous import Hub
from kombu.exceptions import OperationalError
from kombu.transport import redis as redis_transport

from tidings import DomainEvent, EventBus, register_event
from tidings.deadletter.redis import RedisDeadLetterStore
from tidings.inbox.redis import RedisInbox
from tidings.retry import RetryPolicy
from tidings.transports.celery import CeleryTransport

REDIS_URL = os.environ.get("TIDINGS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
HANDLER = "reliable.apply"
TICKS = "reliable.count_ticks"
GATE_LIMIT = 30.0
"""The longest a gated claim waits for the cut key, so no worker waits for ever."""


@register_event
@dataclass(frozen=True)
class ReliableEvent(DomainEvent):
    event_type: ClassVar[str] = "celery_reliable.event"


class GateInbox:
    """A :class:`RedisInbox` whose first claim of each event fails, while the gate is on."""

    def __init__(self, inner: RedisInbox, client: redis.Redis, prefix: str) -> None:
        self.inner = inner
        self.client = client
        self.prefix = prefix

    @contextmanager
    def guard(self, handler: str, event_id: str) -> Iterator[bool]:
        gate = self.client.exists(f"{self.prefix}:gate-on")
        if gate and self.client.set(f"{self.prefix}:gate:{event_id}", 1, nx=True):
            self.client.set(f"{self.prefix}:claimed", event_id)
            deadline = time.monotonic() + GATE_LIMIT
            while not self.client.exists(f"{self.prefix}:cut") and time.monotonic() < deadline:
                time.sleep(0.02)
            msg = "the inbox is unreachable (the test's gate)"
            raise redis.ConnectionError(msg)
        with self.inner.guard(handler, event_id) as fresh:
            yield fresh


def make(
    queue: str,
    prefix: str,
    *,
    broker_url: str = REDIS_URL,
    visibility_timeout: float = 3600.0,
    polling_interval: float | None = None,
    default_sweep: bool = False,
) -> tuple[Celery, EventBus, CeleryTransport, redis.Redis]:
    """Build the service: Celery app, transport with a gate inbox, the handler."""
    client = redis.Redis.from_url(REDIS_URL)
    app = Celery(f"reliable-{queue}", broker=broker_url)
    app.conf.update(
        task_default_queue=queue,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_prefetch_multiplier=1,
        # A publish that fails is not retried for long: the retry's send fails within a second.
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.2,
        },
        broker_transport_options={
            "unacked_key": f"{prefix}:unacked",
            "unacked_index_key": f"{prefix}:unacked_index",
            "unacked_mutex_key": f"{prefix}:unacked_mutex",
            "visibility_timeout": visibility_timeout,
            "client_name": prefix,
            # Restore unacknowledged messages older than the visibility timeout every second
            # (kombu's default sweep is every 100 s), unless the test wants the defaults.
            **(
                {}
                if default_sweep
                else {"unacked_restore_interval": 1, "unacked_restore_throttle": 1}
            ),
            **({} if polling_interval is None else {"polling_interval": polling_interval}),
        },
    )
    inbox = GateInbox(RedisInbox(client, prefix=f"{prefix}:inbox", lease=5.0), client, prefix)
    transport = CeleryTransport(
        app,
        queue=queue,
        inbox=inbox,
        dead_letters=RedisDeadLetterStore(client, prefix=f"{prefix}:dlq"),
        retry=RetryPolicy(max_attempts=3, initial_delay=0.05, max_delay=0.2),
        max_infrastructure_retries=3,
    )
    bus = EventBus(transport=transport)

    def route(name: str, args: Any, kwargs: Any, options: Any, **_: Any) -> None:
        if client.exists(f"{prefix}:refuse-sends"):
            msg = "the test's router refuses to send tasks"
            raise OperationalError(msg)

    app.conf.task_routes = (route,)

    def ran(**_: Any) -> None:
        client.incr(f"{prefix}:ran")

    task_postrun.connect(ran, weak=False)

    @app.task(name=TICKS, shared=False)
    def count_ticks() -> None:
        # Run by a solo worker in its main process. kombu forgets its current loop when the
        # loop resets (a reconnection): find the worker's hub among the live objects.
        gc.collect()
        live = gc.get_objects()
        ticks = [
            tick
            for hub in live
            if isinstance(hub, Hub)
            for tick in hub.on_tick
            if getattr(tick, "__module__", None) == "kombu.transport.redis"
        ]
        transports = [found for found in live if isinstance(found, redis_transport.Transport)]
        client.set(f"{prefix}:ticks", len(ticks))
        client.set(f"{prefix}:transports", len(transports))

    @bus.subscribe(ReliableEvent, name=HANDLER)
    def apply(event: ReliableEvent) -> None:
        client.incr(f"{prefix}:started:{event.event_id}")
        if client.exists(f"{prefix}:fail"):
            msg = "the test's handler fails"
            raise RuntimeError(msg)
        client.incr(f"{prefix}:effect:{event.event_id}")

    return app, bus, transport, client


if os.environ.get("RELIABLE_QUEUE"):
    app, bus, transport, _client = make(
        os.environ["RELIABLE_QUEUE"],
        os.environ["RELIABLE_PREFIX"],
        broker_url=os.environ.get("RELIABLE_BROKER_URL", REDIS_URL),
        visibility_timeout=float(os.environ.get("RELIABLE_VISIBILITY_TIMEOUT", "3600")),
        polling_interval=(
            float(os.environ["RELIABLE_POLLING_INTERVAL"])
            if os.environ.get("RELIABLE_POLLING_INTERVAL")
            else None
        ),
        default_sweep=bool(os.environ.get("RELIABLE_DEFAULT_SWEEP")),
    )
