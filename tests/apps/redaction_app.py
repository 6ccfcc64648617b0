"""A bus on a Redis Streams transport, for the redaction tests of ``tidings worker``."""

import redis

from tidings import EventBus
from tidings.memory import MemoryDeadLetterStore
from tidings.transports.redis_streams import RedisStreamsTransport

bus = EventBus(
    transport=RedisStreamsTransport(
        redis.Redis.from_url("redis://127.0.0.1:1/0"),
        service="redaction",
        dead_letters=MemoryDeadLetterStore(),
    )
)
