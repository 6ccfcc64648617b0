"""The codec: event ⇄ CloudEvents 1.0 structured-mode JSON envelope bytes."""

from __future__ import annotations

import copy
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, ClassVar

import pytest

import tidings
from tidings import (
    Codec,
    DomainEvent,
    Envelope,
    EventDecodeError,
    EventEncodeError,
    EventRegistry,
    EventTypeMismatchError,
    Limits,
    PayloadTooDeepError,
    PayloadTooLargeError,
    TidingsError,
    UnknownEventTypeError,
    event_context,
    register_event,
)
from tidings.codec import BASE_FIELDS, CONTENT_TYPE

REGISTRY = EventRegistry()
SOURCE = "/codec-tests"
CODEC = Codec(REGISTRY, source=SOURCE)


@dataclass(frozen=True)
class Line:
    sku: str
    qty: int


@REGISTRY.register
@dataclass(frozen=True)
class OrderPlaced(DomainEvent):
    event_type: ClassVar[str] = "codec_test.order_placed"
    order_id: str
    quantity: int = 0
    lines: tuple[Line, ...] = ()


@REGISTRY.register
@dataclass(frozen=True)
class Shipped(DomainEvent):
    event_type: ClassVar[str] = "codec_test.shipped"
    order_id: str = ""


@REGISTRY.register
@dataclass(frozen=True)
class ExpressShipped(Shipped):
    event_type: ClassVar[str] = "codec_test.express_shipped"
    courier: str = ""


@REGISTRY.register
@dataclass(frozen=True)
class Renamed(DomainEvent):
    event_type: ClassVar[str] = "codec_test.renamed_v2"
    label: str = ""


REGISTRY.add_alias("codec_test.renamed_old", Renamed)


@REGISTRY.register
@dataclass(frozen=True)
class Positive(DomainEvent):
    event_type: ClassVar[str] = "codec_test.positive"
    amount: int = 1

    def __post_init__(self) -> None:
        if self.amount <= 0:
            msg = f"amount must be positive, got {self.amount}"
            raise ValueError(msg)


@REGISTRY.register
@dataclass(frozen=True)
class Opaque(DomainEvent):
    event_type: ClassVar[str] = "codec_test.opaque"
    blob: Any = None


@REGISTRY.register
@dataclass(frozen=True, slots=True)
class Slotted(DomainEvent):
    event_type: ClassVar[str] = "codec_test.slotted"
    name: str = ""
    scores: list[int] = field(default_factory=lambda: [1, 2, 3])


@REGISTRY.register
@dataclass(frozen=True)
class WithDefaults(DomainEvent):
    event_type: ClassVar[str] = "codec_test.with_defaults"
    note: str = "n/a"
    count: int = 7
    tags: tuple[str, ...] = ()
    items: list[int] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=lambda: {"k": "v"})


@REGISTRY.register
@dataclass(frozen=True)
class Matrix(DomainEvent):
    event_type: ClassVar[str] = "codec_test.matrix"
    rows: list[list[int]] = field(default_factory=list)
    note: str = ""


@REGISTRY.register
@dataclass(frozen=True)
class Versioned(DomainEvent):
    event_type: ClassVar[str] = "codec_test.versioned"
    event_version: ClassVar[int] = 2
    full_name: str = ""


@REGISTRY.upcaster("codec_test.versioned", from_version=1)
def _versioned_v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    return {"full_name": f"{data.pop('first', '')} {data.pop('last', '')}".strip()}


@register_event
@dataclass(frozen=True)
class DefaultRegistered(DomainEvent):
    event_type: ClassVar[str] = "codec_test.default_registered"
    order_id: str = ""


def envelope_of(payload: bytes) -> dict[str, Any]:
    """Parse an encoded payload, keeping tidings' own key order."""
    result: dict[str, Any] = json.loads(payload)
    return result


def foreign(envelope: dict[str, Any]) -> bytes:
    """Re-serialise an envelope the way another producer might: keys in a different order."""
    return json.dumps(dict(sorted(envelope.items())), separators=(", ", ": ")).encode()


def order() -> OrderPlaced:
    return OrderPlaced(order_id="o-1", quantity=3, lines=(Line("sku-1", 2), Line("sku-2", 1)))


# -- encoding -----------------------------------------------------------------------------------


