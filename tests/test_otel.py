"""OpenTelemetry tracing: publish, relay and handle spans linked across every hop."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import redis
import sqlalchemy as sa
from opentelemetry import trace
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanKind, StatusCode, Tracer
from sqlalchemy import orm
from tests.apps import celery_traced
from tests.workers import celery_worker, wait_until

from tidings import DomainEvent, EventBus, _tracing, event_context, read, register_event
from tidings.codec import default_codec
from tidings.deadletter.redis import RedisDeadLetterStore
from tidings.delivery import Dispatcher, Received
from tidings.inbox.redis import RedisInbox
from tidings.integrations.otel import install_tracing, tracing_installed, uninstall_tracing
from tidings.memory import MemoryDeadLetterStore, MemoryInbox
from tidings.outbox import Outbox, Relay
from tidings.retry import RetryPolicy
from tidings.transports.redis_streams import RedisStreamsTransport

DEADLINE = 30.0


@register_event
@dataclass(frozen=True)
class TicketSold(DomainEvent):
    event_type: ClassVar[str] = "otel_test.ticket_sold"
    ticket_id: str = ""


@register_event
@dataclass(frozen=True)
class SeatHeld(DomainEvent):
    event_type: ClassVar[str] = "otel_test.seat_held"
    ticket_id: str = ""


class Boom(Exception):
    pass


@dataclass
class Traces:
    """The spans this process finished, and a tracer for the test's own (request) spans."""

    exporter: InMemorySpanExporter
    provider: TracerProvider

    @property
    def tracer(self) -> Tracer:
        return self.provider.get_tracer("test")

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, prefix: str) -> list[ReadableSpan]:
        return [span for span in self.spans() if span.name.startswith(prefix)]

    def one(self, prefix: str) -> ReadableSpan:
        (span,) = self.named(prefix)
        return span


@pytest.fixture
def traces() -> Iterator[Traces]:
    """Tracing installed on an SDK provider with an in-memory exporter, uninstalled after."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    install_tracing(provider)
    try:
        yield Traces(exporter, provider)
    finally:
        uninstall_tracing()
        provider.shutdown()


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent else None


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.trace_id


def traceparent_of(span: ReadableSpan) -> str:
    assert span.context is not None
    flags = int(span.context.trace_flags)
    return f"00-{trace_id(span):032x}-{span_id(span):016x}-{flags:02x}"


class RecordingTransport:
    """A transport that keeps the envelopes it is asked to send."""

    name = "recording"

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    def bind(self, bus: object) -> None:
        pass

    def subscribed(self, handler: object) -> None:
        pass

    def send(self, events: Sequence[DomainEvent]) -> None:
        self.bodies.extend(default_codec.encode(event) for event in events)

    def close(self) -> None:
        pass


# -- off by default --------------------------------------------------------------------------


def test_nothing_is_traced_until_install_tracing_is_called():
    """Importing the integration installs nothing, and envelopes then carry no traceparent."""
    assert _tracing.hooks is None
    assert not tracing_installed()
    transport = RecordingTransport()
    EventBus(transport=transport).publish(TicketSold(ticket_id="t-0"))
    assert read(transport.bodies[0]).traceparent is None


def test_uninstall_tracing_stops_tracing(traces):
    """After uninstall_tracing no span is made and no traceparent is written."""
    uninstall_tracing()
    transport = RecordingTransport()
    with traces.tracer.start_as_current_span("request"):
        EventBus(transport=transport).publish(TicketSold(ticket_id="t-0"))
    assert [span.name for span in traces.spans()] == ["request"]
    assert read(transport.bodies[0]).traceparent is None


# -- the in-process bus ----------------------------------------------------------------------


def test_publish_and_inline_handle_spans_are_parent_and_child(traces):
    """An inline publish is a PRODUCER span under the request; each handler run is its child."""
    bus = EventBus()
    bus.add_handler(lambda event: None, TicketSold, name="box_office.count")
    with (
        traces.tracer.start_as_current_span("request") as request,
        event_context(correlation_id="corr-1", tenant_id="acme"),
    ):
        event = TicketSold(ticket_id="t-1")
        bus.publish(event)
    publish, handle = traces.one("publish"), traces.one("handle")
    assert parent_of(publish) == request.get_span_context().span_id
    assert parent_of(handle) == span_id(publish)
    assert {trace_id(s) for s in traces.spans()} == {request.get_span_context().trace_id}
    assert publish.name == "publish otel_test.ticket_sold"
    assert publish.kind is SpanKind.PRODUCER
    assert publish.attributes is not None
    assert publish.attributes["messaging.system"] == "tidings"
    assert publish.attributes["messaging.operation"] == "publish"
    assert publish.attributes["messaging.destination.name"] == "otel_test.ticket_sold"
    assert publish.attributes["messaging.message.id"] == event.event_id
    assert handle.name == "handle box_office.count"
    assert dict(handle.attributes or {}) == {
        "messaging.system": "tidings",
        "messaging.operation": "process",
        "messaging.operation.type": "process",
        "messaging.operation.name": "handle",
        "messaging.destination.name": "otel_test.ticket_sold",
        "messaging.message.id": event.event_id,
        "tidings.event_type": "otel_test.ticket_sold",
        "tidings.correlation_id": "corr-1",
        "tidings.tenant_id": "acme",
        "tidings.handler": "box_office.count",
        "tidings.attempt": 1,
        "tidings.outcome": "handled",
    }


def test_a_follow_up_published_by_a_handler_is_a_child_of_its_handle_span(traces):
    """A handler's own publish span is a child of the handle span, in the same trace."""
    bus = EventBus()

    @bus.subscribe(TicketSold, name="box_office.hold_seat")
    def hold_seat(event: TicketSold) -> None:
        bus.publish(SeatHeld(ticket_id=event.ticket_id))

    bus.add_handler(lambda event: None, SeatHeld, name="box_office.seat_held")
    bus.publish(TicketSold(ticket_id="t-2"))
    first = traces.one("publish otel_test.ticket_sold")
    hold = traces.one("handle box_office.hold_seat")
    follow_up = traces.one("publish otel_test.seat_held")
    held = traces.one("handle box_office.seat_held")
    assert first.parent is None
    assert parent_of(hold) == span_id(first)
    assert parent_of(follow_up) == span_id(hold)
    assert parent_of(held) == span_id(follow_up)
    assert len({trace_id(s) for s in traces.spans()}) == 1


