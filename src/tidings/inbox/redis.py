"""A Redis inbox: ``SET NX`` with a lease claims a (handler, source, event id), a marker its end.

Where the guarantee holds: the done marker is written *after* the handler returned, in a
separate step from whatever the handler did. An effect outside Redis (a database write, an
e-mail, an HTTP call) therefore happens at least once, and once unless the worker dies (or Redis
becomes unreachable) between the effect and the mark, or the handler outlives its ``lease``.
When the handler's writes live in a SQL database, :mod:`tidings.inbox.sql` makes them exactly
once instead.

Keys are ``{prefix}:{handler}:s{n}:{source}:{event_id}``, readable in ``redis-cli``: ``n`` is
the length of the source (the CloudEvents ``source`` of the producer), so that a source or an
event id containing ``:`` can never spell another pair's key. An event id reused by another
producer is therefore not a duplicate. A handler name should not contain ``:`` (names derived
by :class:`~tidings.EventBus` never do). A handler name, source or event id longer than 128
characters is not embedded: its SHA-256 is, marked ``~sha256~`` (see
:mod:`tidings.inbox._keys`), so that a value from a message cannot make a key of its size.

Keys written before sources were part of them (tidings 0.x: ``{prefix}:{handler}:{event_id}``)
keep working: with ``legacy_keys`` (the default) a claim whose pair has a done mark under the
old key is answered "already done", in the same script (no extra round trip), so an upgrade
repeats no effect. Old marks expire after ``keep``; after one ``keep`` since the upgrade,
``legacy_keys=False`` saves that lookup. A caller that names no source (``source=None``) uses
the old key itself.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

try:
    import redis
except ImportError as exc:
    msg = "tidings.inbox.redis needs redis-py: pip install 'tidings[redis]'"
    raise ImportError(msg) from exc

from tidings._ids import new_event_id
from tidings._redis import OwnConnection
from tidings._untrusted import log_safe
from tidings.errors import InboxBusyError
from tidings.inbox._keys import bounded
from tidings.ports import Claim, ClaimPair

__all__ = ["CommandQueue", "RedisInbox"]

log = logging.getLogger("tidings.inbox")

_DONE = "done"

# Claim: 1 = claimed now, 0 = already done, -1 = held by someone else (with its PTTL in ms).
# One script so that "not claimable" and "why" are read in the same instant.
# KEYS[2], when given, is the pair's key of the old layout: done there means done.
_CLAIM = """
if KEYS[2] and redis.call('GET', KEYS[2]) == ARGV[3] then return {0, 0} end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1, 0} end
if redis.call('GET', KEYS[1]) == ARGV[3] then return {0, 0} end
return {-1, redis.call('PTTL', KEYS[1])}
"""

# Mark done only over our own claim, or over nothing (our lease lapsed and nobody took it):
# 1 = marked, 2 = marked after our lease lapsed, 3 = someone else already marked it,
# 0 = someone else holds it now (left alone: they will mark it themselves).
_MARK = """
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) return 1 end
if not held then redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) return 2 end
if held == ARGV[2] then return 3 end
return 0
"""

# Claim many keys: per key 1 = claimed now, 0 = already done, -1 - PTTL = held by someone else.
# The first ARGV[4] keys are claimed; the rest, when present, are their keys of the old layout
# (in the same order): done there means done.
_CLAIM_MANY = """
local out, n = {}, tonumber(ARGV[4])
local legacy = #KEYS > n
for i = 1, n do
  local key = KEYS[i]
  if legacy and redis.call('GET', KEYS[n + i]) == ARGV[3] then
    out[i] = 0
  elseif redis.call('SET', key, ARGV[1], 'NX', 'PX', ARGV[2]) then
    out[i] = 1
  elseif redis.call('GET', key) == ARGV[3] then
    out[i] = 0
  else
    out[i] = -1 - math.max(redis.call('PTTL', key), 0)
  end
end
return out
"""

# Settle: the first ARGV[4] keys are done (marked over our claim or over nothing), the rest
# failed (released if still ours). Returns how many done keys had lapsed to someone else.
# A done key costs one call: SET ... GET marks it and says what it held; in the rare case that
# was another worker's claim, the claim is put back (with a full lease: it can only be longer
# than what was left of it), so that a done mark never lands on someone else's live claim.
_SETTLE = """
local done, lapsed = tonumber(ARGV[4]), 0
for i, key in ipairs(KEYS) do
  if i <= done then
    local held = redis.call('SET', key, ARGV[2], 'PX', ARGV[3], 'GET')
    if held and held ~= ARGV[1] and held ~= ARGV[2] then
      redis.call('SET', key, held, 'PX', ARGV[5])
      lapsed = lapsed + 1
    end
  elseif redis.call('GET', key) == ARGV[1] then
    redis.call('DEL', key)
  end
