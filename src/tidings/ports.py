"""The small contracts adapters implement: where effects are remembered, where failures go.

A transport moves envelopes (``tidings.codec``) between processes; on the receiving side every
delivery of an event to a handler passes an :class:`Inbox`, keyed by (handler name, event id),
so a redelivered event does not repeat its effect; a delivery that keeps failing, or that
cannot be decoded at all, ends in a :class:`DeadLetterStore` with everything needed to
understand and replay it. A transport that can also forward a stored envelope as written
(:class:`EnvelopeSender`) lets the outbox relay be a pipe that needs no event class.
Conformance suites for each contract live in :mod:`tidings.testing`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol, runtime_checkable

from tidings._ids import new_event_id, utc_now_iso
from tidings.errors import PublishError

__all__ = [
    "BatchInbox",
    "Claim",
    "ClaimPair",
    "DeadLetter",
    "DeadLetterFilter",
    "DeadLetterStore",
    "EnvelopeRefusedError",
    "EnvelopeSender",
    "FilteringDeadLetterStore",
    "Inbox",
    "Replayer",
    "StoredEnvelope",
    "Transport",
]


@runtime_checkable
class Inbox(Protocol):
    """Remembers which (handler, event id) pairs took effect: the idempotency guard.

    Usage, by the worker around each handler call::

        with inbox.guard(handler.name, event.event_id) as fresh:
            if fresh:
                handler.func(event)

    Contract:

    - Entering returns ``True`` when the effect should run now (nobody completed it, and this
      caller now holds the claim), ``False`` when it already took effect (a duplicate).
    - Leaving without an exception marks the pair done: later guards return ``False``.
      Leaving with an exception releases the claim, so a retry may run the effect again.
    - While one caller holds the claim, another guard of the same pair either raises
      :class:`~tidings.errors.InboxBusyError` at once (retry the delivery later), or waits until
      the holder finishes and then answers as if it came after (a SQL store: the row lock); a
      store that gives up waiting raises ``InboxBusyError``. A claim whose holder crashed
      expires (Redis: after the lease) or is released with its transaction (SQL).
    - Thread-safe and process-safe: two workers racing on one pair see exactly one ``True``.

    Where the guarantee holds: a SQL inbox commits the done mark in the same transaction as the
    handler's own writes to that database (the handler writes through
    ``tidings.inbox.sql.current_connection()``), so the effect happens exactly once. A Redis inbox
    marks done after the handler returned: an effect outside Redis (an e-mail, an HTTP call)
    happens at least once and, barring a crash between the effect and the mark, once.
    """

    def guard(self, handler: str, event_id: str) -> AbstractContextManager[bool]:
        """Claim (handler, event_id); see the class docstring for the contract.

        An inbox that tells producers apart also takes ``source=`` (the producer's CloudEvents
        ``source``; ``None`` for none) and says so with a true ``by_source`` attribute: the
        worker then guards (handler, source, event id), so that an event id reused by another
        producer is not taken for a duplicate. The stores of tidings all do.
        """
        ...


ClaimPair = tuple[str, str] | tuple[str, str, str | None]
"""What a batch inbox claims: (handler, event_id), or (handler, event_id, source)."""


class Claim(NamedTuple):
    """A batch inbox's answer for one (handler, event id) (immutable; a named tuple).

    Attributes:
        handler: the handler name.
        event_id: the event id.
        fresh: ``True`` when the effect should run now (this caller holds the claim).
        retry_after: seconds until someone else's claim expires when the pair is busy;
            ``None`` otherwise. Not fresh and not busy means the effect already took place.
        token: the store's proof of ownership, handed back to ``settle``.
        source: the producer's CloudEvents ``source`` the pair was claimed with (``None``:
            claimed without one).
    """

    handler: str
    event_id: str
    fresh: bool
    retry_after: float | None = None
    token: str = ""
    source: str | None = None


@runtime_checkable
class BatchInbox(Protocol):
    """An optional capability of an :class:`Inbox`: many pairs in one round trip each way.

    ``claim_many`` claims every pair at once (same rules as ``guard``, answered per pair);
    ``settle`` then marks the claims whose handlers succeeded done and releases those whose
    handlers failed. Claims not settled expire like any claim. A worker handling a batch of
    events uses it to pay two round trips per batch instead of two per event; the price is that
    a crash before ``settle`` repeats the effects of the batch's handlers that had finished.
    """

    def claim_many(self, pairs: Sequence[ClaimPair]) -> list[Claim]:
        """Claim every (handler, event_id[, source]); one :class:`Claim` per pair, in order.

        Triples come only to an inbox whose ``by_source`` is true (see :meth:`Inbox.guard`).
        """
        ...

    def settle(self, done: Sequence[Claim], failed: Sequence[Claim]) -> None:
        """Mark ``done`` claims done and release ``failed`` ones (only claims still held)."""
        ...


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A delivery that failed for good, with what is needed to understand and replay it.

    Attributes:
        body: the message exactly as received (it may be undecodable).
        reason: the error, ``"ExceptionType: message"``.
        traceback: a summary of where it was raised (empty for refused input).
        attempts: how many times the handler was tried (0 when it never ran).
        handler: the handler that failed, or ``None`` when the message could not be decoded.
        event_type: the event's type if known, else ``None``.
        event_id: the event's id if known, else ``None``.
        headers: the message headers as received (context ids, routing).
        transport: which transport received it, e.g. ``"celery"``.
        destination: where it came from (queue or stream), for replay.
        id: this dead letter's own id.
        failed_at: when it was dead-lettered, ISO-8601 UTC.
    """

    body: bytes
    reason: str
    traceback: str = ""
    attempts: int = 0
    handler: str | None = None
    event_type: str | None = None
    event_id: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    transport: str = ""
    destination: str = ""
    id: str = field(default_factory=new_event_id)
    failed_at: str = field(default_factory=utc_now_iso)


