"""Ordered partitions of the Redis Streams transport: naming, leases, fenced acknowledgements.

With ``partitions=N`` an event goes to ``{topic stream}:p{crc32(key) % N}``, ``key`` being its
partition key. Each partition stream is read by at most one consumer of a service at a time: the
holder of the lease ``{stream_prefix}:{service}:lease:{partition stream}`` (a key whose value is
the consumer's name, expiring after ``claim_idle``). Every consumer renews its leases on each
turn of its loop, and takes free ones up to its fair share (partitions / live consumers of the
service, counted in the sorted set ``{stream_prefix}:{service}:consumers``), giving back any
above it. A new holder first claims every entry still pending on the partition (whoever held
them: ``XAUTOCLAIM`` with idle 0) and handles them, oldest first, before reading new ones.
Acknowledging is fenced: an entry is acknowledged only if the lease is still this consumer's
(checked and acknowledged atomically, :data:`ACK_IF_HELD`).
"""

from __future__ import annotations

import math
import random
import time
import zlib
from typing import Any, Final

__all__ = ["ACK_IF_HELD", "Leases", "partition_of"]

# KEYS[1] lease, KEYS[2] stream; ARGV[1] consumer, ARGV[2] group, ARGV[3..] ids. Acks or 0.
ACK_IF_HELD: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
return redis.call('XACK', KEYS[2], ARGV[2], unpack(ARGV, 3))
"""

# KEYS[1] lease, KEYS[2] stream; ARGV[1] consumer, ARGV[2] ttl (ms), ARGV[3] group. Takes the
# lease if free and makes every entry pending on the stream the consumer's, without counting a
# delivery (JUSTID), in one step. 1 when taken, 0 when held by someone.
_ACQUIRE: Final = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
local cursor = '0-0'
repeat
  cursor = redis.call('XAUTOCLAIM', KEYS[2], ARGV[3], ARGV[1], 0, cursor, 'COUNT', 100, 'JUSTID')[1]
until cursor == '0-0'
return 1
"""

# KEYS[1] lease; ARGV[1] consumer, ARGV[2] ttl (ms). 1 when renewed, 0 when not ours.
_RENEW: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""

# KEYS[1] lease; ARGV[1] consumer. Deletes it only if it is ours.
_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def partition_of(stream: str, key: str, partitions: int) -> str:
    """Return the partition stream of ``key`` among ``partitions`` partitions of ``stream``."""
    return f"{stream}:p{zlib.crc32(key.encode('utf-8')) % partitions}"


class Leases:
    """The partition leases one consumer holds; see the module docstring."""

    def __init__(self, client: Any, base: str, group: str, name: str, ttl: float) -> None:
        self.redis, self.base, self.group, self.name = client, base, group, name
        self.ttl_ms = max(1, round(ttl * 1000))
        self.held: set[str] = set()
        self.unread: set[str] = set()  # held partitions whose pending entries are still to read
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self.ack_if_held = client.register_script(ACK_IF_HELD)

    def key(self, stream: str) -> str:
        """Return the lease key of a partition stream."""
        return f"{self.base}:lease:{stream}"

    def refresh(self, streams: tuple[str, ...]) -> None:
        """Renew held leases, give back those above the fair share, take free ones up to it."""
        members = f"{self.base}:consumers"
        now = time.time()
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(members, {self.name: now})
            pipe.zremrangebyscore(members, "-inf", now - self.ttl_ms / 1000)
            pipe.zcard(members)
            live = int(pipe.execute()[2])
        share = math.ceil(len(streams) / max(1, live))
        for stream in sorted(self.held):
            if not self.renew(stream):
                self.lost(stream)
        for stream in sorted(self.held)[share:]:
            self.release(stream)
        free = [s for s in streams if s not in self.held]
        random.shuffle(free)
        for stream in free:
            if len(self.held) >= share:
                break
            keys, args = [self.key(stream), stream], [self.name, self.ttl_ms, self.group]
            if self._acquire(keys=keys, args=args):
                self.held.add(stream)
                self.unread.add(stream)

    def renew(self, stream: str) -> bool:
        """Extend the lease of ``stream``; False when it is no longer this consumer's."""
        return bool(self._renew(keys=[self.key(stream)], args=[self.name, self.ttl_ms]))

    def holds(self, stream: str) -> bool:
        """Whether the lease of ``stream`` is still this consumer's (the fencing check)."""
        held: bool = self.redis.get(self.key(stream)) == self.name.encode()
        if not held:
            self.lost(stream)
        return held

    def lost(self, stream: str) -> None:
        """Forget a partition whose lease expired or was taken."""
        self.held.discard(stream)
        self.unread.discard(stream)

    def release(self, stream: str) -> None:
        """Give a partition back (its pending entries, if any, go to the next holder)."""
        self._release(keys=[self.key(stream)], args=[self.name])
        self.lost(stream)

    def release_all(self) -> None:
        """Give every partition back and leave the live consumers (on stop)."""
        for stream in sorted(self.held):
            self.release(stream)
        self.redis.zrem(f"{self.base}:consumers", self.name)
