"""One consumer of the Redis Streams transport: read, dispatch, acknowledge, reclaim, retry.

The rules of delivery (decode, inbox, handler, retry policy, dead letters) live in
:class:`~tidings.delivery.Dispatcher`; this module only moves entries. A consumer works as a
pipeline of batches (see :meth:`StreamConsumer._step`): while the handlers of one batch run, Redis
already settles and acknowledges the batch before it, claims the next batch's inbox pairs and
reads the batch after that, all sent in one go on the consumer's own connection (see
:mod:`tidings.transports._streams_link`). A batch is acknowledged only after its handlers ran
(or were scheduled for a retry, or dead-lettered) and its inbox claims were settled. Anything
that fails before the acknowledgement (Redis, the inbox, the dead-letter store) leaves the
batch pending, and it is reclaimed after ``claim_idle``. Redis errors never end the loop: it
waits with bounded exponential backoff (0.1 s doubling to 5 s, with jitter) and goes on.

With ``partitions``, the consumer reads one batch at a time instead, holds partition leases
(see :mod:`tidings.transports._streams_partitions`), handles the entries of its partitions one
by one, retrying a failed handler in place, and acknowledges each only while its lease holds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
import time
import traceback
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import redis

from tidings._untrusted import log_safe, parse_counter
from tidings.delivery import Dispatcher, Outcome, Prepared, Received, Redelivery
from tidings.inbox.redis import RedisInbox
from tidings.ports import BatchInbox, Claim, DeadLetter
from tidings.transports._streams_link import Commands, Entry, Link, entries_of, read_command, text
from tidings.transports._streams_partitions import Leases
from tidings.transports._streams_scripts import MOVE_LONGEST, MOVE_MOST_VALUES

if TYPE_CHECKING:
    from tidings.events import DomainEvent
    from tidings.transports.redis_streams import RedisStreamsTransport

__all__ = ["ATTEMPT", "ENVELOPE", "GROUP", "HANDLER", "StreamConsumer", "Streams"]

log = logging.getLogger("tidings.streams")

ENVELOPE: Final = "envelope"
HANDLER: Final = "tidings_handler"
ATTEMPT: Final = "tidings_attempt"
GROUP: Final = "tidings_group"
ENTRY_ID: Final = "tidings_stream_id"
# Unacknowledged deliveries of the event before this entry: a redelivery of an entry that was
# reclaimed (a handler waiting on a crashed worker's inbox claim, say) carries them, so that a
# poison event cannot reset its delivery count by becoming a new entry.
DELIVERIES: Final = "tidings_deliveries"
# Redeliveries in a row of one handler's delivery because the inbox found the event busy (being
# handled elsewhere): those keep their attempt number, so they are counted here, and bounded.
BUSY: Final = "tidings_busy"
MAX_BUSY: Final = 100
"""Most redeliveries in a row of one handler's delivery for a busy inbox; then a dead letter."""
_RETRY_ID: Final = "tidings_retry_id"
_COUNTERS: Final = (ATTEMPT.encode(), DELIVERIES.encode(), BUSY.encode())
# What a redelivery carries besides the envelope, handler, attempt and its own id: the fields
# tidings defines, each cut at _CARRIED_LENGTH characters. Nothing else of an entry is copied,
# so that an entry with thousands of fields (or huge ones) makes an ordinary redelivery.
_CARRIED: Final = (
    DELIVERIES,
    "tidings_event_type",
    "tidings_event_id",
    "tidings_correlation_id",
    "tidings_causation_id",
    "tidings_tenant_id",
)
_CARRIED_LENGTH: Final = 256
_UNMOVABLE_BATCH: Final = 100
_ENVELOPE_KEY: Final = ENVELOPE.encode()
_BACKOFF_FIRST, _BACKOFF_MAX = 0.1, 5.0