@runtime_checkable
class DeadLetterStore(Protocol):
    """Keeps dead letters until an operator replays or purges them.

    Contract: ``add`` is durable when it returns (the message may then be acknowledged), and
    adding a letter whose id is stored replaces it; listing is newest first by ``failed_at``;
    every method is safe to call from several processes.
    """

    def add(self, letter: DeadLetter) -> None:
        """Store ``letter``; durable once this returns."""
        ...

    def get(self, letter_id: str) -> DeadLetter | None:
        """Return the dead letter with this id, or ``None``."""
        ...

    def list(self, *, limit: int = 100, offset: int = 0) -> list[DeadLetter]:
        """Return up to ``limit`` dead letters, newest first, skipping ``offset``."""
        ...

    def remove(self, letter_id: str) -> bool:
        """Delete one dead letter (after a replay); return whether it existed."""
        ...

    def purge(self) -> int:
        """Delete every dead letter; return how many there were."""
        ...

    def count(self) -> int:
        """Return how many dead letters are stored."""
        ...


@dataclass(frozen=True)
class DeadLetterFilter:
    """Which dead letters an operator means: every field given must hold, ``None`` is "any".

    Attributes:
        handler: the letter's handler, exactly (``handler="billing.charge"``).
        event_type: the letter's event type, exactly.
        since: letters that failed at this instant or later; a naive datetime is taken as UTC.
        reason: text the letter's reason contains (case-sensitive).
    """

    handler: str | None = None
    event_type: str | None = None
    since: datetime | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        if self.since is not None and self.since.tzinfo is None:
            object.__setattr__(self, "since", self.since.replace(tzinfo=UTC))

    @property
    def is_empty(self) -> bool:
        """Whether the filter lets every letter through."""
        return self == DeadLetterFilter()

    def matches(self, letter: DeadLetter) -> bool:
        """Whether ``letter`` passes; one whose ``failed_at`` is not ISO-8601 fails ``since``."""
        if self.handler is not None and letter.handler != self.handler:
            return False
        if self.event_type is not None and letter.event_type != self.event_type:
            return False
        if self.reason is not None and self.reason not in letter.reason:
            return False
        if self.since is None:
            return True
        try:
            failed_at = datetime.fromisoformat(letter.failed_at)
        except ValueError:
            return False
        if failed_at.tzinfo is None:
            failed_at = failed_at.replace(tzinfo=UTC)
        return failed_at >= self.since


@runtime_checkable
class FilteringDeadLetterStore(DeadLetterStore, Protocol):
    """A :class:`DeadLetterStore` that finds the letters of a filter itself (Redis and SQL do).

    Stores without it still work: :func:`tidings.deadletter.iter_matching` pages their ``list``.
    """

    def iter_matching(
        self, where: DeadLetterFilter, *, page_size: int = 500
    ) -> Iterator[DeadLetter]:
        """Yield the letters ``where`` matches, newest first, reading ``page_size`` at a time.

        A letter removed while this runs is skipped, never another in its place; one added
        meanwhile may or may not be yielded.
        """
        ...


@runtime_checkable
class Replayer(Protocol):
    """Sends a dead letter's message back to where it came from (a transport implements it).

    Contract: when ``replay`` returns, the broker has accepted the message; the delivery goes
    to ``letter.handler`` only when one is named (other handlers of the event already ran),
    else to every handler. The inbox still guards it, so a replay never repeats an effect that
    took place.
    """

    def replay(self, letter: DeadLetter) -> None:
        """Publish ``letter.body`` again so that it reaches ``letter.destination``'s consumers.

        Where other services read that destination too, it reaches only the service that
        dead-lettered it.
        """
        ...


