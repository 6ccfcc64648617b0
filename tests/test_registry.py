"""Behaviour of the event registry: registration, refusals, lookups, aliases and upcasters."""

import dataclasses
import importlib
import json
import sys
import textwrap
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest

from tidings import (
    DomainEvent,
    DuplicateEventTypeError,
    EventDecodeError,
    EventDefinitionError,
    EventRegistry,
    TidingsError,
    UnknownEventTypeError,
    default_registry,
    get_event_class,
    register_event,
)
from tidings.codec import Codec

WAIT = 10.0


def envelope(event_type: str, dataversion: int | str, data: dict[str, Any]) -> dict[str, Any]:
    """Build by hand a CloudEvents envelope as an older producer would have written it."""
    return {
        "type": event_type,
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": "/legacy-service",
        "time": "2024-01-02T03:04:05.000006+00:00",
        "datacontenttype": "application/json",
        "dataversion": str(dataversion),
        "correlationid": "legacy-correlation",
        "causationid": "legacy-cause",
        "tenantid": "legacy-tenant",
        "data": data,
    }


# Tidings itself writes compact JSON with "type" first; other producers write what they like.
JSON_STYLES: dict[str, Callable[[dict[str, Any]], bytes]] = {
    "compact": lambda env: json.dumps(env, separators=(",", ":")).encode(),
    "spaced": lambda env: json.dumps(env, indent=2).encode(),
    "reordered": lambda env: json.dumps(dict(reversed(list(env.items())))).encode(),
}


@pytest.fixture(params=sorted(JSON_STYLES))
def to_json(request: pytest.FixtureRequest) -> Callable[[dict[str, Any]], bytes]:
    """One way of serialising a hand-built envelope."""
    return JSON_STYLES[request.param]


# -- register_event -------------------------------------------------------------------------


def test_register_event_returns_the_class() -> None:
    """register_event returns the very class it was given, so it works as a decorator."""

    @dataclass(frozen=True)
    class Returned(DomainEvent):
        event_type: ClassVar[str] = "test_registry.register_event_returns_the_class"

    assert register_event(Returned) is Returned
    assert get_event_class("test_registry.register_event_returns_the_class") is Returned


def test_register_event_as_a_decorator_keeps_the_class_usable() -> None:
    """A class decorated with @register_event constructs and round-trips normally."""

    @register_event
    @dataclass(frozen=True)
    class Decorated(DomainEvent):
        event_type: ClassVar[str] = "test_registry.decorator_keeps_class_usable"
        value: int = 0

    assert isinstance(Decorated, type)
    event = Decorated(value=3)
    assert DomainEvent.from_dict(event.to_dict()) == event


def test_registering_a_different_class_under_a_taken_name_raises() -> None:
    """A second, different class with a taken event_type raises DuplicateEventTypeError."""
    name = "test_registry.duplicate_name"

    @register_event
    @dataclass(frozen=True)
    class First(DomainEvent):
        event_type: ClassVar[str] = name

    @dataclass(frozen=True)
    class Second(DomainEvent):
        event_type: ClassVar[str] = name

    with pytest.raises(DuplicateEventTypeError) as info:
        register_event(Second)
    assert isinstance(info.value, TidingsError)
    message = str(info.value)
    assert name in message
    assert "First" in message
    assert "Second" in message
    assert get_event_class(name) is First, "the first registration stands"


def test_same_qualname_in_another_module_is_a_different_class() -> None:
    """A class with the same qualified name but another module cannot take a taken name."""
    registry = EventRegistry()
    name = "test_registry.same_qualname_other_module"

    def make(module: str) -> type[DomainEvent]:
        @dataclass(frozen=True)
        class Twin(DomainEvent):
            event_type: ClassVar[str] = name

        Twin.__module__ = module
        return Twin

    first = registry.register(make("service_a.events"))
    with pytest.raises(DuplicateEventTypeError):
        registry.register(make("service_b.events"))
    assert registry.get(name) is first