class _EntryHeaders(Mapping[str, str]):
    """An entry's fields but the envelope, with its id and group, as text: decoded when read.

    Workers read headers only to dead-letter or redeliver an entry (they never trust them for
    anything else), so the common entry never pays for decoding them.
    """

    __slots__ = ("_decoded", "_entry_id", "_fields", "_group")

    def __init__(self, fields: dict[bytes, bytes], entry_id: str, group: str) -> None:
        self._fields, self._entry_id, self._group = fields, entry_id, group
        self._decoded: dict[str, str] | None = None

    def _all(self) -> dict[str, str]:
        if self._decoded is None:
            # The entry's id and group first (a store keeps the first headers of a letter), and
            # never overridden by a field of the same name.
            found = {ENTRY_ID: self._entry_id, GROUP: self._group}
            for k, v in self._fields.items():
                if k != _ENVELOPE_KEY and (key := text(k)) not in (ENTRY_ID, GROUP):
                    found[key] = text(v)
            self._decoded = found
        return self._decoded

    def __getitem__(self, key: str) -> str:
        return self._all()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


class _Ready(NamedTuple):
    """A batch claimed in the inbox, its handlers not yet run."""

    entries: list[Entry]
    prepared: Prepared
    claims: list[Claim] | None


@dataclass(frozen=True, slots=True)
class Streams:
    """The keys one service's workers use.

    Attributes:
        group: the consumer group (the service's name) on every stream.
        topics: the streams events are published to that the service reads.
        redeliver: the service's own stream of redeliveries (retries and replays).
        retry: the sorted set where redeliveries wait until due.
        ordered: the partition streams (``partitions`` set), each read by one consumer at once.
    """

    group: str
    topics: tuple[str, ...]
    redeliver: str
    retry: str
    ordered: tuple[str, ...] = ()

    @property
    def read(self) -> tuple[str, ...]:
        """Every stream the service's group reads."""
        return (*self.topics, *self.ordered, self.redeliver)

    @property
    def unmovable(self) -> str:
        """The list where the retry mover puts members it cannot move, to be dead-lettered."""
        return f"{self.retry}:unmovable"

    @property
    def shared(self) -> tuple[str, ...]:
        """The streams every consumer of the service reads (and reclaims from)."""
        return (*self.topics, self.redeliver)