def test_encode_writes_a_cloudevents_structured_mode_object() -> None:
    """Encode writes every required CloudEvents 1.0 attribute with the event's values."""
    event = order()
    env = envelope_of(CODEC.encode(event))
    assert env["specversion"] == "1.0"
    assert env["id"] == event.event_id
    assert env["type"] == "codec_test.order_placed"
    assert env["source"] == SOURCE
    assert env["time"] == event.occurred_at
    assert env["datacontenttype"] == CONTENT_TYPE == "application/json"
    assert env["dataversion"] == "1"
    assert env["correlationid"] == event.correlation_id
    assert env["data"] == {
        "order_id": "o-1",
        "quantity": 3,
        "lines": [{"sku": "sku-1", "qty": 2}, {"sku": "sku-2", "qty": 1}],
    }
    assert all(isinstance(env[key], str) for key in env if key != "data")


def test_encode_omits_none_extensions_and_traceparent_by_default() -> None:
    """Context extensions that are None and an absent traceparent are left out of the envelope."""
    env = envelope_of(CODEC.encode(order()))
    assert set(env) == {
        "specversion",
        "id",
        "type",
        "source",
        "time",
        "datacontenttype",
        "dataversion",
        "correlationid",
        "data",
    }


def test_encode_writes_context_extensions_and_traceparent_when_given() -> None:
    """Correlation, causation and tenant ids and a given traceparent become extension attributes."""
    with event_context(correlation_id="corr-1", causation_id="cause-1", tenant_id="tenant-1"):
        event = order()
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    env = envelope_of(CODEC.encode(event, traceparent=traceparent))
    assert env["correlationid"] == "corr-1"
    assert env["causationid"] == "cause-1"
    assert env["tenantid"] == "tenant-1"
    assert env["traceparent"] == traceparent


def test_data_holds_only_the_subclass_fields() -> None:
    """The data member holds exactly the subclass's own fields; base fields are never inside it."""
    with event_context(correlation_id="c", causation_id="x", tenant_id="t"):
        events: list[DomainEvent] = [
            order(),
            ExpressShipped(order_id="o", courier="ups"),
            Slotted(),
        ]
    own = {
        OrderPlaced: {"order_id", "quantity", "lines"},
        ExpressShipped: {"order_id", "courier"},
        Slotted: {"name", "scores"},
    }
    for event in events:
        data = envelope_of(CODEC.encode(event))["data"]
        assert set(data) == own[type(event)]
        assert not set(data) & set(BASE_FIELDS)
        assert "event_type" not in data


def test_dataversion_is_the_class_event_version_as_a_string() -> None:
    """The dataversion attribute carries the class's event_version as a string."""
    env = envelope_of(CODEC.encode(Versioned(full_name="Ada Lovelace")))
    assert env["dataversion"] == "2"


def test_encode_refuses_a_value_without_json_form() -> None:
    """A field value with no JSON form raises EventEncodeError on encode and on to_dict."""
    event = Opaque(blob=object())
    with pytest.raises(EventEncodeError, match=r"codec_test\.opaque") as info:
        CODEC.encode(event)
    assert isinstance(info.value, TidingsError)
    with pytest.raises(EventEncodeError):
        event.to_dict()
    with pytest.raises(EventEncodeError):
        CODEC.encode(Opaque(blob=1j))


# -- round trips --------------------------------------------------------------------------------


def test_decode_of_encode_is_the_same_event_of_the_same_class() -> None:
    """decode(encode(e)) equals e and is an instance of e's own class, not a base class."""
    with event_context(correlation_id="corr", causation_id="cause", tenant_id="tenant"):
        events: list[DomainEvent] = [
            order(),
            Shipped(order_id="s"),
            ExpressShipped(order_id="x", courier="dhl"),
            Renamed(label="l"),
            WithDefaults(note="n", count=1, tags=("a",), items=[1], meta={}),
        ]
    for event in events:
        decoded = CODEC.decode(CODEC.encode(event))
        assert decoded == event
        assert type(decoded) is type(event)


