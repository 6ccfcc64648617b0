"""The audit's tracing hooks: each publish, relay and handler run queues an audit record.

The records go to a :class:`~tidings.audit._writer.Writer`, whose thread writes them off the
handler's path (see there for what happens when the store falls behind). :func:`uninstall_audit`
and the interpreter's exit write what is queued. In a forked child (a Celery prefork worker)
the writer starts anew with an empty queue: the parent writes what it had queued.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any

import msgspec

from tidings import _tracing
from tidings._untrusted import plain_id
from tidings.audit._record import AuditRecord, AuditStore, storable
from tidings.audit._writer import Writer
from tidings.codec import nests_within

if TYPE_CHECKING:
    from tidings.events import DomainEvent
    from tidings.ports import DeadLetter

__all__ = ["audit_installed", "flush_audit", "install_audit", "uninstall_audit"]

_NAME = "audit"
"""The name the audit is installed under (see :func:`tidings._tracing.install`)."""
_ID_LIMIT = 255
_DETAIL_LIMIT = 1000
# Set while a relayed batch is sent: its publish is the relay, recorded as "relayed".
_relaying: ContextVar[bool] = ContextVar("tidings_audit_relaying", default=False)
_hooked_process = threading.Lock()


class _Ids(msgspec.Struct):
    """The envelope attributes a rejected message's record needs; the rest is skipped."""

    id: Any = None
    type: Any = None
    correlationid: Any = None
    causationid: Any = None
    tenantid: Any = None


_read_ids = msgspec.json.Decoder(_Ids).decode
_process_hooks_done = False


def install_audit(
    store: AuditStore,
    *,
    batch: int = 500,
    flush_interval: float = 0.5,
    max_queued: int = 100_000,
    warn_every: float = 60.0,
) -> None:
    """Record every publish, relay and handler run of this process in ``store``.

    Records are written by a background thread in batches of up to ``batch``, at least every
    ``flush_interval`` seconds; at most ``max_queued`` wait, past which the oldest are dropped
    with a WARNING at most once per ``warn_every`` seconds. Hooks never wait on the store.
    Installing again replaces (and flushes) the previous installation. The store stays the
    caller's to close, after :func:`uninstall_audit`.

    Raises:
        ValueError: a bound is not positive.
    """
    if batch < 1 or max_queued < 1 or not flush_interval > 0 or not warn_every > 0:
        msg = (
            "batch, max_queued, flush_interval and warn_every must be positive, not "
            f"{batch!r}, {max_queued!r}, {flush_interval!r}, {warn_every!r}"
        )
        raise ValueError(msg)
    _hook_process()
    writer = Writer(store, batch, flush_interval, max_queued, warn_every)
    previous = _tracing.installed(_NAME)
    _tracing.install(_NAME, _AuditHooks(writer))
    if isinstance(previous, _AuditHooks):
        previous.writer.close()


def uninstall_audit() -> None:
    """Stop recording, write every queued record, and stop the writer; harmless when off."""
    previous = _tracing.installed(_NAME)
    _tracing.uninstall(_NAME)
    if isinstance(previous, _AuditHooks):
        previous.writer.close()


def audit_installed() -> bool:
    """Whether :func:`install_audit` is in effect in this process."""
    return isinstance(_tracing.installed(_NAME), _AuditHooks)


def flush_audit() -> None:
    """Write every record queued so far, in the calling thread; harmless when off."""
    installed = _tracing.installed(_NAME)
    if isinstance(installed, _AuditHooks):
        installed.writer.flush()


def _hook_process() -> None:
    """Once per process: flush at exit, and restart the writer in a forked child."""
    global _process_hooks_done  # noqa: PLW0603 - once per process, like atexit itself
    with _hooked_process:
        if _process_hooks_done:
            return
        _process_hooks_done = True
    atexit.register(_at_exit)
    os.register_at_fork(after_in_child=_after_fork)


def _at_exit() -> None:
    installed = _tracing.installed(_NAME)
    if isinstance(installed, _AuditHooks):
        installed.writer.close()


def _after_fork() -> None:
    installed = _tracing.installed(_NAME)
    if isinstance(installed, _AuditHooks):
        installed.writer.restart_in_child()


