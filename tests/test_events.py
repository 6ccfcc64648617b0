"""Behaviour of ``DomainEvent``: the seed contract (DESIGN.md section 2) and context defaults."""

import contextvars
import copy
import dataclasses
import importlib
import inspect
import json
import math
import sys
import textwrap
import types
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from enum import Enum, IntEnum
from typing import Any, ClassVar, Optional

import pytest

import tidings
from tidings import (
    DomainEvent,
    EventDecodeError,
    EventEncodeError,
    EventTypeMismatchError,
    TidingsError,
    UnknownEventTypeError,
    event_context,
    get_event_class,
    register_event,
)

BASE_FIELDS = ("event_id", "correlation_id", "occurred_at", "tenant_id", "causation_id")


def assert_uuid4(value: object) -> None:
    assert isinstance(value, str)
    parsed = uuid.UUID(value)
    assert parsed.version == 4
    assert str(parsed) == value, "a canonical lowercase 36-character uuid string"


def json_round_trip(data: object) -> object:
    return json.loads(json.dumps(data))


# -- event classes shared by several tests (module level so their annotations resolve) --------


class Color(Enum):
    RED = "red"
    GREEN = "green"


class Priority(IntEnum):
    LOW = 1
    HIGH = 2


class Size(Enum):
    SMALL = 1
    LARGE = 2


@dataclass(frozen=True)
class Money:
    amount: Decimal
    currency: str


@dataclass(frozen=True)
class Address:
    street: str
    city: str
    moved_in: date | None = None


@dataclass(frozen=True)
class Customer:
    customer_id: uuid.UUID
    address: Address
    wallet: tuple[Money, ...] = ()


@register_event
@dataclass(frozen=True)
class EveryType(DomainEvent):
    """Required fields of every kind a user would put in an event (no defaults on purpose)."""

    event_type: ClassVar[str] = "test_events.every_type"

    at: datetime
    local_at: datetime
    naive_at: datetime
    day: date
    ident: uuid.UUID
    amount: Decimal
    color: Color
    priority: Priority
    size: Size
    pair: tuple[int, str]
    many: tuple[uuid.UUID, ...]
    tags: frozenset[str]
    money: Money
    customer: Customer
    maybe_money: Optional[Money]  # noqa: UP045 - the Optional spelling is part of the contract
    maybe_none: str | None
    maybe_day: date | None
    items: list[Money]
    days: list[date]
    by_name: dict[str, Decimal]
    by_color: dict[str, Color]
    nested: dict[str, list[tuple[int, Decimal]]]
    count: int
    ratio: float
    flag: bool
    text: str


def make_every_type(**overrides: object) -> EveryType:
    values: dict[str, object] = {
        "at": datetime(2025, 3, 4, 5, 6, 7, 891011, tzinfo=UTC),
        "local_at": datetime(
            2024, 1, 2, 3, 4, 5, 6, tzinfo=timezone(timedelta(hours=5, minutes=30))
        ),
        "naive_at": datetime(2023, 12, 31, 23, 59, 59),
        "day": date(2024, 2, 29),
        "ident": uuid.UUID("12345678-1234-4234-8234-123456789abc"),
        "amount": Decimal("1.10"),
        "color": Color.GREEN,
        "priority": Priority.HIGH,
        "size": Size.LARGE,
        "pair": (7, "seven"),
        "many": (uuid.uuid4(), uuid.uuid4()),
        "tags": frozenset({"a", "b", "c"}),
        "money": Money(Decimal("19.99"), "EUR"),
        "customer": Customer(
            customer_id=uuid.uuid4(),
            address=Address("Main St 1", "Springfield", moved_in=date(2020, 1, 1)),
            wallet=(Money(Decimal("5"), "USD"), Money(Decimal("-0.01"), "GBP")),
        ),
        "maybe_money": Money(Decimal("0"), "JPY"),
        "maybe_none": None,
        "maybe_day": date(1999, 12, 31),
        "items": [Money(Decimal("3.000"), "CHF"), Money(Decimal("1E+3"), "SEK")],
        "days": [date(2024, 1, 1), date(2024, 12, 31)],
        "by_name": {"fee": Decimal("0.30"), "tax": Decimal("12.5")},
        "by_color": {"primary": Color.RED},
        "nested": {"rows": [(1, Decimal("1.5")), (2, Decimal("2.5"))], "empty": []},
        "count": 42,
        "ratio": 0.1,
        "flag": True,
        "text": 'grüße \u2603 "quoted" \\ back',
    }
    values.update(overrides)
    return EveryType(**values)  # type: ignore[arg-type]