def test_decode_with_the_exact_class_or_a_base_class_as_expected() -> None:
    """expected= accepts the payload's own class and any base class of it."""
    event = ExpressShipped(order_id="o", courier="c")
    payload = CODEC.encode(event)
    assert CODEC.decode(payload, ExpressShipped) == event
    assert CODEC.decode(payload, Shipped) == event
    assert CODEC.decode(payload, DomainEvent) == event
    assert CODEC.decode(foreign(envelope_of(payload)), Shipped) == event


@pytest.mark.parametrize("reorder", [False, True], ids=["tidings-order", "foreign-order"])
def test_expected_refuses_a_registered_class_outside_it(reorder: bool) -> None:
    """expected= refuses a registered class that is neither that class nor a subclass of it."""
    cases: list[tuple[DomainEvent, type[DomainEvent]]] = [
        (Shipped(order_id="o"), ExpressShipped),
        (order(), Shipped),
        (Renamed(), OrderPlaced),
    ]
    for event, expected in cases:
        payload = CODEC.encode(event)
        if reorder:
            payload = foreign(envelope_of(payload))
        with pytest.raises(EventTypeMismatchError) as info:
            CODEC.decode(payload, expected)
        assert isinstance(info.value, EventDecodeError)


def test_read_returns_an_envelope_with_producer_attributes() -> None:
    """Codec.read returns an Envelope with the event, source, traceparent and dataversion."""
    event = order()
    envelope = CODEC.read(CODEC.encode(event, traceparent="00-trace-01"))
    assert isinstance(envelope, Envelope)
    assert envelope.event == event
    assert envelope.source == SOURCE
    assert envelope.traceparent == "00-trace-01"
    assert envelope.dataversion == 1
    plain = CODEC.read(CODEC.encode(event))
    assert plain.traceparent is None


def test_read_reports_another_producers_source() -> None:
    """Codec.read reports the source that the producing codec was configured with."""
    other = Codec(REGISTRY, source="/orders-service")
    envelope = CODEC.read(other.encode(Shipped(order_id="o")))
    assert envelope.source == "/orders-service"


def test_to_envelope_is_the_encoded_json_as_a_dict() -> None:
    """to_envelope returns the same object encode serialises, as plain JSON types."""
    event = order()
    assert CODEC.to_envelope(event, traceparent="tp") == json.loads(
        CODEC.encode(event, traceparent="tp")
    )


def test_from_envelope_round_trips_and_leaves_the_input_unchanged() -> None:
    """from_envelope(to_envelope(e)) == e and the envelope dict is not mutated."""
    event = order()
    env = CODEC.to_envelope(event)
    before = copy.deepcopy(env)
    assert CODEC.from_envelope(env) == event
    assert env == before
    assert list(env) == list(before)
    reordered = dict(sorted(env.items()))
    assert CODEC.from_envelope(reordered, OrderPlaced) == event
    assert CODEC.from_envelope(MappingProxyType(env)) == event
    assert env == before


def test_from_envelope_refuses_what_is_not_a_json_object() -> None:
    """from_envelope raises EventDecodeError for a non-mapping or a value with no JSON form."""
    with pytest.raises(EventDecodeError):
        CODEC.from_envelope([("type", "x")])  # type: ignore[arg-type]
    env = CODEC.to_envelope(order())
    env["source"] = object()
    with pytest.raises(EventDecodeError):
        CODEC.from_envelope(env)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview, str])
def test_decode_accepts_bytes_bytearray_memoryview_and_str(kind: type) -> None:
    """Codec.decode accepts the payload as bytes, bytearray, memoryview or str."""
    event = order()
    payload = CODEC.encode(event)
    for raw in (payload, foreign(envelope_of(payload))):
        given = raw.decode() if kind is str else kind(raw)
        assert CODEC.decode(given) == event
        assert CODEC.read(given).event == event


def test_decode_refuses_a_payload_of_another_python_type() -> None:
    """A payload that is neither bytes-like nor str raises EventDecodeError."""
    for bad in (None, 42, {"type": "x"}, ["x"]):
        with pytest.raises(EventDecodeError):
            CODEC.decode(bad)  # type: ignore[arg-type]


def test_module_level_functions_use_the_default_registry() -> None:
    """tidings.encode/decode/read work for classes registered with @register_event."""
    event = DefaultRegistered(order_id="o")
    payload = tidings.encode(event, traceparent="tp")
    assert tidings.decode(payload) == event
    assert tidings.decode(payload, DefaultRegistered) == event
    envelope = tidings.read(payload)
    assert envelope.event == event
    assert envelope.traceparent == "tp"
    assert envelope.source == "/tidings"


