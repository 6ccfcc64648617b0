"""What every outbox shares, with no database library: limits, partition keys, backoff, order.

The SQLAlchemy outbox (:mod:`tidings.outbox`) and the Django one
(:mod:`tidings.integrations.django`) both build on these, so they agree on the table's
limits, on which key an event's order is kept by, and on which claimed rows may go out.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast
from urllib.parse import quote

import msgspec

from tidings import _tracing
from tidings._untrusted import RedactingFilter, log_safe
from tidings._wire import SPEC_VERSION, check_attributes, is_plain
from tidings.bus import EventBus
from tidings.codec import _NOT_OPENERS, Limits, _incoming_decoder, _too_deep
from tidings.context import EventContext, bind, reset
from tidings.errors import EventDecodeError, UsageError
from tidings.events import DomainEvent
from tidings.ports import EnvelopeRefusedError, EnvelopeSender, StoredEnvelope, Transport

__all__ = [
    "EVENT_ID_LENGTH",
    "KEY_LENGTH",
    "REASON_LENGTH",
    "Backoff",
    "BatchReport",
    "ClaimedRow",
    "Drained",
    "RedactingFilter",
    "default_partition_key",
    "drain",
    "forward_batch",
    "in_key_order",
    "read_stored",
    "resolve_publisher",
    "row_key",
    "secret_urls",
    "send_stored",
]

DEFAULT_MAX_ATTEMPTS = 5
"""Per-row failures after which the relay quarantines an outbox row (its key goes on)."""

EVENT_ID_LENGTH = 64
KEY_LENGTH = 200
REASON_LENGTH = 2000
"""The longest reason a quarantined row keeps (longer ones are cut)."""

log = logging.getLogger("tidings.outbox.relay")


def default_partition_key(event: DomainEvent) -> str:
    """Return the key whose order the relay keeps for ``event``.

    It is ``str(event.aggregate_id)`` if the event has that field and it is not ``None``, else
    the ``event_type`` (so events without an aggregate keep their order per type).
    """
    aggregate_id = getattr(event, "aggregate_id", None)
    return type(event).event_type if aggregate_id is None else str(aggregate_id)


def row_key(
    event: object, key: str | None, key_of: Callable[[DomainEvent], str], caller: str
) -> str:
    """Check that ``event`` fits an outbox row and return its partition key.

    ``key`` overrides ``key_of(event)``. ``caller`` names the API in the error message.

    Raises:
        UsageError: not a ``DomainEvent``, or a key or event id longer than its column.
    """
    if not isinstance(event, DomainEvent):
        msg = f"{caller} takes DomainEvent instances, not {type(event).__name__}"
        raise UsageError(msg)
    key = key_of(event) if key is None else key
    if len(key) > KEY_LENGTH or len(event.event_id) > EVENT_ID_LENGTH:
        msg = (
            f"the outbox keeps partition keys up to {KEY_LENGTH} and event ids up to "
            f"{EVENT_ID_LENGTH} characters: shorten {key[:40]!r} / {event.event_id[:40]!r}"
        )
        raise UsageError(msg)
    return key


@dataclass(frozen=True, slots=True)
class Backoff:
    """How long the relay waits after consecutive failures, bounded.

    The n-th failure in a row waits ``initial * factor**(n-1)`` seconds, at most ``maximum``,
    each delay shortened by up to ``jitter`` (a fraction) at random.
    """

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum or self.factor < 1 or not 0 <= self.jitter < 1:
            msg = "Backoff needs 0 < initial <= maximum, factor >= 1 and 0 <= jitter < 1"
            raise ValueError(msg)

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failure in a row (``failures`` >= 1)."""
        exponent = min(max(failures - 1, 0), 64)
        delay = min(self.maximum, self.initial * self.factor**exponent)
        return delay * (1 - self.jitter * random.random())  # noqa: S311 - not cryptographic


@dataclass(frozen=True, slots=True)
class BatchReport:
    """What one claimed batch came to.

    Attributes:
        relayed: rows the broker confirmed (deleted or marked published).
        failed: ids of rows that could not be relayed and stay pending, their attempt counted
            (they hold back the later rows of their key).
        quarantined: ids of rows moved to the quarantine table (their keys went on).
    """

    relayed: int = 0
    failed: tuple[int, ...] = ()
    quarantined: tuple[int, ...] = ()


