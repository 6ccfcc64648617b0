"""A service for the Celery fault tests, wired like a user's composition root.

Worker subprocesses start as ``celery -A tests.apps.celery_faults worker -Q <queue>`` with these
environment variables; the test process calls :func:`make` itself, with the same values, to
publish and to look at the results:

- ``FAULTS_QUEUE``: the queue (required; without it nothing is built on import).
- ``FAULTS_PREFIX``: the first part of every Redis key of the test: inbox, dead letters,
  counters, and (through kombu's ``global_keyprefix``) the broker's own keys, so that a short
  visibility timeout restores only this test's unacknowledged messages.
- ``FAULTS_BROKER_URL``: the broker (default: the test Redis).
- ``FAULTS_VISIBILITY_TIMEOUT``: seconds before Redis hands an unacknowledged message out again.
- ``FAULTS_LEASE``: seconds an inbox claim lasts (how long a killed worker blocks a redelivery).

Counters and inbox keys always live on the test Redis (``TIDINGS_TEST_REDIS_URL``), never on the
broker, so that restarting the broker does not touch them. Per event, under ``{prefix}:``:

- ``started:<id>``: how many times the handler's body began (one per fresh inbox claim);
- ``effect:<id>``: how many times it completed its effect (the test wants exactly 1);
- ``pid:<id>``: the process the body last ran in (the test kills or pauses it);
- ``busy:<id>``: deliveries the inbox refused because another worker held the claim;
- ``duplicate:<id>``: deliveries the inbox skipped because the effect had taken place.

The handler's behaviour depends on the event's ``mode``: ``"normal"`` takes effect at once,
``"block"`` waits until the key ``{prefix}:go`` exists (at most :data:`BLOCK_LIMIT` seconds) so
that the test can kill or pause the worker mid-handler, and ``"crash"`` ends its own process
with ``os._exit``, every time, before the effect (a poison pill).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import ClassVar

import redis
from celery import Celery

from tidings import DomainEvent, EventBus, register_event
from tidings.deadletter.redis import RedisDeadLetterStore
from tidings.errors import InboxBusyError
from tidings.inbox.redis import RedisInbox
from tidings.ports import BatchInbox, Claim
from tidings.retry import RetryPolicy
from tidings.transports.celery import CeleryTransport

REDIS_URL = os.environ.get("TIDINGS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
HANDLER = "faults.apply"
BLOCK_LIMIT = 60.0
"""The longest a ``"block"`` handler waits for the go key, so no worker waits for ever."""


@register_event
@dataclass(frozen=True)
class FaultEvent(DomainEvent):
    event_type: ClassVar[str] = "celery_faults.fault"
    mode: str = "normal"


class CountingInbox:
    """A :class:`RedisInbox` that counts, per event, the deliveries it refused or skipped.

    It has the inbox's batch capability too, so that workers take the same path as with a
    plain ``RedisInbox`` (``claim_many`` and ``settle``).
    """

    def __init__(self, inner: RedisInbox, client: redis.Redis, prefix: str) -> None:
        self.inner = inner
        self.client = client
        self.prefix = prefix

    @contextmanager
    def guard(self, handler: str, event_id: str) -> Iterator[bool]:
        with ExitStack() as stack:
            try:
                fresh = stack.enter_context(self.inner.guard(handler, event_id))
            except InboxBusyError:
                self.client.incr(f"{self.prefix}:busy:{event_id}")
                raise
            if not fresh:
                self.client.incr(f"{self.prefix}:duplicate:{event_id}")
            yield fresh

    def claim_many(self, pairs: Sequence[tuple[str, str]]) -> list[Claim]:
        claims = self.inner.claim_many(pairs)
        for claim in claims:
            if not claim.fresh:
                kind = "duplicate" if claim.retry_after is None else "busy"
                self.client.incr(f"{self.prefix}:{kind}:{claim.event_id}")
        return claims

    def settle(self, done: Sequence[Claim], failed: Sequence[Claim]) -> None:
        self.inner.settle(done, failed)


def make(
    queue: str,
    prefix: str,
    *,
    broker_url: str = REDIS_URL,
    visibility_timeout: float = 3600.0,
    lease: float = 60.0,
) -> tuple[Celery, EventBus, CeleryTransport, redis.Redis]:
    """Build the service: Celery app, transport with a counting Redis inbox, the handler."""
    client = redis.Redis.from_url(REDIS_URL)
    app = Celery(f"faults-{queue}", broker=broker_url)
    app.conf.update(
        task_default_queue=queue,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        # One message at a time per worker process: a paused or killed worker holds only the
        # message it is running, not others reserved behind it.
        worker_prefetch_multiplier=1,
        broker_transport_options={
            "global_keyprefix": f"{prefix}:broker:",
            "visibility_timeout": visibility_timeout,
            # kombu's Redis transport restores unacknowledged messages older than the
            # visibility timeout only in a worker's periodic sweep (every interval * throttle
            # seconds, 10 * 10 by default) and when a worker starts: sweep every second.
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
        },
    )
    inbox = CountingInbox(RedisInbox(client, prefix=f"{prefix}:inbox", lease=lease), client, prefix)
    assert isinstance(inbox, BatchInbox)  # the workers must take RedisInbox's own path
    transport = CeleryTransport(
        app,
        queue=queue,
        inbox=inbox,
        dead_letters=RedisDeadLetterStore(client, prefix=f"{prefix}:dlq"),
        # Retries must outwait neither the visibility timeout nor the test.
        retry=RetryPolicy(max_attempts=3, initial_delay=0.05, max_delay=0.2),
    )
    bus = EventBus(transport=transport)

    @bus.subscribe(FaultEvent, name=HANDLER)
    def apply(event: FaultEvent) -> None:
        client.set(f"{prefix}:pid:{event.event_id}", os.getpid())
        client.incr(f"{prefix}:started:{event.event_id}")
        if event.mode == "crash":
            os._exit(1)  # a poison pill: the worker process dies without a word
        if event.mode == "block":
            deadline = time.monotonic() + BLOCK_LIMIT
            while not client.exists(f"{prefix}:go") and time.monotonic() < deadline:
                time.sleep(0.02)
        client.incr(f"{prefix}:effect:{event.event_id}")

    return app, bus, transport, client


if os.environ.get("FAULTS_QUEUE"):
    app, bus, transport, _client = make(
        os.environ["FAULTS_QUEUE"],
        os.environ["FAULTS_PREFIX"],
        broker_url=os.environ.get("FAULTS_BROKER_URL", REDIS_URL),
        visibility_timeout=float(os.environ.get("FAULTS_VISIBILITY_TIMEOUT", "3600")),
        lease=float(os.environ.get("FAULTS_LEASE", "60")),
    )