def test_slotted_event_round_trips() -> None:
    """An event class declared with slots=True round-trips through encode/decode and dicts."""
    event = Slotted(name="n", scores=[5])
    decoded = CODEC.decode(CODEC.encode(event))
    assert decoded == event
    assert type(decoded) is Slotted
    assert CODEC.decode(foreign(envelope_of(CODEC.encode(event)))) == event
    assert Slotted.from_dict(event.to_dict()) == event


@pytest.mark.parametrize("reorder", [False, True], ids=["tidings-order", "foreign-order"])
def test_absent_defaulted_fields_take_their_defaults(reorder: bool) -> None:
    """Fields with a default or default_factory absent from data take that default on decode."""
    env = CODEC.to_envelope(WithDefaults(note="given"))
    env["data"] = {"note": "given"}
    payload = foreign(env) if reorder else json.dumps(env).encode()
    first = CODEC.decode(payload, WithDefaults)
    second = CODEC.decode(payload, WithDefaults)
    assert first.note == "given"
    assert first.count == 7
    assert first.tags == ()
    assert first.items == []
    assert first.meta == {"k": "v"}
    assert first.items is not second.items
    assert first.meta is not second.meta
    env["data"] = {}
    assert CODEC.decode(json.dumps(env)) == WithDefaults(
        event_id=first.event_id,
        correlation_id=first.correlation_id,
        occurred_at=first.occurred_at,
    )


@pytest.mark.parametrize("reorder", [False, True], ids=["tidings-order", "foreign-order"])
def test_slotted_defaults_apply_when_absent(reorder: bool) -> None:
    """A slots=True class also gets its defaults and fresh default_factory values on decode."""
    env = CODEC.to_envelope(Slotted())
    del env["data"]
    payload = foreign(env) if reorder else json.dumps(env).encode()
    first = CODEC.decode(payload, Slotted)
    second = CODEC.decode(payload, Slotted)
    assert first.name == ""
    assert first.scores == [1, 2, 3]
    assert first.scores is not second.scores


# -- other producers ----------------------------------------------------------------------------


def minimal_envelope(**extra: Any) -> dict[str, Any]:
    """An envelope as a minimal foreign CloudEvents producer writes it (attributes first)."""
    env: dict[str, Any] = {
        "specversion": "1.0",
        "id": "ext-1",
        "source": "urn:example:producer",
        "type": "codec_test.shipped",
        "data": {"order_id": "o-9"},
    }
    env.update(extra)
    return env


