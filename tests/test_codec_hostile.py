"""Hostile input to the codec: bounded time per MiB, typed errors only, dangerous values refused.

The threat model: anyone who can write to a queue or a stream, and any HTTP client whose data
reaches an event. Every decode entry point must take time linear in its input: the payloads
below are built to be worst cases for the codec's own scans (the nesting check, the parsing of
msgspec's error messages) and for the parser, at the 1 MiB size limit.
"""

from __future__ import annotations

import contextlib
import enum
import gc
import json
import time
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar, Literal

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tidings import (
    Codec,
    DomainEvent,
    EventDecodeError,
    EventEncodeError,
    EventRegistry,
    PayloadTooDeepError,
)
from tidings.codec import MAX_DECIMAL_EXPONENT, decimal_bounds

MIB = 1024 * 1024
CPU_SECONDS_PER_MIB = 2.0
"""The bound every decode entry point holds, in CPU seconds per MiB of input (measured: < 0.4)."""


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass(frozen=True)
class Line:
    sku: str
    price: Decimal


@dataclass(frozen=True)
class Hostile(DomainEvent):
    event_type: ClassVar[str] = "hostile.target"
    colour: Colour = Colour.RED
    mode: Literal["a", "b"] = "a"
    amount: Decimal = Decimal(0)
    maybe: Decimal | None = None
    lines: tuple[Line, ...] = ()
    items: list[Any] = field(default_factory=list)
    count: int = 0


@dataclass(frozen=True)
class Picky(DomainEvent):
    event_type: ClassVar[str] = "hostile.picky"
    amount: Decimal = Decimal(1)

    def __post_init__(self) -> None:
        # A user's own check that raises something other than ValueError/TypeError.
        if self.amount.is_nan() or self.amount < 0:
            raise InvalidOperation("amount must be a positive number")


@dataclass(frozen=True)
class Loose(DomainEvent):
    event_type: ClassVar[str] = "hostile.loose"
    rate: Decimal = field(
        default=Decimal(0), metadata=decimal_bounds(allow_non_finite=True, max_exponent=10)
    )


@dataclass(frozen=True)
class Renamed(DomainEvent):
    event_type: ClassVar[str] = "hostile.renamed"
    event_version: ClassVar[int] = 2
    name: str = ""


REGISTRY = EventRegistry()
for _cls in (Hostile, Picky, Loose, Renamed):
    REGISTRY.register(_cls)


@REGISTRY.upcaster("hostile.renamed", from_version=1)
def _upcast(data: dict[str, Any]) -> dict[str, Any]:
    return {"name": data["old_name"]}  # KeyError on a payload without it


CODEC = Codec(REGISTRY)
HEAD = b'{"type":"hostile.target","specversion":"1.0","id":"x","data":'


def envelope(data: bytes, head: bytes = HEAD) -> bytes:
    return head + data + b"}"