def test_a_failing_inline_handler_span_has_error_status_and_an_exception_event(traces):
    """A handler that raises leaves an ERROR handle span with the exception recorded."""
    bus = EventBus()

    @bus.subscribe(TicketSold, name="box_office.broken")
    def broken(event: TicketSold) -> None:
        raise Boom("no seats left")

    with pytest.raises(ExceptionGroup):
        bus.publish(TicketSold(ticket_id="t-3"))
    handle = traces.one("handle box_office.broken")
    assert handle.status.status_code is StatusCode.ERROR
    assert "Boom: no seats left" in (handle.status.description or "")
    assert [event.name for event in handle.events] == ["exception"]
    assert traces.one("publish").status.status_code is StatusCode.ERROR


def test_apublish_traces_async_handlers_like_publish(traces):
    """An awaited async handler runs inside its handle span, a child of the publish span."""
    bus = EventBus()
    seen: list[str] = []

    @bus.subscribe(TicketSold, name="box_office.async_count")
    async def count(event: TicketSold) -> None:
        await asyncio.sleep(0)
        seen.append(event.ticket_id)

    asyncio.run(bus.apublish(TicketSold(ticket_id="t-4")))
    assert seen == ["t-4"]
    assert parent_of(traces.one("handle box_office.async_count")) == span_id(traces.one("publish"))


def test_an_envelope_sent_through_a_transport_carries_the_publish_spans_traceparent(traces):
    """Every envelope encoded while the publish span is current carries its traceparent."""
    transport = RecordingTransport()
    bus = EventBus(transport=transport)
    bus.publish(TicketSold(ticket_id="t-5"), TicketSold(ticket_id="t-6"))
    publish = traces.one("publish")
    assert publish.attributes is not None
    assert publish.attributes["messaging.system"] == "recording"
    assert publish.attributes["messaging.batch.message_count"] == 2
    assert [read(body).traceparent for body in transport.bodies] == [traceparent_of(publish)] * 2


# -- the worker's dispatcher -----------------------------------------------------------------


def dispatcher(bus: EventBus, **kwargs) -> Dispatcher:
    return Dispatcher(
        bus, inbox=MemoryInbox(), dead_letters=MemoryDeadLetterStore(), transport="test", **kwargs
    )


def sent_in_a_trace(traces: Traces, event: DomainEvent) -> tuple[bytes, ReadableSpan]:
    transport = RecordingTransport()
    EventBus(transport=transport).publish(event)
    return transport.bodies[0], traces.one("publish")


