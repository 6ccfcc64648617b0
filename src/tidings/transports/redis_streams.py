"""``RedisStreamsTransport``: events as Redis stream entries, consumed by groups, once in effect.

**Layout.** Each event goes to one stream, ``{stream_prefix}:{route(event class)}``; by default
the route is the event type, so there is a stream per type. An entry has one field,
``envelope``: the CloudEvents JSON bytes (see :mod:`tidings.codec`), which carry the type, the id
and the context ids, readable as they are in ``redis-cli``. With ``entry_headers=True`` entries
also repeat them as fields of their own, for tools that route or filter on fields:
``tidings_event_type``, ``tidings_event_id``, ``tidings_correlation_id``,
``tidings_causation_id`` and ``tidings_tenant_id`` (when set). That is off by default because
it costs about half the throughput end to end (measured: publishing, Redis and the worker each
do about twice the work per entry), and workers never trust those fields anyway: the envelope
is decoded and validated, and the other fields are read only to dead-letter an entry.

**Publishing** sends a whole ``publish`` call to Redis as one script call (up to
:data:`~tidings.transports._streams_scripts.PUBLISH_CHUNK` entries each): one round trip, and the
entries of one call are added without any other client's entry in between. It goes through
connections of its own, made from ``client``'s settings, that time out after ``send_timeout``
seconds (5 by default) where ``client`` sets no timeouts, so a Redis that accepts connections
and never answers fails a publish instead of holding it for ever; ``EventBus.apublish`` uses
:meth:`RedisStreamsTransport.asend`, on :mod:`redis.asyncio`, with no thread (see
:mod:`tidings.transports._streams_publish`).

**Services and workers.** Every consuming service has one consumer group per stream, named
after the service, so each service receives every event, and the workers of a service share the
load (each worker thread is a consumer of its own). A group is created at the start of the
stream (id ``0``), so events published before a service's first worker started are not missed.

**At least once, effect once.** A worker reads up to ``count`` entries at once
(``XREADGROUP ... BLOCK block_ms``), hands them to the :class:`~tidings.delivery.Dispatcher`
(decode → inbox → handler, with retries and dead letters: the same rules as the Celery
transport), and acknowledges them with ``XACK`` only after every handler succeeded, was
scheduled for a retry, or was dead-lettered, and the batch's inbox claims were settled. A worker
that dies keeps its entries pending; after ``claim_idle`` seconds any worker of the service
reclaims them (``XAUTOCLAIM``). An entry delivered more than ``max_deliveries`` times (its
handler kills the worker, say) is dead-lettered and acknowledged.

**One round trip per batch.** While a batch's handlers run, Redis works on what the consumer
sent just before, in one go: the previous batch's settling and acknowledgement, the next
batch's inbox claims and a read of the batch after it (which waits in the consumer, pending,
meanwhile). So a worker holds up to two batches besides the one running; on stop it handles
them before it leaves. This needs an inbox on the transport's own Redis client (the
:class:`~tidings.inbox.redis.RedisInbox` built on the same ``client``); any other inbox makes its
own calls, in their own round trips.

**Retries.** A failed handler is tried again alone: the redelivery (envelope, handler, attempt)
waits in the sorted set ``{stream_prefix}:{service}:retry``, scored by its due time, and when due
is moved atomically into the service's own stream ``{stream_prefix}:{service}:redeliver``, which
only that service's group reads. The original entry is acknowledged after the redelivery was
stored. (Not so on ordered partitions: there a failed handler is retried in place.)

**Trimming** is never done on publish; see :mod:`tidings.transports._streams_scripts` for how
:meth:`RedisStreamsTransport.trim` (run by workers every ``trim_interval``) keeps every entry
some group still needs. By default (``maxlen=DEFAULT_MAXLEN``, 100,000) a stream keeps its
newest 100,000 entries and, beyond them, only entries some group has not read or not
acknowledged: a slow or stopped group keeps what it has not read, however many that is (a
group never created keeps nothing: create services' groups before publishing to them, as a
worker's first start does). ``maxlen=None`` never trims.

**Hostile entries.** Anyone who can ``XADD`` to a stream chooses an entry's fields. Workers
trust none of them: the envelope is decoded under the codec's limits, counters
(``tidings_attempt``, ``tidings_deliveries``) must be ASCII digits (an entry whose counters are
not is dead-lettered, saying so), a redelivery copies only the fields tidings defines (each cut
at 256 characters), the retry mover sets aside what it cannot move for consumers to
dead-letter, and nothing read from an entry reaches a log line unescaped. Every entry ends
handled, retried (boundedly), without subscriber, or dead-lettered with its reason.

**Ordering.** By default, entries of one stream are handled in stream order by one consumer;
with several consumers (``concurrency`` > 1, or several workers) they overlap, and a retried
handler runs later, so nothing is ordered.

**Per-key order, when asked for** (``partitions=N`` with ``partition_key``). Each event goes to
the partition stream ``{stream_prefix}:{topic}:p{crc32(key) % N}`` of its key, and each
partition stream is read by one consumer of a service at a time, the holder of its lease (see
:mod:`tidings.transports._streams_partitions`), which handles its entries one by one. The
guarantee: *within one service, for events of one key and one topic published in order (one
publish returned before the next began, or in one ``publish`` call), each handler of the
service runs on an event only after its run on every earlier one succeeded or was
dead-lettered*; this holds across a consumer crash (the next holder first handles the entries
left pending, oldest first) and across failures: a failing handler on a partition is retried
in place (not through the retry set), blocking its partition, until it succeeds or is
dead-lettered (meanwhile the waiting consumer gives its other partitions back, for other
consumers to go on with). Delivery stays at least once: with the inbox, effects are once.

What is **not** ordered: events of different keys or of different topics (even with one key);
events published concurrently; different services relative to each other; a dead-lettered
event relative to the rest (its replay goes to the service's redelivery stream, unordered).
Keys that hash to the same partition share its order, so a failing event also holds back
those keys, and a poison entry (one killing its worker) holds its partition until it is
dead-lettered after ``max_deliveries``.

**Fencing, and the window left.** Leases expire after ``claim_idle`` and are renewed on every
turn of a consumer's loop (and while it waits to retry). A holder checks its lease before each
entry and acknowledges only while it still holds it (checked and acknowledged atomically), so
a consumer that lost its partition stops handling it. What this cannot stop is a consumer paused
(GC, swap, SIGSTOP) or simply slow past ``claim_idle`` *inside* a handler: the next holder may
run the following events while that call is still going. The inbox narrows this: the new
holder's run of the same (handler, event) waits for the old claim (retried in place), so order
can break only if the call also outlasts the inbox's lease. Keep handlers well under
``claim_idle``. Publishers and workers must agree on ``partitions`` and ``partition_key``;
changing ``partitions`` remaps keys, so drain the streams first. Without ``partitions``
nothing of this applies and the transport behaves as described above.
"""

