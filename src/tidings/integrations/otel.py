"""OpenTelemetry tracing: publish, relay and handle spans, linked across every hop.

Install it once in each process (web, relay, worker), after configuring your tracer provider::

    from tidings.integrations.otel import install_tracing

    install_tracing()  # or install_tracing(tracer_provider=provider)

Nothing happens on import. Once installed:

- ``EventBus.publish``/``apublish``, ``Outbox.add``/``add_async`` and the Django ``publish``
  run inside a **publish** span (kind ``PRODUCER``), and every envelope encoded inside it
  carries that span's W3C ``traceparent``.
- The relay starts one **relay** span per event (``PRODUCER``), a child of the ``traceparent``
  stored in its outbox row, and sends the event on with the relay span's ``traceparent``.
  While a batch goes out, the first event's relay span is current, so spans a broker
  instrumentation makes for the batch's message join that event's trace.
- Every handler run is a **handle** span: ``CONSUMER`` in a worker, a child of the envelope's
  ``traceparent``; ``INTERNAL`` in the in-process bus, a child of the publish (or relay) span.
  When a span of the same trace is already current (the ``run`` span of
  ``opentelemetry-instrumentation-celery``, which continues the trace of the message's
  ``apply_async`` span, itself a child of the publish span) the handle span nests under it, so
  the trace is one tree with one root. When the current span belongs to another trace (a
  batch message carrying events of several traces), the handle span keeps the envelope's
  parent and links to the current span.

Attributes follow the OpenTelemetry messaging conventions: ``messaging.system`` (the
transport's name, ``tidings`` in-process and for the outbox), ``messaging.operation``
(``publish`` or ``process``), ``messaging.operation.type`` (``send`` or ``process``),
``messaging.operation.name`` (``publish``, ``relay``, ``handle``),
``messaging.destination.name`` (the queue or stream a handler's message came from, the outbox
table, else the event type), ``messaging.message.id`` (the event id; a batch gives
``messaging.batch.message_count``), plus ``tidings.event_type``, ``tidings.correlation_id``,
``tidings.causation_id``, ``tidings.tenant_id``, ``tidings.handler``, ``tidings.attempt`` and
``tidings.outcome`` (``handled``, ``duplicate``, ``busy``, ``retry``, ``dead_letter``). A
failing handler's span has status ``ERROR`` and an exception event; a retry adds a
``tidings.retry`` event (``tidings.retry_in_s``), a dead letter a ``tidings.dead_letter`` event
(``tidings.dead_letter.id``), a handler busy elsewhere a ``tidings.inbox_busy`` event.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar, Token
from typing import Any

import msgspec

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.context import Context
    from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, Tracer
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError as exc:  # pragma: no cover - depends on the environment
    msg = "tidings tracing needs the OpenTelemetry API: pip install 'tidings[otel]'"
    raise ImportError(msg) from exc

from tidings import __version__, _tracing
from tidings.events import DomainEvent
from tidings.ports import DeadLetter

__all__ = ["install_tracing", "tracing_installed", "uninstall_tracing"]

_propagator = TraceContextTextMapPropagator()
# While a relayed batch is sent: event id -> the traceparent of that event's relay span.
_relaying: ContextVar[dict[str, str] | None] = ContextVar("tidings_otel_relaying", default=None)


class _TraceHeader(msgspec.Struct):
    """The one envelope attribute a handle span needs; the rest of the envelope is skipped."""

    traceparent: str | None = None


_read_header = msgspec.json.Decoder(_TraceHeader).decode
_NAME = "otel"
"""The name this integration is installed under (see :func:`tidings._tracing.install`)."""


def install_tracing(tracer_provider: trace.TracerProvider | None = None) -> None:
    """Trace publishing, relaying and handling in this process through OpenTelemetry.

    ``tracer_provider`` defaults to the global one (set with ``trace.set_tracer_provider``,
    before or after this call). Installing again replaces the previous installation. Thread-safe
    to call, but meant for the composition root, once per process (in a forked worker child too,
    if the provider must be made there).
    """
    tracer = trace.get_tracer("tidings", __version__, tracer_provider=tracer_provider)
    _tracing.install(_NAME, _OtelHooks(tracer))


def uninstall_tracing() -> None:
    """Stop tracing; spans already started end normally. Harmless when not installed."""
    _tracing.uninstall(_NAME)


def tracing_installed() -> bool:
    """Whether :func:`install_tracing` is in effect in this process."""
    return isinstance(_tracing.installed(_NAME), _OtelHooks)


def _traceparent(span: Span) -> str | None:
    context = span.get_span_context()
    if not context.is_valid:
        return None
    flags = int(context.trace_flags)
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{flags:02x}"


def _remote(traceparent: str | None) -> Context | None:
    """The context of a received ``traceparent``; ``None`` if absent or invalid."""
    if not traceparent:
        return None
    context = _propagator.extract({"traceparent": traceparent}, context=Context())
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def _shared(events: Sequence[DomainEvent], name: str) -> Any:
    """The value of attribute ``name`` if every event has the same one, else ``None``."""
    values = {getattr(event, name, None) for event in events}
    return values.pop() if len(values) == 1 else None


def _event_attributes(events: Sequence[DomainEvent]) -> dict[str, Any]:
    attributes: dict[str, Any] = {}
    if len(events) == 1:
        attributes["messaging.message.id"] = events[0].event_id
    else:
        attributes["messaging.batch.message_count"] = len(events)
    for key, name in (
        ("tidings.event_type", "event_type"),
        ("tidings.correlation_id", "correlation_id"),
        ("tidings.causation_id", "causation_id"),
        ("tidings.tenant_id", "tenant_id"),
    ):
        value = _shared(events, name)
        if isinstance(value, str):
            attributes[key] = value
    return attributes


def _messaging(system: str, operation: str, destination: str) -> dict[str, Any]:
    legacy, kind = ("process", "process") if operation == "handle" else ("publish", "send")
    return {
        "messaging.system": system,
        "messaging.operation": legacy,
        "messaging.operation.type": kind,
        "messaging.operation.name": operation,
        "messaging.destination.name": destination,
    }


def _fail(span: Span, error: BaseException) -> None:
    span.record_exception(error)
    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))


class _HandleSpan:
    """One handler run's span, current from its start until :meth:`end`."""

    __slots__ = ("_attach", "_ended", "_relay", "attempt", "span")

    def __init__(self, span: Span, attempt: int) -> None:
        self.span = span
        self.attempt = attempt
        self._ended = False
        self._attach = otel_context.attach(trace.set_span_in_context(span))
        # Events this handler publishes are its own, not part of a relayed batch.
        self._relay: Token[dict[str, str] | None] = _relaying.set(None)

    def done(self, fresh: bool) -> None:
        self.span.set_attribute("tidings.outcome", "handled" if fresh else "duplicate")
        self.end()

    def busy(self, retry_in: float) -> None:
        self.span.set_attribute("tidings.outcome", "busy")
        self.span.add_event("tidings.inbox_busy", {"tidings.retry_in_s": retry_in})
        self.end()

    def failed(
        self,
        error: BaseException,
        *,
        retry_in: float | None = None,
        dead_letter: str | None = None,
    ) -> None:
        _fail(self.span, error)
        if retry_in is not None:
            self.span.set_attribute("tidings.outcome", "retry")
            self.span.add_event(
                "tidings.retry", {"tidings.retry_in_s": retry_in, "tidings.attempt": self.attempt}
            )
        elif dead_letter is not None:
            self.span.set_attribute("tidings.outcome", "dead_letter")
            self.span.add_event("tidings.dead_letter", {"tidings.dead_letter.id": dead_letter})
        self.end()

    def end(self) -> None:
        if self._ended:
            return
        self._ended = True
        _relaying.reset(self._relay)
        otel_context.detach(self._attach)
        self.span.end()

    def __enter__(self) -> _HandleSpan:
        return self

    def __exit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        if error is not None:
            self.failed(error)
        else:
            self.done(fresh=True)