def test_own_output_takes_the_fast_path_and_foreign_key_order_decodes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Envelopes tidings wrote skip the general path; any key order decodes to the same event."""
    codec = Codec(REGISTRY)
    calls: list[bytes] = []
    slow = codec._decode_slowly

    def spy(payload: bytes, expected: type[DomainEvent]) -> Any:
        calls.append(payload)
        return slow(payload, expected)

    monkeypatch.setattr(codec, "_decode_slowly", spy)
    event = order()
    assert codec.decode(codec.encode(event)) == event  # may warm a per-type cache
    calls.clear()
    assert codec.decode(codec.encode(event)) == event
    assert calls == []
    assert codec.decode(foreign(envelope_of(codec.encode(event)))) == event


def test_foreign_envelope_with_extra_extensions_decodes() -> None:
    """Unknown extension attributes and optional CloudEvents attributes are ignored."""
    env = minimal_envelope(
        time="2024-05-06T07:08:09Z",
        correlationid="corr-x",
        tenantid="t-x",
        subject="orders/o-9",
        dataschema="https://example.com/schema",
        comexampleext="value",
        partitionkey="p-1",
    )
    event = CODEC.decode(json.dumps(env), Shipped)
    assert event == Shipped(
        order_id="o-9",
        event_id="ext-1",
        correlation_id="corr-x",
        occurred_at="2024-05-06T07:08:09Z",
        tenant_id="t-x",
        causation_id=None,
    )
    assert type(event) is Shipped


def test_foreign_envelope_without_time_gets_a_fresh_utc_timestamp() -> None:
    """A missing time attribute becomes a fresh ISO-8601 UTC occurred_at."""
    before = datetime.now(UTC)
    event = CODEC.decode(json.dumps(minimal_envelope()))
    after = datetime.now(UTC)
    occurred = datetime.fromisoformat(event.occurred_at)
    assert occurred.utcoffset() is not None
    assert occurred.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert before.replace(microsecond=0) <= occurred <= after


def test_foreign_envelope_without_correlation_id_is_fresh_outside_a_context() -> None:
    """A missing correlationid outside any event_context becomes a fresh uuid4, per message."""
    first = CODEC.decode(json.dumps(minimal_envelope()))
    second = CODEC.decode(json.dumps(minimal_envelope()))
    assert uuid.UUID(first.correlation_id).version == 4
    assert first.correlation_id != second.correlation_id
    assert first.tenant_id is None
    assert first.causation_id is None


def test_foreign_envelope_without_correlation_id_takes_the_current_context() -> None:
    """A missing correlationid is taken from the current event_context, never minted anew."""
    with event_context(correlation_id="ctx-corr"):
        slow = CODEC.decode(json.dumps(minimal_envelope()))
        env = CODEC.to_envelope(Shipped(order_id="o"))
        del env["correlationid"]
        fast = CODEC.decode(json.dumps(env))
    assert slow.correlation_id == "ctx-corr"
    assert fast.correlation_id == "ctx-corr"


def test_envelope_correlation_id_wins_over_the_current_context() -> None:
    """A correlationid present in the envelope is kept even inside another event_context."""
    with event_context(correlation_id="ctx-corr"):
        event = CODEC.decode(json.dumps(minimal_envelope(correlationid="wire-corr")))
    assert event.correlation_id == "wire-corr"


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/cloudevents+json",
        "application/json; charset=utf-8",
        "application/cloudevents+json; charset=UTF-8",
        "Application/JSON",
    ],
)
@pytest.mark.parametrize("reorder", [False, True], ids=["tidings-order", "foreign-order"])
def test_json_content_types_decode(content_type: str, reorder: bool) -> None:
    """Any JSON datacontenttype (with parameters, +json suffix, any case) decodes."""
    event = Shipped(order_id="o")
    env = CODEC.to_envelope(event)
    env["datacontenttype"] = content_type
    payload = foreign(env) if reorder else json.dumps(env).encode()
    assert CODEC.decode(payload) == event


def test_absent_content_type_means_json() -> None:
    """An envelope without datacontenttype is read as JSON, as CloudEvents says."""
    event = CODEC.decode(json.dumps(minimal_envelope()))
    assert event.order_id == "o-9"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "content_type",
    ["application/python-pickle", "application/x-pickle", "text/plain", "application/xml", ""],
)
@pytest.mark.parametrize("reorder", [False, True], ids=["tidings-order", "foreign-order"])
def test_non_json_content_type_is_refused(content_type: str, reorder: bool) -> None:
    """A datacontenttype that is not JSON raises EventDecodeError naming datacontenttype."""
    env = CODEC.to_envelope(Shipped(order_id="o"))
    env["datacontenttype"] = content_type
    payload = foreign(env) if reorder else json.dumps(env).encode()
    with pytest.raises(EventDecodeError) as info:
        CODEC.decode(payload)
    assert info.value.field == "datacontenttype"


@pytest.mark.parametrize("version", ["0.3", "1.1", "2.0", "1", "1.0 ", ""])
@pytest.mark.parametrize("reorder", [False, True], ids=["tidings-order", "foreign-order"])
def test_specversion_other_than_1_0_is_refused(version: str, reorder: bool) -> None:
    """Only specversion "1.0" is read; anything else raises EventDecodeError naming it."""
    env = CODEC.to_envelope(Shipped(order_id="o"))
    env["specversion"] = version
    payload = foreign(env) if reorder else json.dumps(env).encode()
    with pytest.raises(EventDecodeError) as info:
        CODEC.decode(payload)
    assert info.value.field == "specversion"


def test_specversion_as_a_number_is_refused() -> None:
    """A specversion that is a JSON number rather than the string "1.0" is refused."""
    env = CODEC.to_envelope(Shipped(order_id="o"))
    env["specversion"] = 1.0
    with pytest.raises(EventDecodeError) as info:
        CODEC.decode(json.dumps(env))
    assert info.value.field == "specversion"


@pytest.mark.parametrize("reorder", [False, True], ids=["tidings-order", "foreign-order"])
def test_unknown_type_raises_unknown_event_type_error(reorder: bool) -> None:
    """An unregistered type raises UnknownEventTypeError, an EventDecodeError naming the type."""
    env = CODEC.to_envelope(Shipped(order_id="o"))
    env["type"] = "codec_test.never_registered"
    payload = foreign(env) if reorder else json.dumps(env).encode()
    with pytest.raises(UnknownEventTypeError) as info:
        CODEC.decode(payload)
    assert isinstance(info.value, EventDecodeError)
    assert info.value.event_type == "codec_test.never_registered"
    assert info.value.field == "event_type"


def test_a_type_registered_elsewhere_is_unknown_here() -> None:
    """A class registered only in the default registry is unknown to a private registry's codec."""
    payload = tidings.encode(DefaultRegistered(order_id="o"))
    with pytest.raises(UnknownEventTypeError):
        CODEC.decode(payload)


