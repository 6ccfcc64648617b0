"""The wire structures: the envelope layouts, and what the codec knows of each event class.

Private to the codec; see :mod:`tidings.codec` for the format itself.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import MISSING
from typing import Any, Final, Literal, NotRequired, TypedDict

import msgspec

from tidings._ids import utc_now_iso
from tidings.errors import EventDecodeError, EventDefinitionError, EventEncodeError
from tidings.events import DomainEvent, _correlation_id

CONTENT_TYPE: Final = "application/json"
SPEC_VERSION: Final = "1.0"
BASE_FIELDS: Final = ("event_id", "correlation_id", "occurred_at", "tenant_id", "causation_id")
"""Fields of :class:`DomainEvent` itself; on the wire they are envelope attributes."""


class Outgoing(msgspec.Struct, omit_defaults=True, gc=False):
    type: str
    specversion: str
    id: str
    source: str
    time: str
    datacontenttype: str
    dataversion: str
    data: dict[str, Any]
    correlationid: str | None = None
    causationid: str | None = None
    tenantid: str | None = None
    traceparent: str | None = None


class Incoming(msgspec.Struct):
    type: str
    specversion: str
    id: str
    source: str = ""
    time: str | None = None
    datacontenttype: str = CONTENT_TYPE
    dataversion: str = "1"
    correlationid: str | None = None
    causationid: str | None = None
    tenantid: str | None = None
    traceparent: str | None = None
    data: msgspec.Raw = msgspec.Raw(b"{}")


INCOMING_FIELDS: Final = [
    (f.name, f.type, f.default if f.default is not msgspec.NODEFAULT else msgspec.NODEFAULT)
    for f in msgspec.structs.fields(Incoming)
    if f.name != "data"
]


class ClassPlan:
    """What the codec needs to know about one event class, built once on first use."""

    __slots__ = (
        "cls",
        "data_type",
        "defaults",
        "envelope_type",
        "event_type",
        "field_count",
        "float_fields",
        "own",
        "post_init",
        "slotted",
        "version",
    )

    def __init__(self, cls: type[DomainEvent]) -> None:
        self.cls = cls
        self.event_type = cls.event_type
        self.version = str(cls.event_version)
        try:
            hints = typing.get_type_hints(cls)
        except NameError as exc:
            msg = (
                f"cannot resolve the annotations of {cls.__qualname__} ({exc}): define the "
                "types its fields use at module level, before the event is first encoded"
            )
            raise EventDefinitionError(msg) from exc
        own = [f for f in dataclasses.fields(cls) if f.name not in BASE_FIELDS]
        self.own = tuple(f.name for f in own)
        self.field_count = len(own)
        # (name, default, factory) of the fields that may be absent from a payload.
        self.defaults = tuple(
            (f.name, f.default, None if f.default_factory is MISSING else f.default_factory)
            for f in own
            if f.default is not MISSING or f.default_factory is not MISSING
        )
        optional = {name for name, _, _ in self.defaults}
        # A TypedDict decodes straight into the dict that becomes the instance's __dict__.
        data_name = f"{cls.__name__}Data"
        self.data_type: Any = TypedDict(  # type: ignore[misc]
            data_name,
            {
                f.name: NotRequired[hints[f.name]] if f.name in optional else hints[f.name]
                for f in own
            },
        )
        # This class's envelope, for the codec's tagged union: "type" is the tag, and the other
        # constant attributes are Literal types, so the parser itself checks them and a payload
        # that differs in any (an old version, say) fails over to the long way.
        constants: dict[str, Any] = {
            "specversion": Literal["1.0"],
            "datacontenttype": Literal["application/json"],
            "dataversion": Literal[self.version],
        }
        self.envelope_type = msgspec.defstruct(
            f"{cls.__name__}Envelope",
            [(n, constants.get(n, t), d) for n, t, d in INCOMING_FIELDS if n != "type"]
            + [("data", self.data_type, {})],
            tag_field="type",
            tag=cls.event_type,
            gc=False,  # holds strings and the data dict only: no cycle can pass through it
            namespace={"plan": self},
        )
        try:
            msgspec.json.Decoder(self.envelope_type)  # fails now for a type with no JSON form
        except TypeError as exc:
            msg = f"{cls.__qualname__} has a field type with no JSON form: {exc}"
            raise EventDefinitionError(msg) from exc
        # Fields whose declared type can hold a float: only those are checked for NaN and
        # infinity on encode (JSON has no such numbers, and msgspec would write null).
        self.float_fields = tuple(f.name for f in own if _may_hold_float(hints[f.name]))
        self.post_init = getattr(cls, "__post_init__", None)
        # Instances without __slots__ anywhere keep all fields in one __dict__, set in one step.
        self.slotted = any("__slots__" in c.__dict__ for c in cls.__mro__[:-1])

    def refuse_non_finite(self, event: DomainEvent) -> None:
        """Raise :class:`EventEncodeError` if a float in the event is NaN or infinite."""
        for name in self.float_fields:
            path = _non_finite(getattr(event, name), name)
            if path is not None:
                msg = (
                    f"cannot encode {self.event_type!r}: field {path!r} is NaN or infinite, "
                    "which JSON cannot carry; use None or a Decimal for such values"
                )
                raise EventEncodeError(msg)

    def build(self, incoming: Any, data: dict[str, Any]) -> DomainEvent:
        """Make the event from envelope attributes and parsed data, without running factories."""
        attrs = data
        if len(attrs) != self.field_count:
            for name, default, factory in self.defaults:
                if name not in attrs:
                    attrs[name] = default if factory is None else factory()
        attrs["event_id"] = incoming.id
        # Foreign producers may omit the optional time and correlation id; fill them as the
        # constructor would (the current context's correlation id, or a fresh one).
        correlation_id, time = incoming.correlationid, incoming.time
        attrs["correlation_id"] = _correlation_id() if correlation_id is None else correlation_id
        attrs["occurred_at"] = utc_now_iso() if time is None else time
        attrs["tenant_id"] = incoming.tenantid
        attrs["causation_id"] = incoming.causationid
        obj = object.__new__(self.cls)
        if self.slotted:
            for name, value in attrs.items():
                object.__setattr__(obj, name, value)
        else:
            object.__setattr__(obj, "__dict__", attrs)
        if self.post_init is not None:
            try:
                self.post_init(obj)
            except (ValueError, TypeError) as exc:
                msg = f"{self.cls.event_type!r} rejected its own data: {exc}"
                raise EventDecodeError(msg) from exc
        return obj


def _may_hold_float(annotation: Any) -> bool:
    try:
        info = msgspec.inspect.type_info(annotation)
    except (TypeError, ValueError):  # pragma: no cover - the plan's decoder reports these
        return True
    return _type_may_hold_float(info, set())


def _type_may_hold_float(info: Any, seen: set[int]) -> bool:
    if isinstance(info, msgspec.inspect.FloatType | msgspec.inspect.AnyType):
        return True
    if id(info) in seen:
        return False
    seen.add(id(info))
    for value in msgspec.structs.astuple(info):
        items = value if isinstance(value, tuple) else (value,)
        for item in items:
            inner = item.type if isinstance(item, msgspec.inspect.Field) else item
            if isinstance(inner, msgspec.inspect.Type) and _type_may_hold_float(inner, seen):
                return True
    return False


def _non_finite(value: Any, path: str) -> str | None:
    """Return the path of the first NaN or infinite float inside ``value``, else ``None``."""
    if isinstance(value, float):
        return None if math.isfinite(value) else path
    if isinstance(value, dict):
        items: Any = ((f"{path}.{key}", item) for key, item in value.items())
    elif isinstance(value, list | tuple | set | frozenset):
        items = ((f"{path}[{index}]", item) for index, item in enumerate(value))
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = ((f"{path}.{f.name}", getattr(value, f.name)) for f in dataclasses.fields(value))
    else:
        return None
    for inner_path, item in items:
        found = _non_finite(item, inner_path)
        if found is not None:
            return found
    return None