@dataclass
class Drained:
    """What :func:`drain` relayed so far (a ``--once`` run), updated as it goes."""

    relayed: int = 0
    quarantined: set[int] = dataclasses.field(default_factory=set)
    failing: set[int] = dataclasses.field(default_factory=set)

    def problem(self) -> str | None:
        """The operator's message when a row could not be relayed, else ``None``."""
        if not (self.failing or self.quarantined):
            return None
        shown = ", ".join(str(i) for i in sorted(self.failing | self.quarantined)[:20])
        return (
            f"{len(self.quarantined)} row(s) could not be relayed and were quarantined, "
            f"{len(self.failing)} could not be relayed and stay pending (ids {shown}); see "
            "`tidings outbox status` and `tidings dlq outbox list`"
        )


def drain(runner: Any, into: Drained) -> Drained:
    """Relay batches until nothing moves; each row ends relayed, quarantined or failing.

    ``runner`` is a relay (``run_batch()``, ``quarantining``). Rows failing on their own are
    tried again at once, up to their bound, so that with the quarantine table each ends
    relayed or quarantined. ``into`` is updated as batches go, so a caller that catches an
    exception still knows how far it got.
    """
    while True:
        report = runner.run_batch()
        into.relayed += report.relayed
        into.quarantined.update(report.quarantined)
        into.failing.difference_update(report.quarantined)
        into.failing.update(report.failed)
        retry = bool(report.failed) and runner.quarantining
        if not (report.relayed or report.quarantined or retry):
            return into


class ClaimedRow(Protocol):
    """A claimed outbox row, as either relay reads it."""

    @property
    def id(self) -> int:
        """The row's id (relay order)."""

    @property
    def partition_key(self) -> str:
        """The key whose order is kept."""

    @property
    def payload(self) -> str:
        """The CloudEvents JSON envelope."""

    @property
    def attempts(self) -> int:
        """Failed (or completed) publish attempts so far."""


R = TypeVar("R", bound=ClaimedRow)


def in_key_order(rows: Sequence[R], first_outside: dict[str, int]) -> list[R]:
    """Keep, per key, only the claimed rows older than the key's oldest pending row not claimed.

    ``first_outside`` maps a key to the smallest id of its pending rows outside the batch.
    """
    return [row for row in rows if row.id < first_outside.get(row.partition_key, row.id + 1)]


def relay_batch(
    publish: Callable[[Sequence[DomainEvent]], None],
    events: Sequence[DomainEvent],
    traceparents: Sequence[str | None] | None,
    destination: str,
) -> None:
    """Publish one relayed batch, then log each of its events at DEBUG in its own context.

    With tracing installed, ``publish`` runs inside the events' relay spans (``traceparents``
    are the stored envelopes'). Each log line ("relayed <type> <id>") is written with the
    event's correlation and tenant ids bound, its id as the causation id, so that a log filter
    such as :class:`~tidings.integrations.logging.ContextFilter` ties it to the request.
    """
    stored = [None] * len(events) if traceparents is None else traceparents
    _tracing.relayed(publish, events, stored, destination)
    if not log.isEnabledFor(logging.DEBUG):
        return
    for event in events:
        token = bind(EventContext(event.correlation_id, event.event_id, event.tenant_id))
        try:
            log.debug("relayed %s %s from %s", log_safe(event.event_type),
                      log_safe(event.event_id), destination)  # fmt: skip
        finally:
            reset(token)