from __future__ import annotations

import asyncio
import operator
import threading
from collections.abc import Callable, Sequence

try:
    import redis
except ImportError as exc:  # pragma: no cover - depends on the environment
    msg = "the Redis Streams transport needs redis-py: pip install 'tidings[redis]'"
    raise ImportError(msg) from exc

from tidings._redis import SEND_TIMEOUT
from tidings._redis_persistence import warn_if_forgetful
from tidings.bus import EventBus, Handler
from tidings.codec import Codec, default_codec
from tidings.delivery import Dispatcher
from tidings.errors import PublishError, UsageError
from tidings.events import DomainEvent
from tidings.ports import (
    DeadLetter,
    DeadLetterStore,
    EnvelopeRefusedError,
    Inbox,
    StoredEnvelope,
)
from tidings.retry import RetryPolicy
from tidings.transports._defaults import DEFAULT, Default, redis_dead_letters, redis_inbox
from tidings.transports._streams_partitions import partition_of
from tidings.transports._streams_publish import Senders
from tidings.transports._streams_run import run_consumers, run_until_signalled
from tidings.transports._streams_scripts import (
    PUBLISH,
    PUBLISH_CHUNK,
    PUBLISH_FIELDS,
    SAFE_TRIM,
    TRIM_MOST,
)
from tidings.transports._streams_worker import (
    ATTEMPT,
    ENVELOPE,
    GROUP,
    HANDLER,
    Streams,
)

__all__ = ["DEFAULT_MAXLEN", "RedisStreamsTransport"]

DEFAULT_MAXLEN = 100_000
"""Entries a stream keeps at least, beyond those a group still needs; older ones are trimmed."""

Route = Callable[[type[DomainEvent]], str]
PartitionKey = Callable[[DomainEvent], object]


def _by_event_type(cls: type[DomainEvent]) -> str:
    return cls.event_type


