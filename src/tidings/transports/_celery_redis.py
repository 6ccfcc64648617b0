"""kombu's Redis channel, cheaper: the same Redis writes, less CPU and less waiting.

A Celery worker's main process spends most of its time in kombu's Redis channel: for every
message it records the delivery in the channel's unacknowledged index (``ZADD`` + ``HSET`` in
one ``MULTI``) and waits for Redis's reply, then does the same to remove it on acknowledgement;
and it builds a new ``redis.Redis`` for each of those (about as costly as the round trip it is
for). The publisher builds one for every message too. Two changes, each on channels of kombu's
Redis transport only (a channel with a ``global_keyprefix`` keeps kombu's code: its keys are
rewritten by kombu's client):

- :func:`reuse_redis_clients`: one client per connection pool, made once. A client holds no
  connection of its own, only the pool and its reply callbacks.
- :func:`acknowledge_without_waiting`: the channel's QoS sends the same transactions, in the
  same order, on a connection it keeps, and reads their replies on its next write instead of
  waiting for each. A write is on its way to Redis before the call returns, as before; what
  changes is when its reply is read. A write Redis refused is logged then. Writes a broken
  connection did not confirm are sent again, in order, on a new one before the next write
  (they are idempotent: adding or removing a delivery tag); if that fails too, the write
  raises as kombu's would (its consumer then reconnects) and they wait for the next one.
  Before kombu reads the index itself (a requeue, the restore of unacknowledged messages at
  shutdown or after the visibility timeout), every write is confirmed first. The worker's main
  process then spends about a third less CPU per message, and waits less, for every task.

A third, :func:`refuse_malformed_items`, is about hostile input rather than speed: kombu's
Redis channel parses each item it pops from a queue list as a kombu message, and an item that
is not one (anyone who can ``LPUSH`` can write one) raises inside the worker's event loop and
ends the worker. The consumer's channel hands such an item on as a message of content type
``application/x-tidings-malformed`` instead, which the consumer dead-letters and acknowledges.

A fourth, :func:`close_fetch_window`, is about not losing messages: kombu's channel pops a
message with ``BRPOP`` and records it in the unacknowledged index only once the reply is read,
so a worker killed in between (or paused then killed) loses a message that is then nowhere. The
consumer's channel instead takes a message and records it in one Lua script (nothing blocks in
a script), and waits for the next one with ``BLMOVE key key RIGHT RIGHT``, which blocks until
the list has an item and then puts it back where it was: a waiting worker takes nothing.

A fifth, :func:`restore_promptly`, is about draining: kombu restores the messages of a worker
that died (left unacknowledged past the visibility timeout) in a sweep that its event loop
starts every 10 s but runs one time in 10, so about every 100 s, under a Redis mutex that a
worker killed while holding it keeps for 300 s. A consumer's channel instead sweeps every
``visibility_timeout / 4`` s (between 1 and 10 s) and holds the mutex for at most one
visibility timeout (between 5 and 60 s), unless the app's ``broker_transport_options`` set
those options themselves.

A sixth, :func:`forget_stale_transports`, is about memory: kombu's Redis transport, when it
registers with the event loop, adds a callback to the loop's ``on_tick`` set and five
repeating timers (restore, health checks, re-authentication, binding expiry), and never
removes them; it cancels the timers of the same transport only. And its channel's QoS
registers an exit-time finalizer (restore what is unacknowledged) that only the channel's
``close`` cancels, which does not get that far when the broker is gone (deleting the
channel's fanout queues fails first). A worker that reconnects (its broker restarted, a
network cut) registers a new transport each time, and every old one stayed alive through
them, with its channels, clients, pools and buffers, its timers still firing. The consumer
removes the callbacks, cancels the timers and drops the finalizers of transports no longer its
own before it registers the current one. What an old channel's finalizer would have put back
at exit is in the unacknowledged index, restored by the sweep after the visibility timeout.

Used by the transport (publishing) and by tidings' worker consumer; imported with them.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import suppress
from typing import Any, NamedTuple

from tidings._untrusted import log_safe

__all__ = [
    "acknowledge_without_waiting",
    "check_persistence",
    "close_fetch_window",
    "forget_stale_transports",
    "refuse_malformed_items",
    "restore_options",
    "restore_promptly",
    "reuse_redis_clients",
]

MALFORMED = "application/x-tidings-malformed"
"""The content type of a queue item that is not a kombu message, as handed on to Celery."""

log = logging.getLogger("tidings.celery")

_KOMBU_REDIS = "kombu.transport.redis"


def _is_plain_kombu_redis(channel: Any) -> bool:
    """Whether ``channel`` is kombu's own Redis channel, with keys as named (no prefix)."""
    return type(channel).__module__ == _KOMBU_REDIS and not getattr(channel, "global_keyprefix", "")