@register_event
@dataclass(frozen=True)
class Shipment(DomainEvent):
    event_type: ClassVar[str] = "test_events.shipment"
    shipment_id: str
    parcels: int = 1


@register_event
@dataclass(frozen=True)
class ExpressShipment(Shipment):
    event_type: ClassVar[str] = "test_events.express_shipment"
    deadline: datetime | None = None


@register_event
@dataclass(frozen=True)
class Invoice(DomainEvent):
    event_type: ClassVar[str] = "test_events.invoice"
    invoice_id: str = ""
    total: Decimal = Decimal("0")
    lines: tuple[Money, ...] = ()


@register_event
@dataclass(frozen=True)
class Loose(DomainEvent):
    event_type: ClassVar[str] = "test_events.loose"
    anything: Any = None


@register_event
@dataclass(frozen=True)
class Measured(DomainEvent):
    event_type: ClassVar[str] = "test_events.measured"
    value: float = 0.0


# -- the base fields ------------------------------------------------------------------------


def test_event_is_frozen() -> None:
    """Assigning or deleting any field of an event raises FrozenInstanceError."""
    event = Shipment(shipment_id="s-1")
    for name in (*BASE_FIELDS, "shipment_id", "parcels"):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(event, name, "changed")
        with pytest.raises(dataclasses.FrozenInstanceError):
            delattr(event, name)
    assert event.shipment_id == "s-1"


def test_domain_event_is_a_frozen_dataclass_with_the_base_fields() -> None:
    """DomainEvent is a frozen dataclass whose fields are exactly the five base fields."""
    assert dataclasses.is_dataclass(DomainEvent)
    assert DomainEvent.__dataclass_params__.frozen  # type: ignore[attr-defined]
    assert tuple(f.name for f in dataclasses.fields(DomainEvent)) == BASE_FIELDS


def test_event_type_is_a_class_var_not_a_field() -> None:
    """event_type is a ClassVar: not a dataclass field and not an __init__ argument."""
    assert DomainEvent.event_type == "domain_event"
    assert Shipment.event_type == "test_events.shipment"
    assert "event_type" not in {f.name for f in dataclasses.fields(Shipment)}
    assert "event_type" not in inspect.signature(Shipment).parameters
    with pytest.raises(TypeError):
        Shipment(shipment_id="s", event_type="other")  # type: ignore[call-arg]


def test_event_id_is_a_uuid4_string() -> None:
    """A new event's event_id is a canonical version-4 UUID string."""
    assert_uuid4(Shipment(shipment_id="s").event_id)
    assert_uuid4(DomainEvent().event_id)


