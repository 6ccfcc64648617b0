import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import pytest

from tidings import DomainEvent, EventBus, event_context, register_event
from tidings.integrations.logging import CONTEXT_KEYS, ContextFilter, structlog_processor

FORMAT = "%(correlation_id)s %(causation_id)s %(tenant_id)s %(event_id)s %(message)s"


@register_event
@dataclass(frozen=True)
class NoteTaken(DomainEvent):
    event_type: ClassVar[str] = "logging_test.note_taken"
    text: str = ""


@pytest.fixture
def log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(ContextFilter())
    logger = logging.getLogger(f"tidings.test.{id(stream)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield logger, stream
    finally:
        logger.removeHandler(handler)


def test_filter_outside_any_context_writes_the_default(log):
    """Outside any scope every id is written as "-" so the format string never fails."""
    logger, stream = log
    logger.info("hello")
    assert stream.getvalue() == "- - - - hello\n"


def test_filter_default_is_configurable():
    """A filter built with default="" puts that value on unbound ids."""
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    assert ContextFilter(default="").filter(record)
    assert all(getattr(record, key) == "" for key in CONTEXT_KEYS)


def test_filter_adds_the_ids_bound_by_event_context(log):
    """Inside event_context the record carries the bound correlation and tenant ids."""
    logger, stream = log
    with event_context(correlation_id="c-1", tenant_id="acme"):
        logger.info("inside")
    assert stream.getvalue() == "c-1 - acme - inside\n"


def test_filter_escapes_a_bound_value_that_could_forge_a_line(log):
    """A bound id with CR/LF or ESC is written escaped and cut, on one line."""
    logger, stream = log
    with event_context(correlation_id="c\r\nFAKE line\x1b[2J", tenant_id="t" * 300):
        logger.info("inside")
    line = stream.getvalue()
    assert line.count("\n") == 1
    assert "\x1b" not in line
    assert "\r" not in line
    assert line.startswith("c\\r\\nFAKE line\\x1b[2J - " + "t" * 256 + "…")


def test_filter_keeps_attributes_passed_with_extra(log):
    """An id the caller passed with extra= is not replaced by the context's."""
    logger, stream = log
    with event_context(correlation_id="c-1"):
        logger.info("mine", extra={"correlation_id": "explicit"})
    assert stream.getvalue().startswith("explicit ")


def test_filter_inside_a_bus_handler_adds_the_handled_event_id(log):
    """Inside a handler causation_id and event_id are the handled event's id."""
    logger, stream = log
    bus = EventBus()

    @bus.subscribe(NoteTaken, name="logging_test.log_note")
    def log_note(event: NoteTaken) -> None:
        logger.info(event.text)

    with event_context(correlation_id="c-7", tenant_id="t-7"):
        event = NoteTaken(text="noted")
    bus.publish(event)
    assert stream.getvalue() == f"c-7 {event.event_id} t-7 {event.event_id} noted\n"


def test_processor_outside_any_context_adds_none():
    """Outside any scope the processor adds every key with the value None."""
    event_dict = structlog_processor(None, "info", {"event": "hi"})
    assert event_dict == {"event": "hi", **dict.fromkeys(CONTEXT_KEYS)}


def test_processor_adds_ids_without_overwriting_the_callers():
    """Bound ids are added, and a key the caller set keeps its value."""
    with event_context(correlation_id="c-2", tenant_id="acme"):
        event_dict = structlog_processor(None, "info", {"event": "hi", "tenant_id": "mine"})
    assert event_dict["correlation_id"] == "c-2"
    assert event_dict["tenant_id"] == "mine"
    assert event_dict["causation_id"] is None


def test_processor_escapes_unsafe_bound_values():
    """The structlog processor escapes a bound value with control characters."""
    with event_context(correlation_id="a\nb"):
        event_dict = structlog_processor(None, "info", {"event": "hi"})
    assert event_dict["correlation_id"] == "a\\nb"


def test_processor_inside_a_bus_handler_adds_the_handled_event_id():
    """Inside a handler the processor adds the handled event's id as causation and event id."""
    seen: list[object] = []
    bus = EventBus()

    @bus.subscribe(NoteTaken, name="logging_test.process_note")
    def process_note(event: NoteTaken) -> None:
        seen.append(structlog_processor(None, "info", {"event": event.text}))

    event = NoteTaken(text="n")
    bus.publish(event)
    assert seen == [
        {
            "event": "n",
            "correlation_id": event.correlation_id,
            "causation_id": event.event_id,
            "tenant_id": None,
            "event_id": event.event_id,
        }
    ]


def test_processor_works_in_a_structlog_chain():
    """Configured in front of structlog's renderer, the ids reach the rendered line."""
    structlog = pytest.importorskip("structlog")
    logger = structlog.wrap_logger(
        structlog.testing.CapturingLogger(),
        processors=[structlog_processor, structlog.processors.KeyValueRenderer(sort_keys=True)],
    )
    with event_context(correlation_id="c-3"):
        logger.info("hi")
    line = logger._logger.calls[0].args[0]
    assert "correlation_id='c-3'" in line
    assert "event_id=None" in line
