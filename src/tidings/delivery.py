"""What a worker does with one received message, whatever the transport.

decode → for each handler: bind the event's context → inbox guard → run → on failure retry
(per the handler's policy) or dead-letter. Transports (Celery, Redis Streams) only move bytes
and schedule the redeliveries this module asks for; the rules live here, once.

Bad input never raises: a message that cannot be decoded (malformed, too large, too deep, an
unknown type, not JSON) is dead-lettered at once with the reason, and the worker goes on. Only a
failure to store a dead letter propagates, so that the transport does not acknowledge a message
that would otherwise be lost.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import NamedTuple, Protocol

from tidings import _tracing
from tidings._letters import bounded_letter_fields
from tidings._untrusted import log_safe
from tidings.bus import EventBus, Handler
from tidings.codec import Codec, default_codec
from tidings.context import EventContext, _current
from tidings.errors import EventDecodeError, InboxBusyError
from tidings.events import DomainEvent
from tidings.ports import BatchInbox, Claim, ClaimPair, DeadLetter, DeadLetterStore, Inbox
from tidings.retry import RetryPolicy

__all__ = [
    "DeliveringTransport",
    "Dispatcher",
    "Outcome",
    "Prepared",
    "Received",
    "Redelivery",
    "Settle",
    "traceback_line",
]

Settle = Callable[[Sequence[Claim], Sequence[Claim]], None]
"""Settles a batch's inbox claims: (done, failed), as :meth:`~tidings.ports.BatchInbox.settle`."""

_clock = time.perf_counter

log = logging.getLogger("tidings.worker")

_TRACEBACK_LIMIT = 8000
_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


class Received(NamedTuple):
    """One message as a transport received it (immutable; a named tuple, cheap to make).

    Attributes:
        body: the envelope bytes.
        headers: the message headers (context ids, routing), as strings.
        destination: the queue or stream it came from.
        handler: when set, deliver to this handler only (a retry or a replay).
        attempt: the attempt number of that handler (1 for a first delivery).
    """

    body: bytes
    headers: Mapping[str, str] = _NO_HEADERS
    destination: str = ""
    handler: str | None = None
    attempt: int = 1


class Redelivery(NamedTuple):
    """A handler to try again: the transport sends ``body`` to ``handler`` after ``delay`` s.

    ``error`` says why, bounded and fit for a log line (the handler's exception, or that the
    inbox found the handler busy elsewhere): what monitors are shown, never the event.
    """

    body: bytes
    handler: str
    attempt: int
    delay: float
    headers: Mapping[str, str] = _NO_HEADERS
    error: str = ""


class Outcome(NamedTuple):
    """What became of one received message (immutable; a named tuple).

    Attributes:
        event: the decoded event, or ``None`` when the message could not be decoded.
        handled: handlers that ran to completion now.
        duplicates: handlers the inbox skipped because their effect already took place.
        retries: redeliveries the transport must schedule.
        dead: what was dead-lettered (already stored).
    """

    event: DomainEvent | None
    handled: tuple[str, ...] = ()
    duplicates: tuple[str, ...] = ()
    retries: tuple[Redelivery, ...] = ()
    dead: tuple[DeadLetter, ...] = ()


class DeliveringTransport(Protocol):
    """What :meth:`Dispatcher.serving` reads from a transport: how its workers deliver."""

    name: str
    dead_letters: DeadLetterStore
    inbox: Inbox | None
    codec: Codec
    retry: RetryPolicy