def test_a_workers_handle_span_is_a_consumer_child_of_the_envelopes_traceparent(traces):
    """Dispatching a received envelope makes a CONSUMER span whose parent is its traceparent."""
    bus = EventBus()
    bus.add_handler(lambda event: None, TicketSold, name="box_office.worker_count")
    event = TicketSold(ticket_id="t-7")
    body, publish = sent_in_a_trace(traces, event)
    worker = dispatcher(bus)
    worker.dispatch(Received(body, destination="tickets"))
    worker.dispatch(Received(body, destination="tickets"))  # a redelivery: the inbox skips it
    first, again = traces.named("handle")
    for span in (first, again):
        assert span.kind is SpanKind.CONSUMER
        assert parent_of(span) == span_id(publish)
        assert trace_id(span) == trace_id(publish)
        assert span.attributes is not None
        assert span.attributes["messaging.system"] == "test"
        assert span.attributes["messaging.destination.name"] == "tickets"
    assert first.attributes is not None
    assert again.attributes is not None
    assert first.attributes["tidings.outcome"] == "handled"
    assert again.attributes["tidings.outcome"] == "duplicate"


def test_each_handler_of_a_received_event_gets_its_own_ended_span(traces):
    """Two handlers of one message get two sibling spans, each ended before the next starts."""
    bus = EventBus()
    bus.add_handler(lambda event: None, TicketSold, name="box_office.first")
    bus.add_handler(lambda event: None, TicketSold, name="box_office.second")
    body, publish = sent_in_a_trace(traces, TicketSold(ticket_id="t-7b"))
    outcome = dispatcher(bus).dispatch(Received(body, destination="tickets"))
    assert outcome.handled == ("box_office.first", "box_office.second")
    first, second = traces.named("handle")
    assert (first.name, second.name) == ("handle box_office.first", "handle box_office.second")
    assert parent_of(first) == parent_of(second) == span_id(publish)
    assert first.end_time is not None
    assert second.end_time is not None
    assert first.end_time <= second.start_time


def test_retries_and_dead_letters_are_recorded_on_the_handle_span(traces):
    """A failing run is an ERROR span with a retry event, the last attempt a dead-letter event."""
    bus = EventBus()

    @bus.subscribe(TicketSold, name="box_office.flaky")
    def flaky(event: TicketSold) -> None:
        raise Boom("printer jammed")

    body, _ = sent_in_a_trace(traces, TicketSold(ticket_id="t-8"))
    worker = dispatcher(bus, retry=RetryPolicy(max_attempts=2, initial_delay=0.5, jitter=0.0))
    (retry,) = worker.dispatch(Received(body, destination="tickets")).retries
    (letter,) = worker.dispatch(
        Received(body, destination="tickets", handler=retry.handler, attempt=retry.attempt)
    ).dead
    first, last = traces.named("handle")
    assert first.status.status_code is StatusCode.ERROR
    assert [e.name for e in first.events] == ["exception", "tidings.retry"]
    assert first.events[1].attributes == {"tidings.retry_in_s": 0.5, "tidings.attempt": 1}
    assert last.status.status_code is StatusCode.ERROR
    assert [e.name for e in last.events] == ["exception", "tidings.dead_letter"]
    assert last.events[1].attributes == {"tidings.dead_letter.id": letter.id}
    assert last.attributes is not None
    assert last.attributes["tidings.attempt"] == 2
    assert last.attributes["tidings.outcome"] == "dead_letter"


def test_a_handle_span_nests_under_a_current_span_of_the_same_trace(traces):
    """A span already current in the envelope's trace (a broker's run span) becomes the parent."""
    bus = EventBus()
    bus.add_handler(lambda event: None, TicketSold, name="box_office.nested")
    body, publish = sent_in_a_trace(traces, TicketSold(ticket_id="t-9"))
    # The broker's run span continues the message's trace, as CeleryInstrumentor's does.
    remote = trace.set_span_in_context(NonRecordingSpan(publish.get_span_context()))
    with traces.tracer.start_as_current_span("broker run", context=remote) as run:
        dispatcher(bus).dispatch(Received(body))
    handle = traces.one("handle")
    assert parent_of(handle) == run.get_span_context().span_id
    assert not handle.links