def test_reregistering_the_same_class_is_harmless() -> None:
    """Registering one class twice returns it and leaves it registered."""

    @register_event
    @dataclass(frozen=True)
    class Twice(DomainEvent):
        event_type: ClassVar[str] = "test_registry.reregister_same_class"

    assert register_event(Twice) is Twice
    assert register_event(Twice) is Twice
    assert get_event_class("test_registry.reregister_same_class") is Twice


def test_a_redefinition_with_the_same_qualname_replaces_the_old_class() -> None:
    """A new class object with the same module and qualname registers and replaces the old one."""
    registry = EventRegistry()
    name = "test_registry.same_qualname_redefinition"

    def define() -> type[DomainEvent]:
        @dataclass(frozen=True)
        class Redefined(DomainEvent):
            event_type: ClassVar[str] = name
            n: int = 0

        return Redefined

    old, new = define(), define()
    assert old is not new
    assert registry.register(old) is old
    assert registry.register(new) is new
    assert registry.get(name) is new
    payload = Codec(registry=registry).encode(old(n=5))
    decoded = Codec(registry=registry).decode(payload)
    assert type(decoded) is new
    assert decoded.n == 5  # type: ignore[attr-defined]


RELOAD_SOURCE = '''
"""An events module that a development server reloads."""
from dataclasses import dataclass
from typing import ClassVar

from tidings import DomainEvent, register_event


@register_event
@dataclass(frozen=True)
class Reloaded(DomainEvent):
    event_type: ClassVar[str] = "test_registry.module_reload.{suffix}"
    n: int = 0
'''


RELOAD_WITH_ALIAS_AND_UPCASTER_SOURCE = '''
"""An events module that also declares an alias and an upcaster at import time."""
from dataclasses import dataclass
from typing import Any, ClassVar

from tidings import DomainEvent, default_registry, register_event


@register_event
@dataclass(frozen=True)
class Reloaded(DomainEvent):
    event_type: ClassVar[str] = "test_registry.module_reload.{suffix}"
    event_version: ClassVar[int] = 2
    n: int = 0


default_registry.add_alias("test_registry.module_reload_old.{suffix}", Reloaded)


@default_registry.upcaster("test_registry.module_reload.{suffix}", from_version=1)
def number_renamed(data: dict[str, Any]) -> dict[str, Any]:
    return {"n": data["number"]}
'''


def write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, template: str) -> tuple[str, str]:
    """Write an events module from template to tmp_path; return (module name, its suffix)."""
    suffix = uuid.uuid4().hex
    name = f"tidings_test_reload_{suffix}"
    source = textwrap.dedent(template).replace("{suffix}", suffix)
    (tmp_path / f"{name}.py").write_text(source, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name, suffix


@pytest.fixture
def reloadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str]]:
    """(module name, event_type) of a tiny events module written to tmp_path, on sys.path."""
    name, suffix = write_module(tmp_path, monkeypatch, RELOAD_SOURCE)
    try:
        yield name, f"test_registry.module_reload.{suffix}"
    finally:
        sys.modules.pop(name, None)