class Dispatcher:
    """Runs received messages through the bus's handlers, once in effect, with retries.

    Args:
        bus: the handlers.
        dead_letters: where failures end; required, because nothing may be dropped.
        inbox: the idempotency guard; ``None`` runs handlers unguarded (at-least-once effects).
        codec: how bodies are decoded (the default codec if omitted).
        retry: the policy of handlers that have none of their own.
        transport: the transport's name, recorded on dead letters.

    Thread-safe: one dispatcher may serve several worker threads.
    """

    def __init__(
        self,
        bus: EventBus,
        *,
        dead_letters: DeadLetterStore,
        inbox: Inbox | None = None,
        codec: Codec | None = None,
        retry: RetryPolicy | None = None,
        transport: str = "",
    ) -> None:
        self.bus = bus
        self.dead_letters = dead_letters
        self.inbox = inbox
        # An inbox that tells producers apart is given each event's source (see ports.Inbox).
        self._by_source = bool(getattr(inbox, "by_source", False))
        self.codec = default_codec if codec is None else codec
        self.retry = RetryPolicy() if retry is None else retry
        self.transport = transport

    @classmethod
    def serving(cls, bus: EventBus, transport: DeliveringTransport) -> Dispatcher:
        """The dispatcher a transport's workers use: its store, inbox, codec, policy and name."""
        return cls(
            bus,
            dead_letters=transport.dead_letters,
            inbox=transport.inbox,
            codec=transport.codec,
            retry=transport.retry,
            transport=transport.name,
        )

    def dispatch(self, received: Received) -> Outcome:
        """Deliver one message to its handlers; see the module docstring for the rules."""
        return self.dispatch_many([received])[0]

    def dispatch_many(
        self, messages: Sequence[Received], *, settle: Settle | None = None
    ) -> list[Outcome]:
        """Deliver several messages, one :class:`Outcome` each, in order.

        With an inbox that has the :class:`~tidings.ports.BatchInbox` capability and several
        events, every (handler, event) pair is claimed in one round trip and settled in one more
        after the last handler; a worker crash in between repeats the effects of the handlers
        that had finished (at least once, per batch). Otherwise each pair passes the inbox's
        ``guard`` on its own and is marked done as soon as its handler returns.

        ``settle``, when given, is called with the batch's (done, failed) claims *instead of*
        the inbox's ``settle``: the caller then settles them itself (before acknowledging the
        messages), say in the same round trip as its acknowledgement.
        """
        prepared = self.prepare(messages)
        claims = None
        if prepared.pairs:
            assert isinstance(self.inbox, BatchInbox)  # noqa: S101 - pairs only for one
            claims = self.inbox.claim_many(prepared.pairs)
        return self.complete(prepared, claims, settle=settle)

    def prepare(self, messages: Sequence[Received]) -> Prepared:
        """Decode several messages and find their handlers: the first half of ``dispatch_many``.

        Undecodable messages are dead-lettered now. The result's ``pairs`` are what a caller
        claims itself (in the same round trip as other work of its own) and hands to
        :meth:`complete`; they are empty when the inbox claims one pair at a time.
        """
        outcomes: list[Outcome | None] = []
        work: list[_Work] = []
        for received in messages:
            found = self._resolve(received)
            if isinstance(found, Outcome):
                outcomes.append(found)
            else:
                outcomes.append(None)
                work.append((received, *found))
        # One event's handlers pass the inbox one by one, each marked done as it returns, so a
        # crash in a later handler repeats none of the earlier ones. Claiming in bulk pays off
        # for several events; a crash then repeats the effects of the batch's finished handlers.
        pairs: list[ClaimPair] = []
        if isinstance(self.inbox, BatchInbox) and len(work) > 1:
            if self._by_source:
                pairs = [
                    (h.name, event.event_id, source)
                    for _, event, handlers, source in work
                    for h in handlers
                ]
            else:
                pairs = [
                    (h.name, event.event_id) for _, event, handlers, _ in work for h in handlers
                ]
        return Prepared(outcomes, work, pairs)

    def complete(
        self,
        prepared: Prepared,
        claims: Sequence[Claim] | None,
        *,
        settle: Settle | None = None,
    ) -> list[Outcome]:
        """Run the handlers of a :meth:`prepare`-d batch: the second half of ``dispatch_many``.

        ``claims`` answer ``prepared.pairs`` in order (``None`` when there are none); see
        :meth:`dispatch_many` for ``settle``.
        """
        inbox = self.inbox
        batch = None if claims is None else _Batch(iter(claims))
        # The runs' outcomes, for the integrations that take them a batch at a time.
        reports: list[_tracing.RunReport] | None = None
        if _tracing.batch_hooks is not None:
            reports = []
        try:
            handled = iter(
                [self._handle(r, e, hs, batch, src, reports) for r, e, hs, src in prepared.work]
            )
        finally:
            try:
                if (
                    batch is not None
                    and isinstance(inbox, BatchInbox)
                    and (batch.done or batch.failed)
                ):
                    (inbox.settle if settle is None else settle)(batch.done, batch.failed)
            finally:
                batched = _tracing.batch_hooks
                if reports and batched is not None:
                    batched.runs(reports, system=self.transport or "tidings")
        return [o if o is not None else next(handled) for o in prepared.outcomes]

    def _resolve(
        self, received: Received
    ) -> tuple[DomainEvent, tuple[Handler, ...], str] | Outcome:
        """Decode the message and find its handlers (and its source), or dead-letter it."""
        try:
            envelope = self.codec.read(received.body)
        except EventDecodeError as exc:
            letter = self._dead_letter(received, exc, attempts=0, handler=received.handler)
            log.error(
                "dead-lettered an undecodable message %s: %s", letter.id, log_safe(letter.reason)
            )
            self._rejected(letter)
            return Outcome(None, dead=(letter,))
        event, source = envelope.event, envelope.source
        if received.handler is None:
            handlers = self.bus.handlers_for(type(event))
            if not handlers and _tracing.hooks is not None:
                _tracing.hooks.unrouted(event.event_type, 1, system=self.transport or "tidings")
            return event, handlers, source
        target = self.bus.handler(received.handler)
        if target is None or target not in self.bus.handlers_for(type(event)):
            # A retry or replay names one handler; a forged one could aim any event at any
            # handler (a refund handler run on an order event): only its own classes pass.
            name = log_safe(received.handler, 200)
            refused = LookupError(
                f"no handler named {name!r} in this worker"
                if target is None
                else f"handler {name!r} does not subscribe to {event.event_type!r}: a targeted "
                "delivery reaches a handler only with an event it subscribes to"
            )
            letter = self._dead_letter(
                received, refused, attempts=received.attempt, handler=received.handler, event=event
            )
            log.error("dead-lettered a delivery as %s: %s", letter.id, log_safe(letter.reason))
            self._rejected(letter)
            return Outcome(event, dead=(letter,))
        return event, (target,), source

    def _rejected(self, letter: DeadLetter) -> None:
        if _tracing.hooks is not None:
            _tracing.hooks.rejected(letter, system=self.transport or "tidings")

    def _handle(  # noqa: PLR0917 - once per event: positional is cheaper
        self,
        received: Received,
        event: DomainEvent,
        handlers: tuple[Handler, ...],
        batch: _Batch | None,
        source: str,
        reports: list[_tracing.RunReport] | None = None,
    ) -> Outcome:
        """Run one event's handlers with its context bound; collect what became of each.

        Each run gets a span of the integrations that want one; with ``reports``, each run
        that ended (not one cut short by an error of the worker) is also added to it.
        """
        handled: list[str] = []
        duplicates: list[str] = []
        retries: list[Redelivery] = []
        dead: list[DeadLetter] = []
        attempt = received.attempt if received.handler is not None else 1
        hooks = _tracing.span_hooks
        span = _tracing.NO_SPAN
        started, outcome = 0.0, 0
        if hooks is not None:  # what each run's span is told, worked out once per event
            system = self.transport or "tidings"
            destination = received.destination or type(event).event_type
        token = _current.set(EventContext(event.correlation_id, event.event_id, event.tenant_id))
        try:
            for handler in handlers:
                if hooks is not None:
                    # The span of this run, a child of the envelope's ``traceparent``.
                    span = hooks.handle(
                        handler.name,
                        event,
                        body=received.body,
                        system=system,
                        destination=destination,
                        attempt=attempt,
                    )
                if reports is not None:
                    started = _clock()
                try:
                    fresh = self._run(handler, event, batch, source)
                except InboxBusyError as busy:
                    # Not a failure of the handler: someone else is running it. Look again
                    # once their claim would have expired; the attempt does not count.
                    span.busy(busy.retry_after)
                    outcome = _tracing.BUSY
                    retries.append(
                        Redelivery(
                            received.body,
                            handler.name,
                            attempt,
                            busy.retry_after,
                            received.headers,
                            "busy: the inbox has it claimed elsewhere",
                        )
                    )
                except Exception as exc:  # noqa: BLE001 - a handler's failure is data here
                    policy = handler.retry or self.retry
                    if policy.should_retry(exc, attempt):
                        delay = policy.delay(attempt)
                        log.warning(
                            "handler %s failed on %s (attempt %d of %d), retrying in %.1f s: %s",
                            handler.name,
                            event.event_id,
                            attempt,
                            policy.max_attempts,
                            delay,
                            log_safe(repr(exc), 500),
                        )
                        span.failed(exc, retry_in=delay)
                        outcome = _tracing.RETRIED
                        retries.append(
                            Redelivery(
                                received.body,
                                handler.name,
                                attempt + 1,
                                delay,
                                received.headers,
                                log_safe(repr(exc), 500),
                            )
                        )
                    else:
                        letter = self._dead_letter(
                            received, exc, attempts=attempt, handler=handler.name, event=event
                        )
                        log.error(
                            "handler %s failed on %s after %d attempt(s), dead-lettered as %s: %s",
                            handler.name,
                            log_safe(event.event_id),
                            attempt,
                            letter.id,
                            traceback_line(exc),
                        )
                        span.failed(exc, dead_letter=letter.id)
                        outcome = _tracing.DEAD
                        dead.append(letter)
                else:
                    span.done(fresh)
                    outcome = _tracing.DONE if fresh else _tracing.DUPLICATE
                    (handled if fresh else duplicates).append(handler.name)
                if reports is not None:
                    reports.append((handler.name, event, started, _clock() - started, outcome))
        finally:
            span.end()  # idempotent: ends a span left open by an error propagating
            _current.reset(token)
        return Outcome(event, tuple(handled), tuple(duplicates), tuple(retries), tuple(dead))

    def _run(self, handler: Handler, event: DomainEvent, batch: _Batch | None, source: str) -> bool:
        """Run one handler behind the inbox; return False when the inbox skipped it.

        The inbox key is (handler, source, event id) when the inbox tells producers apart
        (``by_source``), else (handler, event id).
        """
        if batch is not None:  # claimed with the rest of the batch; settled after it
            claim = next(batch.claims)
            if not claim.fresh:
                if claim.retry_after is not None:
                    msg = f"{handler.name} is handling event {event.event_id} elsewhere"
                    raise InboxBusyError(msg, retry_after=claim.retry_after)
                return False
            try:
                self._call(handler, event)
            except BaseException:
                batch.failed.append(claim)
                raise
            batch.done.append(claim)
            return True
        if self.inbox is None:
            self._call(handler, event)
            return True
        guard = (
            self.inbox.guard(handler.name, event.event_id, source=source)  # type: ignore[call-arg]
            if self._by_source
            else self.inbox.guard(handler.name, event.event_id)
        )
        with guard as fresh:
            if fresh:
                self._call(handler, event)
            return fresh

    def _call(self, handler: Handler, event: DomainEvent) -> None:
        if handler.is_async:
            # An event loop for the call, closed with it (workers are synchronous); the
            # coroutine runs in a copy of the current context, which has this event's ids.
            with asyncio.Runner() as runner:
                runner.run(handler.func(event), context=contextvars.copy_context())
        else:
            handler.func(event)

    def _dead_letter(
        self,
        received: Received,
        error: BaseException,
        *,
        attempts: int,
        handler: str | None,
        event: DomainEvent | None = None,
    ) -> DeadLetter:
        # Keep what can be stored: a huge message must not make the store fail for ever.
        body, headers, cut = bounded_letter_fields(
            received.body, received.headers, self.codec.limits.max_bytes
        )
        letter = DeadLetter(
            body=body,
            reason=f"{type(error).__name__}: {error}{cut}",
            traceback=_summary(error),
            attempts=attempts,
            handler=handler,
            event_type=None if event is None else event.event_type,
            event_id=None if event is None else event.event_id,
            headers=headers,
            transport=self.transport,
            destination=received.destination,
        )
        self.dead_letters.add(letter)  # raises if the store is down: then nothing is acked
        return letter


