"""Fuzzing the decoder: bad input only ever raises EventDecodeError (or a subclass of it).

A worker must survive whatever arrives: every failure to decode has to be an
``EventDecodeError`` so the message is dead-lettered, never another exception type that would
escape the worker's handling. The helpers below let any other exception propagate, so pytest
(or hypothesis, with the falsifying example) reports it.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tidings import (
    Codec,
    DomainEvent,
    EventDecodeError,
    EventRegistry,
    Limits,
    PayloadTooDeepError,
    PayloadTooLargeError,
    register_event,
)

FUZZ_SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@dataclass(frozen=True)
class Item:
    sku: str
    qty: int


@register_event
@dataclass(frozen=True)
class FuzzOrder(DomainEvent):
    event_type: ClassVar[str] = "codec_test.fuzz.order"
    order_id: str
    quantity: int = 0
    lines: tuple[Item, ...] = ()
    placed_on: date | None = None
    amount: Decimal = Decimal(0)
    tags: frozenset[str] = frozenset()
    meta: dict[str, list[str]] = field(default_factory=dict)


@register_event
@dataclass(frozen=True, slots=True)
class FuzzSlotted(DomainEvent):
    event_type: ClassVar[str] = "codec_test.fuzz.slotted"
    name: str = ""
    scores: list[float] = field(default_factory=list)


@register_event
@dataclass(frozen=True)
class FuzzChecked(DomainEvent):
    event_type: ClassVar[str] = "codec_test.fuzz.checked"
    amount: int = 1

    def __post_init__(self) -> None:
        if self.amount <= 0:
            msg = "amount must be positive"
            raise ValueError(msg)


REGISTRY = EventRegistry()
for _cls in (FuzzOrder, FuzzSlotted, FuzzChecked):
    REGISTRY.register(_cls)
REGISTRY.add_alias("codec_test.fuzz.old_order", FuzzOrder)
CODEC = Codec(REGISTRY)
SMALL = Codec(REGISTRY, limits=Limits(max_bytes=2048, max_depth=8))
SHALLOW = Codec(REGISTRY, limits=Limits(max_bytes=1 << 24, max_depth=8))

SAMPLES: list[DomainEvent] = [
    FuzzOrder(
        order_id="o-1",
        quantity=2,
        lines=(Item("a", 1), Item("b", 2)),
        placed_on=date(2024, 2, 29),
        amount=Decimal("12.50"),
        tags=frozenset({"x", "y"}),
        meta={"k": ["v", "w"]},
        tenant_id="tenant",
        causation_id="cause",
    ),
    FuzzSlotted(name="n", scores=[1.5, -2.0]),
    FuzzChecked(amount=3),
]
VALID: list[bytes] = [CODEC.encode(event, traceparent="00-abc-01") for event in SAMPLES]
VALID.append(json.dumps(dict(sorted(json.loads(VALID[0]).items()))).encode())

EVENT_CLASSES: list[type[DomainEvent]] = [DomainEvent, FuzzOrder, FuzzSlotted, FuzzChecked]


def decode_or_refuse(payload: Any, codec: Codec = CODEC) -> None:
    """Decode ``payload`` every way the codec offers; only EventDecodeError may escape."""
    for expected in EVENT_CLASSES:
        with contextlib.suppress(EventDecodeError):
            codec.decode(payload, expected)
    with contextlib.suppress(EventDecodeError):
        codec.read(payload)


def from_envelope_or_refuse(envelope: Any) -> None:
    """Decode an already parsed envelope; only EventDecodeError may escape."""
    for expected in EVENT_CLASSES:
        with contextlib.suppress(EventDecodeError):
            CODEC.from_envelope(envelope, expected)


def from_dict_or_refuse(data: Any) -> None:
    """Build events from a dict with each class; only EventDecodeError may escape."""
    for cls in EVENT_CLASSES:
        with contextlib.suppress(EventDecodeError):
            cls.from_dict(data)


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


# -- deterministic corpus -----------------------------------------------------------------------


def test_every_prefix_of_a_valid_payload_is_decoded_or_refused() -> None:
    """Every truncation of a valid envelope decodes or raises EventDecodeError, nothing else."""
    for payload in VALID:
        for end in range(len(payload) + 1):
            decode_or_refuse(payload[:end])
            decode_or_refuse(payload[:end].decode("utf-8", "replace"))
        for start in range(0, len(payload), 7):
            decode_or_refuse(payload[start:])


def test_the_valid_corpus_decodes() -> None:
    """The untouched corpus decodes, so the fuzz tests start from payloads that work."""
    for payload, event in zip(VALID, [*SAMPLES, SAMPLES[0]], strict=True):
        assert CODEC.decode(payload) == event


def test_oversized_payloads_are_refused() -> None:
    """Payloads beyond max_bytes raise PayloadTooLargeError whatever they contain."""
    padded = VALID[0][:-1] + b" " * 4096 + b"}"
    for payload in (
        padded,
        padded.decode(),
        b"\x00" * 5000,
        b"[" * 5000,
        "é" * 1500,
        bytearray(padded),
        memoryview(padded),
    ):
        with pytest.raises(PayloadTooLargeError):
            SMALL.decode(payload)
    huge = b'{"type":"codec_test.fuzz.order","data":{"order_id":"' + b"x" * (1 << 21) + b'"}}'
    with pytest.raises(PayloadTooLargeError):
        CODEC.decode(huge)


def _envelope_around(value: bytes) -> bytes:
    return (
        b'{"type":"codec_test.fuzz.order","specversion":"1.0","id":"i",'
        b'"data":{"order_id":"o","meta":' + value + b"}}"
    )


@pytest.mark.parametrize("depth", [7, 8, 9, 33, 100, 1_000, 100_000])
@pytest.mark.parametrize("opener", [b"[", b'{"a":', b'[{"a":'])
def test_deeply_nested_balanced_payloads_are_decoded_or_refused(depth: int, opener: bytes) -> None:
    """Balanced deep nesting of arrays and objects is decoded or refused as a decode error."""
    closer = {b"[": b"]", b'{"a":': b"}", b'[{"a":': b"}]"}[opener]
    value = opener * depth + b"1" + closer * depth
    for payload in (value, _envelope_around(value)):
        decode_or_refuse(payload)
        decode_or_refuse(payload, SMALL)


UNBALANCED_SHAPES = {
    "unclosed-arrays": b"[",
    "unclosed-objects": b'{"a":',
    "unclosed-mixed": b'[{"a":',
}


def _unbalanced(shape: str, depth: int) -> list[bytes]:
    opener = UNBALANCED_SHAPES[shape]
    nested = opener * depth
    return [
        nested,
        nested + b"1",
        b"[" * depth + b"}" * depth,
        _envelope_around(nested),
        _envelope_around(nested)[:-2],
    ]


@pytest.mark.parametrize("depth", [100, 1_000, 100_000])
@pytest.mark.parametrize("shape", sorted(UNBALANCED_SHAPES))
def test_deeply_nested_unbalanced_payloads_are_decode_errors(depth: int, shape: str) -> None:
    """Deep nesting never closed (or closed wrongly) raises EventDecodeError, nothing else."""
    for payload in _unbalanced(shape, depth):
        for codec in (CODEC, SMALL, SHALLOW):
            with pytest.raises(EventDecodeError):
                codec.decode(payload)


@pytest.mark.parametrize("depth", [100, 1_000, 100_000])
@pytest.mark.parametrize("shape", sorted(UNBALANCED_SHAPES))
def test_deeply_nested_unbalanced_payloads_are_refused_as_too_deep(depth: int, shape: str) -> None:
    """Unclosed nesting deeper than max_depth is refused before parsing as PayloadTooDeepError."""
    for payload in _unbalanced(shape, depth):
        for codec in (CODEC, SHALLOW):
            with pytest.raises(PayloadTooDeepError):
                codec.decode(payload)


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff",
        b"\xff\xfe{}",
        b"\xc0\xaf",
        b"\xed\xa0\x80",
        b"\xf8\x88\x80\x80\x80",
        b'{"type":"codec_test.fuzz.order","specversion":"1.0","id":"\xff","data":{"order_id":"o"}}',
        b'{"type":"codec_test.fuzz.order","specversion":"1.0","id":"i","data":{"order_id":"\xc3"}}',
        b'{"type":"codec_test.fuzz.\xe9","specversion":"1.0","id":"i"}',
        b'{"type":"\xff\xff","specversion":"1.0","id":"i"}',
        b'{"type":"',
        b'{"type":"codec_test.fuzz.order',
        b'{"type":"codec_test.fuzz.order"',
        b"\xef\xbb\xbf" + VALID[0],
        VALID[0].decode().encode("utf-16"),
        VALID[0].decode().encode("utf-32"),
    ],
)
def test_non_utf8_bytes_are_refused(payload: bytes) -> None:
    """Bytes that are not valid UTF-8 JSON decode or raise EventDecodeError, nothing else."""
    decode_or_refuse(payload)


def test_str_payloads_that_are_not_valid_unicode_are_refused() -> None:
    """A str payload holding lone surrogates raises EventDecodeError."""
    for payload in ("\ud800", VALID[0].decode().replace("o-1", "\udfff")):
        with pytest.raises(EventDecodeError):
            CODEC.decode(payload)


@pytest.mark.parametrize(
    ("attribute", "value"),
    [
        ("id", 1),
        ("id", None),
        ("id", ["x"]),
        ("type", None),
        ("type", 1),
        ("type", {"a": 1}),
        ("type", ""),
        ("type", "codec_test.fuzz.nope"),
        ("type", "tidings.codec.Codec"),
        ("type", "builtins.eval"),
        ("specversion", 1.0),
        ("specversion", None),
        ("source", 1),
        ("time", 1),
        ("time", {}),
        ("datacontenttype", None),
        ("datacontenttype", "application/python-pickle"),
        ("datacontenttype", 7),
        ("dataversion", 1),
        ("dataversion", "x"),
        ("dataversion", "0"),
        ("dataversion", "-1"),
        ("dataversion", "2"),
        ("dataversion", "9" * 5000),
        ("dataversion", ""),
        ("correlationid", 1),
        ("causationid", []),
        ("tenantid", {}),
        ("traceparent", 3),
        ("data", []),
        ("data", [1, 2]),
        ("data", "x"),
        ("data", None),
        ("data", 1.5),
    ],
)
@pytest.mark.parametrize("reorder", [False, True], ids=["tidings-order", "foreign-order"])
def test_wrongly_typed_envelope_attributes_are_refused(
    attribute: str, value: Any, reorder: bool
) -> None:
    """A wrongly typed or unacceptable envelope attribute raises EventDecodeError."""
    envelope = json.loads(VALID[0])
    envelope[attribute] = value
    if reorder:
        envelope = dict(reversed(list(envelope.items())))
    with pytest.raises(EventDecodeError):
        CODEC.decode(json.dumps(envelope))
    with pytest.raises(EventDecodeError):
        CODEC.from_envelope(envelope)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("order_id", 1),
        ("order_id", None),
        ("quantity", "1"),
        ("quantity", 1.5),
        ("quantity", True),
        ("quantity", [1]),
        ("lines", "ab"),
        ("lines", [1]),
        ("lines", [{"sku": "a"}]),
        ("lines", [{"sku": "a", "qty": "1"}]),
        ("placed_on", "not a date"),
        ("placed_on", "2024-02-30"),
        ("placed_on", 20240101),
        ("amount", "twelve"),
        ("amount", [1]),
        ("tags", "abc"),
        ("tags", [1, 2]),
        ("tags", {"a": 1}),
        ("meta", ["x"]),
        ("meta", {"k": "v"}),
        ("meta", {"k": [1]}),
    ],
)
@pytest.mark.parametrize("reorder", [False, True], ids=["tidings-order", "foreign-order"])
def test_wrongly_typed_fields_are_refused(name: str, value: Any, reorder: bool) -> None:
    """A wrongly typed event field raises EventDecodeError, on decode and on from_dict."""
    envelope = json.loads(VALID[0])
    envelope["data"][name] = value
    if reorder:
        envelope = dict(reversed(list(envelope.items())))
    with pytest.raises(EventDecodeError) as info:
        CODEC.decode(json.dumps(envelope))
    assert info.value.field is not None
    assert info.value.field.startswith(name)
    data = {**SAMPLES[0].to_dict(), name: value}
    with pytest.raises(EventDecodeError):
        FuzzOrder.from_dict(data)


def test_data_rejected_by_post_init_is_refused() -> None:
    """Data that the event's own __post_init__ rejects raises EventDecodeError."""
    envelope = json.loads(VALID[2])
    envelope["data"]["amount"] = 0
    with pytest.raises(EventDecodeError):
        CODEC.decode(json.dumps(envelope))
    with pytest.raises(EventDecodeError):
        FuzzChecked.from_dict({"amount": -5})