def check_persistence(channel: Any, what: str) -> None:
    """Warn once if the Redis behind a kombu Redis channel keeps nothing on disk.

    See :mod:`tidings._redis_persistence`; other channels (AMQP) are left alone. Asks on a
    client of its own (over the channel's pool), never on the channel's fetch connection.
    """
    if type(channel).__module__ != _KOMBU_REDIS:
        return
    import redis  # noqa: PLC0415 - there: kombu's Redis transport made the channel

    from tidings._redis_persistence import warn_if_forgetful  # noqa: PLC0415

    warn_if_forgetful(redis.Redis(connection_pool=channel.client.connection_pool), what)


def restore_options(visibility_timeout: float) -> dict[str, float]:
    """The kombu transport options a worker's channel sweeps its dead peers' messages with.

    ``unacked_restore_interval``: a quarter of ``visibility_timeout``, between 1 and 10 s;
    ``unacked_restore_throttle`` 1 (every sweep runs); ``unacked_mutex_expire``: the
    visibility timeout, between 5 and 60 s. A message a killed worker held is then back in
    its queue at most about ``visibility_timeout`` + the interval after it was taken, or one
    mutex expiry later if the worker died holding the sweep's mutex.
    """
    return {
        "unacked_restore_interval": min(10.0, max(1.0, visibility_timeout / 4)),
        "unacked_restore_throttle": 1,
        "unacked_mutex_expire": min(60.0, max(5.0, visibility_timeout)),
    }


def restore_promptly(channel: Any) -> None:
    """Make a kombu Redis channel, and those made after it, sweep as :func:`restore_options` says.

    An option the connection's transport options set already (the app's
    ``broker_transport_options``) is kept. Call it before the event loop starts (it reads the
    interval then). Other channels are left alone.
    """
    if type(channel).__module__ != _KOMBU_REDIS:
        return
    options = channel.connection.client.transport_options
    for name, value in restore_options(float(channel.visibility_timeout)).items():
        if name not in options:
            options[name] = value  # the event loop's sweep timer, and channels made later
            setattr(channel, name, value)


def forget_stale_transports(hub: Any, current: Any) -> int:
    """Drop what keeps kombu Redis transports other than ``current`` alive; return how many.

    ``current`` is the consumer's kombu transport (``connection.transport``). Call it before
    that transport registers with the loop. For each other transport with a callback in
    ``hub.on_tick``: the callback is removed, the repeating timers of its poller (its
    ``*_tref`` attributes) are cancelled, and its channels' exit-time finalizers are dropped.
    """
    stale: dict[int, Any] = {}
    for tick in list(hub.on_tick):
        if (
            getattr(tick, "__module__", None) != _KOMBU_REDIS
            or getattr(tick, "__name__", None) != "on_poll_start"
        ):
            continue
        held = [_cell_value(cell) for cell in (getattr(tick, "__closure__", None) or ())]
        owners = {id(owner): owner for value in held if (owner := _transport_of(value))}
        if not owners or id(current) in owners:
            continue
        hub.on_tick.discard(tick)
        stale.update(owners)
        for value in held:
            if hasattr(value, "_restore_messages_tref"):  # the transport's poller (its cycle)
                for name, tref in list(vars(value).items()):
                    if name.endswith("_tref") and hasattr(tref, "cancel"):
                        tref.cancel()
                        # A cancelled entry waits in the timer's queue until it is due (up to
                        # 25 s), holding its function: let go of the poller now.
                        with suppress(AttributeError):
                            tref.fun, tref.args, tref.kwargs = _nothing, [], {}
    if stale:
        from multiprocessing import util  # noqa: PLC0415 - where kombu's QoS registers it

        registry = getattr(util, "_finalizer_registry", {})
        for finalizer in list(registry.values()):
            qos = getattr(getattr(finalizer, "_callback", None), "__self__", None)
            channel = getattr(qos, "channel", None)
            if (
                type(qos).__module__ == _KOMBU_REDIS
                and id(getattr(channel, "connection", None)) in stale
            ):
                finalizer.cancel()
    return len(stale)