def _id(value: object) -> str | None:
    """An id from an event or a message, if it is one fit to keep (else ``None``)."""
    return plain_id(value, _ID_LIMIT)


def _ids(event: object) -> tuple[str | None, str | None, str | None, str | None, str | None]:
    """The event's id, type, correlation, causation and tenant ids (a non-str one as ``None``).

    No further check: a received event's ids passed the codec's (printable ASCII, bounded), and
    the stores bound and escape what they keep; the hot path of every handler run pays for
    five attribute reads only.
    """
    try:
        ids = (
            event_id := event.event_id,  # type: ignore[attr-defined]
            event_type := event.event_type,  # type: ignore[attr-defined]
            correlation := event.correlation_id,  # type: ignore[attr-defined]
            causation := event.causation_id,  # type: ignore[attr-defined]
            tenant := event.tenant_id,  # type: ignore[attr-defined]
        )
    except AttributeError:  # not an event: publish() refuses it, after this hook
        return (None, None, None, None, None)
    # Written out, no generator: this is once per record.
    if (
        event_id.__class__ is str
        and event_type.__class__ is str
        and (correlation is None or correlation.__class__ is str)
        and (causation is None or causation.__class__ is str)
        and (tenant is None or tenant.__class__ is str)
    ):
        return ids
    return tuple(value if value.__class__ is str else None for value in ids)  # type: ignore[return-value]


def _record(  # noqa: PLR0917 - called on every handler run: positional is cheaper
    writer: Writer,
    kind: str,
    event: object,
    handler: str | None,
    outcome: str,
    attempt: int,
    at: float,
    duration: float | None,
    detail: str,
) -> AuditRecord:
    event_id, event_type, correlation_id, causation_id, tenant_id = _ids(event)
    return AuditRecord(
        kind,
        event_id,
        event_type,
        correlation_id,
        causation_id,
        tenant_id,
        handler,
        outcome,
        attempt,
        duration,
        writer.worker,
        at,
        _text(detail) if detail else "",
    )


def _text(detail: str) -> str:
    """``detail`` cut to its bound, NUL and lone surrogates escaped: every store takes it."""
    return storable(detail[:_DETAIL_LIMIT])


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


class _AuditSpan:
    """One handler run: its record is queued when the run reports how it ended."""

    __slots__ = ("_at", "_relay", "_reported", "_start", "attempt", "event", "handler", "writer")

    def __init__(self, writer: Writer, handler: str, event: DomainEvent, attempt: int) -> None:
        self.writer = writer
        self.handler = handler
        self.event = event
        self.attempt = attempt
        self._reported = False
        # A handler run inline by the relay publishes events of its own: they are recorded.
        self._relay = _relaying.set(False) if _relaying.get() else None
        self._at = time.time()
        self._start = time.perf_counter()

    def _report(self, kind: str, outcome: str, detail: str = "") -> None:
        if self._reported:
            return
        self._reported = True
        duration = time.perf_counter() - self._start
        if self._relay is not None:
            _relaying.reset(self._relay)
        writer = self.writer
        writer.put(
            _record(
                writer,
                kind,
                self.event,
                self.handler,
                outcome,
                self.attempt,
                self._at,
                duration,
                detail,
            )
        )

    def done(self, fresh: bool) -> None:
        if fresh:
            self._report("handled", "ok")
        else:
            self._report("duplicate", "duplicate", "the inbox saw its effect done")

    def busy(self, retry_in: float) -> None:
        self._report(
            "retried", "busy", f"the inbox has it claimed elsewhere; again in {retry_in:.3g} s"
        )

    def failed(
        self,
        error: BaseException,
        *,
        retry_in: float | None = None,
        dead_letter: str | None = None,
    ) -> None:
        reason = _reason(error)
        if retry_in is not None:
            self._report("retried", "retry", f"{reason}; again in {retry_in:.3g} s")
        elif dead_letter is not None:
            self._report("dead_lettered", "dead_letter", f"dead letter {dead_letter}: {reason}")
        else:
            self._report("handled", "failed", reason)

    def end(self) -> None:
        self._report("handled", "aborted", "the worker stopped the run (its own error)")

    def __enter__(self) -> _AuditSpan:
        return self

    def __exit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        if error is not None:
            self.failed(error)
        else:
            self.done(fresh=True)