class RedisStreamsTransport:
    """Publishes events to Redis streams and runs a service's handlers on them.

    Args:
        client: a redis-py client returning bytes (``decode_responses=False``), or a
            ``redis://`` / ``rediss://`` URL to make one from; its socket timeout, if any,
            must be longer than ``block_ms``.
        service: the consuming service: its consumer group on every stream, and its name in the
            retry keys. Publishers need it only to replay dead letters.
        dead_letters: where failures and undecodable entries end (nothing is dropped). Left
            out: a :class:`~tidings.deadletter.redis.RedisDeadLetterStore` on ``client``,
            prefix ``tidings:dlq:{service}``.
        inbox: the idempotency guard every (handler, event) passes. Left out: a
            :class:`~tidings.inbox.redis.RedisInbox` on ``client``, prefix
            ``tidings:inbox:{service}`` (on the same client, its claims travel with the
            reads). ``inbox=None`` is the explicit opt-out: handlers run unguarded
            (at-least-once effects).
        codec: encodes and decodes envelopes (the default codec if omitted).
        retry: the policy of handlers without their own.
        stream_prefix: the first part of every stream and key name.
        route: event class → topic; the stream is ``{stream_prefix}:{topic}``. Defaults to the
            event type: a stream per type. Publishers and workers must use the same route.
        block_ms: longest wait of one read for new entries; also bounds how long a stop takes.
        count: most entries read, handled and acknowledged as one batch.
        claim_idle: seconds an entry stays pending with a silent consumer before another
            consumer of the service reclaims it; choose it longer than the slowest batch.
        max_deliveries: deliveries of one entry after which it is dead-lettered instead.
        maxlen: workers trim every stream they read to about this many entries every
            ``trim_interval`` seconds, never dropping one a group still needs (default
            :data:`DEFAULT_MAXLEN`; ``None`` never trims: streams then grow without bound).
        trim_interval: seconds between two trims of a worker.
        partitions: when set, order events per key (see "Per-key order" in the module
            docstring): each topic is split into this many partition streams.
        partition_key: event → key (its ``str`` is hashed), or the name of the event attribute
            holding it (an aggregate id, say); required with ``partitions``.
        entry_headers: also write the event's type, id and context ids as entry fields of their
            own, besides the envelope (see "Layout" in the module docstring).
        send_timeout: seconds a publish waits to connect and for Redis's reply where
            ``client`` sets no timeout of its own (``None``: as ``client`` does).

    Thread-safe for publishing. Creating it contacts nothing; ``EventBus(transport=...)`` binds
    it, and :meth:`run` (or ``tidings worker``) consumes.
    """

    name = "redis-streams"

    def __init__(
        self,
        client: redis.Redis | str,
        *,
        service: str,
        dead_letters: DeadLetterStore | Default = DEFAULT,
        inbox: Inbox | Default | None = DEFAULT,
        codec: Codec | None = None,
        retry: RetryPolicy | None = None,
        stream_prefix: str = "tidings:stream",
        route: Route | None = None,
        block_ms: int = 2000,
        count: int = 100,
        claim_idle: float = 30.0,
        max_deliveries: int = 5,
        maxlen: int | None = DEFAULT_MAXLEN,
        trim_interval: float = 10.0,
        partitions: int | None = None,
        partition_key: PartitionKey | str | None = None,
        entry_headers: bool = False,
        send_timeout: float | None = SEND_TIMEOUT,
    ) -> None:
        problems = []
        if not service or ":" in service:
            problems.append("service must be a non-empty name without ':'")
        if block_ms < 1 or count < 1 or max_deliveries < 1:
            problems.append("block_ms, count and max_deliveries must be >= 1")
        if claim_idle <= 0 or trim_interval <= 0:
            problems.append("claim_idle and trim_interval must be positive seconds")
        if maxlen is not None and maxlen < 1:
            problems.append("maxlen must be >= 1 (or None: never trim)")
        if partitions is not None and (partitions < 1 or partition_key is None):
            problems.append("partitions must be >= 1 and come with a partition_key")
        if partitions is not None and claim_idle * 1000 <= 2 * block_ms:
            problems.append("with partitions, claim_idle (the lease) must exceed 2 * block_ms")
        if send_timeout is not None and send_timeout <= 0:
            problems.append("send_timeout must be positive seconds (or None)")
        if problems:
            msg = "invalid RedisStreamsTransport: " + "; ".join(problems)
            raise ValueError(msg)
        if isinstance(client, str):
            client = redis.Redis.from_url(client)
        self.client = client
        self.service = service
        self.dead_letters = (
            redis_dead_letters(client, service)
            if isinstance(dead_letters, Default)
            else dead_letters
        )
        self.inbox = redis_inbox(client, service) if isinstance(inbox, Default) else inbox
        self.codec = default_codec if codec is None else codec
        self.retry = RetryPolicy() if retry is None else retry
        self.stream_prefix = stream_prefix
        self.route: Route = _by_event_type if route is None else route
        self.block_ms = block_ms
        self.count = count
        self.claim_idle = claim_idle
        self.max_deliveries = max_deliveries
        self.maxlen = maxlen
        self.trim_interval = trim_interval
        self.partitions = partitions
        self._partition_attribute = partition_key if isinstance(partition_key, str) else None
        self.partition_key: PartitionKey | None = (
            operator.attrgetter(partition_key) if isinstance(partition_key, str) else partition_key
        )
        self.entry_headers = entry_headers
        self._bus: EventBus | None = None
        self._dispatcher: Dispatcher | None = None
        self._trim = client.register_script(SAFE_TRIM)
        self._publish = client.register_script(PUBLISH_FIELDS if entry_headers else PUBLISH)
        self._senders = Senders(PUBLISH_FIELDS if entry_headers else PUBLISH, send_timeout)

    # -- wiring -----------------------------------------------------------------------------

    def bind(self, bus: EventBus) -> None:
        """Attach the bus whose handlers this service's workers run (once)."""
        if self._bus is not None:
            msg = "a RedisStreamsTransport serves one EventBus; make one transport per bus"
            raise UsageError(msg)
        self._bus = bus
        self._dispatcher = Dispatcher.serving(bus, self)

    def subscribed(self, handler: Handler) -> None:
        """Accept any handler: retries wait in Redis, so no delay is too long for the broker."""

    def stream(self, event_class: type[DomainEvent]) -> str:
        """Return the stream events of ``event_class`` are published to."""
        return f"{self.stream_prefix}:{self.route(event_class)}"

    def stream_of(self, event: DomainEvent) -> str:
        """Return the stream ``event`` is published to: its partition's, with ``partitions``."""
        stream = self.stream(type(event))
        if self.partitions is None or self.partition_key is None:
            return stream
        return partition_of(stream, str(self.partition_key(event)), self.partitions)

    def streams(self, service: str | None = None) -> Streams:
        """Return the keys a worker of ``service`` (default: this transport's) reads and uses.

        The topic streams are those of every registered event class that one of the bus's
        handlers receives (a handler of a base class receives its registered subclasses).
        """
        service = self.service if service is None else service
        topics: dict[str, None] = {}
        if self._bus is not None:
            registry = self.codec.registry
            for event_type in registry:
                cls = registry.get(event_type)
                if cls is not None and self._bus.handlers_for(cls):
                    topics[self.stream(cls)] = None
        base = f"{self.stream_prefix}:{service}"
        ordered: tuple[str, ...] = ()
        if self.partitions is not None:
            ordered = tuple(f"{t}:p{n}" for t in topics for n in range(self.partitions))
            topics = {}
        return Streams(
            group=service,
            topics=tuple(topics),
            redeliver=f"{base}:redeliver",
            retry=f"{base}:retry",
            ordered=ordered,
        )

    # -- publishing -------------------------------------------------------------------------

    def send(self, events: Sequence[DomainEvent]) -> None:
        """Encode every event first (nothing is sent if one fails), then add them all.

        Each chunk of up to ``PUBLISH_CHUNK`` entries is added by one script call: one round
        trip, no other client's entry in between. Thread-safe: concurrent sends use
        connections of their own. Each waits at most ``send_timeout`` to connect and for
        each reply.

        Raises:
            EventEncodeError: an event cannot be encoded; nothing was sent.
            PublishError: Redis refused or could not be reached; earlier chunks, and entries
                before a failing one, may have been added (send again: the inbox makes
                duplicates harmless).
        """
        entries = [(self.stream_of(event), self._entry(event)) for event in events]
        self._add(entries, "event(s)")

    def send_envelopes(self, envelopes: Sequence[StoredEnvelope]) -> None:
        """Add stored envelopes, unchanged, to the streams ``send`` would add their events to.

        The stream is the envelope's ``type`` under ``stream_prefix``; with ``partitions``, the
        partition of the value of the ``partition_key`` attribute, read from the envelope's
        ``data`` (a dotted name walks nested objects; ``event_id``, ``correlation_id``,
        ``causation_id`` and ``tenant_id`` are the envelope's own). Same chunks, same
        guarantees as :meth:`send`.

        Raises:
            UsageError: a custom ``route`` or a ``partition_key`` function: those need the
                event classes (checked by ``send_envelopes([])``, at start-up).
            EnvelopeRefusedError: an envelope has no usable partition key value; nothing sent.
            PublishError: Redis refused or could not be reached (send again).
        """
        if self.route is not _by_event_type or (
            self.partitions is not None and self._partition_attribute is None
        ):
            msg = (
                "this RedisStreamsTransport routes with a function of the event (a custom route, "
                "or partition_key given as a function), so it needs the event classes: relay "
                "through the decoding path (Relay with a publish function) or pass partition_key "
                "as an attribute name"
            )
            raise UsageError(msg)
        entries: list[tuple[str, tuple[bytes | str | int, ...]]] = []
        for index, envelope in enumerate(envelopes):
            stream = f"{self.stream_prefix}:{envelope.event_type}"
            if self.partitions is not None and self._partition_attribute is not None:
                key = _stored_key(envelope, self._partition_attribute)
                if key is None:
                    reason = (
                        f"its data has no plain value at {self._partition_attribute!r}, the "
                        "partition key"
                    )
                    raise EnvelopeRefusedError(index, reason)
                stream = partition_of(stream, key, self.partitions)
            if self.entry_headers:
                headers = _stored_headers(envelope)
                entries.append((stream, (len(headers) + 2, ENVELOPE, envelope.body, *headers)))
            else:
                entries.append((stream, (envelope.body,)))
        self._add(entries, "envelope(s)")

    def _add(self, entries: Sequence[tuple[str, tuple[bytes | str | int, ...]]], what: str) -> None:
        """Add ``entries`` (stream, script arguments) in chunks, one script call each."""
        warn_if_forgetful(self.client, "the Redis Streams transport, publishing")
        sender = self._senders.sync(self.client)
        try:
            for first in range(0, len(entries), PUBLISH_CHUNK):
                chunk = entries[first : first + PUBLISH_CHUNK]
                args = [value for _, entry in chunk for value in entry]
                self._publish(keys=[stream for stream, _ in chunk], args=args, client=sender)
        except redis.RedisError as exc:
            raise PublishError(_not_accepted(len(entries), what, exc)) from exc

    async def asend(self, events: Sequence[DomainEvent]) -> None:
        """Like :meth:`send`, on the running event loop through :mod:`redis.asyncio`.

        ``EventBus.apublish`` calls it: no thread is used, and concurrent calls each take a
        connection of their own. Cancelling it (a timeout) drops the connection it was using;
        the entries may or may not have been added. A ``client`` whose pool cannot be
        reproduced for :mod:`redis.asyncio` (Sentinel, cluster) is used through :meth:`send`
        in a thread instead.

        Raises:
            EventEncodeError: an event cannot be encoded; nothing was sent.
            PublishError: as :meth:`send`.
        """
        entries = [(self.stream_of(event), self._entry(event)) for event in events]
        made = self._senders.for_loop(self.client)
        if made is None:
            await asyncio.to_thread(self.send, events)
            return
        client, script = made
        try:
            for first in range(0, len(entries), PUBLISH_CHUNK):
                chunk = entries[first : first + PUBLISH_CHUNK]
                args = [value for _, entry in chunk for value in entry]
                await script(keys=[stream for stream, _ in chunk], args=args, client=client)
        except redis.RedisError as exc:
            raise PublishError(_not_accepted(len(entries), "event(s)", exc)) from exc

    async def aopen(self) -> None:
        """Connect the running loop's publishing client now (an ASGI app's start-up).

        Redis being away is logged, not raised: the app starts, and each publish connects
        again (see :func:`tidings.integrations.asgi.lifespan`).
        """
        await self._senders.open(self.client)

    async def aclose(self) -> None:
        """Close the running loop's publishing client, then as :meth:`close`."""
        await self._senders.aclose()
        self.close()

    def _entry(self, event: DomainEvent) -> tuple[bytes | str | int, ...]:
        """The publishing script's arguments for one entry (see ``_streams_scripts``)."""
        if not self.entry_headers:
            return (self.codec.encode(event),)
        headers = _headers(event)
        return (len(headers) + 2, ENVELOPE, self.codec.encode(event), *headers)

    def replay(self, letter: DeadLetter) -> None:
        """Send a dead letter back to the service that dead-lettered it, and to no other.

        It goes to that service's redelivery stream (from the letter's ``tidings_group``
        header, else this transport's service), to ``letter.handler`` only when one is named,
        as attempt 1. ``letter.destination`` names the stream it was first read from.
        """
        service = letter.headers.get(GROUP) or self.service
        fields: dict[str, bytes | str] = {ENVELOPE: letter.body}
        if letter.handler:
            fields[HANDLER], fields[ATTEMPT] = letter.handler, "1"
        self.client.xadd(self.streams(service).redeliver, fields)  # type: ignore[arg-type]

    def close(self) -> None:
        """Close the client's idle pooled connections; a later send opens new ones.

        Connections in use (a consumer blocked in a read, say) are left alone; so are the
        async publishing clients (closed by :meth:`aclose`, on their loop).
        """
        self._senders.close()
        self.client.connection_pool.disconnect(inuse_connections=False)

    # -- working ----------------------------------------------------------------------------

    def trim(self, stream: str) -> int:
        """Trim ``stream`` to about ``maxlen`` entries, keeping every entry a group needs.

        Returns how many entries were removed (0 when ``maxlen`` is ``None``).
        """
        if self.maxlen is None:
            return 0
        return int(self._trim(keys=[stream], args=[self.maxlen, TRIM_MOST], client=self.client))

    def run(self, stop: threading.Event | None = None, *, concurrency: int = 1) -> None:
        """Consume with ``concurrency`` consumer threads until ``stop`` is set.

        Each thread is a consumer of the service's group on every stream of :meth:`streams`;
        on stop each reads no more, and handles and acknowledges the batches it holds (up to
        two: see "One round trip per batch" in the module docstring). Redis being unreachable
        never ends the run: consumers retry with bounded exponential backoff.

        Raises:
            UsageError: the transport is not bound to a bus, or the bus has no handlers.
        """
        dispatcher = self._dispatcher
        if dispatcher is None:
            msg = "create the EventBus with this transport before running a worker"
            raise UsageError(msg)
        streams = self.streams()
        if not streams.topics and not streams.ordered:
            msg = "the bus has no handlers of registered events: nothing to consume"
            raise UsageError(msg)
        if concurrency < 1:
            msg = "concurrency must be >= 1"
            raise ValueError(msg)
        warn_if_forgetful(self.client, "the Redis Streams transport, from a worker")
        run_consumers(self, dispatcher, streams, stop, concurrency)

    def run_forever(self, *, concurrency: int = 1) -> None:
        """Like :meth:`run`, stopping gracefully on SIGTERM or SIGINT (from the main thread)."""
        run_until_signalled(lambda stop: self.run(stop, concurrency=concurrency))


