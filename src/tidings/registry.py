"""The event registry: event type names to classes, with aliases and upcasters.

Aliases keep renamed types readable; upcasters bring old schema versions up to date. Decoding
finds classes here and nowhere else: message data never drives an import or attribute lookup.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Final, TypeVar

from tidings.errors import (
    DuplicateEventTypeError,
    EventDecodeError,
    EventDefinitionError,
    EventTypeMismatchError,
    UnknownEventTypeError,
)
from tidings.events import DomainEvent

__all__ = ["EventRegistry", "Upcaster", "default_registry", "get_event_class", "register_event"]

E = TypeVar("E", bound=type[DomainEvent])
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
"""Turns the ``data`` of version N of an event into the ``data`` of version N + 1."""

_TYPE_NAME: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,199}")


def _same_definition(a: Any, b: Any) -> bool:
    # A reloaded module makes a new class object for the same definition.
    return a is b or (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def _check_definition(cls: Any) -> None:
    if not (isinstance(cls, type) and issubclass(cls, DomainEvent)):
        msg = (
            f"{cls!r} is not a DomainEvent subclass: declare it as "
            "`@register_event @dataclass(frozen=True) class MyEvent(DomainEvent): ...`"
        )
        raise EventDefinitionError(msg)
    name = cls.__qualname__
    if "__dataclass_fields__" not in cls.__dict__:
        msg = (
            f"{name} is not a dataclass of its own, so its annotated attributes would silently "
            "not be fields: put @dataclass(frozen=True) directly above the class, under "
            "@register_event"
        )
        raise EventDefinitionError(msg)
    if not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        msg = f"{name} must be immutable: declare it with @dataclass(frozen=True)"
        raise EventDefinitionError(msg)
    event_type = cls.__dict__.get("event_type")
    if event_type is None:
        msg = (
            f"{name} has no event_type of its own (it would share its parent's name on the "
            f'wire): add `event_type: ClassVar[str] = "context.{name.lower()}"` to the class'
        )
        raise EventDefinitionError(msg)
    if not (isinstance(event_type, str) and _TYPE_NAME.fullmatch(event_type)):
        msg = (
            f"{name}.event_type = {event_type!r} is not a valid name: use 1-200 characters of "
            "letters, digits and . _ - : /, such as 'orders.order_placed'"
        )
        raise EventDefinitionError(msg)
    version = cls.event_version
    if not (isinstance(version, int) and version >= 1):
        msg = f"{name}.event_version = {version!r} must be an int >= 1"
        raise EventDefinitionError(msg)
    for f in dataclasses.fields(cls):
        if not f.init:
            msg = f"{name}.{f.name} is declared init=False: every event field must be on the wire"
            raise EventDefinitionError(msg)


class EventRegistry:
    """Maps event type names (and aliases) to event classes, and holds upcasters.

    Thread-safe: registration takes a lock; lookups read a dict. Registering the same class
    again (a module reload makes a new class object with the same module and qualified name)
    replaces the entry harmlessly; registering a different class under a taken name raises.
    """

    def __init__(self) -> None:
        self._classes: dict[str, type[DomainEvent]] = {}
        self._aliases: dict[str, str] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}
        self._lock = threading.Lock()
        self._listeners: list[weakref.WeakMethod[Callable[[], object]]] = []

    def on_change(self, method: Callable[[], object]) -> None:
        """Call the bound ``method`` after every (re-)registration or alias, for cache upkeep.

        The registry holds it weakly: a listener that is garbage collected is dropped.
        """
        self._listeners.append(weakref.WeakMethod(method))

    def _changed(self) -> None:
        alive = []
        for ref in self._listeners:
            method = ref()
            if method is not None:
                method()
                alive.append(ref)
        self._listeners = alive

    def register(self, cls: E, /) -> E:
        """Register ``cls`` under its ``event_type`` and return it (usable as a decorator).

        Raises:
            EventDefinitionError: ``cls`` is not a frozen dataclass subclass of ``DomainEvent``
                of its own, or lacks its own valid ``event_type``.
            DuplicateEventTypeError: a different class or an alias holds the name.
        """
        _check_definition(cls)
        event_type = cls.event_type
        with self._lock:
            taken = self._classes.get(event_type)
            if taken is not None and not _same_definition(taken, cls):
                msg = (
                    f"event_type {event_type!r} is already registered to "
                    f"{taken.__module__}.{taken.__qualname__}; give "
                    f"{cls.__module__}.{cls.__qualname__} a different event_type"
                )
                raise DuplicateEventTypeError(msg)
            if event_type in self._aliases:
                msg = (
                    f"event_type {event_type!r} is an alias of {self._aliases[event_type]!r}; "
                    "choose another name for the new class"
                )
                raise DuplicateEventTypeError(msg)
            self._classes[event_type] = cls
            self._changed()
        return cls

    def add_alias(self, alias: str, cls: type[DomainEvent]) -> None:
        """Decode payloads named ``alias`` (an old name of a renamed type) as ``cls``.

        ``cls`` must be registered. Raises :class:`DuplicateEventTypeError` when ``alias`` is a
        registered type or an alias of another type.
        """
        if not _TYPE_NAME.fullmatch(alias):
            msg = f"alias {alias!r} is not a valid event type name"
            raise EventDefinitionError(msg)
        with self._lock:
            if self._classes.get(cls.event_type) is not cls:
                msg = f"register {cls.__qualname__} with @register_event before aliasing it"
                raise EventDefinitionError(msg)
            current = self._aliases.get(alias)
            if alias in self._classes or (current is not None and current != cls.event_type):
                msg = f"{alias!r} already names another event type; aliases must be unique"
                raise DuplicateEventTypeError(msg)
            self._aliases[alias] = cls.event_type
            self._changed()

    def upcaster(self, event_type: str, *, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Register a function turning ``data`` of ``from_version`` into ``from_version + 1``.

        Decoding a payload of version N for a class at version M > N applies the upcasters
        N, N+1, ..., M-1 in turn to the payload's ``data`` dict before validating it.
        """

        def decorator(func: Upcaster) -> Upcaster:
            with self._lock:
                key = (event_type, from_version)
                existing = self._upcasters.get(key)
                if existing is not None and not _same_definition(existing, func):
                    msg = (
                        f"an upcaster for {event_type!r} from version {from_version} is already "
                        f"registered ({existing.__module__}.{existing.__qualname__}); keep one "
                        "function per step, or bump from_version for the next step"
                    )
                    raise DuplicateEventTypeError(msg)
                self._upcasters[key] = func
            return func

        return decorator

    def upcast(self, cls: type[DomainEvent], version: int, data: dict[str, Any]) -> dict[str, Any]:
        """Bring ``data`` written at ``version`` up to ``cls.event_version``.

        Raises:
            EventDecodeError: the payload is newer than this code, or an upcaster is missing.
        """
        target = cls.event_version
        if version > target:
            msg = (
                f"{cls.event_type!r} payload is version {version} but this process knows "
                f"version {target}: deploy the newer event class here, then replay the message"
            )
            raise EventDecodeError(msg, field="dataversion")
        for step in range(version, target):
            upcaster = self._upcasters.get((cls.event_type, step))
            if upcaster is None:
                msg = (
                    f"no upcaster for {cls.event_type!r} from version {step} to {step + 1}: "
                    f"register one with @registry.upcaster({cls.event_type!r}, from_version={step})"
                )
                raise EventDecodeError(msg, field="dataversion")
            data = upcaster(data)
        return data

    def get(self, event_type: str) -> type[DomainEvent] | None:
        """Return the class registered under ``event_type`` or one of its aliases, else ``None``."""
        cls = self._classes.get(event_type)
        if cls is None:
            current = self._aliases.get(event_type)
            if current is not None:
                cls = self._classes.get(current)
        return cls

    def resolve(
        self, event_type: str, expected: type[DomainEvent] = DomainEvent
    ) -> type[DomainEvent]:
        """Return the class for ``event_type``, which must be ``expected`` or a subclass.

        Raises:
            UnknownEventTypeError: nothing is registered under that name.
            EventTypeMismatchError: the class is not ``expected`` or a subclass of it.
        """
        cls = self.get(event_type)
        if cls is None:
            raise UnknownEventTypeError(event_type)
        if not issubclass(cls, expected):
            msg = (
                f"event type {event_type!r} is {cls.__qualname__}, not a "
                f"{expected.__qualname__}: decode it with the right class or with DomainEvent"
            )
            raise EventTypeMismatchError(msg, field="event_type")
        return cls

    def __contains__(self, event_type: object) -> bool:
        return isinstance(event_type, str) and self.get(event_type) is not None

    def __iter__(self) -> Iterator[str]:
        """Iterate over the registered event type names (aliases not included)."""
        return iter(list(self._classes))

    def __len__(self) -> int:
        return len(self._classes)


default_registry: Final = EventRegistry()
"""The registry behind :func:`register_event`, :func:`get_event_class` and ``from_dict``."""


def register_event(event_cls: E) -> E:
    """Class decorator: register ``event_cls`` in the default registry and return it unchanged.

    Raises:
        EventDefinitionError: the class is not a frozen dataclass with its own ``event_type``.
        DuplicateEventTypeError: another class already holds its ``event_type``.
    """
    return default_registry.register(event_cls)


def get_event_class(event_type: str) -> type[DomainEvent] | None:
    """Return the class registered under ``event_type`` in the default registry, or ``None``."""
    return default_registry.get(event_type)