class _Timed:
    """A publish or a relay: one record per event, queued when the block ends."""

    __slots__ = ("at", "detail", "events", "kind", "start", "token", "writer")

    def __init__(
        self, writer: Writer, kind: str, events: Sequence[DomainEvent], detail: str
    ) -> None:
        self.writer = writer
        self.kind = kind
        self.events = events
        self.detail = detail
        self.token: Token[bool] | None = None

    def __enter__(self) -> None:
        if self.kind == "relayed":
            self.token = _relaying.set(True)
        self.at = time.time()
        self.start = time.perf_counter()

    def __exit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        duration = time.perf_counter() - self.start
        if self.token is not None:
            _relaying.reset(self.token)
        outcome, detail = "ok", self.detail
        if error is not None:
            outcome, detail = "error", f"{detail}: {_reason(error)}"
        writer, at, kind = self.writer, self.at, self.kind
        detail = _text(detail) if detail else ""  # once for the batch, not per event
        put, worker = writer.put, writer.worker
        for event in self.events:
            event_id, event_type, correlation_id, causation_id, tenant_id = _ids(event)
            put(
                AuditRecord(
                    kind,
                    event_id,
                    event_type,
                    correlation_id,
                    causation_id,
                    tenant_id,
                    None,
                    outcome,
                    0,
                    duration,
                    worker,
                    at,
                    detail,
                )
            )


_NOTHING: AbstractContextManager[object] = nullcontext()


class _AuditHooks:
    """:class:`tidings._tracing.TracingHooks` that queue audit records."""

    __slots__ = ("writer",)

    def __init__(self, writer: Writer) -> None:
        self.writer = writer

    def traceparent(self, event: DomainEvent) -> str | None:
        return None

    def publish(
        self, events: Sequence[DomainEvent], system: str, destination: str | None
    ) -> AbstractContextManager[object]:
        where = f"via {system}" if destination is None else f"into the outbox {destination}"
        return self._timed("published", events, where)

    def relay(
        self,
        events: Sequence[DomainEvent],
        traceparents: Sequence[str | None],
        destination: str,
    ) -> AbstractContextManager[object]:
        return self._timed("relayed", events, f"from the outbox {destination}")

    def _timed(
        self, kind: str, events: Sequence[DomainEvent], detail: str
    ) -> AbstractContextManager[object]:
        if _relaying.get():
            return _NOTHING  # the relay's own send: recorded as "relayed"
        return _Timed(self.writer, kind, events, detail)

    def handle(
        self,
        handler: str,
        event: DomainEvent,
        *,
        body: bytes | None,
        system: str,
        destination: str,
        attempt: int,
    ) -> _AuditSpan:
        return _AuditSpan(self.writer, handler, event, attempt)

    def rejected(self, letter: DeadLetter, *, system: str) -> None:
        headers = letter.headers
        try:
            # Bounded already: the worker cut the letter's body to the codec's size limit; the
            # nesting is checked first (a parser recurses through it).
            found = _read_ids(letter.body) if nests_within(letter.body) else _Ids()
        except Exception:  # noqa: BLE001 - not an envelope: the headers may still say whose
            found = _Ids()
        self.writer.put(
            AuditRecord(
                "rejected",
                _id(letter.event_id or found.id or headers.get("tidings_event_id")),
                _id(letter.event_type or found.type or headers.get("tidings_event_type")),
                _id(found.correlationid or headers.get("tidings_correlation_id")),
                _id(found.causationid or headers.get("tidings_causation_id")),
                _id(found.tenantid or headers.get("tidings_tenant_id")),
                _id(letter.handler),
                "rejected",
                letter.attempts,
                None,
                self.writer.worker,
                time.time(),
                _text(f"dead letter {letter.id}: {letter.reason}"),
            )
        )

    def unrouted(self, event_type: str, count: int, *, system: str) -> None:
        """Nothing to record: an event no handler takes has no run to audit."""
