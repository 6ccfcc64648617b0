"""A service for the hostile-input tests of the Celery transport, on Redis or RabbitMQ.

Worker subprocesses start as ``celery -A tests.apps.celery_hostile worker -Q <queue>`` with:

- ``HOSTILE_QUEUE``: the queue (required; without it nothing is built on import).
- ``HOSTILE_PREFIX``: the first part of every Redis key of the test (dead letters, effects).
- ``HOSTILE_BROKER_URL``: the broker (default: the test Redis).

Dead letters and effects always live on the test Redis. Per handled event the handler appends
``<event id>|<pid>`` to ``{prefix}:effects``, so the test sees which process ran it. While the
key ``{prefix}:store-down`` exists the dead-letter store refuses every letter, as a store that
is down would (the test of bounded infrastructure retries).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import redis
from celery import Celery
from tests.apps.hostile_events import Priced

from tidings import DomainEvent, EventBus, register_event
from tidings.deadletter.redis import RedisDeadLetterStore
from tidings.ports import DeadLetter
from tidings.transports.celery import CeleryTransport

REDIS_URL = os.environ.get("TIDINGS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
HANDLER = "hostile.record"
MAX_INFRASTRUCTURE_RETRIES = 2


@register_event
@dataclass(frozen=True)
class Probe(DomainEvent):
    """A valid event, published after each hostile message to show the worker goes on."""

    event_type: ClassVar[str] = "celery_hostile.probe"
    label: str = ""


class SwitchableStore(RedisDeadLetterStore):
    """A Redis dead-letter store that fails while ``{prefix}:store-down`` exists."""

    def __init__(self, client: redis.Redis, *, prefix: str, switch: str) -> None:
        super().__init__(client, prefix=prefix)
        self.switch = switch
        self.client = client

    def add(self, letter: DeadLetter) -> None:
        """Store ``letter``, or raise redis-py's ``ConnectionError`` while the switch exists.

        redis-py's, as a store on its own Redis would: not one of an AMQP broker's
        connection errors.
        """
        if self.client.exists(self.switch):
            self.client.incr(self.switch + ":refused")
            msg = "the dead-letter store is down (test switch)"
            raise redis.ConnectionError(msg)
        super().add(letter)


def make(
    queue: str, prefix: str, *, broker_url: str = REDIS_URL
) -> tuple[Celery, EventBus, CeleryTransport, redis.Redis]:
    """Build the service: Celery app, transport with a Redis dead-letter store, the handler."""
    client = redis.Redis.from_url(REDIS_URL)
    app = Celery(f"hostile-{queue}", broker=broker_url)
    app.conf.update(
        task_default_queue=queue,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_prefetch_multiplier=1,
    )
    transport = CeleryTransport(
        app,
        queue=queue,
        dead_letters=SwitchableStore(client, prefix=f"{prefix}:dlq", switch=f"{prefix}:store-down"),
        inbox=None,
        max_infrastructure_retries=MAX_INFRASTRUCTURE_RETRIES,
    )
    bus = EventBus(transport=transport)

    def record(event: DomainEvent) -> None:
        client.rpush(f"{prefix}:effects", f"{event.event_id}|{os.getpid()}")

    bus.add_handler(record, Probe, Priced, name=HANDLER)

    return app, bus, transport, client


if os.environ.get("HOSTILE_QUEUE"):
    app, bus, transport, _client = make(
        os.environ["HOSTILE_QUEUE"],
        os.environ["HOSTILE_PREFIX"],
        broker_url=os.environ.get("HOSTILE_BROKER_URL", REDIS_URL),
    )