def test_event_ids_are_unique() -> None:
    """Every new event gets an event_id no other event has."""
    ids = [Shipment(shipment_id="s").event_id for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    for event_id in ids[::997]:
        assert_uuid4(event_id)


def test_occurred_at_is_an_iso8601_utc_string_of_now() -> None:
    """occurred_at is an ISO-8601 string that fromisoformat parses to the current UTC time."""
    before = datetime.now(UTC)
    event = Shipment(shipment_id="s")
    after = datetime.now(UTC)
    assert isinstance(event.occurred_at, str)
    parsed = datetime.fromisoformat(event.occurred_at)
    assert parsed.tzinfo is not None
    assert parsed.utcoffset() == timedelta(0)
    tolerance = timedelta(seconds=1)
    assert before - tolerance <= parsed <= after + tolerance


def test_tenant_and_causation_default_to_none() -> None:
    """Outside any context tenant_id and causation_id are None."""
    event = contextvars.Context().run(Shipment, shipment_id="s")
    assert event.tenant_id is None
    assert event.causation_id is None


def test_base_fields_are_keyword_only() -> None:
    """Every base field is keyword-only, so a subclass's own fields come first positionally."""
    params = inspect.signature(Shipment).parameters
    for name in BASE_FIELDS:
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
    event = Shipment("s-9", 3)
    assert (event.shipment_id, event.parcels) == ("s-9", 3)
    with pytest.raises(TypeError):
        Shipment("s-9", 3, "an-event-id")  # type: ignore[misc]


def test_subclass_may_declare_required_fields() -> None:
    """A subclass field without a default is required; leaving it out is a TypeError."""
    assert Shipment(shipment_id="s").shipment_id == "s"
    with pytest.raises(TypeError):
        Shipment()  # type: ignore[call-arg]


def test_base_fields_can_be_given_by_keyword() -> None:
    """Each base field given by keyword is kept exactly as given."""
    event = Shipment(
        shipment_id="s",
        event_id="e-given",
        correlation_id="c-given",
        occurred_at="2024-01-01T00:00:00+00:00",
        tenant_id="t-given",
        causation_id="cause-given",
    )
    assert event.event_id == "e-given"
    assert event.correlation_id == "c-given"
    assert event.occurred_at == "2024-01-01T00:00:00+00:00"
    assert event.tenant_id == "t-given"
    assert event.causation_id == "cause-given"


def test_equal_fields_make_equal_hashable_events() -> None:
    """Two events with the same field values are equal and hash alike."""
    a = Invoice(invoice_id="i", event_id="e", correlation_id="c", occurred_at="t")
    b = Invoice(invoice_id="i", event_id="e", correlation_id="c", occurred_at="t")
    assert a == b
    assert hash(a) == hash(b)
    assert a != Invoice(invoice_id="j", event_id="e", correlation_id="c", occurred_at="t")


# -- to_dict --------------------------------------------------------------------------------


def test_to_dict_returns_every_field_plus_event_type() -> None:
    """to_dict has one key per dataclass field and "event_type", with the class's name."""
    event = make_every_type()
    data = event.to_dict()
    assert set(data) == {f.name for f in dataclasses.fields(EveryType)} | {"event_type"}
    assert data["event_type"] == "test_events.every_type"
    for name in BASE_FIELDS:
        assert data[name] == getattr(event, name)


def test_to_dict_is_json_compatible_for_every_supported_type() -> None:
    """json.dumps accepts to_dict's result, and json.loads gives back an equal dict."""
    data = make_every_type().to_dict()
    text = json.dumps(data, allow_nan=False)
    assert json.loads(text) == data


def test_to_dict_values_have_the_documented_json_forms() -> None:
    """Datetimes, dates, UUIDs and Decimals become strings, enums their values, tuples lists."""
    event = make_every_type()
    data = event.to_dict()
    assert datetime.fromisoformat(data["at"]) == event.at
    assert datetime.fromisoformat(data["local_at"]).utcoffset() == timedelta(hours=5, minutes=30)
    assert date.fromisoformat(data["day"]) == date(2024, 2, 29)
    assert data["ident"] == "12345678-1234-4234-8234-123456789abc"
    assert Decimal(data["amount"]) == Decimal("1.10")
    assert data["color"] == "green"
    assert data["priority"] == 2
    assert data["size"] == 2
    assert data["pair"] == [7, "seven"]
    assert sorted(data["tags"]) == ["a", "b", "c"]
    assert data["money"] == {"amount": "19.99", "currency": "EUR"}
    assert data["maybe_none"] is None
    assert data["customer"]["address"]["city"] == "Springfield"
    assert data["nested"]["rows"][0][0] == 1


def test_to_dict_of_the_base_class() -> None:
    """A plain DomainEvent's to_dict holds the base fields and event_type "domain_event"."""
    event = DomainEvent(tenant_id="t")
    data = event.to_dict()
    assert set(data) == {*BASE_FIELDS, "event_type"}
    assert data["event_type"] == "domain_event"
    assert data["tenant_id"] == "t"
    assert json_round_trip(data) == data


def test_to_dict_returns_a_new_dict_each_time() -> None:
    """Changing the dict to_dict returned changes neither the event nor the next to_dict."""
    event = Invoice(invoice_id="i", lines=(Money(Decimal("1"), "EUR"),))
    first = event.to_dict()
    first["invoice_id"] = "changed"
    first["lines"].append("junk")
    second = event.to_dict()
    assert second["invoice_id"] == "i"
    assert len(second["lines"]) == 1
    assert event.invoice_id == "i"


# -- from_dict ------------------------------------------------------------------------------


def test_round_trip_keeps_every_supported_type() -> None:
    """from_dict(to_dict(e)) == e, through JSON text too, with every type restored exactly."""
    event = make_every_type()
    for data in (event.to_dict(), json_round_trip(event.to_dict())):
        back = EveryType.from_dict(data)  # type: ignore[arg-type]
        assert back == event
        assert type(back) is EveryType
        assert type(back.pair) is tuple
        assert type(back.many) is tuple
        assert all(type(u) is uuid.UUID for u in back.many)
        assert type(back.tags) is frozenset
        assert type(back.money) is Money
        assert type(back.money.amount) is Decimal
        assert type(back.customer.address) is Address
        assert type(back.customer.wallet) is tuple
        assert type(back.customer.address.moved_in) is date
        assert back.color is Color.GREEN
        assert back.priority is Priority.HIGH
        assert back.size is Size.LARGE
        assert type(back.ident) is uuid.UUID
        assert type(back.at) is datetime
        assert back.at.utcoffset() == timedelta(0)
        assert back.local_at.utcoffset() == timedelta(hours=5, minutes=30)
        assert back.naive_at.tzinfo is None
        assert type(back.day) is date
        assert type(back.items) is list
        assert all(type(m) is Money for m in back.items)
        assert all(type(v) is Decimal for v in back.by_name.values())
        assert back.by_color["primary"] is Color.RED
        assert all(type(row) is tuple for row in back.nested["rows"])
        assert back.event_id == event.event_id
        assert back.occurred_at == event.occurred_at


@pytest.mark.parametrize(
    "overrides",
    [
        {"maybe_money": None, "maybe_day": None, "maybe_none": "now a string"},
        {"pair": (0, ""), "many": (), "tags": frozenset(), "items": [], "days": []},
        {"by_name": {}, "by_color": {}, "nested": {}},
        {"amount": Decimal("-0.000001"), "count": -(2**53), "ratio": -1.5e300, "flag": False},
        {"customer": Customer(customer_id=uuid.uuid4(), address=Address("s", "c"))},
    ],
    ids=["optionals-none", "empty-collections", "empty-mappings", "extremes", "nested-defaults"],
)
def test_round_trip_keeps_edge_values(overrides: dict[str, object]) -> None:
    """from_dict(to_dict(e)) == e for None optionals, empty collections and extreme numbers."""
    event = make_every_type(**overrides)
    data = event.to_dict()
    assert json_round_trip(data) == data
    back = EveryType.from_dict(json_round_trip(data))  # type: ignore[arg-type]
    assert back == event
    assert type(back.tags) is frozenset
    assert type(back.pair) is tuple


def test_round_trip_through_the_base_class_gives_the_subclass() -> None:
    """DomainEvent.from_dict(e.to_dict()) builds e's registered class and equals e."""
    for event in (
        make_every_type(),
        Shipment(shipment_id="s", tenant_id="t"),
        ExpressShipment(shipment_id="x", deadline=datetime(2030, 1, 1, tzinfo=UTC)),
        Invoice(invoice_id="i", total=Decimal("9.90"), lines=(Money(Decimal("9.90"), "EUR"),)),
    ):
        back = DomainEvent.from_dict(json_round_trip(event.to_dict()))  # type: ignore[arg-type]
        assert type(back) is type(event)
        assert back == event


def test_from_dict_does_not_mutate_its_input() -> None:
    """from_dict leaves the given dict, and everything nested in it, exactly as it was."""
    data = make_every_type().to_dict()
    data["unknown_key"] = {"nested": [1, 2, 3]}
    before = copy.deepcopy(data)
    EveryType.from_dict(data)
    DomainEvent.from_dict(data)
    assert data == before
    assert data["event_type"] == "test_events.every_type"


def test_from_dict_accepts_a_read_only_mapping() -> None:
    """from_dict works on a read-only mapping, which it could not change if it tried."""
    data = types.MappingProxyType(Shipment(shipment_id="s", parcels=2).to_dict())
    back = DomainEvent.from_dict(data)
    assert isinstance(back, Shipment)
    assert back.parcels == 2


def test_from_dict_resolves_the_class_through_the_registry() -> None:
    """The event_type key picks the registered class, whichever class from_dict is called on."""
    data = ExpressShipment(shipment_id="x").to_dict()
    assert type(DomainEvent.from_dict(data)) is ExpressShipment
    assert type(Shipment.from_dict(data)) is ExpressShipment
    assert type(ExpressShipment.from_dict(data)) is ExpressShipment
    assert get_event_class("test_events.express_shipment") is ExpressShipment


def test_from_dict_without_event_type_builds_cls() -> None:
    """With no "event_type" key from_dict builds the class it was called on."""
    shipment = Shipment.from_dict({"shipment_id": "s-1", "parcels": 4})
    assert type(shipment) is Shipment
    assert (shipment.shipment_id, shipment.parcels) == ("s-1", 4)
    express = ExpressShipment.from_dict({"shipment_id": "x-1"})
    assert type(express) is ExpressShipment
    base = DomainEvent.from_dict({"tenant_id": "t"})
    assert type(base) is DomainEvent
    assert base.tenant_id == "t"


def test_from_dict_fills_absent_base_fields_like_the_constructor() -> None:
    """Base fields missing from the dict get fresh values, as when constructing the event."""
    event = Invoice.from_dict({"invoice_id": "i"})
    assert_uuid4(event.event_id)
    assert_uuid4(event.correlation_id)
    assert datetime.fromisoformat(event.occurred_at).utcoffset() == timedelta(0)
    assert event.tenant_id is None
    assert event.causation_id is None
    assert event.total == Decimal("0")
    assert event.lines == ()


def test_from_dict_refuses_a_sibling_class() -> None:
    """A registered event_type naming a class outside cls's family raises EventTypeMismatchError."""
    data = Invoice(invoice_id="i").to_dict()
    with pytest.raises(EventTypeMismatchError) as info:
        Shipment.from_dict(data)
    assert isinstance(info.value, EventDecodeError)
    assert isinstance(info.value, TidingsError)
    assert "test_events.invoice" in str(info.value)


def test_from_dict_refuses_a_parent_class_through_a_subclass() -> None:
    """A parent's event_type decoded through a subclass raises EventTypeMismatchError."""
    data = Shipment(shipment_id="s").to_dict()
    with pytest.raises(EventTypeMismatchError):
        ExpressShipment.from_dict(data)


def test_type_mismatch_errors_share_the_tidings_root() -> None:
    """EventTypeMismatchError is an EventDecodeError and a TidingsError."""
    assert issubclass(EventTypeMismatchError, EventDecodeError)
    assert issubclass(EventDecodeError, TidingsError)
    assert issubclass(UnknownEventTypeError, EventDecodeError)
    assert tidings.TidingsError is TidingsError


def test_from_dict_with_an_unregistered_event_type_raises() -> None:
    """An event_type nothing is registered under raises UnknownEventTypeError naming it."""
    name = "test_events.from_dict_unregistered.never_registered"
    data = {"event_type": name, "shipment_id": "s"}
    for cls in (DomainEvent, Shipment):
        with pytest.raises(UnknownEventTypeError) as info:
            cls.from_dict(data)
        assert name in str(info.value)
        assert isinstance(info.value, EventDecodeError)
        assert isinstance(info.value, TidingsError)


def test_from_dict_with_a_non_string_event_type_raises() -> None:
    """An event_type that is not a string raises EventDecodeError naming event_type."""
    with pytest.raises(EventDecodeError) as info:
        DomainEvent.from_dict({"event_type": 12})
    assert info.value.field == "event_type"
    assert "event_type" in str(info.value)


def test_from_dict_ignores_unknown_keys() -> None:
    """Keys that are not fields of the class are ignored (forward compatibility)."""
    event = Shipment(shipment_id="s", parcels=2)
    data = {**event.to_dict(), "added_later": {"deep": [1, 2]}, "another": None}
    assert Shipment.from_dict(data) == event
    assert DomainEvent.from_dict(data) == event


@pytest.mark.parametrize(
    ("field", "bad_value"),
    [
        ("count", "not a number"),
        ("count", 1.5),
        ("text", 12),
        ("flag", "yes"),
        ("day", "not a date"),
        ("at", 12),
        ("ident", "not-a-uuid"),
        ("amount", "a lot"),
        ("color", "purple"),
        ("priority", 99),
        ("pair", [1]),
        ("tags", "abc"),
        ("money", "19.99 EUR"),
        ("items", {"amount": "1"}),
        ("by_name", ["fee"]),
        ("maybe_money", 3),
        ("event_id", 123),
        ("tenant_id", 5),
        ("correlation_id", ["c"]),
    ],
)
def test_from_dict_wrong_type_names_the_field(field: str, bad_value: object) -> None:
    """A field of the wrong type raises EventDecodeError whose .field and message name it."""
    data = {**make_every_type().to_dict(), field: bad_value}
    with pytest.raises(EventDecodeError) as info:
        EveryType.from_dict(data)
    assert info.value.field == field
    assert field in str(info.value)
    assert isinstance(info.value, TidingsError)


@pytest.mark.parametrize("field", ["at", "ident", "money", "customer", "count", "text", "tags"])
def test_from_dict_missing_required_field_names_it(field: str) -> None:
    """A missing required field raises EventDecodeError whose .field and message name it."""
    data = make_every_type().to_dict()
    del data[field]
    with pytest.raises(EventDecodeError) as info:
        EveryType.from_dict(data)
    assert info.value.field == field
    assert field in str(info.value)


def test_from_dict_missing_required_subclass_field_names_it() -> None:
    """A missing required field of a small subclass, decoded via DomainEvent, is named."""
    with pytest.raises(EventDecodeError) as info:
        DomainEvent.from_dict({"event_type": "test_events.shipment", "parcels": 2})
    assert info.value.field == "shipment_id"
    assert "shipment_id" in str(info.value)


def test_from_dict_wrong_nested_field_names_its_path() -> None:
    """A wrong value inside a nested dataclass is named by a dotted path through it."""
    data = make_every_type().to_dict()
    data["money"] = {"amount": "19.99", "currency": 3}
    with pytest.raises(EventDecodeError) as info:
        EveryType.from_dict(data)
    assert info.value.field == "money.currency"
    assert "money.currency" in str(info.value)


def test_from_dict_missing_nested_field_names_its_path() -> None:
    """A field missing inside a nested dataclass is named by a dotted path through it."""
    data = make_every_type().to_dict()
    data["money"] = {"amount": "19.99"}
    with pytest.raises(EventDecodeError) as info:
        EveryType.from_dict(data)
    assert info.value.field == "money.currency"
    assert "money.currency" in str(info.value)


@pytest.mark.parametrize("not_a_mapping", ["text", None, [("shipment_id", "s")], 5])
def test_from_dict_refuses_a_non_mapping(not_a_mapping: object) -> None:
    """from_dict given something that is not a mapping raises EventDecodeError."""
    with pytest.raises(EventDecodeError):
        DomainEvent.from_dict(not_a_mapping)  # type: ignore[arg-type]
    with pytest.raises(EventDecodeError):
        Shipment.from_dict(not_a_mapping)  # type: ignore[arg-type]


def test_to_dict_refuses_a_value_with_no_json_form() -> None:
    """A field holding an arbitrary object makes to_dict raise EventEncodeError."""
    event = Loose(anything=object())
    with pytest.raises(EventEncodeError) as info:
        event.to_dict()
    assert isinstance(info.value, TidingsError)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")], ids=repr)
def test_non_finite_floats_round_trip_or_are_refused(value: float) -> None:
    """A non-finite float survives to_dict/from_dict or is refused; it is never silently lost."""
    event = Measured(value=value)
    try:
        data = event.to_dict()
    except EventEncodeError:
        return
    back = DomainEvent.from_dict(json_round_trip(data))  # type: ignore[arg-type]
    assert isinstance(back, Measured)
    assert back.value == value or (math.isnan(back.value) and math.isnan(value))


# -- context defaults -----------------------------------------------------------------------


def test_event_takes_ids_from_the_current_context() -> None:
    """An event created inside event_context takes its correlation, tenant and causation ids."""
    with event_context(correlation_id="ctx-corr", tenant_id="ctx-tenant", causation_id="ctx-cause"):
        event = Shipment(shipment_id="s")
        base = DomainEvent()
    for e in (event, base):
        assert e.correlation_id == "ctx-corr"
        assert e.tenant_id == "ctx-tenant"
        assert e.causation_id == "ctx-cause"


def test_explicit_ids_win_over_the_context() -> None:
    """Ids given explicitly, None included, override the ones bound by event_context."""
    with event_context(correlation_id="ctx-corr", tenant_id="ctx-tenant", causation_id="ctx-cause"):
        event = Shipment(
            shipment_id="s", correlation_id="mine", tenant_id=None, causation_id="my-cause"
        )
    assert event.correlation_id == "mine"
    assert event.tenant_id is None
    assert event.causation_id == "my-cause"


def test_partially_bound_context_fills_only_what_it_binds() -> None:
    """A context binding only the tenant leaves causation None and mints a correlation id."""

    def build() -> Shipment:
        with event_context(tenant_id="only-tenant"):
            return Shipment(shipment_id="s")

    event = contextvars.Context().run(build)
    assert event.tenant_id == "only-tenant"
    assert event.causation_id is None
    assert_uuid4(event.correlation_id)


def test_outside_a_context_each_event_gets_a_fresh_correlation_id() -> None:
    """Outside any context correlation_id is a new uuid4 for every event."""

    def build() -> list[Shipment]:
        return [Shipment(shipment_id="s") for _ in range(100)]

    events = contextvars.Context().run(build)
    ids = {e.correlation_id for e in events}
    assert len(ids) == len(events)
    for e in events:
        assert_uuid4(e.correlation_id)
        assert e.correlation_id != e.event_id


def test_context_defaults_are_read_at_creation_time() -> None:
    """Leaving a context does not change events created in it; later events follow the new one."""
    with event_context(correlation_id="first"):
        first = Shipment(shipment_id="s")
    with event_context(correlation_id="second"):
        second = Shipment(shipment_id="s")
    assert first.correlation_id == "first"
    assert second.correlation_id == "second"


def test_from_dict_keeps_the_payload_ids_over_the_context() -> None:
    """Ids in the dict win over the current context when decoding."""
    data = Shipment(
        shipment_id="s", correlation_id="orig-corr", tenant_id="orig-tenant", causation_id="orig"
    ).to_dict()
    with event_context(correlation_id="other", tenant_id="other", causation_id="other"):
        back = DomainEvent.from_dict(data)
    assert back.correlation_id == "orig-corr"
    assert back.tenant_id == "orig-tenant"
    assert back.causation_id == "orig"


# -- a user's seed module, unchanged except for its import line -----------------------------

SEED_MODULE = "tidings_test_seed_orders"
SEED_EVENT_TYPE = "test_events.seed.orders.order_placed"
SEED_SOURCE = f'''
"""A user's module written against the seed; only the import line changed."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, ClassVar

from tidings import DomainEvent, get_event_class, register_event


@register_event
@dataclass(frozen=True)
class OrderPlaced(DomainEvent):
    event_type: ClassVar[str] = "{SEED_EVENT_TYPE}"
    order_id: str = ""


@dataclass(frozen=True)
class OrderLine:
    sku: str
    quantity: int
    unit_price: Decimal


@register_event
@dataclass(frozen=True)
class OrderShipped(DomainEvent):
    event_type: ClassVar[str] = "{SEED_EVENT_TYPE}.shipped"
    order_id: str = ""
    shipped_at: datetime | None = None
    lines: tuple[OrderLine, ...] = ()
    labels: frozenset[str] = field(default_factory=frozenset)


def publish(event: DomainEvent) -> dict[str, Any]:
    return event.to_dict()


def consume(payload: dict[str, Any]) -> DomainEvent:
    event_cls = get_event_class(payload["event_type"])
    assert event_cls is not None
    return event_cls.from_dict(payload)
'''


@pytest.fixture(scope="module")
def seed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[types.ModuleType]:
    """The user's seed-style module, imported from a file as their services would."""
    directory = tmp_path_factory.mktemp("seed_user")
    (directory / f"{SEED_MODULE}.py").write_text(textwrap.dedent(SEED_SOURCE), encoding="utf-8")
    sys.path.insert(0, str(directory))
    importlib.invalidate_caches()
    try:
        yield importlib.import_module(SEED_MODULE)
    finally:
        sys.modules.pop(SEED_MODULE, None)
        sys.path.remove(str(directory))


def test_seed_module_imports_and_registers(seed: types.ModuleType) -> None:
    """The seed-style module imports unchanged and @register_event returns its class."""
    order_placed = seed.OrderPlaced
    assert get_event_class(SEED_EVENT_TYPE) is order_placed
    assert issubclass(order_placed, DomainEvent)
    assert order_placed.event_type == SEED_EVENT_TYPE
    assert "event_type" not in {f.name for f in dataclasses.fields(order_placed)}


def test_seed_event_construction(seed: types.ModuleType) -> None:
    """Seed-style construction works: no arguments, keyword fields, positional own field."""
    order_placed = seed.OrderPlaced
    empty = order_placed()
    assert empty.order_id == ""
    assert_uuid4(empty.event_id)
    assert datetime.fromisoformat(empty.occurred_at).utcoffset() == timedelta(0)
    by_keyword = order_placed(
        order_id="o-1", correlation_id="req-1", tenant_id="acme", event_id="e-1"
    )
    assert (by_keyword.order_id, by_keyword.correlation_id) == ("o-1", "req-1")
    assert (by_keyword.tenant_id, by_keyword.event_id) == ("acme", "e-1")
    assert by_keyword.causation_id is None
    assert order_placed("o-2").order_id == "o-2"
    with pytest.raises(dataclasses.FrozenInstanceError):
        by_keyword.order_id = "o-3"


def test_seed_to_dict_has_the_seed_keys(seed: types.ModuleType) -> None:
    """The seed's to_dict keys are all still there (plus causation_id), JSON-ready."""
    event = seed.OrderPlaced(order_id="o-1", tenant_id="acme")
    data = seed.publish(event)
    assert set(data) == {
        "event_id",
        "correlation_id",
        "occurred_at",
        "tenant_id",
        "causation_id",
        "order_id",
        "event_type",
    }
    assert data["event_type"] == SEED_EVENT_TYPE
    assert data["order_id"] == "o-1"
    assert data["tenant_id"] == "acme"
    assert json.loads(json.dumps(data)) == data


def test_seed_round_trip(seed: types.ModuleType) -> None:
    """Seed-style round trips give back an equal OrderPlaced, through every seed entry point."""
    event = seed.OrderPlaced(order_id="o-1", correlation_id="req-1", tenant_id="acme")
    data = json.loads(json.dumps(event.to_dict()))
    snapshot = copy.deepcopy(data)
    for back in (
        DomainEvent.from_dict(data),
        seed.OrderPlaced.from_dict(data),
        seed.consume(data),
        get_event_class(data["event_type"]).from_dict(data),  # type: ignore[union-attr]
    ):
        assert type(back) is seed.OrderPlaced
        assert back == event
    assert data == snapshot, "the seed popped event_type from the dict; tidings must not"


def test_seed_reads_dicts_written_by_the_seed(seed: types.ModuleType) -> None:
    """A dict the seed itself produced (no causation_id) decodes to the same OrderPlaced."""
    written_by_seed = {
        "event_id": "5f0c3b1e-8f5a-4b7e-9d3c-2a1b0c9d8e7f",
        "correlation_id": "0e1d2c3b-4a59-4687-9a6b-5c4d3e2f1a0b",
        "occurred_at": "2024-05-01T12:00:00.123456+00:00",
        "tenant_id": None,
        "order_id": "o-77",
        "event_type": SEED_EVENT_TYPE,
    }
    back = DomainEvent.from_dict(written_by_seed)
    assert type(back) is seed.OrderPlaced
    assert back.order_id == "o-77"
    assert back.event_id == written_by_seed["event_id"]
    assert back.correlation_id == written_by_seed["correlation_id"]
    assert back.occurred_at == written_by_seed["occurred_at"]
    assert back.tenant_id is None
    assert back.causation_id is None


def test_seed_event_takes_the_request_context(seed: types.ModuleType) -> None:
    """A seed-style event created inside event_context carries the request's ids."""
    with event_context(correlation_id="req-9", tenant_id="acme"):
        event = seed.OrderPlaced(order_id="o-9")
    assert event.correlation_id == "req-9"
    assert event.tenant_id == "acme"
    assert DomainEvent.from_dict(event.to_dict()) == event


def test_seed_module_with_string_annotations_round_trips(seed: types.ModuleType) -> None:
    """Events of a `from __future__ import annotations` module with rich types round-trip."""
    event = seed.OrderShipped(
        order_id="o-5",
        shipped_at=datetime(2025, 6, 7, 8, 9, 10, tzinfo=UTC),
        lines=(seed.OrderLine("sku-1", 2, Decimal("9.95")),),
        labels=frozenset({"fragile"}),
    )
    data = json.loads(json.dumps(seed.publish(event)))
    back = seed.consume(data)
    assert back == event
    assert type(back.lines) is tuple
    assert type(back.lines[0]) is seed.OrderLine
    assert type(back.labels) is frozenset
    assert seed.OrderShipped.from_dict({"order_id": "o-6"}).labels == frozenset()