def test_module_reload_with_alias_and_upcaster_is_harmless(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reloading a module that also adds an alias and an upcaster at import time succeeds."""
    name, suffix = write_module(tmp_path, monkeypatch, RELOAD_WITH_ALIAS_AND_UPCASTER_SOURCE)
    old_payload = envelope(f"test_registry.module_reload_old.{suffix}", 1, {"number": 5})
    try:
        module = importlib.import_module(name)
        module = importlib.reload(module)
        event = Codec().decode(json.dumps(old_payload).encode())
        assert type(event) is module.Reloaded
        assert event.n == 5  # type: ignore[attr-defined]
    finally:
        sys.modules.pop(name, None)


def test_module_reload_is_harmless(reloadable: tuple[str, str]) -> None:
    """importlib.reload of a module with @register_event succeeds and registers the new class."""
    module_name, event_type = reloadable
    module = importlib.import_module(module_name)
    first = module.Reloaded
    assert get_event_class(event_type) is first
    payload = first(n=7).to_dict()
    module = importlib.reload(module)
    second = module.Reloaded
    assert second is not first
    assert get_event_class(event_type) is second
    decoded = DomainEvent.from_dict(payload)
    assert type(decoded) is second
    assert decoded.n == 7  # type: ignore[attr-defined]
    module = importlib.reload(module)
    assert get_event_class(event_type) is module.Reloaded


def test_codec_decodes_to_the_reloaded_class(reloadable: tuple[str, str]) -> None:
    """After a reload the codec decodes wire payloads into the new class, not a stale one."""
    module_name, event_type = reloadable
    registry_codec = Codec()
    module = importlib.import_module(module_name)
    assert module.Reloaded.event_type == event_type
    payload = registry_codec.encode(module.Reloaded(n=1))
    assert type(registry_codec.decode(payload)) is module.Reloaded
    module = importlib.reload(module)
    decoded = registry_codec.decode(payload)
    assert type(decoded) is module.Reloaded
    assert decoded.n == 1  # type: ignore[attr-defined]


def test_concurrent_registration_of_one_class_is_safe() -> None:
    """Many threads registering the same class at once all get the class back."""
    registry = EventRegistry()

    @dataclass(frozen=True)
    class Raced(DomainEvent):
        event_type: ClassVar[str] = "test_registry.concurrent_registration"

    threads = 8
    barrier = threading.Barrier(threads, timeout=WAIT)
    results: list[object] = []
    lock = threading.Lock()

    def register() -> None:
        try:
            barrier.wait()
            outcome: object = registry.register(Raced)
        except BaseException as exc:  # noqa: BLE001 - reported to the main thread below
            outcome = exc
        with lock:
            results.append(outcome)

    workers = [threading.Thread(target=register) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(WAIT)
        assert not worker.is_alive()
    assert results == [Raced] * threads
    assert registry.get("test_registry.concurrent_registration") is Raced


# -- refusals -------------------------------------------------------------------------------


def assert_refused(
    cls: Any, *hints: str, registry: EventRegistry | None = None
) -> EventDefinitionError:
    """Assert registering cls raises EventDefinitionError whose message holds every hint."""
    register = register_event if registry is None else registry.register
    with pytest.raises(EventDefinitionError) as info:
        register(cls)
    error = info.value
    assert isinstance(error, TidingsError)
    assert isinstance(error, TypeError)
    for hint in hints:
        assert hint in str(error), f"{hint!r} missing from {str(error)!r}"
    return error


def test_definition_error_is_a_tidings_error_and_a_type_error() -> None:
    """EventDefinitionError derives from both TidingsError and TypeError."""
    assert issubclass(EventDefinitionError, TidingsError)
    assert issubclass(EventDefinitionError, TypeError)


def test_refuses_a_plain_class() -> None:
    """A class that is not a dataclass (nor a DomainEvent) is refused with the fix."""

    class Plain:
        event_type: ClassVar[str] = "test_registry.refuses_a_plain_class"

    assert_refused(Plain, "DomainEvent", "@dataclass(frozen=True)")
    assert get_event_class("test_registry.refuses_a_plain_class") is None


def test_refuses_a_domain_event_subclass_that_is_not_a_dataclass() -> None:
    """A DomainEvent subclass with no @dataclass at all is refused with the fix."""

    class NotDataclass(DomainEvent):
        event_type: ClassVar[str] = "test_registry.refuses_not_dataclass"
        order_id: str = ""

    assert_refused(NotDataclass, "NotDataclass", "@dataclass(frozen=True)")
    assert get_event_class("test_registry.refuses_not_dataclass") is None


def test_refuses_a_non_frozen_dataclass_that_is_not_a_domain_event() -> None:
    """A mutable dataclass not derived from DomainEvent is refused with the fix."""

    @dataclass
    class Mutable:
        event_type: ClassVar[str] = "test_registry.refuses_non_frozen_dataclass"
        order_id: str = ""

    assert_refused(Mutable, "DomainEvent", "@dataclass(frozen=True)")
    assert get_event_class("test_registry.refuses_non_frozen_dataclass") is None


def test_refuses_a_frozen_dataclass_that_is_not_a_domain_event() -> None:
    """A frozen dataclass that does not derive from DomainEvent is refused with the fix."""

    @dataclass(frozen=True)
    class Lookalike:
        event_type: ClassVar[str] = "test_registry.refuses_frozen_lookalike"
        event_id: str = ""

    assert_refused(Lookalike, "DomainEvent")
    assert get_event_class("test_registry.refuses_frozen_lookalike") is None


def test_refuses_a_subclass_that_forgot_its_own_dataclass_decorator() -> None:
    """A subclass of an event without its own @dataclass(frozen=True) is refused with the fix."""

    @register_event
    @dataclass(frozen=True)
    class Parent(DomainEvent):
        event_type: ClassVar[str] = "test_registry.forgot_dataclass.parent"
        order_id: str = ""

    class Child(Parent):
        event_type: ClassVar[str] = "test_registry.forgot_dataclass.child"
        coupon: str = ""

    assert_refused(Child, "Child", "@dataclass(frozen=True)")
    assert get_event_class("test_registry.forgot_dataclass.child") is None
    assert get_event_class("test_registry.forgot_dataclass.parent") is Parent


def test_refuses_a_class_without_its_own_event_type() -> None:
    """A direct DomainEvent subclass with no event_type of its own is refused with the fix."""

    @dataclass(frozen=True)
    class Nameless(DomainEvent):
        order_id: str = ""

    assert_refused(Nameless, "Nameless", "event_type", "ClassVar[str]")
    assert get_event_class("domain_event") is None


def test_refuses_a_subclass_inheriting_its_parents_event_type() -> None:
    """A subclass that reuses its parent's event_type by inheritance is refused with the fix."""

    @register_event
    @dataclass(frozen=True)
    class Parent(DomainEvent):
        event_type: ClassVar[str] = "test_registry.inherited_event_type.parent"

    @dataclass(frozen=True)
    class Child(Parent):
        extra: int = 0

    assert_refused(Child, "Child", "event_type", "ClassVar[str]")
    assert get_event_class("test_registry.inherited_event_type.parent") is Parent


@pytest.mark.parametrize(
    "bad_name",
    ["", " ", "with space", "tab\there", "new\nline", "x" * 201, "-leading-dash", "é.accent", 42],
    ids=repr,
)
def test_refuses_an_invalid_event_type(bad_name: object) -> None:
    """An event_type that is not a valid type name is refused with a message naming it."""

    @dataclass(frozen=True)
    class BadName(DomainEvent):
        event_type: ClassVar[str] = bad_name  # type: ignore[assignment]

    registry = EventRegistry()
    assert_refused(BadName, "event_type", repr(bad_name), registry=registry)
    assert len(registry) == 0


@pytest.mark.parametrize("good_name", ["a", "x" * 200, "orders.order_placed", "v1:ns/Type-2_b"])
def test_accepts_valid_event_type_names(good_name: str) -> None:
    """A name of 1-200 letters, digits, dots, underscores, dashes, colons or slashes registers."""

    @dataclass(frozen=True)
    class GoodName(DomainEvent):
        event_type: ClassVar[str] = good_name

    registry = EventRegistry()
    assert registry.register(GoodName) is GoodName
    assert registry.get(good_name) is GoodName


@pytest.mark.parametrize("bad_version", [0, -1, "2", 1.5])
def test_refuses_an_invalid_event_version(bad_version: object) -> None:
    """An event_version that is not an int >= 1 is refused with a message naming it."""

    @dataclass(frozen=True)
    class BadVersion(DomainEvent):
        event_type: ClassVar[str] = "test_registry.refuses_invalid_event_version"
        event_version: ClassVar[int] = bad_version  # type: ignore[assignment]

    assert_refused(BadVersion, "event_version", registry=EventRegistry())


def test_refuses_an_init_false_field() -> None:
    """A field declared init=False is refused because it could not travel on the wire."""

    @dataclass(frozen=True)
    class Hidden(DomainEvent):
        event_type: ClassVar[str] = "test_registry.refuses_init_false"
        secret: str = field(default="", init=False)

    assert_refused(Hidden, "secret", registry=EventRegistry())


def test_refuses_things_that_are_not_classes() -> None:
    """An instance or a function given to register_event is refused, not registered."""

    @dataclass(frozen=True)
    class Real(DomainEvent):
        event_type: ClassVar[str] = "test_registry.refuses_non_classes"

    registry = EventRegistry()
    for thing in (Real(), lambda: None, "test_registry.refuses_non_classes", None):
        assert_refused(thing, "DomainEvent", registry=registry)
    assert len(registry) == 0


# -- lookups --------------------------------------------------------------------------------


def test_get_event_class_returns_the_class_or_none() -> None:
    """get_event_class gives the registered class, and None for any unregistered name."""

    @register_event
    @dataclass(frozen=True)
    class Found(DomainEvent):
        event_type: ClassVar[str] = "test_registry.get_event_class.found"

    assert get_event_class("test_registry.get_event_class.found") is Found
    assert get_event_class("test_registry.get_event_class.missing") is None
    assert get_event_class("") is None
    assert get_event_class("TEST_REGISTRY.GET_EVENT_CLASS.FOUND") is None


def test_registry_contains_iterates_and_counts_names() -> None:
    """An EventRegistry supports `in`, len() and iteration over its registered names."""
    registry = EventRegistry()

    @dataclass(frozen=True)
    class One(DomainEvent):
        event_type: ClassVar[str] = "test_registry.container.one"

    @dataclass(frozen=True)
    class Two(DomainEvent):
        event_type: ClassVar[str] = "test_registry.container.two"

    registry.register(One)
    registry.register(Two)
    registry.add_alias("test_registry.container.old_one", One)
    assert "test_registry.container.one" in registry
    assert "test_registry.container.old_one" in registry
    assert "test_registry.container.three" not in registry
    assert 42 not in registry
    assert len(registry) == 2
    assert sorted(registry) == ["test_registry.container.one", "test_registry.container.two"]


def test_registries_are_independent() -> None:
    """A class registered in one EventRegistry is unknown to another and to the default one."""
    first, second = EventRegistry(), EventRegistry()
    name = "test_registry.independent"

    @dataclass(frozen=True)
    class InFirst(DomainEvent):
        event_type: ClassVar[str] = name

    @dataclass(frozen=True)
    class InSecond(DomainEvent):
        event_type: ClassVar[str] = name

    assert first.register(InFirst) is InFirst
    assert second.get(name) is None
    assert default_registry.get(name) is None
    assert get_event_class(name) is None
    assert second.register(InSecond) is InSecond, "the same name is free in another registry"
    assert first.get(name) is InFirst
    assert second.get(name) is InSecond


def test_codecs_decode_only_through_their_own_registry() -> None:
    """A codec built on one registry does not find classes registered in another."""
    mine, other = EventRegistry(), EventRegistry()

    @dataclass(frozen=True)
    class OnlyMine(DomainEvent):
        event_type: ClassVar[str] = "test_registry.codec_own_registry"
        n: int = 0

    mine.register(OnlyMine)
    payload = Codec(registry=mine).encode(OnlyMine(n=1))
    decoded = Codec(registry=mine).decode(payload)
    assert type(decoded) is OnlyMine
    assert decoded.n == 1
    with pytest.raises(UnknownEventTypeError):
        Codec(registry=other).decode(payload)


# -- aliases --------------------------------------------------------------------------------


def test_alias_resolves_an_old_name_to_the_new_class(
    to_json: Callable[[dict[str, Any]], bytes],
) -> None:
    """After add_alias, payloads written under the old name decode as the renamed class."""
    registry = EventRegistry()

    @registry.register
    @dataclass(frozen=True)
    class CustomerSignedUp(DomainEvent):
        event_type: ClassVar[str] = "test_registry.alias.customer_signed_up"
        email: str

    registry.add_alias("test_registry.alias.user_registered", CustomerSignedUp)
    assert registry.get("test_registry.alias.user_registered") is CustomerSignedUp
    env = envelope("test_registry.alias.user_registered", 1, {"email": "a@example.com"})
    event = Codec(registry=registry).decode(to_json(env))
    assert type(event) is CustomerSignedUp
    assert event.email == "a@example.com"
    assert event.event_id == env["id"]
    assert event.correlation_id == "legacy-correlation"
    reencoded = json.loads(Codec(registry=registry).encode(event))
    assert reencoded["type"] == "test_registry.alias.customer_signed_up"


def test_alias_in_the_default_registry_serves_from_dict() -> None:
    """An alias in the default registry lets DomainEvent.from_dict read the old name."""

    @register_event
    @dataclass(frozen=True)
    class Renamed(DomainEvent):
        event_type: ClassVar[str] = "test_registry.alias_from_dict.new_name"
        n: int = 0

    default_registry.add_alias("test_registry.alias_from_dict.old_name", Renamed)
    old = {"event_type": "test_registry.alias_from_dict.old_name", "n": 4}
    event = DomainEvent.from_dict(old)
    assert type(event) is Renamed
    assert event.n == 4
    assert type(Renamed.from_dict(old)) is Renamed
    assert get_event_class("test_registry.alias_from_dict.old_name") is Renamed
    assert event.to_dict()["event_type"] == "test_registry.alias_from_dict.new_name"


def test_alias_cannot_take_a_registered_name() -> None:
    """An alias equal to a registered event_type raises DuplicateEventTypeError."""
    registry = EventRegistry()

    @dataclass(frozen=True)
    class Kept(DomainEvent):
        event_type: ClassVar[str] = "test_registry.alias_taken.kept"

    @dataclass(frozen=True)
    class Other(DomainEvent):
        event_type: ClassVar[str] = "test_registry.alias_taken.other"

    registry.register(Kept)
    registry.register(Other)
    with pytest.raises(DuplicateEventTypeError):
        registry.add_alias("test_registry.alias_taken.kept", Other)
    assert registry.get("test_registry.alias_taken.kept") is Kept


def test_alias_cannot_point_two_ways() -> None:
    """An alias already naming one class cannot be re-pointed at another; repeating it is fine."""
    registry = EventRegistry()

    @dataclass(frozen=True)
    class A(DomainEvent):
        event_type: ClassVar[str] = "test_registry.alias_two_ways.a"

    @dataclass(frozen=True)
    class B(DomainEvent):
        event_type: ClassVar[str] = "test_registry.alias_two_ways.b"

    registry.register(A)
    registry.register(B)
    registry.add_alias("test_registry.alias_two_ways.old", A)
    registry.add_alias("test_registry.alias_two_ways.old", A)
    with pytest.raises(DuplicateEventTypeError):
        registry.add_alias("test_registry.alias_two_ways.old", B)
    assert registry.get("test_registry.alias_two_ways.old") is A


def test_registering_a_class_under_an_alias_name_raises() -> None:
    """A new class cannot take a name that is already an alias."""
    registry = EventRegistry()

    @dataclass(frozen=True)
    class Current(DomainEvent):
        event_type: ClassVar[str] = "test_registry.alias_blocks.current"

    @dataclass(frozen=True)
    class Newcomer(DomainEvent):
        event_type: ClassVar[str] = "test_registry.alias_blocks.old"

    registry.register(Current)
    registry.add_alias("test_registry.alias_blocks.old", Current)
    with pytest.raises(DuplicateEventTypeError):
        registry.register(Newcomer)
    assert registry.get("test_registry.alias_blocks.old") is Current


def test_alias_needs_a_registered_class_and_a_valid_name() -> None:
    """Aliasing an unregistered class, or with an invalid name, raises EventDefinitionError."""
    registry = EventRegistry()

    @dataclass(frozen=True)
    class Unregistered(DomainEvent):
        event_type: ClassVar[str] = "test_registry.alias_needs.unregistered"

    with pytest.raises(EventDefinitionError) as info:
        registry.add_alias("test_registry.alias_needs.old", Unregistered)
    assert "register" in str(info.value)
    registry.register(Unregistered)
    with pytest.raises(EventDefinitionError):
        registry.add_alias("not a valid name", Unregistered)
    assert registry.get("test_registry.alias_needs.old") is None


# -- upcasters ------------------------------------------------------------------------------


def make_upcasting_registry(calls: list[str]) -> tuple[EventRegistry, type[DomainEvent]]:
    """A registry holding a version-3 event and upcasters 1->2 and 2->3 that log their calls."""
    registry = EventRegistry()

    @registry.register
    @dataclass(frozen=True)
    class CustomerMoved(DomainEvent):
        event_type: ClassVar[str] = "test_registry.upcast.customer_moved"
        event_version: ClassVar[int] = 3
        full_name: str
        city: str
        country: str

    @registry.upcaster("test_registry.upcast.customer_moved", from_version=1)
    def v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
        calls.append("1->2")
        return {"full_name": f"{data['first']} {data['last']}", "city": data["town"]}

    @registry.upcaster("test_registry.upcast.customer_moved", from_version=2)
    def v2_to_v3(data: dict[str, Any]) -> dict[str, Any]:
        calls.append("2->3")
        return {**data, "country": data.get("country", "unknown")}

    return registry, CustomerMoved


def test_upcasters_upgrade_an_old_payload(to_json: Callable[[dict[str, Any]], bytes]) -> None:
    """A version-1 payload passes through upcasters 1->2 then 2->3 and decodes as version 3."""
    calls: list[str] = []
    registry, customer_moved = make_upcasting_registry(calls)
    env = envelope(
        "test_registry.upcast.customer_moved",
        1,
        {"first": "Ada", "last": "Lovelace", "town": "London"},
    )
    event = Codec(registry=registry).decode(to_json(env))
    assert calls == ["1->2", "2->3"]
    assert type(event) is customer_moved
    assert event.full_name == "Ada Lovelace"  # type: ignore[attr-defined]
    assert event.city == "London"  # type: ignore[attr-defined]
    assert event.country == "unknown"  # type: ignore[attr-defined]
    assert event.event_id == env["id"]
    assert event.correlation_id == "legacy-correlation"
    assert event.causation_id == "legacy-cause"
    assert event.tenant_id == "legacy-tenant"
    assert event.occurred_at == env["time"]


def test_upcasting_starts_at_the_payload_version() -> None:
    """A version-2 payload runs only the 2->3 upcaster; read() reports the original version."""
    calls: list[str] = []
    registry, _ = make_upcasting_registry(calls)
    env = envelope(
        "test_registry.upcast.customer_moved",
        2,
        {"full_name": "Grace Hopper", "city": "Arlington"},
    )
    read = Codec(registry=registry).read(json.dumps(env).encode())
    assert calls == ["2->3"]
    assert read.dataversion == 2
    assert read.source == "/legacy-service"
    assert read.event.country == "unknown"  # type: ignore[attr-defined]


def test_current_payloads_skip_the_upcasters() -> None:
    """A payload at the class's own version decodes without calling any upcaster."""
    calls: list[str] = []
    registry, customer_moved = make_upcasting_registry(calls)
    codec = Codec(registry=registry)
    event = customer_moved(full_name="Alan Turing", city="Wilmslow", country="UK")  # type: ignore[call-arg]
    assert codec.decode(codec.encode(event)) == event
    env = envelope(
        "test_registry.upcast.customer_moved",
        3,
        {"full_name": "Alan Turing", "city": "Wilmslow", "country": "UK"},
    )
    assert codec.read(json.dumps(env).encode()).dataversion == 3
    assert calls == []


def test_upcasting_through_an_alias() -> None:
    """An old payload under an old name is both resolved by alias and upcast."""
    calls: list[str] = []
    registry, customer_moved = make_upcasting_registry(calls)
    registry.add_alias("test_registry.upcast.customer_relocated", customer_moved)
    env = envelope(
        "test_registry.upcast.customer_relocated",
        1,
        {"first": "Ada", "last": "Lovelace", "town": "London"},
    )
    event = Codec(registry=registry).decode(json.dumps(env).encode())
    assert type(event) is customer_moved
    assert calls == ["1->2", "2->3"]


def test_a_payload_newer_than_the_class_is_refused(
    to_json: Callable[[dict[str, Any]], bytes],
) -> None:
    """A payload with a dataversion above the class's version raises EventDecodeError on it."""
    registry, _ = make_upcasting_registry([])
    env = envelope(
        "test_registry.upcast.customer_moved",
        4,
        {"full_name": "Future", "city": "Nowhere", "country": "XX"},
    )
    with pytest.raises(EventDecodeError) as info:
        Codec(registry=registry).decode(to_json(env))
    assert info.value.field == "dataversion"
    assert "4" in str(info.value)
    assert "3" in str(info.value)


def test_a_missing_upcaster_is_refused(to_json: Callable[[dict[str, Any]], bytes]) -> None:
    """An old payload with no upcaster for one of its steps raises EventDecodeError on it."""
    registry = EventRegistry()

    @registry.register
    @dataclass(frozen=True)
    class Gappy(DomainEvent):
        event_type: ClassVar[str] = "test_registry.missing_upcaster.gappy"
        event_version: ClassVar[int] = 3
        value: int = 0

    @registry.upcaster("test_registry.missing_upcaster.gappy", from_version=2)
    def v2_to_v3(data: dict[str, Any]) -> dict[str, Any]:
        return data

    env = envelope("test_registry.missing_upcaster.gappy", 1, {"value": 1})
    with pytest.raises(EventDecodeError) as info:
        Codec(registry=registry).decode(to_json(env))
    assert info.value.field == "dataversion"
    assert "upcaster" in str(info.value)
    assert "from_version=1" in str(info.value)


def test_upcaster_output_is_validated() -> None:
    """An upcaster producing a wrongly typed field raises EventDecodeError naming that field."""
    registry = EventRegistry()

    @registry.register
    @dataclass(frozen=True)
    class Counted(DomainEvent):
        event_type: ClassVar[str] = "test_registry.upcaster_validated.counted"
        event_version: ClassVar[int] = 2
        count: int

    @registry.upcaster("test_registry.upcaster_validated.counted", from_version=1)
    def v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
        return {"count": str(data["n"])}

    env = envelope("test_registry.upcaster_validated.counted", 1, {"n": 3})
    with pytest.raises(EventDecodeError) as info:
        Codec(registry=registry).decode(json.dumps(env).encode())
    assert info.value.field == "count"


def test_a_second_upcaster_for_one_step_is_refused() -> None:
    """Registering a different upcaster for a step that has one raises DuplicateEventTypeError."""
    registry = EventRegistry()

    def first(data: dict[str, Any]) -> dict[str, Any]:
        return data

    def second(data: dict[str, Any]) -> dict[str, Any]:
        return data

    decorate = registry.upcaster("test_registry.second_upcaster", from_version=1)
    assert decorate(first) is first
    assert registry.upcaster("test_registry.second_upcaster", from_version=1)(first) is first
    with pytest.raises(DuplicateEventTypeError):
        registry.upcaster("test_registry.second_upcaster", from_version=1)(second)


def test_registry_of_dataclass_events_keeps_fields_intact() -> None:
    """Registration does not alter the class: its dataclass fields stay what was declared."""

    @dataclass(frozen=True)
    class Untouched(DomainEvent):
        event_type: ClassVar[str] = "test_registry.keeps_fields_intact"
        a: int = 1
        b: str = "b"

    before = [(f.name, f.type, f.default) for f in dataclasses.fields(Untouched)]
    EventRegistry().register(Untouched)
    assert [(f.name, f.type, f.default) for f in dataclasses.fields(Untouched)] == before