_Work = tuple[Received, DomainEvent, tuple[Handler, ...], str]
"""One decodable message of a batch: the message, its event, its handlers, its source."""


class Prepared(NamedTuple):
    """Messages decoded and matched to their handlers by :meth:`Dispatcher.prepare`.

    Attributes:
        outcomes: per message, its outcome when it was settled already (dead-lettered), else
            ``None``.
        work: per decodable message, the message, its event, the handlers to run and the
            envelope's ``source``.
        pairs: the (handler name, event id, source) triples to claim in bulk, or (handler
            name, event id) pairs for an inbox that does not tell sources apart; empty for none.
    """

    outcomes: list[Outcome | None]
    work: list[_Work]
    pairs: list[ClaimPair]


class _Batch:
    """The claims of one ``dispatch_many``, in pair order, and how each ended."""

    __slots__ = ("claims", "done", "failed")

    def __init__(self, claims: Iterator[Claim]) -> None:
        self.claims = claims
        self.done: list[Claim] = []
        self.failed: list[Claim] = []


def traceback_line(error: BaseException, *, frames: int = 3, limit: int = 800) -> str:
    """A failure's traceback summary for one log line: the error, then its innermost frames.

    ``ValueError: boom | at handlers.py:12 in on_order < worker.py:30 in run``: the exception
    (type and message) first, then up to ``frames`` frames, innermost first, as file name, line
    and function. Escaped and cut at about ``limit`` characters, the error's text at half of
    them (:func:`~tidings._untrusted.log_safe`): an error's message may quote a message's data,
    and must not forge a log line.
    """
    summary = traceback.extract_tb(error.__traceback__)[-frames:] if frames > 0 else []
    where = " < ".join(
        f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} in {frame.name}"
        for frame in reversed(summary)
    )
    # The error's own text gets half the room at most, so a long message keeps the frames.
    text = log_safe(f"{type(error).__name__}: {error}", limit // 2)
    return text + (f" | at {log_safe(where, limit - len(text) - 6)}" if where else "")


def _summary(error: BaseException) -> str:
    if isinstance(error, EventDecodeError):
        return ""  # refused input: where the codec noticed is of no use to anyone
    text = "".join(traceback.format_exception(error))
    return text if len(text) <= _TRACEBACK_LIMIT else "…" + text[-_TRACEBACK_LIMIT:]