def read_stored(row: ClaimedRow, limits: Limits | None = None) -> StoredEnvelope:
    """Read the envelope of ``row`` without its event class: what a pipe forwards.

    The same checks as decoding, up to the event's own fields: size and depth limits before
    parsing, a CloudEvents 1.0 JSON envelope whose ``data`` is an object, and ids, source and
    time of printable ASCII within their bounds. The event type need not be registered here.

    Raises:
        EventDecodeError: the row holds nothing a worker could decode.
    """
    limits = Limits() if limits is None else limits
    stored: str | bytes = row.payload
    try:
        payload = stored.encode("utf-8") if isinstance(stored, str) else bytes(stored)
    except UnicodeEncodeError as exc:
        msg = f"the envelope is not valid Unicode text: {exc}"
        raise EventDecodeError(msg) from exc
    if len(payload) > limits.max_bytes:
        msg = f"the envelope is {len(payload)} bytes, over the {limits.max_bytes}-byte limit"
        raise EventDecodeError(msg)
    if len(payload.translate(None, _NOT_OPENERS)) > limits.max_depth and _too_deep(
        payload, limits.max_depth
    ):
        msg = f"the envelope nests deeper than {limits.max_depth} levels"
        raise EventDecodeError(msg)
    try:
        incoming = _incoming_decoder.decode(payload)
        data = msgspec.json.decode(incoming.data)
    except (
        msgspec.DecodeError,
        msgspec.ValidationError,
        UnicodeDecodeError,
        RecursionError,
    ) as exc:
        msg = f"the row is not a CloudEvents JSON envelope: {log_safe(str(exc), 300)}"
        raise EventDecodeError(msg) from exc
    if not is_plain(payload):
        check_attributes(incoming)
    if incoming.specversion != SPEC_VERSION:
        msg = f"specversion {log_safe(incoming.specversion, 64)!r} is not 1.0"
        raise EventDecodeError(msg, field="specversion")
    if not isinstance(data, dict):
        msg = f"the envelope's data is a {type(data).__name__}, not an object"
        raise EventDecodeError(msg, field="data")
    event_type = incoming.type
    if not event_type or not (event_type.isascii() and event_type.isprintable()):
        msg = f"the envelope's type {log_safe(event_type, 64)!r} is not printable ASCII"
        raise EventDecodeError(msg, field="type")
    return StoredEnvelope(
        body=payload,
        event_type=event_type,
        event_id=incoming.id,
        partition_key=row.partition_key,
        correlation_id=incoming.correlationid,
        causation_id=incoming.causationid,
        tenant_id=incoming.tenantid,
        traceparent=incoming.traceparent,
        data=data,
    )


T = TypeVar("T")


def forward_batch(
    rows: Sequence[R],
    read: Callable[[R], T],
    send: Callable[[list[T]], None],
    goes_on: Callable[[R], bool],
) -> tuple[list[int], list[tuple[R, str]]]:
    """Send what can be sent of ``rows``; return (ids sent, rows that failed with their reason).

    ``read`` turns a row into what ``send`` takes (raising :class:`EventDecodeError` for a row
    that cannot be sent). ``send`` may raise :class:`EnvelopeRefusedError` naming one item,
    having sent nothing: that row failed, and the rest is sent again without it (at most once
    per row). Any other exception from ``send`` propagates (the whole batch failed).

    A failed row holds back the later rows of its key, unless ``goes_on(row)`` (it will be
    quarantined in this same transaction): then the key goes on.
    """
    failed: list[tuple[R, str]] = []
    stuck: set[str] = set()
    items: list[tuple[R, T]] = []
    for row in rows:
        if row.partition_key in stuck:
            continue
        try:
            items.append((row, read(row)))
        except EventDecodeError as exc:
            failed.append((row, f"{type(exc).__name__}: {exc}"))
            if not goes_on(row):
                stuck.add(row.partition_key)
    while items:
        try:
            send([item for _, item in items])
            break
        except EnvelopeRefusedError as exc:
            if not 0 <= exc.index < len(items):
                raise
            row = items[exc.index][0]
            failed.append((row, f"{type(exc).__name__}: {exc.reason}"))
            held = not goes_on(row)
            items = [
                (other, item)
                for position, (other, item) in enumerate(items)
                if position != exc.index
                and not (held and position > exc.index and other.partition_key == row.partition_key)
            ]
    return [row.id for row, _ in items], failed


def log_failed(rows: Sequence[tuple[ClaimedRow, str]], quarantined: set[int], table: str) -> None:
    """Log each row that could not be relayed: quarantined, or waiting with its key held."""
    for row, reason in rows:
        if row.id in quarantined:
            log.error(
                "outbox row %s of %s (key %s) could not be relayed after %s attempts; moved to "
                "quarantine (see `tidings outbox status`, `tidings dlq outbox`): %s",
                row.id, table, log_safe(row.partition_key), row.attempts + 1,
                log_safe(reason, 500),
            )  # fmt: skip
        else:
            log.warning(
                "outbox row %s of %s (key %s) could not be relayed (attempt %s); it and the "
                "later rows of its key wait: %s",
                row.id, table, log_safe(row.partition_key), row.attempts + 1,
                log_safe(reason, 500),
            )  # fmt: skip


