"""The consuming service of the relay-pipe tests: what ``tidings worker`` loads, with the classes.

``tidings worker --app tests.apps.relay_pipe:bus`` imports this module with
``RELAY_PIPE_REDIS`` (the broker's URL) and ``RELAY_PIPE_PREFIX`` (every stream and key of the
test starts with it) set, and finds ``bus``: an :class:`~tidings.EventBus` on a
:class:`RedisStreamsTransport` reading ``{prefix}:stream:<event type>`` as service
``shipping``, whose one handler appends ``<aggregate_id>:<seq>:<event id>`` to the list
``{prefix}:handled``. The ``tidings relay`` of these tests runs where this module cannot be
imported: it forwards the stored envelopes without the class.

The test process imports the module without those variables, for :class:`Shipped` alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

from tidings import DomainEvent, EventBus, register_event


@register_event
@dataclass(frozen=True)
class Shipped(DomainEvent):
    """An event of one aggregate; the outbox keeps order per ``aggregate_id``."""

    event_type: ClassVar[str] = "relay_pipe.shipped"
    aggregate_id: str = ""
    seq: int = 0


if os.environ.get("RELAY_PIPE_REDIS"):
    import redis

    from tidings.deadletter.redis import RedisDeadLetterStore
    from tidings.inbox.redis import RedisInbox
    from tidings.transports.redis_streams import RedisStreamsTransport

    _prefix = os.environ["RELAY_PIPE_PREFIX"]
    _client = redis.Redis.from_url(os.environ["RELAY_PIPE_REDIS"])
    bus = EventBus(
        transport=RedisStreamsTransport(
            _client,
            service="shipping",
            stream_prefix=f"{_prefix}:stream",
            inbox=RedisInbox(_client, prefix=f"{_prefix}:inbox"),
            dead_letters=RedisDeadLetterStore(_client, prefix=f"{_prefix}:dlq"),
            block_ms=100,
        )
    )

    @bus.subscribe(Shipped, name="shipping.record")
    def _record(event: Shipped) -> None:
        _client.rpush(f"{_prefix}:handled", f"{event.aggregate_id}:{event.seq}:{event.event_id}")
