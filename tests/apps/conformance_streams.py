"""The Redis Streams side of the transport conformance suite: the worker's composition root.

A worker subprocess runs ``tidings worker --app tests.apps.conformance_streams:bus`` with
``CONFORMANCE_REDIS`` (Redis URL of streams, journal, inbox and dead letters),
``CONFORMANCE_PREFIX`` (their key prefix) and ``CONFORMANCE_SERVICE`` set; importing the module
then builds the service's bus, as a user's composition root would, with the suite's handlers on
it. The test process calls :func:`make_bus` itself to get publisher buses.
"""

from __future__ import annotations

import os
from typing import Any

import redis
from tests.apps.conformance_celery import RedisJournal

from tidings import EventBus
from tidings.deadletter.redis import RedisDeadLetterStore
from tidings.inbox.redis import RedisInbox
from tidings.testing.transport_handlers import RETRY, install_handlers
from tidings.transports.redis_streams import RedisStreamsTransport

# A crashed consumer's entries are reclaimed after CLAIM_IDLE; its inbox claim expires after
# INBOX_LEASE. Both short here, where handlers take milliseconds.
CLAIM_IDLE = 1.0
INBOX_LEASE = 1.5

__all__ = ["CLAIM_IDLE", "INBOX_LEASE", "RedisJournal", "make_bus"]


def make_bus(
    client: redis.Redis,
    prefix: str,
    *,
    service: str,
    transport_class: type[RedisStreamsTransport] = RedisStreamsTransport,
    **options: Any,
) -> tuple[EventBus, RedisStreamsTransport]:
    """Return a bus whose Redis Streams transport uses keys under ``prefix``."""
    settings: dict[str, Any] = {
        "stream_prefix": f"{prefix}:stream",
        "inbox": RedisInbox(client, prefix=f"{prefix}:inbox", lease=INBOX_LEASE),
        "dead_letters": RedisDeadLetterStore(client, prefix=f"{prefix}:dlq"),
        "retry": RETRY,
        "block_ms": 200,
        "count": 25,
        "claim_idle": CLAIM_IDLE,
        **options,
    }
    transport = transport_class(client, service=service, **settings)
    return EventBus(transport=transport), transport


if os.environ.get("CONFORMANCE_SERVICE"):
    _prefix = os.environ["CONFORMANCE_PREFIX"]
    _client = redis.Redis.from_url(os.environ["CONFORMANCE_REDIS"])
    bus, transport = make_bus(_client, _prefix, service=os.environ["CONFORMANCE_SERVICE"])
    install_handlers(bus, RedisJournal(_client, _prefix), service=os.environ["CONFORMANCE_SERVICE"])
