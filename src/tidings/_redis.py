"""A Redis connection kept by its owner: commands sent at once, replies read when asked.

redis-py's client spends more CPU on each command's bookkeeping (pool, retry, callbacks) than
on the command itself: a client call costs about three times a command sent on a connection
held for good. The inbox, the stream consumers and the Celery worker's acknowledgements, which
send a few commands per event, hold connections of their own and use them through
:class:`OwnConnection`.

Publishing must never wait for ever on a Redis server that accepted the connection and then
went silent: :func:`with_timeouts` gives a client whose connections time out, and
:func:`async_twin` the same connection settings for :mod:`redis.asyncio`. Imported only by
modules that need redis-py.
"""

from __future__ import annotations

import inspect
import os
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final

import redis
import redis.asyncio

__all__ = ["SEND_TIMEOUT", "OwnConnection", "async_twin", "with_timeouts"]

SEND_TIMEOUT: Final = 5.0
"""Seconds a publishing connection waits, by default, to connect and for each reply."""

_TIMEOUTS = ("socket_timeout", "socket_connect_timeout")
# Connection classes whose settings are plain values, and their redis.asyncio counterparts.
_ASYNC_CLASSES: dict[type[Any], type[Any]] = {
    redis.Connection: redis.asyncio.Connection,
    redis.SSLConnection: redis.asyncio.SSLConnection,
    redis.UnixDomainSocketConnection: redis.asyncio.UnixDomainSocketConnection,
}
# Settings that hold objects of the sync client (callbacks, retry and notification machinery),
# or are derived by redis-py itself: the async twin makes its own.
_SYNC_ONLY = frozenset(
    {
        "retry",
        "redis_connect_func",
        "maint_notifications_config",
        "maint_notifications_pool_handler",
        "himport_registry",
        "event_dispatcher",
        "parser_class",
        "orig_host_address",
        "orig_socket_timeout",
        "orig_socket_connect_timeout",
    }
)


def _plain_pool(client: redis.Redis) -> redis.ConnectionPool | None:
    """The client's pool if it is a plain one tidings can reproduce, else ``None``."""
    pool = client.connection_pool
    if type(pool) not in (redis.ConnectionPool, redis.BlockingConnectionPool):
        return None  # Sentinel, cluster or a pool of the user's own: used as it is
    if pool.connection_class not in _ASYNC_CLASSES:
        return None
    return pool


def _timed(kwargs: dict[str, Any], timeout: float) -> dict[str, Any]:
    """``kwargs`` with each socket timeout the client left unset (``None``) set to ``timeout``."""
    timed = dict(kwargs)
    for name in _TIMEOUTS:
        if timed.get(name) is None:
            timed[name] = timeout
    return timed


def with_timeouts(client: redis.Redis, timeout: float | None = SEND_TIMEOUT) -> redis.Redis:
    """Return a client on ``client``'s server and settings whose sockets time out.

    Its connect and reply timeouts are ``client``'s own where it set them, else ``timeout``
    seconds (redis-py before 8 waits for ever by default). It has a pool of its own, so a
    consumer's long blocking reads on ``client`` never delay a publish. ``client`` itself is
    returned when ``timeout`` is ``None``, when it already sets both timeouts, or when its
    pool is not a plain ``ConnectionPool`` (Sentinel, cluster): give such a client timeouts
    of its own.
    """
    pool = _plain_pool(client)
    if timeout is None or pool is None:
        return client
    kwargs = pool.connection_kwargs
    if all(kwargs.get(name) is not None for name in _TIMEOUTS):
        return client
    # The new pool derives these (and its notification handler) itself, from its own settings.
    timed = {
        name: value
        for name, value in _timed(kwargs, timeout).items()
        if name not in ("orig_socket_timeout", "orig_socket_connect_timeout")
        and name != "maint_notifications_pool_handler"
    }
    # from_pool: the client owns its pool, so closing the client closes the connections.
    return redis.Redis.from_pool(
        type(pool)(
            connection_class=pool.connection_class, max_connections=pool.max_connections, **timed
        )
    )


def async_twin(
    client: redis.Redis, timeout: float | None = SEND_TIMEOUT
) -> redis.asyncio.Redis | None:
    """Return a :mod:`redis.asyncio` client on ``client``'s server, with its settings.

    Timeouts as :func:`with_timeouts`. The twin belongs to the event loop that first uses it
    (redis.asyncio connections cannot move between loops); close it with ``aclose()``.
    ``None`` when ``client``'s pool cannot be reproduced (see :func:`with_timeouts`).
    """
    pool = _plain_pool(client)
    if pool is None:
        return None
    connection_class = _ASYNC_CLASSES[pool.connection_class]
    accepted = _parameters(connection_class)
    kwargs = {
        name: value
        for name, value in pool.connection_kwargs.items()
        if name in accepted and name not in _SYNC_ONLY
    }
    if timeout is not None:
        kwargs = _timed(kwargs, timeout)
    return redis.asyncio.Redis.from_pool(
        redis.asyncio.ConnectionPool(
            connection_class=connection_class, max_connections=pool.max_connections, **kwargs
        )
    )


