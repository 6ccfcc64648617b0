"""Property tests: every supported field type survives the codec's round trips unchanged."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from decimal import Decimal
from enum import Enum, IntEnum
from typing import ClassVar
from uuid import UUID

from hypothesis import given, settings
from hypothesis import strategies as st

from tidings import Codec, DomainEvent, EventRegistry, register_event

PROPERTY_SETTINGS = settings(max_examples=200, deadline=None)


class Colour(Enum):
    RED = "red"
    GREEN = "green"
    BLUE = "blue"


class Priority(IntEnum):
    LOW = 1
    HIGH = 2


@dataclass(frozen=True)
class Address:
    street: str
    postcode: str | None = None
    floor: int = 0


@dataclass(frozen=True)
class Customer:
    name: str
    address: Address
    since: date


@register_event
@dataclass(frozen=True)
class Scalars(DomainEvent):
    event_type: ClassVar[str] = "codec_test.props.scalars"
    text: str
    number: int
    ratio: float
    flag: bool
    maybe: str | None = None


@register_event
@dataclass(frozen=True)
class Temporal(DomainEvent):
    event_type: ClassVar[str] = "codec_test.props.temporal"
    at_utc: datetime
    at_naive: datetime
    day: date
    clock: time
    clock_utc: time
    ident: UUID
    amount: Decimal


@register_event
@dataclass(frozen=True)
class Containers(DomainEvent):
    event_type: ClassVar[str] = "codec_test.props.containers"
    colour: Colour
    priority: Priority
    numbers: tuple[int, ...] = ()
    labels: frozenset[str] = frozenset()
    rows: list[dict[str, int]] = field(default_factory=list)
    index: dict[str, list[str]] = field(default_factory=dict)


@register_event
@dataclass(frozen=True)
class Nested(DomainEvent):
    event_type: ClassVar[str] = "codec_test.props.nested"
    customer: Customer
    billing: Address | None = None
    history: tuple[Address, ...] = ()


@register_event
@dataclass(frozen=True, slots=True)
class SlottedMix(DomainEvent):
    event_type: ClassVar[str] = "codec_test.props.slotted_mix"
    when: datetime
    amount: Decimal
    tags: frozenset[str] = frozenset()
    address: Address | None = None


REGISTRY = EventRegistry()
for _cls in (Scalars, Temporal, Containers, Nested, SlottedMix):
    REGISTRY.register(_cls)
CODEC = Codec(REGISTRY, source="/codec-property-tests")

ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)
floats = st.floats(allow_nan=False, allow_infinity=False)
decimals = st.decimals(allow_nan=False, allow_infinity=False)
# Envelope attributes are printable ASCII (what else they may hold is refused: test_codec_hostile).
ids = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=40
)
optional_ids = st.none() | ids
aware = st.datetimes(timezones=st.just(UTC))
naive = st.datetimes()

addresses = st.builds(
    Address, street=st.text(), postcode=st.none() | st.text(max_size=10), floor=ints
)
customers = st.builds(Customer, name=st.text(), address=addresses, since=st.dates())

base_fields = {
    "event_id": ids,
    "correlation_id": ids,
    "occurred_at": ids,
    "tenant_id": optional_ids,
    "causation_id": optional_ids,
}

scalars = st.builds(
    Scalars,
    text=st.text(),
    number=ints,
    ratio=floats,
    flag=st.booleans(),
    maybe=st.none() | st.text(),
    **base_fields,
)
temporals = st.builds(
    Temporal,
    at_utc=aware,
    at_naive=naive,
    day=st.dates(),
    clock=st.times(),
    clock_utc=st.times(timezones=st.just(UTC)),
    ident=st.uuids(),
    amount=decimals,
    **base_fields,
)
containers = st.builds(
    Containers,
    colour=st.sampled_from(Colour),
    priority=st.sampled_from(Priority),
    numbers=st.lists(ints, max_size=8).map(tuple),
    labels=st.frozensets(st.text(max_size=8), max_size=8),
    rows=st.lists(st.dictionaries(st.text(max_size=8), ints, max_size=4), max_size=4),
    index=st.dictionaries(st.text(max_size=8), st.lists(st.text(max_size=8), max_size=4)),
    **base_fields,
)
nesteds = st.builds(
    Nested,
    customer=customers,
    billing=st.none() | addresses,
    history=st.lists(addresses, max_size=3).map(tuple),
    **base_fields,
)
slotted = st.builds(
    SlottedMix,
    when=aware | naive,
    amount=decimals,
    tags=st.frozensets(st.text(max_size=8), max_size=5),
    address=st.none() | addresses,
    **base_fields,
)
events = st.one_of(scalars, temporals, containers, nesteds, slotted)


@PROPERTY_SETTINGS
@given(events)
def test_decode_of_encode_is_identity(event: DomainEvent) -> None:
    """decode(encode(e)) equals e and has e's class, for every supported field type."""
    decoded = CODEC.decode(CODEC.encode(event))
    assert decoded == event
    assert type(decoded) is type(event)


@PROPERTY_SETTINGS
@given(events)
def test_decode_of_reordered_envelope_is_identity(event: DomainEvent) -> None:
    """An envelope re-serialised with another key order (the general path) still decodes to e."""
    envelope = CODEC.to_envelope(event, traceparent="00-trace-01")
    reordered = dict(reversed(list(envelope.items())))
    payload = json.dumps(reordered, ensure_ascii=True).encode()
    decoded = CODEC.decode(payload, type(event))
    assert decoded == event
    assert type(decoded) is type(event)
    assert CODEC.from_envelope(reordered) == event


@PROPERTY_SETTINGS
@given(events)
def test_from_dict_of_to_dict_is_identity(event: DomainEvent) -> None:
    """from_dict(to_dict(e)) equals e, and to_dict is not disturbed by from_dict."""
    data = event.to_dict()
    snapshot = json.dumps(data, sort_keys=True)
    restored = type(event).from_dict(data)
    assert restored == event
    assert type(restored) is type(event)
    assert DomainEvent.from_dict(data) == event
    assert json.dumps(data, sort_keys=True) == snapshot


@PROPERTY_SETTINGS
@given(events)
def test_to_dict_is_plain_json(event: DomainEvent) -> None:
    """to_dict returns plain JSON types: a json.dumps/json.loads round trip changes nothing."""
    data = event.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["event_type"] == type(event).event_type
    restored = type(event).from_dict(json.loads(json.dumps(data)))
    assert restored == event