# -- hypothesis ---------------------------------------------------------------------------------


@FUZZ_SETTINGS
@given(st.binary(max_size=512))
def test_random_bytes_are_decoded_or_refused(payload: bytes) -> None:
    """Random bytes decode or raise EventDecodeError, nothing else."""
    decode_or_refuse(payload)
    decode_or_refuse(payload, SMALL)


@FUZZ_SETTINGS
@given(st.text(max_size=300))
def test_random_text_is_decoded_or_refused(payload: str) -> None:
    """Random text decodes or raises EventDecodeError, nothing else."""
    decode_or_refuse(payload)


@st.composite
def mutated_payloads(draw: st.DrawFn) -> bytes:
    """A valid envelope with a few bytes flipped, inserted or deleted."""
    payload = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        action = draw(st.sampled_from(["flip", "set", "insert", "delete", "duplicate"]))
        at = draw(st.integers(min_value=0, max_value=max(len(payload) - 1, 0)))
        if action == "flip" and payload:
            payload[at] ^= 1 << draw(st.integers(min_value=0, max_value=7))
        elif action == "set" and payload:
            payload[at] = draw(st.sampled_from(b'{}[]",:\\0123456789 .-eE\x00\xff'))
        elif action == "insert":
            payload[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete" and payload:
            del payload[at : at + draw(st.integers(min_value=1, max_value=8))]
        elif action == "duplicate":
            payload[at:at] = payload[at : at + draw(st.integers(min_value=1, max_value=40))]
    return bytes(payload)


@FUZZ_SETTINGS
@given(mutated_payloads())
def test_mutated_valid_payloads_are_decoded_or_refused(payload: bytes) -> None:
    """A valid envelope with bytes flipped, inserted or deleted decodes or is refused."""
    decode_or_refuse(payload)
    decode_or_refuse(payload, SMALL)


@FUZZ_SETTINGS
@given(
    st.sampled_from(["id", "type", "specversion", "source", "time", "datacontenttype"])
    | st.sampled_from(["dataversion", "correlationid", "causationid", "tenantid", "traceparent"])
    | st.just("data"),
    json_values,
    st.booleans(),
)
def test_any_json_value_in_any_envelope_attribute_is_decoded_or_refused(
    attribute: str, value: Any, reorder: bool
) -> None:
    """Any JSON value put in any envelope attribute decodes or raises EventDecodeError."""
    envelope = json.loads(VALID[0])
    envelope[attribute] = value
    if reorder:
        envelope = dict(reversed(list(envelope.items())))
    decode_or_refuse(json.dumps(envelope))
    from_envelope_or_refuse(envelope)


@FUZZ_SETTINGS
@given(
    st.sampled_from(["order_id", "quantity", "lines", "placed_on", "amount", "tags", "meta"]),
    json_values,
    st.booleans(),
)
def test_any_json_value_in_any_field_is_decoded_or_refused(
    name: str, value: Any, reorder: bool
) -> None:
    """Any JSON value put in any event field decodes or raises EventDecodeError."""
    envelope = json.loads(VALID[0])
    envelope["data"][name] = value
    if reorder:
        envelope = dict(reversed(list(envelope.items())))
    decode_or_refuse(json.dumps(envelope))
    from_dict_or_refuse({**SAMPLES[0].to_dict(), name: value})


@FUZZ_SETTINGS
@given(
    st.sampled_from(
        [
            "codec_test.fuzz.order",
            "codec_test.fuzz.old_order",
            "codec_test.fuzz.slotted",
            "codec_test.fuzz.checked",
            "domain_event",
        ]
    )
    | st.text(max_size=40),
    st.dictionaries(st.text(max_size=12), json_values, max_size=6),
)
def test_unknown_or_arbitrary_types_with_arbitrary_data_are_decoded_or_refused(
    event_type: str, data: dict[str, Any]
) -> None:
    """Any type name with any data object decodes or raises EventDecodeError."""
    envelope = {"type": event_type, "specversion": "1.0", "id": "i", "data": data}
    decode_or_refuse(json.dumps(envelope))
    reordered = {"specversion": "1.0", "id": "i", "data": data, "type": event_type}
    decode_or_refuse(json.dumps(reordered))


@FUZZ_SETTINGS
@given(json_values)
def test_any_parsed_envelope_is_decoded_or_refused(envelope: Any) -> None:
    """from_envelope given any JSON value decodes or raises EventDecodeError."""
    from_envelope_or_refuse(envelope)
    decode_or_refuse(json.dumps(envelope))


@FUZZ_SETTINGS
@given(st.dictionaries(st.text(max_size=12), json_values, max_size=8))
def test_from_dict_of_arbitrary_dicts_is_built_or_refused(data: dict[str, Any]) -> None:
    """DomainEvent.from_dict given any JSON-like dict builds an event or raises EventDecodeError."""
    from_dict_or_refuse(data)


field_names = st.sampled_from(
    [
        "event_type",
        "event_id",
        "correlation_id",
        "occurred_at",
        "tenant_id",
        "causation_id",
        "order_id",
        "quantity",
        "lines",
        "placed_on",
        "amount",
        "tags",
        "meta",
        "name",
        "scores",
    ]
)
event_types = st.sampled_from(
    [
        "codec_test.fuzz.order",
        "codec_test.fuzz.old_order",
        "codec_test.fuzz.slotted",
        "codec_test.fuzz.checked",
        "codec_test.fuzz.unknown",
        "domain_event",
    ]
)


@FUZZ_SETTINGS
@given(
    st.dictionaries(field_names, json_values, max_size=10),
    st.none() | event_types | json_values,
)
def test_from_dict_of_dicts_with_event_field_names_is_built_or_refused(
    data: dict[str, Any], event_type: Any
) -> None:
    """from_dict given real field names holding arbitrary JSON builds or raises EventDecodeError."""
    if event_type is not None:
        data = {**data, "event_type": event_type}
    from_dict_or_refuse(data)


@pytest.mark.parametrize("depth", [2_000, 50_000])
def test_nesting_beyond_the_parser_with_a_generous_limit_is_a_decode_error(depth: int) -> None:
    """With max_depth above what the parser can recurse, deep input is still a decode error."""
    generous = Codec(REGISTRY, limits=Limits(max_bytes=1 << 24, max_depth=1_000_000))
    value = b"[" * depth + b"]" * depth
    for payload in (value, _envelope_around(value), _envelope_around(b"[" * depth)):
        with pytest.raises(EventDecodeError):
            generous.decode(payload)


def test_from_envelope_of_a_deeply_nested_dict_is_a_decode_error() -> None:
    """An already parsed envelope nested too deep for any parser raises EventDecodeError."""
    nested: list[Any] = []
    for _ in range(100_000):
        nested = [nested]
    envelope = {**json.loads(VALID[0]), "data": {"order_id": "o", "meta": {"k": nested}}}
    with pytest.raises(EventDecodeError):
        CODEC.from_envelope(envelope)
    with pytest.raises(EventDecodeError):
        SHALLOW.from_envelope(envelope)