@runtime_checkable
class Transport(Protocol):
    """Carries events from ``EventBus.publish`` to workers that run the bus's handlers.

    Contract:

    - ``bind(bus)`` is called once, by ``EventBus(transport=...)``; on the worker side the
      transport delivers received events to that bus's handlers (through a
      :class:`~tidings.delivery.Dispatcher`).
    - ``subscribed(handler)`` is called for every handler of the bus, including those
      subscribed before ``bind``; it raises if the transport cannot honour the handler's
      configuration (a retry delay it cannot schedule safely, say).
    - ``send(events)`` returns once the broker accepted every event, and is thread-safe. It
      encodes every event before sending any (an :class:`~tidings.errors.EventEncodeError`
      sends nothing); when the broker does not accept them it raises
      :class:`~tidings.errors.PublishError`, and events up to the failing one may have been
      sent: the caller sends again (the inbox makes duplicates harmless).
    - ``close()`` releases the transport's connections; a later ``send`` opens them again
      (so a process may close its transport when idle, as it may close a database pool). It is
      idempotent, thread-safe, and harmless before any send.
    - What else a transport promises (per-publisher order, fan-out to several services,
      batching, redelivery after a crash) it declares as ``Features`` in its conformance test
      (:mod:`tidings.testing.transport`).
    """

    name: str

    def bind(self, bus: Any) -> None:
        """Attach the bus whose handlers receive the events (called once)."""
        ...

    def subscribed(self, handler: Any) -> None:
        """Check one handler's configuration against what the transport can do."""
        ...

    def send(self, events: Sequence[Any]) -> None:
        """Hand ``events`` to the broker; return once it accepted them."""
        ...

    def close(self) -> None:
        """Release connections; a later send reconnects."""
        ...


@dataclass(frozen=True, slots=True)
class StoredEnvelope:
    """An envelope as the outbox stored it, with what transports route on (no event class).

    Attributes:
        body: the CloudEvents JSON envelope, byte for byte as written; it is sent unchanged.
        event_type: the envelope's ``type``.
        event_id: the envelope's ``id``.
        partition_key: the outbox row's partition key.
        correlation_id: the envelope's ``correlationid``, if any.
        causation_id: the envelope's ``causationid``, if any.
        tenant_id: the envelope's ``tenantid``, if any.
        traceparent: the envelope's ``traceparent``, if any.
        data: the envelope's ``data`` object, decoded to plain JSON values (``str``, ``int``,
            ``float``, ``bool``, ``None``, lists and dicts): what a transport that routes on a
            field of the event (a partition attribute, say) reads instead of the event.

    Every text attribute was checked as the codec checks envelope ids (printable ASCII, bounded
    length), so it may go into broker headers and log lines.
    """

    body: bytes
    event_type: str
    event_id: str
    partition_key: str
    correlation_id: str | None = None
    causation_id: str | None = None
    tenant_id: str | None = None
    traceparent: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


class EnvelopeRefusedError(PublishError):
    """A transport cannot send one stored envelope (whatever is tried, it would fail again).

    Raised by :meth:`EnvelopeSender.send_envelopes` before anything of the batch was sent;
    ``index`` is the envelope's position in the batch, ``reason`` says why. The outbox relay
    counts an attempt on that row (quarantining it after its bound) and sends the others.
    """

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"envelope {index} of the batch refused: {reason}")
        self.index = index
        self.reason = reason


@runtime_checkable
class EnvelopeSender(Protocol):
    """An optional capability of a :class:`Transport`: forward stored envelopes as written.

    The outbox relay is a pipe: it needs no event class, only the stored bytes and the few
    attributes a transport routes on (:class:`StoredEnvelope`). Contract:

    - ``send_envelopes(envelopes)`` returns once the broker accepted every envelope, each
      ``body`` sent unchanged, in order, where ``send`` would send an event of that type, key
      and context; it is thread-safe. It checks every envelope before sending any: one it can
      never send raises :class:`EnvelopeRefusedError` naming it, and nothing was sent. A broker
      failure raises :class:`~tidings.errors.PublishError` (envelopes up to the failing one may
      have been sent: the caller sends again).
    - ``send_envelopes([])`` sends nothing and raises :class:`~tidings.errors.UsageError` when
      the transport's configuration needs the event classes (a custom route function, say):
      callers check at start-up that way, instead of failing on every row.
    """

    def send_envelopes(self, envelopes: Sequence[StoredEnvelope]) -> None:
        """Hand the stored envelopes to the broker unchanged; return once it accepted them."""
        ...