class StreamConsumer:
    """One consumer (one thread) of a service's group; :meth:`run` loops until ``stop``."""

    def __init__(
        self,
        transport: RedisStreamsTransport,
        dispatcher: Dispatcher,
        streams: Streams,
        name: str,
        stop: threading.Event,
    ) -> None:
        self.transport, self.dispatcher, self.streams = transport, dispatcher, streams
        self.name, self.stop = name, stop
        self.redis: Any = transport.client  # redis-py's stream replies are loosely typed
        self._idle_ms = max(1, round(transport.claim_idle * 1000))
        self.leases: Leases | None = None
        self._ordered = frozenset(streams.ordered)
        self._recovering = False  # the batch being handled was read from the pending entries
        self.link = Link(
            transport.client,
            transport.inbox,
            group=streams.group,
            retry=streams.retry,
            redeliver=streams.redeliver,
            unmovable=streams.unmovable,
            count=transport.count,
        )
        # The read-ahead pipeline (see _step): a batch claimed and ready for its handlers, and
        # the batch read after it.
        self._ready: _Ready | None = None
        self._next: list[Entry] = []
        if streams.ordered:
            base = f"{transport.stream_prefix}:{streams.group}"
            self.leases = Leases(self.redis, base, streams.group, name, transport.claim_idle)

    def run(self) -> None:
        """Consume until ``stop`` is set; finish and acknowledge the batches in hand first."""
        delay, ready = _BACKOFF_FIRST, False
        next_claim = next_trim = time.monotonic()
        while not self.stop.is_set():
            try:
                if not ready:
                    self._ensure_groups()
                    ready = True
                if self.leases is not None:
                    self.leases.refresh(self.streams.ordered)
                now = time.monotonic()
                if now >= next_claim:
                    self._reclaim()
                    next_claim = now + max(0.05, self.transport.claim_idle / 2)
                if self.transport.maxlen is not None and now >= next_trim:
                    for stream in self.streams.read:
                        self.transport.trim(stream)
                    next_trim = now + self.transport.trim_interval
                self._turn()
                if self.link.unmovable_waiting:
                    self._dead_letter_unmovable()
                delay = _BACKOFF_FIRST
            except Exception as exc:  # noqa: BLE001 - nothing may end the loop but stop
                # What was read stays pending (reclaimed after claim_idle; claims expire).
                self._ready, self._next = None, []
                if self.leases is not None:  # what was read may be pending still: read it again
                    self.leases.unread.update(self.leases.held)
                if isinstance(exc, redis.ResponseError) and "NOGROUP" in str(exc):
                    ready = False  # the stream or group vanished (a Redis without persistence)
                if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
                    log.warning("Redis unreachable (%s); retrying in %.1f s", log_safe(exc), delay)
                else:  # the traceback on one line: its text may come from an entry
                    log.error(
                        "consumer %s failed; retrying in %.1f s: %s",
                        self.name,
                        delay,
                        log_safe("".join(traceback.format_exception(exc)), 4000),
                    )
                self.stop.wait(delay * (1 - 0.2 * random.random()))  # noqa: S311 - spreading
                delay = min(_BACKOFF_MAX, delay * 2)
        self._leave()

    def _leave(self) -> None:
        """Handle the batches in hand, settle and acknowledge, then deregister (best effort)."""
        try:
            while self._ready is not None or self._next:  # stopping: nothing more is read
                self._step()
            self._exchange(None)
        except Exception as exc:  # noqa: BLE001 - leaving: what is not acknowledged is reclaimed
            log.warning(
                "consumer %s stopped before acknowledging %d entries (%s); they will be "
                "reclaimed, and their inbox markers skip the handlers that already ran",
                self.name,
                len(self.link.acks),
                log_safe(exc),
            )
        self.link.connection.close()
        self._deregister()

    # -- the steps ---------------------------------------------------------------------------

    def _ensure_groups(self) -> None:
        for stream in self.streams.read:
            try:
                self.redis.xgroup_create(stream, self.streams.group, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def _turn(self) -> None:
        """Handle what there is to handle, or wait for entries."""
        if self.leases is not None:  # ordered partitions: one batch at a time, no read-ahead
            entries = self._read_ordered()
            if entries:
                self._handle(entries)
        elif self._ready is None and not self._next:
            wait_ms = self.link.wait_ms(self.transport.block_ms)
            entries = self._exchange(self._new_entries(), wait_ms)
            if len(entries) > self.transport.count // 10:  # a stream in full flow: pipelined
                self._next = entries
            elif entries:  # a trickle: handled at once, a round trip sooner than pipelined
                self._handle(entries)
        else:
            self._step()

    def _step(self) -> None:
        """One step of the read-ahead pipeline: Redis and this thread work at the same time.

        Sent first, without waiting: what is owed (the last batch's settling, then its
        acknowledgement) and a read of the batch after next. Then, while Redis works on that,
        the next batch is decoded and its inbox claims are sent; then, while Redis works on
        those, the ready batch's handlers run. Then the replies are read: the next batch is
        claimed and becomes the ready one; the batch read becomes the next one. Nothing is read
        once ``stop`` is set, so that the batches in hand run out.
        """
        ready, entries = self._ready, self._next
        self._ready, self._next = None, []
        link, inbox = self.link, self.transport.inbox
        first = Commands()
        owed = link.pay(first)
        reading = not self.stop.is_set()
        if reading:
            count = self.transport.count
            first.append(
                read_command(self.streams.group, self.name, self._new_entries(), count, None)
            )
        claims: list[Claim] | None = None
        token, claiming = "", False
        try:
            link.connection.send(first)
            entries = self._sort_out(entries)
            prepared = self.dispatcher.prepare([self._received(*e) for e in entries])
            if prepared.pairs and link.inline:
                assert isinstance(inbox, RedisInbox)  # noqa: S101 - inline
                second = Commands()
                token = inbox.claim_on(second, prepared.pairs)
                link.connection.send(second)
                claiming = True
            elif prepared.pairs:
                assert isinstance(inbox, BatchInbox)  # noqa: S101 - pairs only for one
                claims = inbox.claim_many(prepared.pairs)
            if ready is not None:
                self._complete(ready)
            replies = link.connection.receive(len(first))
            claimed = link.connection.receive(1)[0] if claiming else None
        except BaseException:
            link.connection.drop()  # replies may be on their way: it cannot be used again
            link.default(owed)  # paid again later: settling and acknowledging are idempotent
            raise
        link.paid(owed, replies)
        if claiming:
            assert isinstance(inbox, RedisInbox)  # noqa: S101 - inline
            claims = inbox.claimed(prepared.pairs, claimed, token)
        if entries:
            self._ready = _Ready(entries, prepared, claims)
        if reading:
            self._next = entries_of(replies[-1])

    def _complete(self, ready: _Ready) -> None:
        outcomes = self.dispatcher.complete(
            ready.prepared, ready.claims, settle=self.link.settle_later
        )
        self._schedule(outcomes)
        self.link.ack_later(ready.entries)

    def _read_ordered(self) -> list[Entry]:
        """The next batch with partitions: a taken-over partition's pending entries first."""
        leases = self.leases
        assert leases is not None  # noqa: S101 - only called with partitions
        if leases.unread:
            entries = self._exchange(dict.fromkeys(sorted(leases.unread), "0"))
            leases.unread &= {stream for stream, _, _ in entries}
            self._recovering = bool(entries)
            if entries:
                return entries
        self._recovering = False
        return self._exchange(self._new_entries(), self.link.wait_ms(self.transport.block_ms))

    def _new_entries(self) -> dict[str, str]:
        """What a read of new entries asks for: every stream this consumer reads, from ``>``."""
        held = sorted(self.leases.held) if self.leases is not None else ()
        return dict.fromkeys((*self.streams.shared, *held), ">")

    def _exchange(self, streams: dict[str, str] | None, block: int | None = None) -> list[Entry]:
        """Pay what is owed and read ``streams`` (waiting up to ``block`` ms), in one round trip."""
        commands = Commands()
        owed = self.link.pay(commands)
        if streams is not None:
            count = self.transport.count
            commands.append(read_command(self.streams.group, self.name, streams, count, block))
        try:
            replies = self.link.connection.round_trip(commands)
        except BaseException:
            self.link.default(owed)
            raise
        self.link.paid(owed, replies)
        return entries_of(replies[-1]) if streams is not None else []

    def _handle(self, entries: Sequence[Entry], crashes: int = 0) -> None:
        """Dispatch a batch and store its redeliveries; settle and acknowledge it later.

        For a trickle of entries (a few read after a wait: the read-ahead pipeline of
        :meth:`_step` would make them wait a round trip longer), for reclaimed entries, and
        with partitions. Entries of ordered partitions are handled apart, one by one: see
        :meth:`_handle_ordered`.
        """
        if self.leases is not None:
            ordered = [e for e in entries if e[0] in self._ordered]
            if ordered:
                self._handle_ordered(ordered)
                entries = [e for e in entries if e[0] not in self._ordered]
                if not entries:
                    return
        entries = self._sort_out(entries)
        if not entries:
            return
        messages = [self._received(*e) for e in entries]
        if crashes:
            messages = [
                m._replace(headers={**m.headers, DELIVERIES: str(crashes)}) for m in messages
            ]
        outcomes = self.dispatcher.dispatch_many(messages, settle=self.link.settle_later)
        self._schedule(outcomes)
        self.link.ack_later(entries)

    def _handle_ordered(self, entries: Sequence[Entry]) -> None:
        """Handle partition entries in order, each retried in place until done or dead-lettered.

        Before each entry the lease is checked, and the acknowledgement is fenced by it: a
        consumer that lost its partition stops and acknowledges nothing more of it.
        """
        leases = self.leases
        assert leases is not None  # noqa: S101 - only called with partitions
        for entry in entries:
            stream, entry_id, fields = entry
            if stream not in leases.held or not leases.holds(stream):
                continue
            times = 1
            if self._recovering:  # pending already: did it kill or stall its consumers?
                info = self.redis.xpending_range(stream, self.streams.group, entry_id, entry_id, 1)
                times = int(info[0]["times_delivered"]) if info else 1
            if times > self.transport.max_deliveries:
                self._dead_letter_overdelivered(entry, times)
                continue
            if not self._sort_out([entry]):
                continue
            received = self._received(stream, entry_id, fields)
            retries = self.dispatcher.dispatch(received).retries
            while retries:
                delay = min(again.delay for again in retries)
                if not self._wait_holding(stream, delay):
                    return  # stopping, or the partition is lost: the entry stays pending
                outcomes = self.dispatcher.dispatch_many(
                    [
                        Received(again.body, again.headers, stream, again.handler, again.attempt)
                        for again in retries
                    ]
                )
                retries = tuple(again for outcome in outcomes for again in outcome.retries)
            keys, args = [leases.key(stream), stream], [self.name, self.streams.group, entry_id]
            if leases.ack_if_held(keys=keys, args=args) == -1:
                leases.lost(stream)

    def _wait_holding(self, stream: str, delay: float) -> bool:
        """Wait ``delay`` s keeping the lease of ``stream``; False if stopped or lease lost.

        The consumer's other partitions are given back first, so that their keys go on with
        other consumers (their entries of the current batch are then skipped: no longer held).
        """
        leases = self.leases
        assert leases is not None  # noqa: S101 - only called with partitions
        deadline = time.monotonic() + delay
        step = self.transport.claim_idle / 3
        for other in sorted(leases.held - {stream}):  # let other consumers go on with them
            leases.release(other)
        while True:
            if not leases.renew(stream):
                leases.lost(stream)
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            if self.stop.wait(min(left, step)):
                return False

    def _received(self, stream: str, entry_id: str, fields: dict[bytes, bytes]) -> Received:
        body = fields.get(_ENVELOPE_KEY, b"")
        if len(fields) == 1 and body:  # the usual entry: nothing but the envelope
            return Received(body, {ENTRY_ID: entry_id, GROUP: self.streams.group}, stream)
        headers = _EntryHeaders(fields, entry_id, self.streams.group)
        # Only the service's own stream may aim a delivery at one handler.
        if stream != self.streams.redeliver or not headers.get(HANDLER):
            return Received(body, headers, stream)
        # Strictly parsed (see _sort_out, which dead-letters an entry whose counters are not).
        attempt = parse_counter(fields.get(_COUNTERS[0], b"1")) or 1
        return Received(body, headers, stream, headers[HANDLER], attempt)

    def _sort_out(self, entries: Sequence[Entry]) -> list[Entry]:
        """Dead-letter (and acknowledge later) the entries whose counters are nonsense.

        Returns the others. A counter field tidings defines (``tidings_attempt``,
        ``tidings_deliveries``) that is present must be a sane counter
        (:func:`~tidings._untrusted.parse_counter`): ``"²"``, five thousand digits, ``-1`` or
        ``1.5`` there make the entry one tidings did not write as it is, so it is dead-lettered
        with that reason instead of being guessed at (or crashing its batch).
        """
        good: list[Entry] = []
        for entry in entries:
            fields = entry[2]
            if len(fields) == 1:  # the usual entry: the envelope alone
                good.append(entry)
                continue
            bad = [
                name.decode()
                for name in _COUNTERS
                if name in fields and parse_counter(fields[name]) is None
            ]
            if not bad:
                good.append(entry)
                continue
            shown = ", ".join(f"{name}={log_safe(text(fields[name.encode()]), 40)}" for name in bad)
            self._dead_letter_entry(
                entry,
                f"InvalidEntry: entry {entry[1]} has counters that are not counters ({shown}); "
                "tidings writes ASCII digits only",
                attempts=0,
            )
        return good

    def _schedule(self, outcomes: Sequence[Outcome]) -> None:
        """Store the outcomes' redeliveries in the retry set; dead-letter the endless ones.

        A redelivery for a failure has the next attempt number, bounded by the handler's
        policy. One for a busy inbox keeps its attempt number; those are counted (``BUSY``)
        and past :data:`MAX_BUSY` in a row the delivery is dead-lettered instead, so that no
        retry path is unbounded (a claim someone wrote without expiry would be busy for ever).
        """
        retries: list[Redelivery] = []
        for outcome in outcomes:
            for again in outcome.retries:
                busy = self._busy_count(again)
                if busy > MAX_BUSY:
                    self._dead_letter_busy(again, outcome, busy)
                else:
                    retries.append(again._replace(headers={**again.headers, BUSY: str(busy)}))
        if not retries:
            return
        now = time.time()
        with self.redis.pipeline(transaction=False) as pipe:
            for again in retries:
                fields = [ENVELOPE, again.body.decode("utf-8", "replace")]
                fields += [HANDLER, again.handler, ATTEMPT, str(again.attempt)]
                fields += [_RETRY_ID, uuid.uuid4().hex]
                if again.headers[BUSY] != "0":
                    fields += [BUSY, again.headers[BUSY]]
                for key in _CARRIED:  # only these, and cut: see _CARRIED
                    value = again.headers.get(key)
                    if value:
                        fields += [key, value[:_CARRIED_LENGTH]]
                pipe.zadd(
                    self.streams.retry, {json.dumps(fields, ensure_ascii=False): now + again.delay}
                )
            pipe.execute()
        self.link.retry_due(now + min(again.delay for again in retries))

    @staticmethod
    def _busy_count(again: Redelivery) -> int:
        """How many busy redeliveries in a row ``again`` makes (0: it is for a failure)."""
        headers = again.headers
        aimed = headers.get(HANDLER) == again.handler
        attempt = (parse_counter(headers.get(ATTEMPT, "1")) or 1) if aimed else 1
        if again.attempt != attempt:
            return 0
        return (parse_counter(headers.get(BUSY, "0")) or 0) + 1 if aimed else 1

    def _dead_letter_busy(self, again: Redelivery, outcome: Outcome, busy: int) -> None:
        """Dead-letter a delivery the inbox found busy ``busy`` times in a row."""
        event = outcome.event
        letter = DeadLetter(
            body=again.body,
            reason=(
                f"RedeliveryLimitExceeded: the inbox found {again.handler} busy on this event "
                f"{busy} times in a row (MAX_BUSY={MAX_BUSY}); is a claim held for ever?"
            ),
            attempts=again.attempt,
            handler=again.handler,
            event_type=None if event is None else event.event_type,
            event_id=None if event is None else event.event_id,
            headers=dict(again.headers),
            transport=self.transport.name,
            destination=self.streams.redeliver,
        )
        self.transport.dead_letters.add(letter)
        log.error(
            "dead-lettered %s's delivery of %s as %s: busy %d times in a row",
            log_safe(again.handler),
            log_safe(letter.event_id),
            letter.id,
            busy,
        )

    def _reclaim(self) -> None:
        """Take over entries idle longer than ``claim_idle``, one at a time.

        One at a time, because an entry left pending by a dead consumer may be what killed
        it: claiming (which counts a delivery) and handling each alone keeps the innocent
        entries of that batch from being counted, and dead-lettered, with the guilty one.
        An entry delivered more than ``max_deliveries`` times is dead-lettered instead.
        """
        for stream in self.streams.shared:  # partitions are reclaimed by their new holder only
            cursor: Any = "0-0"
            for _ in range(self.transport.count):
                if self.stop.is_set():
                    return
                reply = self.redis.xautoclaim(
                    stream,
                    self.streams.group,
                    self.name,
                    min_idle_time=self._idle_ms,
                    start_id=cursor,
                    count=1,
                )
                cursor = reply[0]
                for entry_id in reply[2] if len(reply) > 2 else ():
                    self._report_lost(stream, text(entry_id))
                for entry_id, fields in reply[1]:
                    if fields is not None:
                        self._take_over((stream, text(entry_id), fields))
                if text(cursor) == "0-0":
                    break

    def _take_over(self, entry: Entry) -> None:
        stream, entry_id, _ = entry
        info = self.redis.xpending_range(stream, self.streams.group, entry_id, entry_id, 1)
        times = int(info[0]["times_delivered"]) if info else 1
        # A nonsense count is taken as none here; _handle then dead-letters the entry for it.
        times += parse_counter(entry[2].get(DELIVERIES.encode(), b"0")) or 0
        log.warning("reclaimed entry %s of %s (delivery %d)", entry_id, stream, times)
        if times > self.transport.max_deliveries:
            self._dead_letter_overdelivered(entry, times)
        else:
            self._handle([entry], crashes=times - 1)

    def _dead_letter_overdelivered(self, entry: Entry, times: int) -> None:
        self._dead_letter_entry(
            entry,
            f"DeliveryLimitExceeded: entry {entry[1]} was delivered {times} times without "
            f"being acknowledged (max_deliveries={self.transport.max_deliveries}); its "
            "handling probably kills or stalls the worker",
            attempts=times - 1,
        )

    def _dead_letter_entry(self, entry: Entry, reason: str, *, attempts: int) -> None:
        """Dead-letter ``entry`` as it is, with ``reason``, and owe its acknowledgement.

        Never raises for the entry's content (whatever decoding it raises, the letter is stored
        without the event's type and id); only the store failing propagates, and then the entry
        stays pending.
        """
        received = self._received(*entry)
        event: DomainEvent | None
        try:
            event = self.transport.codec.decode(received.body)
        except Exception:  # noqa: BLE001 - whatever the bytes make it raise, they are dead-lettered
            event = None
        letter = DeadLetter(
            body=received.body,
            reason=reason,
            attempts=max(0, attempts),
            handler=received.handler,
            event_type=None if event is None else event.event_type,
            event_id=None if event is None else event.event_id,
            headers=dict(received.headers),
            transport=self.transport.name,
            destination=entry[0],
        )
        self.transport.dead_letters.add(letter)
        log.error(
            "dead-lettered entry %s of %s as %s: %s",
            entry[1],
            entry[0],
            letter.id,
            log_safe(reason),
        )
        self.link.ack_later([entry])

    def _dead_letter_unmovable(self) -> None:
        """Dead-letter the retry members the mover put aside (see ``MOVE_DUE``), then drop them.

        Each letter's id is derived from the member, so that two consumers draining at once, or
        one that crashed between storing and dropping, store it once. ``LREM`` drops exactly
        the member stored.
        """
        key = self.streams.unmovable
        members: list[bytes] = self.redis.lrange(key, 0, _UNMOVABLE_BATCH - 1)
        for member in members:
            self.transport.dead_letters.add(self._unmovable_letter(member))
            self.redis.lrem(key, 1, member)
        if members:
            log.error(
                "dead-lettered %d redelivery(ies) of %s that could not be moved to %s",
                len(members),
                self.streams.retry,
                self.streams.redeliver,
            )
        self.link.unmovable_waiting = len(members) == _UNMOVABLE_BATCH

    def _unmovable_letter(self, member: bytes) -> DeadLetter:
        """The dead letter of one retry member the mover could not move."""
        digest = hashlib.sha256(member).hexdigest()
        body, handler = member, None
        try:
            values = json.loads(member) if len(member) <= MOVE_LONGEST else None
        except (ValueError, RecursionError):
            values = None
        if isinstance(values, list) and all(isinstance(v, str) for v in values):
            found = dict(zip(values[::2], values[1::2], strict=False))
            body = found.get(ENVELOPE, "").encode("utf-8", "surrogatepass")
            handler = found.get(HANDLER)
        return DeadLetter(
            body=body,
            reason=(
                f"UnmovableRetry: a redelivery waiting in {self.streams.retry} could not be moved "
                f"to {self.streams.redeliver} (not a flat JSON array of at most "
                f"{MOVE_MOST_VALUES} field and value strings of at most {MOVE_LONGEST} bytes in "
                "all, or refused by XADD); the body is its envelope when one could be read, "
                "else the member itself"
            ),
            handler=handler[:_CARRIED_LENGTH] if handler else None,
            headers={GROUP: self.streams.group},
            transport=self.transport.name,
            destination=self.streams.retry,
            id=str(uuid.UUID(digest[:32])),
        )

    def _report_lost(self, stream: str, entry_id: str) -> None:
        """An entry was deleted (trimmed) while pending: its event may be lost; say so loudly."""
        log.error(
            "entry %s of %s was deleted while still pending: its event is lost", entry_id, stream
        )
        letter = DeadLetter(
            body=b"",
            reason=(
                f"EntryLost: entry {entry_id} was deleted from {stream} before group "
                f"{self.streams.group} acknowledged it (trimmed by hand, or maxlen on XADD?); "
                "the event cannot be recovered from the stream: republish it from its source"
            ),
            headers={ENTRY_ID: entry_id, GROUP: self.streams.group},
            transport=self.transport.name,
            destination=stream,
        )
        self.transport.dead_letters.add(letter)

    def _deregister(self) -> None:
        """Remove this consumer from its groups when it holds nothing pending (best effort)."""
        try:
            if self.leases is not None:
                self.leases.release_all()
            for stream in self.streams.read:
                for consumer in self.redis.xinfo_consumers(stream, self.streams.group):
                    if text(consumer["name"]) == self.name and not consumer["pending"]:
                        self.redis.xgroup_delconsumer(stream, self.streams.group, self.name)
        except redis.RedisError as exc:
            log.info("consumer %s left without deregistering (%r)", self.name, exc)