def fill(prefix: bytes, unit: bytes, suffix: bytes = b"", size: int = MIB) -> bytes:
    """``prefix + unit * n + suffix``, as long as fits in ``size`` bytes."""
    return prefix + unit * ((size - len(prefix) - len(suffix)) // len(unit)) + suffix


WORST_PAYLOADS = {
    # The nesting check's string scan went quadratic on these (hours at 1 MiB).
    "brackets, then an unterminated string of escaped quotes": fill(b"[" * 40 + b'"', b'\\"'),
    "brackets, then a string ending in a lone backslash": fill(b"[" * 40 + b'"', b"a", b"\\"),
    "brackets, then escaped newlines": fill(b"[" * 40 + b'"', b"\\\n"),
    "many short strings of escaped quotes": fill(b"[" * 40, b'"\\"\\"",'),
    # Extracting the failing field from msgspec's message backtracked exponentially on these.
    "an enum value of dots and backquotes": envelope(fill(b'{"colour":"', b".`", b'"}', MIB - 80)),
    "a literal value of dots and backquotes": envelope(fill(b'{"mode":"', b"`.", b'"}', MIB - 80)),
    "a field path lookalike": envelope(fill(b'{"mode":"', b" - at `$.", b'`"}', MIB - 80)),
    "missing-field lookalikes": envelope(
        fill(b'{"lines":[{"sku":"', b"missing required field `", b'"}]}', MIB - 80)
    ),
    # Nesting and width.
    "openers only": b"[" * MIB,
    "alternating openers": fill(b"", b'[{"a":'),
    "nesting at the limit, repeated": envelope(
        fill(b'{"items":[', b"[" * 28 + b"]" * 28 + b",", b"[]]}", MIB - 80)
    ),
    "a million keys": envelope(fill(b'{"items":[{', b'"k":1,', b'"k":1}]}', MIB - 80)),
    "unicode escapes": envelope(fill(b'{"items":["', b"\\u00e9", b'"]}', MIB - 80)),
    "lone surrogates": envelope(fill(b'{"items":["', b"\\ud800", b'"]}', MIB - 80)),
    "control-character escapes": envelope(fill(b'{"items":["', b"\\u001b\\r\\n", b'"]}', MIB - 80)),
    # Values.
    "a decimal of a million digits": envelope(fill(b'{"amount":"', b"9", b'"}', MIB - 80)),
    "a huge integer": envelope(fill(b'{"count":', b"9", b"}", MIB - 80)),
    "a huge exponent": envelope(b'{"amount":"1e999999999"}'),
    "whitespace": envelope(fill(b"", b" ", b"{}", MIB - 80)),
}


def cpu_seconds(call: Any) -> float:
    # The objects the suite left alive are frozen first, so that a collection during the call
    # traverses only what the call allocated: the measure is the decoder's, not the suite's.
    gc.collect()
    gc.freeze()
    try:
        start = time.thread_time()
        with contextlib.suppress(EventDecodeError):
            call()
        return time.thread_time() - start
    finally:
        gc.unfreeze()


def assert_linear(call: Any, size: int) -> None:
    spent = cpu_seconds(call)
    bound = CPU_SECONDS_PER_MIB * max(size, 64 * 1024) / MIB
    assert spent <= bound, f"{spent:.3f} s of CPU for {size} bytes (bound {bound:.3f} s)"


def _parsed(payload: bytes) -> Any:
    try:
        return msgspec.json.decode(payload)
    except (msgspec.DecodeError, RecursionError):
        return None


# from_envelope takes what a caller parsed already: the worst payloads that are JSON at all.
PARSED = {name: _parsed(payload[:MIB]) for name, payload in WORST_PAYLOADS.items()}


@pytest.mark.parametrize("name", list(WORST_PAYLOADS))
@pytest.mark.parametrize("entry", ["decode", "read", "str"])
def test_worst_case_payloads_decode_in_linear_time(name, entry):
    """Every decode entry point settles a worst-case payload within the per-MiB CPU bound."""
    payload = WORST_PAYLOADS[name][:MIB]
    if entry == "decode":
        call: Any = lambda: CODEC.decode(payload)  # noqa: E731
    elif entry == "read":
        call = lambda: CODEC.read(payload)  # noqa: E731
    else:
        text = payload.decode("utf-8", "replace")
        call = lambda: CODEC.decode(text)  # noqa: E731
    assert_linear(call, len(payload))


@pytest.mark.parametrize("name", [name for name, parsed in PARSED.items() if parsed is not None])
def test_worst_case_envelopes_from_dicts_in_linear_time(name):
    """``from_envelope`` settles the worst payloads, parsed into dicts, within the bound."""
    parsed = PARSED[name]
    if not isinstance(parsed, dict):
        parsed = {"type": "hostile.target", "specversion": "1.0", "id": "x", "data": parsed}
    assert_linear(lambda: CODEC.from_envelope(parsed), len(WORST_PAYLOADS[name][:MIB]))


@pytest.mark.parametrize(
    "data",
    [
        {"colour": ".`" * 100_000},
        {"mode": "`." * 100_000},
        {"lines": [{"sku": "missing required field `" * 10_000}]},
        {"count": "9" * 100_000},
        {"items": list(range(200_000))},
        {"amount": "9" * 200_000},
    ],
    ids=["enum", "literal", "missing", "count", "wide", "digits"],
)
def test_from_dict_takes_linear_time(data):
    """``from_dict`` (HTTP data reaching an event) settles hostile dicts within the bound."""
    size = len(msgspec.json.encode(data))
    assert_linear(lambda: CODEC.from_dict(data, Hostile), size)


def test_deep_values_end_in_typed_errors():
    """Values nested beyond what the encoder can recurse raise tidings' errors, not a crash."""
    deep: Any = []
    for _ in range(100_000):
        deep = [deep]
    event = CODEC.from_dict({"items": deep}, Hostile)  # an Any field takes what it is given
    with pytest.raises(EventEncodeError):
        CODEC.encode(event)
    with pytest.raises(PayloadTooDeepError):
        CODEC.from_envelope(
            {"type": "hostile.target", "specversion": "1.0", "id": "x", "data": deep}
        )


def test_error_messages_carry_no_control_characters():
    """A refusal's message escapes what came from the message and stays short."""
    payload = envelope(b'{"colour":"\\r\\nFAKE LOG LINE\\u001b[31m' + b"x" * 50_000 + b'"}')
    with pytest.raises(EventDecodeError) as caught:
        CODEC.decode(payload)
    text = str(caught.value)
    assert "\r" not in text
    assert "\n" not in text
    assert "\x1b" not in text
    assert len(text) < 1000
    assert caught.value.field == "colour"


# -- every exception while building an event is a decode failure -----------------------------


def test_post_init_raising_anything_is_a_decode_error():
    """A ``__post_init__`` raising ``decimal.InvalidOperation`` becomes an EventDecodeError."""
    payload = b'{"type":"hostile.picky","specversion":"1.0","id":"x","data":{"amount":"-1"}}'
    with pytest.raises(EventDecodeError, match=r"hostile\.picky") as caught:
        CODEC.decode(payload)
    assert isinstance(caught.value.__cause__, InvalidOperation)
    with pytest.raises(EventDecodeError, match="InvalidOperation"):
        CODEC.from_dict({"amount": "-1"}, Picky)


def test_upcaster_raising_key_error_is_a_decode_error():
    """An upcaster that raises ``KeyError`` on an unexpected payload is a decode failure."""
    payload = (
        b'{"type":"hostile.renamed","specversion":"1.0","id":"x","dataversion":"1",'
        b'"data":{"other":1}}'
    )
    with pytest.raises(EventDecodeError, match=r"hostile\.renamed") as caught:
        CODEC.decode(payload)
    assert isinstance(caught.value.__cause__, KeyError)


@dataclass(frozen=True)
class Inner:
    value: int

    def __post_init__(self) -> None:
        if self.value < 0:
            raise LookupError("negative")


@dataclass(frozen=True)
class Outer(DomainEvent):
    event_type: ClassVar[str] = "hostile.outer"
    inner: Inner = Inner(0)


def test_nested_dataclass_check_raising_anything_is_a_decode_error():
    """A nested dataclass whose own check raises ``LookupError`` is refused with a typed error."""
    registry = EventRegistry()
    registry.register(Outer)
    codec = Codec(registry)
    payload = b'{"type":"hostile.outer","specversion":"1.0","id":"x","data":{"inner":{"value":-1}}}'
    with pytest.raises(EventDecodeError, match="LookupError"):
        codec.decode(payload)


# -- values that are legal JSON but dangerous ---------------------------------------------------


@pytest.mark.parametrize(
    "value", ["NaN", "-NaN", "sNaN", "Infinity", "-Infinity", "inf", "1e999999999", "1e-7000"]
)
@pytest.mark.parametrize("where", ["amount", "maybe", "lines"])
def test_non_finite_and_huge_decimals_are_refused(value, where):
    """NaN, infinities and exponents beyond the bound are refused in any Decimal field."""
    if where == "lines":
        data = {"lines": [{"sku": "a", "price": "1"}, {"sku": "b", "price": value}]}
        field_path = "lines[1].price"
    else:
        data = {where: value}
        field_path = where
    payload = envelope(msgspec.json.encode(data))
    with pytest.raises(EventDecodeError, match="Decimal") as caught:
        CODEC.decode(payload)
    assert caught.value.field == field_path
    with pytest.raises(EventDecodeError, match="Decimal"):
        CODEC.from_dict(data, Hostile)


def test_decimals_within_the_bound_still_decode():
    """Ordinary money and the bound itself decode unchanged."""
    edge = Decimal(f"1e{MAX_DECIMAL_EXPONENT}")
    event = Hostile(amount=Decimal("19.99"), maybe=edge, lines=(Line("a", Decimal("-0.01")),))
    assert CODEC.decode(CODEC.encode(event)) == event


def test_encoding_refuses_what_decoding_would_refuse():
    """A NaN Decimal or an unprintable tenant id fails at the producer, not at every consumer."""
    with pytest.raises(EventEncodeError, match="Decimal"):
        CODEC.encode(Hostile(amount=Decimal("NaN")))
    with pytest.raises(EventEncodeError, match="tenantid"):
        CODEC.encode(Hostile(tenant_id="acme\r\nINFO forged"))
    with pytest.raises(EventEncodeError, match="id"):
        CODEC.encode(Hostile(event_id="x" * 300))


def test_a_field_may_opt_in_to_non_finite_decimals():
    """``decimal_bounds(allow_non_finite=True)`` lets one field carry NaN; its own bound holds."""
    for value in ("NaN", "Infinity", "1e10"):
        event = Loose(rate=Decimal(value))
        back = CODEC.decode(CODEC.encode(event))
        assert str(back.rate) == str(event.rate)
    with pytest.raises(EventDecodeError, match="10"):
        CODEC.decode(
            b'{"type":"hostile.loose","specversion":"1.0","id":"x","data":{"rate":"1e11"}}'
        )


# -- envelope attributes ------------------------------------------------------------------------

ATTRIBUTES = ["id", "correlationid", "causationid", "tenantid", "source", "time", "traceparent"]


@pytest.mark.parametrize("name", ATTRIBUTES)
@pytest.mark.parametrize(
    "value",
    ["a\r\nb", "\u001b[31mred", "caf\u00e9", "\u202egnp.exe", "\ud800", "tab\there", "del\x7f"],
    ids=["crlf", "escape", "non-ascii", "bidi", "surrogate", "tab", "del"],
)
def test_envelope_attributes_are_printable_ascii(name, value):
    """An id, context id, source, time or traceparent with other characters is refused."""
    attrs = {"type": "hostile.target", "specversion": "1.0", "id": "x", name: value, "data": {}}
    payload = json.dumps(attrs).encode()  # escapes everything non-ASCII, surrogates too
    with pytest.raises(EventDecodeError) as caught:
        CODEC.decode(payload)
    if value != "\ud800":  # a lone surrogate is refused by the parser, before any attribute
        assert caught.value.field == name


@pytest.mark.parametrize("name", ATTRIBUTES)
def test_envelope_attributes_are_bounded_in_length(name):
    """An envelope attribute longer than its bound is refused by the parser, in C."""
    attrs = {"type": "hostile.target", "specversion": "1.0", "id": "x", name: "a" * 2000}
    with pytest.raises(EventDecodeError):
        CODEC.decode(msgspec.json.encode({**attrs, "data": {}}))


def test_an_empty_id_is_refused():
    """CloudEvents ids are non-empty."""
    with pytest.raises(EventDecodeError):
        CODEC.decode(b'{"type":"hostile.target","specversion":"1.0","id":"","data":{}}')


# -- any bytes: an event or a typed error, in bounded time ------------------------------------

VALID = CODEC.encode(Hostile(amount=Decimal("1.5"), lines=(Line("a", Decimal(2)),), items=[1]))


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid envelope with a slice replaced by arbitrary bytes, or arbitrary bytes alone."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=4096))
    start = draw(st.integers(0, len(VALID)))
    end = draw(st.integers(start, len(VALID)))
    middle = draw(st.binary(max_size=256) | st.sampled_from([b'"', b"\\", b"[", b"{", b"`", b"."]))
    return VALID[:start] + middle * draw(st.integers(1, 64)) + VALID[end:]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_any_bytes_become_an_event_or_a_decode_error_in_bounded_time(payload):
    """Whatever the bytes, decoding returns an event or raises an EventDecodeError, quickly."""
    start = time.thread_time()
    try:
        event = CODEC.decode(payload)
    except EventDecodeError:
        pass
    else:
        assert isinstance(event, DomainEvent)
    assert time.thread_time() - start <= CPU_SECONDS_PER_MIB * max(len(payload), 64 * 1024) / MIB


def test_an_envelope_without_a_type_is_refused_even_with_one_class_registered():
    """With a single event class registered, an envelope lacking "type" is still refused."""
    registry = EventRegistry()
    registry.register(Picky)
    codec = Codec(registry)
    envelope = codec.to_envelope(Picky())
    del envelope["type"]
    with pytest.raises(EventDecodeError):
        codec.decode(json.dumps(envelope).encode())
    envelope["type"] = "\x00"
    with pytest.raises(EventDecodeError):
        codec.decode(json.dumps(envelope).encode())


@pytest.mark.parametrize("attribute", ["time", "correlationid", "causationid", "tenantid"])
def test_an_empty_attribute_is_refused_not_taken_as_a_value(attribute):
    """An empty time or context id is a producer's bug: decode refuses it, and so does encode."""
    codec = Codec(EventRegistry())
    codec.registry.register(Picky)
    envelope = codec.to_envelope(Picky())
    envelope[attribute] = ""
    with pytest.raises(EventDecodeError):
        codec.decode(json.dumps(envelope).encode())
    python_name = {
        "time": "occurred_at",
        "correlationid": "correlation_id",
        "causationid": "causation_id",
        "tenantid": "tenant_id",
    }[attribute]
    with pytest.raises(EventEncodeError):
        codec.encode(Picky(**{python_name: ""}))