def test_a_handle_span_links_to_a_current_span_of_another_trace(traces):
    """Under a current span of another trace the handle span keeps its envelope parent and links."""
    bus = EventBus()
    bus.add_handler(lambda event: None, TicketSold, name="box_office.linked")
    body, publish = sent_in_a_trace(traces, TicketSold(ticket_id="t-10"))
    with traces.tracer.start_as_current_span("batch message", context=None) as other:
        dispatcher(bus).dispatch(Received(body))
    handle = traces.one("handle")
    assert parent_of(handle) == span_id(publish)
    assert [link.context.span_id for link in handle.links] == [other.get_span_context().span_id]


# -- the outbox and the relay ----------------------------------------------------------------


@pytest.fixture
def sqlite_outbox(tmp_path: Path) -> Iterator[tuple[sa.Engine, Outbox]]:
    """A SQLite database holding an outbox table."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'outbox.db'}")
    outbox = Outbox()
    outbox.create_tables(engine)
    yield engine, outbox
    engine.dispose()


def test_outbox_add_relay_and_inline_handle_form_one_chain(traces, sqlite_outbox):
    """Outbox add → relay → inline handle is one chain under the request, with no extra span."""
    engine, outbox = sqlite_outbox
    bus = EventBus()
    bus.add_handler(lambda event: None, TicketSold, name="box_office.relayed")
    event = TicketSold(ticket_id="t-11")
    with traces.tracer.start_as_current_span("request") as request, orm.Session(engine) as session:
        outbox.add(session, event)
        session.commit()
    stored = traces.one("publish")
    assert parent_of(stored) == request.get_span_context().span_id
    assert stored.name == "publish tidings_outbox"
    assert Relay(engine, outbox, bus, listen=False).run_once() == 1
    relay = traces.one("relay")
    handle = traces.one("handle")
    assert parent_of(relay) == span_id(stored)
    assert parent_of(handle) == span_id(relay)
    assert len(traces.named("publish")) == 1
    assert {trace_id(s) for s in traces.spans()} == {request.get_span_context().trace_id}
    assert relay.name == "relay otel_test.ticket_sold"
    assert relay.attributes is not None
    assert relay.attributes["messaging.destination.name"] == "tidings_outbox"
    assert relay.attributes["messaging.message.id"] == event.event_id


def test_each_relayed_event_is_sent_on_with_its_own_relay_spans_traceparent(traces, sqlite_outbox):
    """Rows stored in two traces are relayed in one batch, each continuing its own trace."""
    engine, outbox = sqlite_outbox
    transport = RecordingTransport()
    bus = EventBus(transport=transport)
    for ticket in ("t-12", "t-13"):
        with traces.tracer.start_as_current_span(ticket), orm.Session(engine) as session:
            outbox.add(session, TicketSold(ticket_id=ticket))
            session.commit()
    assert Relay(engine, outbox, bus, listen=False).run_once() == 2
    relays = traces.named("relay")
    assert [parent_of(r) for r in relays] == [span_id(p) for p in traces.named("publish")]
    assert len({trace_id(r) for r in relays}) == 2
    assert [read(body).traceparent for body in transport.bodies] == [
        traceparent_of(r) for r in relays
    ]


@contextmanager
def consuming(transport: RedisStreamsTransport) -> Iterator[None]:
    """Run the transport's consumer in a thread for the block, then stop it."""
    stopping = threading.Event()
    thread = threading.Thread(target=transport.run, args=(stopping,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stopping.set()
        thread.join(DEADLINE)
        assert not thread.is_alive(), "the consumer did not stop"


@pytest.mark.integration
def test_outbox_relay_redis_streams_worker_is_one_trace(
    traces, sqlite_outbox, redis_url, unique_name
):
    """Across the outbox and a Redis stream: request → publish → relay → handle, one trace."""
    engine, outbox = sqlite_outbox
    client = redis.Redis.from_url(redis_url)
    try:
        transport = RedisStreamsTransport(
            client,
            service="box_office",
            stream_prefix=f"{unique_name}:stream",
            inbox=RedisInbox(client, prefix=f"{unique_name}:inbox"),
            dead_letters=RedisDeadLetterStore(client, prefix=f"{unique_name}:dlq"),
            block_ms=100,
        )
        bus = EventBus(transport=transport)
        bus.add_handler(
            lambda event: client.rpush(f"{unique_name}:effects", event.event_id),
            TicketSold,
            name="box_office.streamed",
        )
        event = TicketSold(ticket_id="t-14")
        with (
            traces.tracer.start_as_current_span("request") as request,
            orm.Session(engine) as session,
        ):
            outbox.add(session, event)
            session.commit()
        with consuming(transport):
            transport.streams()  # the group exists before the relay publishes
            assert Relay(engine, outbox, bus, listen=False).run_once() == 1
            wait_until(
                lambda: client.lrange(f"{unique_name}:effects", 0, -1),
                timeout=DEADLINE,
                what="the handler's effect",
            )
            handle = wait_until(lambda: traces.named("handle"), what="the handle span")[0]
        relay = traces.one("relay")
        assert parent_of(relay) == span_id(traces.one("publish tidings_outbox"))
        assert parent_of(handle) == span_id(relay)
        assert handle.kind is SpanKind.CONSUMER
        assert handle.attributes is not None
        assert handle.attributes["messaging.system"] == "redis-streams"
        assert handle.attributes["messaging.message.id"] == event.event_id
        assert {trace_id(s) for s in traces.spans()} == {request.get_span_context().trace_id}
        assert [s.name for s in traces.spans() if s.parent is None] == ["request"]
    finally:
        for key in client.scan_iter(f"{unique_name}*"):
            client.delete(key)
        transport.close()
        client.close()


# -- a Celery worker beside the official Celery instrumentation ------------------------------


@pytest.fixture
def celery_instrumented(traces: Traces) -> Iterator[Traces]:
    """CeleryInstrumentor on the test's provider in this (publishing) process, removed after."""
    instrumentor = CeleryInstrumentor()
    instrumentor.instrument(tracer_provider=traces.provider)
    try:
        yield traces
    finally:
        instrumentor.uninstrument()


def worker_spans(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.mark.integration
def test_a_celery_worker_beside_celery_instrumentation_gives_one_trace_with_one_root(
    celery_instrumented, redis_url, unique_name, tmp_path
):
    """Publish → apply_async → run → handle across the Celery hop: one trace, one root span."""
    traces = celery_instrumented
    _app, bus, transport, client = celery_traced.make(unique_name, unique_name)
    spans_file = tmp_path / "worker_spans.jsonl"
    env = {
        "TRACED_QUEUE": unique_name,
        "TRACED_PREFIX": unique_name,
        "TRACED_SPANS": str(spans_file),
    }
    try:
        with celery_worker("tests.apps.celery_traced", unique_name, env):
            with traces.tracer.start_as_current_span("request") as request:
                event = celery_traced.LabelPrinted(label_id="l-1")
                bus.publish(event)
            wait_until(
                lambda: client.lrange(f"{unique_name}:effects", 0, -1),
                timeout=DEADLINE,
                what="the handler's effect",
            )
            remote = wait_until(
                lambda: (
                    [s for s in worker_spans(spans_file) if str(s["name"]).startswith("handle")]
                    and worker_spans(spans_file)
                ),
                timeout=DEADLINE,
                what="the worker's handle span",
            )
    finally:
        for key in client.scan_iter(f"{unique_name}*"):
            client.delete(key)
        transport.close()
        client.close()
    local = [
        {
            "name": s.name,
            "trace_id": f"{trace_id(s):032x}",
            "span_id": f"{span_id(s):016x}",
            "parent_id": f"{parent_of(s):016x}" if s.parent else None,
        }
        for s in traces.spans()
    ]
    everything = local + remote
    by_id = {s["span_id"]: s for s in everything}
    assert {s["trace_id"] for s in everything} == {f"{request.get_span_context().trace_id:032x}"}
    assert [s["name"] for s in everything if s["parent_id"] is None] == ["request"]
    assert all(s["parent_id"] in by_id for s in everything if s["parent_id"] is not None)
    (handle,) = [s for s in remote if s["name"] == "handle traced.print"]
    chain = []
    node: dict[str, object] | None = handle
    while node is not None:
        chain.append(node["name"])
        node = by_id.get(node["parent_id"]) if node["parent_id"] else None
    assert chain[0] == "handle traced.print"
    assert chain[-2:] == ["publish celery_traced.label_printed", "request"]
    assert any(str(name).startswith("run/") for name in chain)
    assert any(str(name).startswith("apply_async/") for name in chain)
    assert handle["kind"] == "CONSUMER"
    attributes = handle["attributes"]
    assert isinstance(attributes, dict)
    assert attributes["messaging.message.id"] == event.event_id
    assert attributes["messaging.system"] == "celery"
    assert attributes["messaging.destination.name"] == unique_name
