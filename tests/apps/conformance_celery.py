"""The Celery side of the transport conformance suite: the worker app and the publishers' apps.

A worker subprocess runs ``celery -A tests.apps.conformance_celery worker -Q <queue>`` with
``CONFORMANCE_BROKER`` (broker URL), ``CONFORMANCE_REDIS`` (Redis URL of the journal, inbox and
dead letters), ``CONFORMANCE_PREFIX`` (their key prefix), ``CONFORMANCE_SERVICE`` and
``CONFORMANCE_QUEUE`` set; importing the module then builds the service's bus, as a user's
composition root would, with the suite's handlers on it. The test process calls
:func:`make_bus` itself to get publisher buses.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import redis
from celery import Celery

from tidings import EventBus
from tidings.deadletter.redis import RedisDeadLetterStore
from tidings.inbox.redis import RedisInbox
from tidings.testing.transport_handlers import RETRY, install_handlers
from tidings.transports.celery import CeleryTransport

# A claim left by a crashed handler blocks its redelivery this long: keep it short here, where
# handlers take milliseconds.
INBOX_LEASE = 1.5
BATCH_SIZE = 25


class RedisJournal:
    """The suite's journal as Redis lists, one per scope: ``{prefix}:journal:{scope}``."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client, self.prefix = client, prefix

    def append(self, scope: str, entry: str) -> None:
        """Append ``entry`` to the scope's list."""
        self.client.rpush(f"{self.prefix}:journal:{scope}", entry)

    def entries(self, scope: str) -> list[str]:
        """Return the scope's entries in append order."""
        return [raw.decode() for raw in self.client.lrange(f"{self.prefix}:journal:{scope}", 0, -1)]


def make_app(broker_url: str, name: str, queue: str) -> Celery:
    """Return a Celery app on ``broker_url`` whose default queue is ``queue``."""
    app = Celery(name, broker=broker_url)
    app.conf.update(
        task_default_queue=queue,
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_enable_remote_control=False,  # no pidbox queues left behind on the broker
    )
    return app


def make_bus(
    broker_url: str,
    client: redis.Redis,
    prefix: str,
    *,
    queue: str,
    publish_to: Sequence[str],
) -> tuple[EventBus, CeleryTransport]:
    """Return a bus whose transport consumes ``queue`` and publishes to ``publish_to``."""
    transport = CeleryTransport(
        make_app(broker_url, f"conformance-{queue}", queue),
        queue=queue,
        publish_to=publish_to,
        inbox=RedisInbox(client, prefix=f"{prefix}:inbox", lease=INBOX_LEASE),
        dead_letters=RedisDeadLetterStore(client, prefix=f"{prefix}:dlq"),
        retry=RETRY,
        batch_size=BATCH_SIZE,
    )
    return EventBus(transport=transport), transport


if os.environ.get("CONFORMANCE_QUEUE"):
    _queue = os.environ["CONFORMANCE_QUEUE"]
    _prefix = os.environ["CONFORMANCE_PREFIX"]
    _client = redis.Redis.from_url(os.environ["CONFORMANCE_REDIS"])
    bus, transport = make_bus(
        os.environ["CONFORMANCE_BROKER"], _client, _prefix, queue=_queue, publish_to=[_queue]
    )
    install_handlers(bus, RedisJournal(_client, _prefix), service=os.environ["CONFORMANCE_SERVICE"])
    app = transport.app