@pytest.mark.parametrize("reorder", [False, True], ids=["tidings-order", "foreign-order"])
def test_alias_decodes_to_the_new_class(reorder: bool) -> None:
    """A payload named by an alias (the old name of a renamed type) decodes to the new class."""
    event = Renamed(label="x")
    env = CODEC.to_envelope(event)
    env["type"] = "codec_test.renamed_old"
    payload = foreign(env) if reorder else json.dumps(env).encode()
    decoded = CODEC.decode(payload, Renamed)
    assert type(decoded) is Renamed
    assert decoded == event
    assert envelope_of(CODEC.encode(decoded))["type"] == "codec_test.renamed_v2"


def test_old_dataversion_is_upcast_and_read_reports_it() -> None:
    """An older dataversion is upcast, and read reports the version the payload was written at."""
    env = CODEC.to_envelope(Versioned(full_name="x"))
    env["dataversion"] = "1"
    env["data"] = {"first": "Ada", "last": "Lovelace"}
    envelope = CODEC.read(json.dumps(env))
    assert envelope.event.full_name == "Ada Lovelace"  # type: ignore[attr-defined]
    assert envelope.dataversion == 1


def test_newer_dataversion_than_the_class_is_refused() -> None:
    """A payload written at a version newer than the local class raises EventDecodeError."""
    env = CODEC.to_envelope(Versioned(full_name="x"))
    env["dataversion"] = "3"
    with pytest.raises(EventDecodeError) as info:
        CODEC.decode(json.dumps(env))
    assert info.value.field == "dataversion"


# -- limits -------------------------------------------------------------------------------------


def test_limits_refuse_nonsense_bounds() -> None:
    """Limits too small to hold any envelope are refused at construction."""
    with pytest.raises(ValueError, match="max_bytes"):
        Limits(max_bytes=10)
    with pytest.raises(ValueError, match="max_depth"):
        Limits(max_depth=1)


def test_oversized_payload_is_refused_before_parsing() -> None:
    """A payload longer than max_bytes raises PayloadTooLargeError even when it is not JSON."""
    codec = Codec(REGISTRY, limits=Limits(max_bytes=256))
    for payload in (b"\xff" * 257, b"x" * 10_000, "y" * 257):
        with pytest.raises(PayloadTooLargeError) as info:
            codec.decode(payload)
        assert isinstance(info.value, EventDecodeError)
    big = CODEC.to_envelope(Shipped(order_id="o" * 300))
    with pytest.raises(PayloadTooLargeError):
        codec.decode(json.dumps(big))


def test_str_payload_is_measured_in_utf8_bytes() -> None:
    """A str payload under max_bytes in characters but over it in UTF-8 bytes is refused."""
    env = CODEC.to_envelope(Shipped(order_id=""))
    base = json.dumps(env, ensure_ascii=False)
    env["data"]["order_id"] = "é" * 200
    text = json.dumps(env, ensure_ascii=False)
    limit = len(base) + 250
    assert len(text) <= limit < len(text.encode())
    codec = Codec(REGISTRY, limits=Limits(max_bytes=limit))
    with pytest.raises(PayloadTooLargeError):
        codec.decode(text)