def send_stored(
    sender: EnvelopeSender, envelopes: Sequence[StoredEnvelope], destination: str
) -> None:
    """Forward stored envelopes through ``sender``, then log each at DEBUG in its own context.

    With tracing installed, each envelope gets a relay span, a child of its stored
    ``traceparent``, and is sent with that span's ``traceparent`` in place of the stored one
    (the only change a pipe makes to a body).
    """
    installed = _tracing.hooks
    if installed is None:
        sender.send_envelopes(envelopes)
    else:
        # The tracing hooks read only the ids, type and context attributes they share.
        as_events = cast("Sequence[DomainEvent]", envelopes)
        with installed.relay(as_events, [e.traceparent for e in envelopes], destination):
            sender.send_envelopes(
                [
                    _with_traceparent(e, installed.traceparent(cast("DomainEvent", e)))
                    for e in envelopes
                ]
            )
    if not log.isEnabledFor(logging.DEBUG):
        return
    for envelope in envelopes:
        token = bind(EventContext(envelope.correlation_id, envelope.event_id, envelope.tenant_id))
        try:
            log.debug("relayed %s %s from %s", log_safe(envelope.event_type),
                      log_safe(envelope.event_id), destination)  # fmt: skip
        finally:
            reset(token)


def _with_traceparent(envelope: StoredEnvelope, traceparent: str | None) -> StoredEnvelope:
    if traceparent is None or traceparent == envelope.traceparent:
        return envelope
    document: dict[str, Any] = msgspec.json.decode(envelope.body)
    document["traceparent"] = traceparent
    return dataclasses.replace(
        envelope, body=msgspec.json.encode(document), traceparent=traceparent
    )


def check_sender(sender: EnvelopeSender) -> None:
    """Ask ``sender`` at start-up whether it can forward envelopes without event classes.

    Raises:
        UsageError: it cannot (its configuration needs the classes); the message says why.
    """
    sender.send_envelopes([])


def envelope_sender(target: object) -> EnvelopeSender | None:
    """The envelope sender behind ``target`` (a transport, or a bus with one), else ``None``."""
    if isinstance(target, EnvelopeSender):
        return target
    transport = getattr(target, "transport", None)
    if isinstance(target, EventBus) and isinstance(transport, EnvelopeSender):
        return transport
    return None


def resolve_publisher(
    publish: Callable[[Sequence[DomainEvent]], None] | EventBus | Transport | EnvelopeSender,
    decode: bool | None,
) -> tuple[EnvelopeSender | None, Callable[[Sequence[DomainEvent]], None] | None]:
    """Return a relay's envelope sender (``None``: it decodes) and its publish function.

    The publish function is ``None`` for an envelope sender that is nothing else.

    See ``Relay``'s ``publish`` and ``decode`` arguments: a transport or bus that forwards
    envelopes is the pipe; otherwise events are decoded and published; a class is refused.

    Raises:
        UsageError: a class, something that cannot publish, or (``decode=False``) something
            that cannot forward stored envelopes.
    """
    if isinstance(publish, type):
        msg = (
            f"the relay publishes through an EventBus or a transport, not the class "
            f"{publish.__name__}: pass your bus (with its transport) or the transport itself"
        )
        raise UsageError(msg)
    sender = None if decode else envelope_sender(publish)
    if sender is not None:
        try:
            check_sender(sender)
        except UsageError:
            if decode is False or not isinstance(publish, EventBus):
                raise
            sender = None  # the bus decodes; its process has the classes
    elif decode is False:
        msg = (
            f"{type(publish).__name__} cannot forward stored envelopes (no send_envelopes): "
            "give the relay a transport (memory, Redis Streams, Celery) or a bus with one"
        )
        raise UsageError(msg)
    if isinstance(publish, EventBus):
        bus = publish
        return sender, lambda events: bus.publish(*events)
    if isinstance(publish, Transport):
        return sender, publish.send
    if sender is not None and not callable(publish):
        return sender, None
    if not callable(publish):
        msg = f"the relay cannot publish through a {type(publish).__name__}"
        raise UsageError(msg)
    function: Callable[[Sequence[DomainEvent]], None] = publish
    return sender, function


def secret_urls(target: object) -> list[str]:
    """The broker URLs (or a URL holding the broker password) a relay's target connects with.

    Read from a bus's transport or a transport: a Celery app's ``broker_url``, a redis-py
    client's password. For :class:`RedactingFilter` and error messages; never printed.
    """
    transport = target.transport if isinstance(target, EventBus) else target
    found: list[str] = []
    conf = getattr(getattr(transport, "app", None), "conf", None)
    broker = getattr(conf, "broker_url", None)
    if isinstance(broker, str) and broker:
        found.append(broker)
    pool = getattr(getattr(transport, "client", None), "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None)
    password = kwargs.get("password") if isinstance(kwargs, dict) else None
    if isinstance(password, str) and password:
        found.append(f"redis://user:{quote(password, safe='')}@redis/")
    return found