end
return lapsed
"""

# Release only our own claim: 1 = released, 0 = it was no longer ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class CommandQueue(Protocol):
    """Where :meth:`RedisInbox.claim_on` and :meth:`RedisInbox.settle_on` queue a command.

    A redis-py pipeline is one; so is any batch of commands its owner sends in one round trip
    and whose replies it hands back in order.
    """

    def eval(self, script: str, numkeys: int, *keys_and_args: Any) -> Any:
        """Queue ``EVAL script numkeys keys... args...``."""


def _split(pair: Sequence[str | None]) -> tuple[str, str, str | None]:
    """A claimed pair's (handler, event_id, source): ``source`` is ``None`` for a 2-tuple."""
    handler, event_id = str(pair[0]), str(pair[1])
    return handler, event_id, pair[2] if len(pair) > 2 else None


class RedisInbox:
    """An :class:`~tidings.ports.Inbox` in Redis: effects outside Redis happen at least once.

    Args:
        client: a redis-py client; its connection pool lends the connections (some of which
            the instance keeps, see below).
        prefix: the first part of every key, to keep applications apart.
        lease: seconds a claim lasts; a worker that dies holding one blocks the pair this long.
            Choose it longer than the slowest handler: past it another worker may run the
            effect again (the late finisher then logs a warning and leaves that claim alone).
        keep: seconds the done marker lasts; a redelivery after that runs the effect again,
            so choose it longer than the broker's redelivery window.
        legacy_keys: also honour done marks written under the key of earlier versions,
            ``{prefix}:{handler}:{event_id}`` (see the module docstring); turn it off once
            ``keep`` has passed since the upgrade.

    Contract (see :class:`~tidings.ports.Inbox`): a second guard of a pair that is claimed
    raises :class:`~tidings.errors.InboxBusyError` whose ``retry_after`` is the claim's
    remaining lease. Nothing is retried here: a Redis error while claiming propagates (deliver
    again later). The done mark is sent before :meth:`guard` returns, and its reply is read on
    that connection's next use rather than waited for (a round trip less per event; a later
    :meth:`is_done` in the same thread sees it): a connection that fails while sending it
    raises, a mark Redis refuses is logged as an error, and either way the claim then expires
    after ``lease``. A handler that ran for half its lease or more waits for its mark's reply,
    to warn at once if the claim lapsed. Thread-safe and process-safe: every decision is one
    atomic Lua script.
    :meth:`guard` sends its two commands on connections the instance keeps from the client's
    pool, lent to one call at a time (a third of the CPU of a client call; no more connections
    than calls in flight, whatever the threads or greenlets; a forked child opens its own).
    Creating an instance does not contact Redis.
    """

    by_source = True
    """Keys tell producers apart: the worker passes each event's ``source`` (see ports)."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = "tidings:inbox",
        lease: float = 60.0,
        keep: float = 7 * 24 * 3600,
        legacy_keys: bool = True,
    ) -> None:
        if lease <= 0 or keep <= 0:
            msg = f"lease and keep must be positive seconds, got lease={lease!r}, keep={keep!r}"
            raise ValueError(msg)
        self.client = client
        self.prefix = prefix
        self.lease = lease
        self.keep = keep
        self.legacy_keys = legacy_keys
        self._lease_ms = max(1, round(lease * 1000))
        self._keep_ms = max(1, round(keep * 1000))
        # Kept connections, lent to one call at a time: never more than the calls in flight.
        self._idle: list[OwnConnection] = []
        self._idle_lock = threading.Lock()
        self._release = client.register_script(_RELEASE)

    @contextmanager
    def _lent(self) -> Iterator[OwnConnection]:
        """Lend a kept connection to one call (a new one when every kept one is lent)."""
        with self._idle_lock:
            own = self._idle.pop() if self._idle else OwnConnection(self.client)
        try:
            yield own
        finally:
            with self._idle_lock:
                self._idle.append(own)

    def _call(self, *command: Any) -> Any:
        """Send one command on a kept connection (a third of a client call's CPU).

        Raises:
            redis.RedisError: the reply is an error, or the connection failed.
        """
        with self._lent() as own:
            return own.call(*command)

    def key(self, handler: str, event_id: str, source: str | None = None) -> str:
        """Return the Redis key of (handler, source, event_id).

        ``{prefix}:{handler}:s{len(source)}:{source}:{event_id}``; with ``source=None``, the
        key of earlier versions, ``{prefix}:{handler}:{event_id}``. A part longer than 128
        characters is replaced by its marked SHA-256 (see the module docstring): a key never
        embeds an unbounded value.
        """
        if source is None:
            return f"{self.prefix}:{bounded(handler)}:{bounded(event_id)}"
        source = bounded(source)
        return f"{self.prefix}:{bounded(handler)}:s{len(source)}:{source}:{bounded(event_id)}"

    def _keys(self, handler: str, event_id: str, source: str | None) -> tuple[str, ...]:
        """The pair's key, then its key of the old layout when that one is to be honoured."""
        key = self.key(handler, event_id, source)
        if source is None or not self.legacy_keys:
            return (key,)
        return key, self.key(handler, event_id)

    @contextmanager
    def guard(self, handler: str, event_id: str, source: str | None = None) -> Iterator[bool]:
        """Claim (handler, source, event_id); see :class:`~tidings.ports.Inbox` and the class.

        ``source`` is the producer's CloudEvents ``source`` (the worker passes it); ``None``
        claims the key of earlier versions, (handler, event_id).

        Raises:
            InboxBusyError: another worker holds an unexpired claim on the pair.
            redis.RedisError: Redis could not be reached or refused the script.
        """
        keys = self._keys(handler, event_id, source)
        key = keys[0]
        token = new_event_id()  # never equal to _DONE
        status, pttl = self._call("EVAL", _CLAIM, len(keys), *keys, token, self._lease_ms, _DONE)
        if status == 0:
            yield False
            return
        if status < 0:
            # PTTL is 0 in the claim's last millisecond, -1 for a key set without expiry.
            retry_after = max(pttl, 1) / 1000 if pttl >= 0 else self.lease
            msg = (
                f"{log_safe(handler)} is already handling event {log_safe(event_id)} in another "
                f"worker; deliver it again in {retry_after:.1f} s"
            )
            raise InboxBusyError(msg, retry_after=retry_after)
        started = time.monotonic()
        try:
            yield True
        except BaseException:
            self._give_back(key, token)
            raise
        mark = ("EVAL", _MARK, 1, key, token, _DONE, self._keep_ms)
        if time.monotonic() - started < self.lease / 2:
            # The claim is surely still ours: send the mark now, read its reply on the
            # connection's next use (a round trip less to wait for, per event).
            with self._lent() as own:
                own.send_later([mark], functools.partial(self._marked, handler, event_id))
        else:
            # The claim may have lapsed: wait for the verdict, to warn now.
            self._report_mark(handler, event_id, self._call(*mark))

    def _marked(self, handler: str, event_id: str, replies: list[Any] | Exception) -> None:
        """Report the reply to a mark sent earlier, or the failure that lost it."""
        self._report_mark(
            handler, event_id, replies if isinstance(replies, Exception) else replies[0]
        )

    def _report_mark(self, handler: str, event_id: str, outcome: Any) -> None:
        """Log what a done mark found, unless it found its own claim."""
        if outcome == 1:
            return
        if isinstance(outcome, Exception):
            log.error(
                "%s on event %s may not be marked done (%r); if not, its claim expires after "
                "the lease",
                log_safe(handler),
                log_safe(event_id),
                log_safe(outcome),
            )
            return
        log.warning(
            "%s on event %s outlived its %.1f s inbox lease (%s); raise RedisInbox(lease=)",
            log_safe(handler),
            log_safe(event_id),
            self.lease,
            {
                0: "another worker holds the claim now and may repeat the effect; left alone",
                2: "nobody took the claim over; marked done",
                3: "another worker ran the effect again and marked it done",
            }.get(outcome, f"unexpected mark outcome {outcome}"),
        )

    def claim_many(self, pairs: Sequence[ClaimPair]) -> list[Claim]:
        """Claim many pairs in one script call (:class:`~tidings.ports.BatchInbox`).

        A pair is (handler, event_id) or (handler, event_id, source), as for :meth:`guard`.

        All claims of one call share a token and the same lease: choose ``lease`` longer than
        the whole batch takes to handle.
        """
        if not pairs:
            return []
        with self.client.pipeline(transaction=False) as pipe:
            token = self.claim_on(pipe, pairs)
            (answers,) = pipe.execute()
        return self.claimed(pairs, answers, token)

    def claim_on(self, queue: CommandQueue, pairs: Sequence[ClaimPair]) -> str:
        """Queue what :meth:`claim_many` does on ``queue``, bound for this inbox's Redis.

        For a caller that claims in the same round trip as commands of its own (the Redis
        Streams consumer reads its next batch so). Returns the claims' token: pass it, with
        the one reply, to :meth:`claimed`.
        """
        token = new_event_id()
        split = [_split(pair) for pair in pairs]
        keys = [self.key(*pair) for pair in split]
        if self.legacy_keys and any(source is not None for _, _, source in split):
            keys += [self.key(handler, event_id) for handler, event_id, _ in split]
        # EVAL, not EVALSHA: a pipeline cannot load a script a restarted Redis lost.
        queue.eval(_CLAIM_MANY, len(keys), *keys, token, self._lease_ms, _DONE, len(pairs))
        return token

    def claimed(self, pairs: Sequence[ClaimPair], reply: object, token: str) -> list[Claim]:
        """Turn the reply to :meth:`claim_on` into one :class:`~tidings.ports.Claim` per pair.

        Raises:
            redis.RedisError: the reply is an error (nothing was claimed).
        """
        if isinstance(reply, Exception):
            raise reply
        assert isinstance(reply, list)  # noqa: S101 - the script answers a list
        # Per pair: 1 = claimed now, 0 = already done, -1 - PTTL = held by someone else.
        return [
            Claim(handler, event_id, status == 1, _retry_after(status), token, source)
            for (handler, event_id, source), status in zip(
                (_split(pair) for pair in pairs), reply, strict=True
            )
        ]

    def settle(self, done: Sequence[Claim], failed: Sequence[Claim]) -> None:
        """Mark ``done`` claims done and release ``failed`` ones, in one round trip."""
        with self.client.pipeline(transaction=False) as pipe:
            if self.settle_on(pipe, done, failed):
                self.settled(pipe.execute())

    def settle_on(self, queue: CommandQueue, done: Sequence[Claim], failed: Sequence[Claim]) -> int:
        """Queue what :meth:`settle` does on ``queue``, bound for this inbox's Redis.

        For a caller that settles in the same round trip as its own commands (the Redis
        Streams consumer acknowledges its batch so). Returns how many commands were queued:
        pass their replies, in order, to :meth:`settled`.
        """
        tokens = {claim.token for claim in (*done, *failed)}
        for token in tokens:
            mine_done = [c for c in done if c.token == token]
            mine_failed = [c for c in failed if c.token == token]
            keys = [self.key(c.handler, c.event_id, c.source) for c in (*mine_done, *mine_failed)]
            # EVAL, not EVALSHA: a pipeline cannot load a script a restarted Redis lost.
            queue.eval(
                _SETTLE,
                len(keys),
                *keys,
                token,
                _DONE,
                self._keep_ms,
                len(mine_done),
                self._lease_ms,
            )
        return len(tokens)

    def settled(self, replies: Sequence[Any]) -> None:
        """Report claims that lapsed to another worker, from the replies of :meth:`settle_on`.

        Raises:
            redis.RedisError: a reply is an error (the claims then expire after ``lease``).
        """
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        lapsed = sum(int(reply) for reply in replies)
        if lapsed:
            log.warning(
                "%d inbox claim(s) lapsed to another worker before their handlers finished "
                "(lease %.1f s); that worker may repeat the effect: raise RedisInbox(lease=)",
                lapsed,
                self.lease,
            )

    def is_done(self, handler: str, event_id: str, source: str | None = None) -> bool:
        """Whether (handler, source, event_id) is marked done (and its marker has not expired).

        With ``legacy_keys``, a done mark under the pair's key of earlier versions counts.

        Reads the replies owed on the instance's idle connections first, so that a guard's
        mark, in the same thread, is seen once the guard returned.
        """
        # Marks whose replies are unread have reached Redis but may not be processed yet:
        # read those replies first (a lent connection's borrower reads them itself).
        with self._idle_lock:
            kept, self._idle = self._idle, []
        try:
            for own in kept:
                with contextlib.suppress(redis.RedisError):  # the GET below is the answer
                    own.collect()
        finally:
            with self._idle_lock:
                self._idle.extend(kept)
        values = self.client.mget(self._keys(handler, event_id, source))
        return any(value in (_DONE, _DONE.encode()) for value in values)

    def _give_back(self, key: str, token: str) -> None:
        """Release our claim after a failure, without hiding the failure if Redis is down."""
        try:
            released = int(self._release(keys=[key], args=[token]))
        except redis.RedisError as exc:
            log.warning(
                "could not release inbox claim %s (%s); it expires by itself",
                log_safe(key),
                log_safe(exc),
            )
            return
        if not released:
            log.warning("inbox claim %s had expired before its handler failed", log_safe(key))


def _retry_after(status: int) -> float | None:
    """Seconds until a busy pair's claim lapses (from its claim status), else ``None``."""
    return None if status >= 0 else max(-1 - status, 1) / 1000
