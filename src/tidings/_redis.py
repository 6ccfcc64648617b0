"""A Redis connection kept by its owner: commands sent at once, replies read when asked.

redis-py's client spends more CPU on each command's bookkeeping (pool, retry, callbacks) than
on the command itself: a client call costs about three times a command sent on a connection
held for good. The inbox, the stream consumers and the Celery worker's acknowledgements, which
send a few commands per event, hold connections of their own and use them through
:class:`OwnConnection`. Imported only by modules that need redis-py.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import redis

__all__ = ["OwnConnection"]


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
