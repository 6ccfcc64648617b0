"""The publishing connections of a Redis Streams transport: never waiting for ever, never a hop.

A transport is given one redis-py client, which its consumers also use for blocking reads
(so its socket timeout, if any, is long). Publishing goes through clients of its own, made
from that client's settings (:func:`tidings._redis.with_timeouts`): a sync one whose sockets
time out after ``send_timeout`` seconds unless the client set its own timeouts, and for
``asend`` one :mod:`redis.asyncio` twin per event loop (its connections cannot move between
loops), so an ``async def`` view publishes on the loop itself, without a thread. Redis that
accepts connections and never answers makes a publish fail after the timeout instead of
holding a thread, or a request, for ever. Concurrent publishers each take a connection from
the pool: no lock is held while one waits on Redis.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from typing import Any

import redis
import redis.asyncio

from tidings._redis import async_twin, with_timeouts

__all__ = ["Senders"]

log = logging.getLogger("tidings.redis_streams")


class Senders:
    """The publishing clients made from one transport's client, made when first needed.

    ``script`` is the Lua source every publish runs. Thread-safe; the async twins are kept
    per event loop and forgotten with their loop.
    """

    def __init__(self, script: str, timeout: float | None) -> None:
        self.script = script
        self.timeout = timeout
        self._lock = threading.Lock()
        self._sync: tuple[redis.Redis, redis.Redis] | None = None  # (source client, sender)
        self._async: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[redis.Redis, redis.asyncio.Redis, Any]
        ] = weakref.WeakKeyDictionary()

    def sync(self, client: redis.Redis) -> redis.Redis:
        """The client publishing with ``client``'s settings and timeouts (see the module)."""
        made = self._sync
        if made is not None and made[0] is client:
            return made[1]
        with self._lock:
            if self._sync is None or self._sync[0] is not client:
                self._sync = (client, with_timeouts(client, self.timeout))
            return self._sync[1]

    def for_loop(self, client: redis.Redis) -> tuple[redis.asyncio.Redis, Any] | None:
        """The running loop's async client and its publishing script, or ``None``.

        ``None`` when ``client``'s pool cannot be reproduced for :mod:`redis.asyncio`
        (Sentinel, cluster): the caller publishes through :meth:`sync` in a thread.
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            made = self._async.get(loop)
            if made is not None and made[0] is client:
                return made[1], made[2]
            twin = async_twin(client, self.timeout)
            if twin is None:
                return None
            made = (client, twin, twin.register_script(self.script))
            self._async[loop] = made
            return made[1], made[2]

    async def open(self, client: redis.Redis) -> None:
        """Connect the running loop's async client now; a failure is logged, not raised.

        A web app whose Redis is down at start still starts (and serves what needs no
        publishing); each publish then connects again, and raises if Redis is still away.
        """
        made = self.for_loop(client)
        if made is None:
            return
        try:
            await made[0].ping()
        except (redis.RedisError, OSError) as exc:
            log.warning(
                "Redis did not answer at start (%s); publishing will connect again on each send",
                type(exc).__name__,
            )

    def close(self) -> None:
        """Close the idle connections of the sync publishing client (a later send reopens)."""
        made = self._sync
        if made is not None and made[1] is not made[0]:
            made[1].connection_pool.disconnect(inuse_connections=False)

    async def aclose(self) -> None:
        """Close the running loop's async client, and the sync one's idle connections."""
        with self._lock:
            made = self._async.pop(asyncio.get_running_loop(), None)
        if made is not None:
            await made[1].aclose()
        self.close()