def _headers(event: DomainEvent) -> list[str]:
    """The event's type, id and context ids as entry fields (``entry_headers=True``)."""
    fields = ["tidings_event_type", event.event_type, "tidings_event_id", event.event_id]
    for name in ("correlation_id", "causation_id", "tenant_id"):
        value = getattr(event, name)
        if value is not None:
            fields += (f"tidings_{name}", value)
    return fields


_ENVELOPE_KEYS = ("event_id", "correlation_id", "causation_id", "tenant_id")


def _stored_key(envelope: StoredEnvelope, attribute: str) -> str | None:
    """The partition key ``str(getattr(event, attribute))`` would give, read from the envelope.

    ``None`` when the value is missing or not a plain scalar (a nested object's ``str`` is not
    the same as its JSON form).
    """
    value: object
    if attribute in _ENVELOPE_KEYS:
        value = getattr(envelope, attribute)
    else:
        value = envelope.data
        for part in attribute.split("."):
            if not isinstance(value, dict) or part not in value:
                return None
            value = value[part]
    if isinstance(value, dict | list):
        return None
    return str(value)


def _stored_headers(envelope: StoredEnvelope) -> list[str]:
    """The entry fields of ``entry_headers=True``, from a stored envelope (as :func:`_headers`)."""
    fields = ["tidings_event_type", envelope.event_type, "tidings_event_id", envelope.event_id]
    for name in ("correlation_id", "causation_id", "tenant_id"):
        value = getattr(envelope, name)
        if value is not None:
            fields += (f"tidings_{name}", value)
    return fields


def _not_accepted(count: int, what: str, exc: Exception) -> str:
    """The PublishError message of a send Redis did not take in full."""
    return (
        f"Redis did not accept all of {count} {what} ({exc!r}); send them again: handlers' "
        "inboxes make the ones already added harmless"
    )