class _OtelHooks:
    """:class:`tidings._tracing.TracingHooks` on an OpenTelemetry tracer."""

    __slots__ = ("tracer",)

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer

    def traceparent(self, event: DomainEvent) -> str | None:
        relayed = _relaying.get()
        if relayed is not None:
            own = relayed.get(event.event_id)
            if own is not None:
                return own
        return _traceparent(trace.get_current_span())

    def publish(
        self, events: Sequence[DomainEvent], system: str, destination: str | None
    ) -> AbstractContextManager[object]:
        return self._publish(events, system, destination)

    @contextmanager
    def _publish(
        self, events: Sequence[DomainEvent], system: str, destination: str | None
    ) -> Iterator[object]:
        if _relaying.get() is not None:
            yield None  # the relay's spans are this send's publish spans
            return
        checked = [event for event in events if isinstance(event, DomainEvent)]
        if destination is None:
            destination = _shared(checked, "event_type") or "tidings"
        attributes = {**_messaging(system, "publish", destination), **_event_attributes(checked)}
        with self.tracer.start_as_current_span(
            f"publish {destination}", kind=SpanKind.PRODUCER, attributes=attributes
        ) as span:
            yield span

    def relay(
        self,
        events: Sequence[DomainEvent],
        traceparents: Sequence[str | None],
        destination: str,
    ) -> AbstractContextManager[object]:
        return self._relay(events, traceparents, destination)

    @contextmanager
    def _relay(
        self,
        events: Sequence[DomainEvent],
        traceparents: Sequence[str | None],
        destination: str,
    ) -> Iterator[object]:
        spans: list[Span] = []
        own: dict[str, str] = {}
        for event, traceparent in zip(events, traceparents, strict=True):
            attributes = {
                **_messaging("tidings", "relay", destination),
                **_event_attributes([event]),
            }
            span = self.tracer.start_span(
                f"relay {event.event_type}",
                context=_remote(traceparent),
                kind=SpanKind.PRODUCER,
                attributes=attributes,
            )
            spans.append(span)
            mine = _traceparent(span)
            if mine is not None:
                own[event.event_id] = mine
        relaying = _relaying.set(own)
        attached = otel_context.attach(trace.set_span_in_context(spans[0])) if spans else None
        try:
            yield spans
        except BaseException as error:
            for span in spans:
                _fail(span, error)
            raise
        finally:
            if attached is not None:
                otel_context.detach(attached)
            _relaying.reset(relaying)
            for span in spans:
                span.end()

    def handle(
        self,
        handler: str,
        event: DomainEvent,
        *,
        body: bytes | None,
        system: str,
        destination: str,
        attempt: int,
    ) -> _HandleSpan:
        if body is None:
            relayed = _relaying.get()
            parent = None if relayed is None else _remote(relayed.get(event.event_id))
            kind = SpanKind.INTERNAL
        else:
            try:
                parent = _remote(_read_header(body).traceparent)
            except (msgspec.DecodeError, UnicodeDecodeError):
                parent = None  # the codec accepted the body; a foreign attribute shape is no parent
            kind = SpanKind.CONSUMER
        links: list[Link] = []
        current = trace.get_current_span().get_span_context()
        if parent is not None and current.is_valid:
            remote = trace.get_current_span(parent).get_span_context()
            if remote.trace_id == current.trace_id:
                parent = None  # nest under the current span (e.g. Celery's run span): one tree
            else:
                links.append(Link(current))
        attributes = {
            **_messaging(system, "handle", destination),
            **_event_attributes([event]),
            "tidings.handler": handler,
            "tidings.attempt": attempt,
        }
        span = self.tracer.start_span(
            f"handle {handler}", context=parent, kind=kind, attributes=attributes, links=links
        )
        return _HandleSpan(span, attempt)

    def rejected(self, letter: DeadLetter, *, system: str) -> None:
        """Nothing to trace: the refusal is on the dead letter and in the worker's log."""

    def unrouted(self, event_type: str, count: int, *, system: str) -> None:
        """Nothing to trace: an event nobody takes starts no span."""