def test_payload_of_exactly_max_bytes_is_accepted() -> None:
    """A payload of exactly max_bytes decodes; one byte more is refused."""
    event = Shipped(order_id="o")
    payload = CODEC.encode(event)
    codec = Codec(REGISTRY, limits=Limits(max_bytes=len(payload)))
    assert codec.decode(payload) == event
    with pytest.raises(PayloadTooLargeError):
        codec.decode(payload + b" ")
    assert codec.decode(payload.decode()) == event


def test_too_deep_payload_is_refused_and_the_limit_itself_is_accepted() -> None:
    """Nesting deeper than max_depth raises PayloadTooDeepError; exactly max_depth decodes."""
    event = Matrix(rows=[[1, 2], [3]])  # envelope 1, data 2, rows 3, a row 4
    payload = CODEC.encode(event)
    at_limit = Codec(REGISTRY, limits=Limits(max_depth=4))
    assert at_limit.decode(payload) == event
    assert at_limit.decode(foreign(envelope_of(payload))) == event
    below = Codec(REGISTRY, limits=Limits(max_depth=3))
    with pytest.raises(PayloadTooDeepError) as info:
        below.decode(payload)
    assert isinstance(info.value, EventDecodeError)


def test_too_deep_payload_is_refused_before_parsing() -> None:
    """Depth is checked before parsing: deep garbage or a deep unknown type is too deep."""
    codec = Codec(REGISTRY, limits=Limits(max_depth=8))
    deep = b"[" * 50 + b"]" * 50
    env = b'{"type":"codec_test.nope","specversion":"1.0","id":"i","data":{"x":' + deep + b"}}"
    for payload in (deep + b" trailing garbage", env, b"{" + b'"a":{' * 40 + b"}" * 41):
        with pytest.raises(PayloadTooDeepError):
            codec.decode(payload)


@pytest.mark.parametrize(
    "note",
    [
        "[" * 100,
        "]" * 100 + "[" * 100,
        "{[" * 60 + "]}" * 60,
        'quoted \\"[[[[[[[[[[[[[[[[[[[[ {{{{{{{{{{{{{{{{{{{{',
        '"' + "[" * 50 + '"',
        "ends with a backslash \\",
        "\\" * 7 + '"' + "{" * 40,
    ],
)
def test_brackets_inside_json_strings_do_not_count_as_depth(note: str) -> None:
    """Brackets inside a JSON string are not nesting: such a payload is not refused as too deep."""
    codec = Codec(REGISTRY, limits=Limits(max_depth=3))
    event = Matrix(note=note)
    payload = CODEC.encode(event)
    assert codec.decode(payload) == event
    assert codec.decode(foreign(envelope_of(payload))) == event


# -- invalid data -------------------------------------------------------------------------------


@pytest.mark.parametrize("reorder", [False, True], ids=["tidings-order", "foreign-order"])
def test_wrongly_typed_field_is_named(reorder: bool) -> None:
    """A wrongly typed field raises EventDecodeError whose .field names it."""
    env = CODEC.to_envelope(order())
    env["data"]["quantity"] = "three"
    payload = foreign(env) if reorder else json.dumps(env).encode()
    with pytest.raises(EventDecodeError, match="quantity") as info:
        CODEC.decode(payload)
    assert info.value.field == "quantity"


@pytest.mark.parametrize("reorder", [False, True], ids=["tidings-order", "foreign-order"])
def test_wrongly_typed_nested_field_is_named_by_its_path(reorder: bool) -> None:
    """A wrongly typed value inside a nested dataclass in a list is named by its path."""
    env = CODEC.to_envelope(order())
    env["data"]["lines"][1]["sku"] = 42
    payload = foreign(env) if reorder else json.dumps(env).encode()
    with pytest.raises(EventDecodeError) as info:
        CODEC.decode(payload)
    assert info.value.field == "lines[1].sku"


@pytest.mark.parametrize("reorder", [False, True], ids=["tidings-order", "foreign-order"])
def test_missing_required_field_is_named(reorder: bool) -> None:
    """A missing required field, at top level or nested, raises EventDecodeError naming it."""
    env = CODEC.to_envelope(order())
    del env["data"]["order_id"]
    payload = foreign(env) if reorder else json.dumps(env).encode()
    with pytest.raises(EventDecodeError) as info:
        CODEC.decode(payload)
    assert info.value.field == "order_id"
    env = CODEC.to_envelope(order())
    del env["data"]["lines"][0]["qty"]
    payload = foreign(env) if reorder else json.dumps(env).encode()
    with pytest.raises(EventDecodeError) as info:
        CODEC.decode(payload)
    assert info.value.field == "lines[0].qty"