def _nothing() -> None:
    """What a cancelled timer entry of a dropped transport holds instead of its function."""


def _transport_of(value: Any) -> Any:
    """The kombu Redis transport a bound method held by an ``on_tick`` callback belongs to."""
    owner = getattr(value, "__self__", None)
    return owner if type(owner).__module__ == _KOMBU_REDIS and hasattr(owner, "cycle") else None


def _cell_value(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def reuse_redis_clients(channel: Any) -> None:
    """Make a kombu Redis channel reuse one redis-py client per pool instead of one per command.

    Calling it again for the same channel changes nothing; a channel kombu replaces after a
    connection error is served again by the next call. Other channels are left alone.
    """
    create = getattr(channel, "_create_client", None)
    if create is None or getattr(create, "reuses", False) or not _is_plain_kombu_redis(channel):
        return
    made: dict[bool, Any] = {}

    def reused(asynchronous: bool = False) -> Any:  # kombu calls it so
        client = made.get(asynchronous)
        if client is None:
            client = made[asynchronous] = create(asynchronous=asynchronous)
        return client

    reused.reuses = True  # type: ignore[attr-defined]
    channel._create_client = reused  # the one hook kombu's channel offers


def acknowledge_without_waiting(channel: Any) -> None:
    """Make a kombu Redis channel's QoS send its index writes without waiting for replies.

    See the module docstring for what changes and what does not. Calling it again for the same
    channel changes nothing; other channels are left alone. Thread-safe: one lock orders the
    writes of every thread (kombu acknowledges from pool threads with ``--pool=threads``).
    """
    if not _is_plain_kombu_redis(channel):
        return
    qos = channel.qos
    if isinstance(getattr(qos, "tidings_writes", None), _Writes):
        return
    _Writes(qos).install()


class _Writes:
    """The unacknowledged-index writes of one kombu Redis QoS, their replies read later."""

    def __init__(self, qos: Any) -> None:
        import redis  # noqa: PLC0415 - there: kombu's Redis transport made the qos
        from kombu.transport import virtual  # noqa: PLC0415
        from kombu.utils.json import dumps  # noqa: PLC0415

        from tidings._redis import OwnConnection  # noqa: PLC0415

        self.qos = qos
        self.connection = OwnConnection(qos.channel._create_client())
        self.lock = threading.Lock()
        # kombu's own: the state every QoS keeps, and the JSON its index records are made of.
        self._virtual: Any = virtual.QoS
        self._dumps: Any = dumps
        self._redis_error = redis.RedisError
        # To send: a new write, and those a connection that broke had not confirmed.
        self._unsent: list[_Transaction] = []
        self._kombu_reject = qos.reject
        self._kombu_restore_unacked = qos.restore_unacked
        self._kombu_restore_visible = qos.restore_visible

    def install(self) -> None:
        """Put this object's methods in place of the QoS's own."""
        qos = self.qos
        qos.append, qos.ack, qos.reject = self.append, self.ack, self.reject
        qos.restore_unacked = self._settled_first(self._kombu_restore_unacked)
        qos.restore_visible = self._settled_first(self._kombu_restore_visible)
        qos.tidings_writes = self

    def append(self, message: Any, delivery_tag: str) -> None:
        """Record a delivery in the index (as kombu does), then in the QoS's own state."""
        delivery = message.delivery_info
        record = self._dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        self._send(
            [
                ("ZADD", self.qos.unacked_index_key, time.time(), delivery_tag),
                ("HSET", self.qos.unacked_key, delivery_tag, record),
            ],
            "record a delivery; a worker death before its acknowledgement loses it",
        )
        self._virtual.append(self.qos, message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        """Remove an acknowledged delivery from the index (as kombu does) and from the QoS."""
        self._remove(delivery_tag)
        self._virtual.ack(self.qos, delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        """Reject as kombu does: a requeue reads the index (after what is owed); else an ack."""
        if requeue:
            self.settle()
            self._kombu_reject(delivery_tag, requeue=True)
            return
        self.ack(delivery_tag)  # kombu's own reject without requeue does what ack does

    def settle(self) -> None:
        """Read the replies owed, so that every write sent so far has been applied.

        Raises:
            redis.RedisError: a write could not be sent (it is sent again by the next write).
        """
        with self.lock:
            self._collect()
            if self._unsent:
                self._send_unsent()
                self._collect()

    def _remove(self, delivery_tag: str) -> None:
        self._send(
            [
                ("ZREM", self.qos.unacked_index_key, delivery_tag),
                ("HDEL", self.qos.unacked_key, delivery_tag),
            ],
            "remove an acknowledged delivery; it is delivered again after the visibility timeout",
        )

    def _send(self, commands: Sequence[tuple[Any, ...]], what: str) -> None:
        """Send one transaction, after what a broken connection lost (in order).

        Raises:
            redis.RedisError: it could not be sent (it is sent again by the next write).
        """
        with self.lock:
            self._collect()
            self._unsent.append(_Transaction([("MULTI",), *commands, ("EXEC",)], what))
            self._send_unsent()

    def _collect(self) -> None:
        """Read owed replies; a broken connection hands back what it lost (to ``_unsent``)."""
        try:
            self.connection.collect()
        except self._redis_error as exc:
            log.warning("a Redis connection broke before writes were confirmed: %r", exc)

    def _send_unsent(self) -> None:
        unsent, self._unsent = self._unsent, []
        for index, transaction in enumerate(unsent):
            try:
                self.connection.send_later(
                    transaction.commands, functools.partial(self._replied, transaction)
                )
            except self._redis_error:
                # Those just sent came back to _unsent as lost, in order: the rest follow.
                self._unsent.extend(unsent[index:])
                raise

    def _replied(self, transaction: _Transaction, replies: list[Any] | Exception) -> None:
        if isinstance(replies, Exception):  # the connection broke: send it again
            self._unsent.append(transaction)
            return
        # An error queuing a command, or EXEC's own (its reply lists each command's result).
        flat = [
            item for reply in replies for item in (reply if isinstance(reply, list) else [reply])
        ]
        error = next((item for item in flat if isinstance(item, Exception)), None)
        if error is not None:
            log.error("Redis refused to %s: %r", transaction.what, error)

    def _settled_first(self, read: Callable[..., Any]) -> Callable[..., Any]:
        def settled_first(*args: Any, **kwargs: Any) -> Any:
            self.settle()
            return read(*args, **kwargs)

        return settled_first


class _Transaction(NamedTuple):
    """One ``MULTI`` … ``EXEC`` of index writes, and what it does (for the log)."""

    commands: list[tuple[Any, ...]]
    what: str


def refuse_malformed_items(channel: Any) -> None:
    """Make a kombu Redis channel hand on a queue item that is not a kombu message, wrapped.

    The wrapper is a well-formed message of content type :data:`MALFORMED`, no task header, the
    item itself as its body and the reason in its ``tidings_malformed`` header: Celery's
    consumer finds it undecodable, and tidings' consumer dead-letters it. Applies to the items
    the channel's event loop pops (``BRPOP``); calling it again changes nothing; other channels
    are left alone.
    """
    if not _is_plain_kombu_redis(channel):
        return
    client = channel.client
    parse = client.parse_response
    if getattr(parse, "tidings_checks", False):
        return

    def parse_response(connection: Any, command: str, **options: Any) -> Any:
        reply = parse(connection, command, **options)
        if command == "BRPOP" and reply:
            key, item = reply
            problem = _malformed(item)
            if problem is not None:
                queue = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
                queue = queue.rsplit(channel.sep, 1)[0]
                reply = [key, _wrapped(item, queue, problem)]
        return reply

    parse_response.tidings_checks = True  # type: ignore[attr-defined]
    client.parse_response = parse_response


def _malformed(item: Any) -> str | None:
    """Why a queue item is not a message kombu's Redis channel can take, or ``None``."""
    try:
        payload = json.loads(item)
    except (ValueError, TypeError) as exc:
        return f"not JSON: {type(exc).__name__}"
    if not isinstance(payload, dict) or not isinstance(payload.get("properties"), dict):
        return "not a map with properties"
    properties = payload["properties"]
    delivery = properties.get("delivery_info")
    if not isinstance(properties.get("delivery_tag"), str) or not (
        isinstance(delivery, dict) and "exchange" in delivery and "routing_key" in delivery
    ):
        return "no delivery tag or delivery info"
    if not all(
        isinstance(payload.get(key), expected)
        for key, expected in (
            ("headers", dict | None),
            ("content-type", str | None),
            ("content-encoding", str | None),
            ("body", str | None),
        )
    ):
        return "headers, content type, encoding or body of the wrong type"
    if properties.get("body_encoding") == "base64":
        try:
            base64.b64decode(payload.get("body") or "", validate=True)
        except (binascii.Error, ValueError):
            return "a body that is not base64"
    return None


def _wrapped(item: Any, queue: str, problem: str, tag: str | None = None) -> bytes:
    """The well-formed message standing for a malformed item (under ``tag`` if recorded)."""
    raw = item if isinstance(item, bytes) else str(item).encode("utf-8", "replace")
    message = {
        "body": base64.b64encode(raw).decode("ascii"),
        "content-type": MALFORMED,
        "content-encoding": "binary",
        "headers": {"tidings_malformed": f"the queue item is not a kombu message: {problem}"},
        "properties": {
            "body_encoding": "base64",
            "delivery_tag": tag or str(uuid.uuid4()),
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
        },
    }
    return json.dumps(message).encode()


# Takes the oldest item of the first non-empty queue list (kombu's order: KEYS[3:]) and records
# it in kombu's unacknowledged hash (KEYS[1]) and index (KEYS[2], scored ARGV[1]) in the same
# step. The record is written before the item leaves its list: a write Redis refuses (out of
# memory) ends the script with the item still queued, since a script's writes are not undone.
# An item without a delivery tag and delivery info is taken unrecorded (the consumer
# dead-letters it); the record is kombu's own: the JSON array [message, exchange, routing key].
_FETCH = """
for i = 3, #KEYS do
  local item = redis.call('LINDEX', KEYS[i], -1)
  if item then
    local ok, payload = pcall(cjson.decode, item)
    local tag, exchange, routing_key
    if ok and type(payload) == 'table' and type(payload['properties']) == 'table' then
      local properties = payload['properties']
      tag = properties['delivery_tag']
      local info = properties['delivery_info']
      if type(info) == 'table' then
        exchange = info['exchange']
        routing_key = info['routing_key']
      end
    end
    if type(tag) == 'string' and type(exchange) == 'string'
        and type(routing_key) == 'string' then
      redis.call('ZADD', KEYS[2], ARGV[1], tag)
      redis.call('HSET', KEYS[1], tag, '[' .. item .. ',' .. cjson.encode(exchange) .. ','
        .. cjson.encode(routing_key) .. ']')
      redis.call('RPOP', KEYS[i])
      return {KEYS[i], item, tag}
    end
    redis.call('RPOP', KEYS[i])
    return {KEYS[i], item}
  end
end
return false
"""

_WAIT_ONE_QUEUE = 1.0
"""The longest wait (s) of an idle channel consuming one queue before it looks again."""
_WAIT_SEVERAL_QUEUES = 0.2
"""The same for several queues: the wait watches one list, the others are looked at so often."""
_PAUSE = 1.0
"""How long a channel whose fetch Redis refused waits before it tries again (s)."""


def close_fetch_window(channel: Any) -> None:
    """Make a kombu Redis channel take and record each message in one server-side step.

    kombu's channel pops with ``BRPOP`` and records the message in its unacknowledged index
    once it has read the reply: a worker killed in between loses the message. Instead, the
    channel's event loop sends a Lua script that moves the oldest item of the first non-empty
    queue (kombu's order: priorities, then its queue cycle) into the unacknowledged hash and
    index at once, scored with the worker's clock as kombu scores it; kombu's own
    acknowledgement, reject, requeue and restore (after ``visibility_timeout``) then apply to
    it unchanged, and its QoS does not write the record again. With nothing to take, the
    channel waits with ``BLMOVE key key RIGHT RIGHT`` on the list it last took from (at most
    :data:`_WAIT_ONE_QUEUE` s, :data:`_WAIT_SEVERAL_QUEUES` s with several queues), which
    takes nothing: a worker killed while waiting leaves the queue as it was.

    Needs Redis 6.2 (``BLMOVE``) and ``EVAL``: where Redis does not know or allow either
    (older, renamed, an ACL), the channel logs a warning and goes back to kombu's ``BRPOP``;
    where it refuses the script otherwise (out of memory, say), the channel logs it and looks
    again after at most :data:`_PAUSE` s. Applies to kombu's Redis channels (with or
    without ``global_keyprefix``); calling it again changes nothing; others are left alone.
    """
    if type(channel).__module__ != _KOMBU_REDIS:
        return
    if isinstance(getattr(channel, "tidings_fetch", None), _Fetch):
        return
    _Fetch(channel).install()


class _Fetch:
    """The event-loop fetch of one kombu Redis channel: take-and-record, then wait."""

    def __init__(self, channel: Any) -> None:
        from kombu.transport import virtual  # noqa: PLC0415 - kombu made the channel
        from kombu.utils.json import loads  # noqa: PLC0415

        self.channel = channel
        self.prefix = str(getattr(channel, "global_keyprefix", "") or "")
        self._virtual_append: Any = virtual.QoS.append
        self._loads: Any = loads
        self._kombu_poll_error = channel._poll_error
        self._kombu_append: Any = None  # the QoS's append before install
        self.sent: str | None = None  # "fetch", "wait" or "pause": the reply being awaited
        self.next = "fetch"
        self.last_key: str | None = None  # the list the last message came from (unprefixed)
        self.recorded: set[str] = set()  # delivery tags the script recorded, not yet appended
        self._refusals = 0

    def install(self) -> None:
        """Put this object's methods in place of the channel's fetch and its QoS's append."""
        channel = self.channel
        channel._brpop_start = self.start
        channel._brpop_read = self.read
        channel.handlers["BRPOP"] = self.read
        channel._poll_error = self.poll_error
        qos = channel.qos
        self._kombu_append = qos.append
        qos.append = self._append(qos.append)
        channel.tidings_fetch = self

    def uninstall(self) -> None:
        """Give the channel back kombu's own fetch (``BRPOP``) and its QoS its append."""
        channel = self.channel
        for name in ("_brpop_start", "_brpop_read", "_poll_error"):
            channel.__dict__.pop(name, None)
        channel.handlers["BRPOP"] = channel._brpop_read
        channel.qos.append = self._kombu_append

    def start(self, timeout: float | None = None) -> None:
        """Send the next step (kombu calls it with no reply awaited and credit to consume)."""
        channel = self.channel
        if timeout is None:
            timeout = channel.brpop_timeout
        queues = channel._queue_cycle.consume(len(channel.active_queues))
        if not queues:
            return
        keys = [
            channel._q_for_pri(queue, pri) for pri in channel.priority_steps for queue in queues
        ]
        step, self.next = self.next, "fetch"
        bound = _WAIT_ONE_QUEUE if len(queues) == 1 else _WAIT_SEVERAL_QUEUES
        wait = min(float(timeout), bound) if timeout else bound
        p = self.prefix
        if step == "wait":
            key = p + (self.last_key if self.last_key in keys and self.last_key else keys[0])
            command: list[Any] = ["BLMOVE", key, key, "RIGHT", "RIGHT", wait]
        elif step == "pause":
            # BLPOP on a list nothing writes: the server waits, the channel does not spin.
            # At most kombu's own BRPOP timeout, which its health check of the connection allows.
            pause = min(_PAUSE, float(timeout)) if timeout else _PAUSE
            command = ["BLPOP", f"{p}_tidings.fetch.pause.{uuid.uuid4().hex}", pause]
        else:
            qos = channel.qos
            names = [p + qos.unacked_key, p + qos.unacked_index_key, *(p + key for key in keys)]
            command = ["EVAL", _FETCH, len(names), *names, repr(time.time())]
        connection = channel.client.connection
        channel._in_poll = connection
        channel._brpop_sent_at = time.monotonic()
        self.sent = step
        connection.send_command(*command)

    def read(self, **options: Any) -> bool:
        """Read the reply of the step sent: deliver a message, or raise ``Empty``."""
        from kombu.transport.virtual import Empty  # noqa: PLC0415

        channel = self.channel
        client = channel.client
        step = self.sent
        try:
            try:
                reply = client.parse_response(client.connection, "EVAL", **options)
            except channel.connection_errors:
                client.connection.disconnect()  # as kombu's: the next poll reconnects
                raise
            except channel.ResponseError as exc:
                if _unavailable(exc):
                    self._fall_back(step, exc)
                else:
                    self._refused(step, exc)
                raise Empty() from exc
            if step != "fetch" or not reply:
                if step == "fetch":
                    self.next = "wait"
                raise Empty()
            self._refusals = 0
            key = _text(reply[0])[len(self.prefix) :]
            tag = _text(reply[2]) if len(reply) > 2 else None
            self._deliver(key, reply[1], tag)
            return True
        finally:
            channel._in_poll = None
            self.sent = None
            flush = getattr(channel, "_flush_brpop_reauth", None)
            if flush is not None:
                flush()

    def poll_error(self, kind: str, **options: Any) -> Any:
        """An error event on a socket: for the fetch's, read (and deliver) what it holds."""
        if kind == "BRPOP" and self.sent is not None:
            return self.read(**options)
        return self._kombu_poll_error(kind, **options)

    def _deliver(self, key: str, item: Any, tag: str | None) -> None:
        channel = self.channel
        queue = key.rsplit(channel.sep, 1)[0]
        self.last_key = key
        channel._queue_cycle.rotate(queue)
        problem = _malformed(item)
        if problem is not None:
            # Under the recorded tag, if any: its acknowledgement removes the record.
            item = _wrapped(item, queue, problem, tag)
        if tag is not None:
            self.recorded.add(tag)
        try:
            channel.connection._deliver(self._loads(_text(item)), queue)
        finally:
            if tag is not None:
                self.recorded.discard(tag)

    def _fall_back(self, step: str | None, exc: Exception) -> None:
        """Redis has no EVAL or BLMOVE for this client (old, renamed, or denied by its ACL)."""
        self.uninstall()
        log.warning(
            "Redis refused the worker's %s (%s): the worker fetches with kombu's BRPOP instead, "
            "and a worker killed while it fetches may lose a message (needs EVAL and BLMOVE, "
            "Redis 6.2)",
            "wait (BLMOVE)" if step == "wait" else "fetch script (EVAL)",
            log_safe(repr(exc)),
        )

    def _refused(self, step: str | None, exc: Exception) -> None:
        self.next = "pause"
        self._refusals += 1
        if self._refusals == 1 or self._refusals % 60 == 0:
            log.error(
                "Redis refused the worker's %s (%d times in a row; looking again every %.0f s): %s",
                step or "fetch",
                self._refusals,
                _PAUSE,
                log_safe(repr(exc)),
            )

    def _append(self, append: Callable[[Any, str], None]) -> Callable[[Any, str], None]:
        def recorded_first(message: Any, delivery_tag: str) -> None:
            if delivery_tag in self.recorded:
                # The fetch script recorded it in Redis already: only the QoS's own state.
                self.recorded.discard(delivery_tag)
                self._virtual_append(self.channel.qos, message, delivery_tag)
                return
            append(message, delivery_tag)

        return recorded_first


def _unavailable(exc: Exception) -> bool:
    """Whether a Redis error says the command does not exist or is not allowed."""
    text = str(exc).lower()
    return "unknown command" in text or text.startswith("noperm") or "no permissions" in text


def _text(value: Any) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)
