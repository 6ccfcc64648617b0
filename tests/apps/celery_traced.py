"""A traced shop for the tracing tests: tidings tracing beside the official Celery instrumentation.

The worker subprocess is started as ``celery -A tests.apps.celery_traced worker -Q <queue>``
with ``TRACED_QUEUE``, ``TRACED_PREFIX`` (Redis key prefix) and ``TRACED_SPANS`` (a file the
worker appends its finished spans to, one JSON object a line) set; the test process calls
:func:`make` itself to publish, with its own tracer provider.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import redis
from celery import Celery
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from tidings import DomainEvent, EventBus, register_event
from tidings.deadletter.redis import RedisDeadLetterStore
from tidings.inbox.redis import RedisInbox
from tidings.integrations.otel import install_tracing
from tidings.transports.celery import CeleryTransport

REDIS_URL = os.environ.get("TIDINGS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@register_event
@dataclass(frozen=True)
class LabelPrinted(DomainEvent):
    event_type: ClassVar[str] = "celery_traced.label_printed"
    label_id: str = ""


def span_record(span: ReadableSpan) -> dict[str, object]:
    """The parts of a finished span the tests compare, as plain JSON types."""
    context = span.get_span_context()
    return {
        "name": span.name,
        "trace_id": f"{context.trace_id:032x}" if context else None,
        "span_id": f"{context.span_id:016x}" if context else None,
        "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
        "kind": span.kind.name,
        "attributes": dict(span.attributes or {}),
        "status": span.status.status_code.name,
        "events": [event.name for event in span.events],
    }


class JsonLinesExporter(SpanExporter):
    """Appends each finished span to a file as one JSON line (read by the test process)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(span_record(span), default=str) + "\n" for span in spans)
        with self._lock, open(self.path, "a", encoding="utf-8") as file:
            file.write(lines)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing to release: every export opens and closes the file."""


def make(queue: str, prefix: str) -> tuple[Celery, EventBus, CeleryTransport, redis.Redis]:
    """Build the service: Celery app, transport with Redis inbox and dead letters, one handler."""
    client = redis.Redis.from_url(REDIS_URL)
    app = Celery(f"traced-{queue}", broker=REDIS_URL)
    app.conf.update(
        task_default_queue=queue,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    transport = CeleryTransport(
        app,
        queue=queue,
        inbox=RedisInbox(client, prefix=f"{prefix}:inbox"),
        dead_letters=RedisDeadLetterStore(client, prefix=f"{prefix}:dlq"),
    )
    bus = EventBus(transport=transport)

    @bus.subscribe(LabelPrinted, name="traced.print")
    def print_label(event: LabelPrinted) -> None:
        client.rpush(f"{prefix}:effects", event.event_id)

    return app, bus, transport, client


if os.environ.get("TRACED_QUEUE"):
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(os.environ["TRACED_SPANS"])))
    # The solo pool runs tasks in this process, so instrumenting here (not in
    # worker_process_init, which prefork children need) covers every task.
    CeleryInstrumentor().instrument(tracer_provider=provider)
    install_tracing(provider)
    app, bus, transport, _client = make(os.environ["TRACED_QUEUE"], os.environ["TRACED_PREFIX"])