def _parameters(connection_class: type[Any]) -> frozenset[str]:
    """The keyword arguments ``connection_class`` and its bases take."""
    names: set[str] = set()
    for cls in connection_class.__mro__:
        init = cls.__dict__.get("__init__")
        if init is not None:
            names.update(inspect.signature(init).parameters)
    return frozenset(names - {"self", "kwargs"})


OnReplies = Callable[[list[Any] | Exception], None]
"""Gets the replies of commands sent by :meth:`OwnConnection.send_later`, or what lost them."""


class OwnConnection:
    """A connection taken from ``client``'s pool and kept until :meth:`close`.

    Commands (tuples of arguments) are packed and sent at once by :meth:`send`; their replies
    are read, in order, by :meth:`receive`. An error reply is returned, not raised; a connection
    that fails is dropped (the next :meth:`send` takes another) and the error raised. In a
    forked child, the connection inherited from the parent is left alone and another is taken.

    Not thread-safe: one owner at a time (keep one per thread).
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._connection: Any = None
        self._pid = 0
        # Commands sent by send_later whose replies are unread, in order: (count, callback).
        self._later: deque[tuple[int, OnReplies]] = deque()

    def send(self, commands: Sequence[tuple[Any, ...]]) -> None:
        """Send ``commands`` at once; their replies wait for :meth:`receive`."""
        if self._connection is None or self._pid != os.getpid():
            self._later.clear()  # owed on a connection this process no longer has
            self._connection, self._pid = self.client.connection_pool.get_connection(), os.getpid()
        try:
            self._connection.send_packed_command(self._connection.pack_commands(commands))
        except BaseException as exc:
            self.drop(exc)
            raise

    def send_later(self, commands: Sequence[tuple[Any, ...]], on_replies: OnReplies) -> None:
        """Send ``commands`` now; ``on_replies`` gets their replies when they are read.

        They are read by the next :meth:`receive` (before that call's own replies) or by
        :meth:`collect`, and handed over as a list (an error reply as its exception). If the
        connection fails before they are read, ``on_replies`` gets that failure instead: the
        commands may or may not have been applied. ``on_replies`` must not raise.

        Raises:
            redis.ConnectionError, redis.TimeoutError: sending failed (nothing was registered).
        """
        self.send(commands)
        self._later.append((len(commands), on_replies))

    def collect(self) -> None:
        """Read the replies of everything sent by :meth:`send_later` so far."""
        if self._later:
            self.receive(0)

    def receive(self, n: int) -> list[Any]:
        """Read the next ``n`` replies; an error reply is returned as its exception.

        Replies owed to :meth:`send_later` come first and go to their callbacks.

        Raises:
            redis.ConnectionError, redis.TimeoutError: the connection failed (it is dropped:
                the replies of everything sent on it are lost).
        """
        try:
            while self._later:
                count, on_replies = self._later[0]
                replies = self._read(count)
                self._later.popleft()
                on_replies(replies)
            return self._read(n)
        except BaseException as exc:
            self.drop(exc)
            raise

    def _read(self, n: int) -> list[Any]:
        replies: list[Any] = []
        for _ in range(n):
            try:
                replies.append(self._connection.read_response())
            except redis.ResponseError as exc:  # the reply was read whole: go on
                replies.append(exc)
        return replies

    def round_trip(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` and return their replies."""
        self.send(commands)
        return self.receive(len(commands))

    def call(self, *command: Any) -> Any:
        """Send one command and return its reply.

        Raises:
            redis.RedisError: the reply is an error, or the connection failed.
        """
        (reply,) = self.round_trip([command])
        if isinstance(reply, Exception):
            raise reply
        return reply

    def drop(self, error: BaseException | None = None) -> None:
        """Close the connection (after an error); the next :meth:`send` takes another.

        The callbacks of replies still owed get ``error`` (or a ``redis.ConnectionError``).
        """
        connection, self._connection = self._connection, None
        owed, self._later = self._later, deque()
        if connection is None or self._pid != os.getpid():
            return
        connection.disconnect()
        self.client.connection_pool.release(connection)
        lost = error if isinstance(error, Exception) else redis.ConnectionError("dropped")
        for _, on_replies in owed:
            on_replies(lost)

    def close(self) -> None:
        """Read the replies still owed, then give the connection back to the pool."""
        if self._connection is not None and self._pid == os.getpid():
            self.collect()
        connection, self._connection = self._connection, None
        if connection is not None and self._pid == os.getpid():
            self.client.connection_pool.release(connection)