def test_from_dict_names_the_wrong_field() -> None:
    """from_dict raises EventDecodeError naming a wrongly typed or missing field."""
    data = order().to_dict()
    bad = {**data, "quantity": "three"}
    with pytest.raises(EventDecodeError) as info:
        OrderPlaced.from_dict(bad)
    assert info.value.field == "quantity"
    nested = {**data, "lines": [{"sku": "a", "qty": "many"}]}
    with pytest.raises(EventDecodeError) as info:
        OrderPlaced.from_dict(nested)
    assert info.value.field == "lines[0].qty"
    missing = {k: v for k, v in data.items() if k != "order_id"}
    with pytest.raises(EventDecodeError) as info:
        OrderPlaced.from_dict(missing)
    assert info.value.field == "order_id"


@pytest.mark.parametrize(
    ("attribute", "value"),
    [("id", 7), ("type", None), ("source", 1), ("time", 5), ("correlationid", ["x"])],
)
def test_wrongly_typed_envelope_attribute_is_named(attribute: str, value: Any) -> None:
    """A wrongly typed envelope attribute raises EventDecodeError naming the attribute."""
    env = CODEC.to_envelope(Shipped(order_id="o"))
    env[attribute] = value
    with pytest.raises(EventDecodeError) as info:
        CODEC.decode(json.dumps(env))
    assert info.value.field == attribute


def test_data_that_is_not_an_object_is_refused() -> None:
    """A data member that is a list, string or number raises EventDecodeError."""
    for data in ([], [1], "x", 3, True):
        env = CODEC.to_envelope(Shipped(order_id="o"))
        env["data"] = data
        with pytest.raises(EventDecodeError):
            CODEC.decode(json.dumps(env))


@pytest.mark.parametrize("reorder", [False, True], ids=["tidings-order", "foreign-order"])
def test_post_init_rejecting_data_gives_a_decode_error(reorder: bool) -> None:
    """An event whose __post_init__ raises ValueError on the data gives EventDecodeError."""
    with pytest.raises(ValueError, match="positive"):
        Positive(amount=0)
    env = CODEC.to_envelope(Positive(amount=5))
    env["data"]["amount"] = -1
    payload = foreign(env) if reorder else json.dumps(env).encode()
    with pytest.raises(EventDecodeError, match="positive"):
        CODEC.decode(payload)
    ok = Positive(amount=2)
    assert CODEC.decode(CODEC.encode(ok)) == ok


def test_post_init_rejecting_data_in_from_dict_gives_a_decode_error() -> None:
    """from_dict of data that __post_init__ rejects raises EventDecodeError."""
    data = Positive(amount=3).to_dict()
    with pytest.raises(EventDecodeError, match="positive"):
        Positive.from_dict({**data, "amount": 0})


def test_malformed_json_is_a_decode_error() -> None:
    """Malformed JSON, a non-object and invalid UTF-8 raise EventDecodeError."""
    for payload in (
        b"",
        b"{",
        b"not json",
        b"[]",
        b"null",
        b'{"type":"codec_test.shipped"',
        b"\xff",
    ):
        with pytest.raises(EventDecodeError):
            CODEC.decode(payload)
    with pytest.raises(EventDecodeError):
        CODEC.decode("\ud800")


@pytest.mark.parametrize("depth", [9, 10, 16, 40])
def test_alternating_arrays_and_objects_count_every_level(depth: int) -> None:
    """Nesting that alternates arrays and objects counts each level towards max_depth."""
    codec = Codec(REGISTRY, limits=Limits(max_depth=8))
    levels = depth - 2  # the envelope and data are the first two levels
    value = "1"
    for level in range(levels):
        value = f"[{value}]" if level % 2 == 0 else f'{{"k":{value}}}'
    payload = (
        '{"type":"codec_test.opaque","specversion":"1.0","id":"i","data":{"blob":' + value + "}}"
    )
    with pytest.raises(PayloadTooDeepError):
        codec.decode(payload)
