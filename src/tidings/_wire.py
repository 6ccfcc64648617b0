"""The wire structures: the envelope layouts, and what the codec knows of each event class.

Private to the codec; see :mod:`tidings.codec` for the format itself.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING
from decimal import Decimal
from typing import Annotated, Any, Final, Literal, NotRequired, TypedDict

import msgspec

from tidings._ids import utc_now_iso
from tidings._untrusted import log_safe
from tidings.errors import EventDecodeError, EventDefinitionError, EventEncodeError
from tidings.events import DomainEvent, _correlation_id

CONTENT_TYPE: Final = "application/json"
SPEC_VERSION: Final = "1.0"
BASE_FIELDS: Final = ("event_id", "correlation_id", "occurred_at", "tenant_id", "causation_id")
"""Fields of :class:`DomainEvent` itself; on the wire they are envelope attributes."""

MAX_DECIMAL_EXPONENT: Final = 6144
"""The largest adjusted exponent (either sign) a Decimal field takes by default: decimal128's.

``Decimal("1e999999999")`` is legal JSON and a few bytes long, but formatting it in fixed
point builds a gigabyte string; NaN and infinities compare and sum in surprising ways. Both are
refused unless a field opts in with :func:`decimal_bounds`.
"""

_DECIMAL_BOUNDS_KEY: Final = "tidings.decimal_bounds"

# Envelope attributes are checked for length by the parser itself (in C), and for their
# characters after it (printable ASCII only): they reach log lines and broker headers.
ID_LIMIT: Final = 256
"""The longest id, correlation id, causation id or tenant id an envelope may carry."""
TIME_LIMIT: Final = 64
"""The longest ``time`` an envelope may carry."""
_LIMITS: Final = {
    "id": ID_LIMIT,
    "correlationid": ID_LIMIT,
    "causationid": ID_LIMIT,
    "tenantid": ID_LIMIT,
    "time": TIME_LIMIT,
    "source": 1024,
    "traceparent": 512,
}
# Present means not empty: an empty id, time or version is a producer's bug, not "absent".
_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=ID_LIMIT)]
_Short = Annotated[str, msgspec.Meta(min_length=1, max_length=TIME_LIMIT)]


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
    type: Annotated[str, msgspec.Meta(max_length=200)]
    specversion: _Short
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=ID_LIMIT)]
    source: Annotated[str, msgspec.Meta(max_length=_LIMITS["source"])] = ""
    time: _Short | None = None
    datacontenttype: Annotated[str, msgspec.Meta(max_length=256)] = CONTENT_TYPE
    dataversion: _Short = "1"
    correlationid: _Id | None = None
    causationid: _Id | None = None
    tenantid: _Id | None = None
    traceparent: Annotated[str, msgspec.Meta(max_length=_LIMITS["traceparent"])] | None = None
    data: msgspec.Raw = msgspec.Raw(b"{}")


def is_plain(payload: bytes) -> bool:
    """Whether every string in this JSON holds printable ASCII only, by three scans in C.

    ASCII with no backslash (so no escape) and no DEL: the parser refuses raw control
    characters, so nothing else can reach a string.
    """
    return payload.isascii() and 92 not in payload and 127 not in payload


def decimal_bounds(
    *, allow_non_finite: bool = False, max_exponent: int = MAX_DECIMAL_EXPONENT
) -> Mapping[str, Any]:
    """Field metadata loosening the codec's Decimal checks for one field of an event.

    By default a ``Decimal`` anywhere in an event (a field, or inside a list, dict or nested
    dataclass) must be finite with an adjusted exponent within ±:data:`MAX_DECIMAL_EXPONENT`,
    on encode and on decode. A field that needs more says so::

        rate: Decimal = field(default=Decimal(0), metadata=decimal_bounds(allow_non_finite=True))

    Args:
        allow_non_finite: accept NaN, sNaN and the infinities in this field.
        max_exponent: the largest adjusted exponent (either sign) accepted in this field.

    Returns:
        A mapping to pass as (or merge into) ``dataclasses.field(metadata=...)``.
    """
    if max_exponent < 0:
        msg = "decimal_bounds(max_exponent=...) must be >= 0"
        raise ValueError(msg)
    return {_DECIMAL_BOUNDS_KEY: (allow_non_finite, max_exponent)}


def check_attributes(incoming: Any) -> None:
    """Refuse envelope attributes holding anything but printable ASCII (lengths: the parser).

    The codec calls this only for payloads that are not plain (see :func:`is_plain`).

    Raises:
        EventDecodeError: naming the attribute.
    """
    for name in _LIMITS:
        value = getattr(incoming, name)
        if value is not None and not (value.isascii() and value.isprintable()):
            msg = (
                f"envelope attribute {name!r} holds characters other than printable ASCII "
                f"({log_safe(value, 64)}); ids, source and time are plain text"
            )
            raise EventDecodeError(msg, field=name)


def refuse_unreadable(envelope: dict[str, Any]) -> None:
    """Refuse to send an envelope whose attributes decoding would refuse (see ``_LIMITS``).

    Raises:
        EventEncodeError: naming the attribute, its length or its characters.
    """
    for name, limit in _LIMITS.items():
        value = envelope.get(name)
        if value is None:
            continue
        if not (len(value) <= limit and value.isascii() and value.isprintable()) or (
            name != "source" and not value
        ):
            msg = (
                f"cannot encode {envelope['type']!r}: envelope attribute {name!r} must be "
                f"printable ASCII of 1 to {limit} characters, not {log_safe(value, 64)!r} "
                f"({len(value)} characters); validate ids and tenants where they come in"
            )
            raise EventEncodeError(msg)


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
        "decimal_fields",
        "defaults",
        "envelope_type",
        "event_type",
        "field_count",
        "float_fields",
        "own",
        "post_init",
        "slotted",
        "value_checks",
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
        self.float_fields: tuple[str, ...] = tuple(
            f.name for f in own if _may_hold(hints[f.name], _FLOATS)
        )
        # Fields that can hold a Decimal, with their bounds: checked on encode and on decode.
        # (name, whether it is a plain Decimal field, allow non-finite, largest exponent)
        self.decimal_fields = tuple(
            (
                f.name,
                _is_plain_decimal(hints[f.name]),
                *f.metadata.get(_DECIMAL_BOUNDS_KEY, (False, MAX_DECIMAL_EXPONENT)),
            )
            for f in own
            if _may_hold(hints[f.name], _DECIMALS)
        )
        self.value_checks = bool(self.float_fields or self.decimal_fields)
        self.post_init = getattr(cls, "__post_init__", None)
        # Instances without __slots__ anywhere keep all fields in one __dict__, set in one step.
        self.slotted = any("__slots__" in c.__dict__ for c in cls.__mro__[:-1])

    def refuse_non_finite(self, event: DomainEvent) -> None:
        """Raise :class:`EventEncodeError` for a NaN or infinite float, or an unbounded Decimal."""
        for name in self.float_fields:
            try:
                path = _first(getattr(event, name), name, _non_finite_float)
            except RecursionError as exc:
                msg = f"cannot encode {self.event_type!r}: field {name!r} nests too deeply"
                raise EventEncodeError(msg) from exc
            if path is not None:
                msg = (
                    f"cannot encode {self.event_type!r}: field {path!r} is NaN or infinite, "
                    "which JSON cannot carry; use None for such values"
                )
                raise EventEncodeError(msg)
        if self.decimal_fields:
            self.refuse_unbounded_decimals(event.__getattribute__, decoding=False)

    def refuse_unbounded_decimals(self, value_of: Callable[[str], Any], *, decoding: bool) -> None:
        """Raise for a Decimal out of its field's bounds (fields read through ``value_of``).

        Raises:
            EventDecodeError: when ``decoding``, naming the field.
            EventEncodeError: otherwise.
        """
        for name, plain, allow_non_finite, max_exponent in self.decimal_fields:
            value = value_of(name)
            if plain:  # the common case, checked without a walk
                if type(value) is not Decimal or _decimal_ok(value, allow_non_finite, max_exponent):
                    continue
                path: str | None = name
            else:
                path = _first(
                    value, name, functools.partial(_decimal_bad, allow_non_finite, max_exponent)
                )
                if path is None:
                    continue
            msg = (
                f"cannot {'decode' if decoding else 'encode'} {self.event_type!r}: field "
                f"{path!r} holds a Decimal that is NaN, infinite or beyond ±{max_exponent} in "
                "exponent; allow it with field(metadata=decimal_bounds(...)) if such values "
                "are legitimate"
            )
            if decoding:
                raise EventDecodeError(msg, field=path)
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
        if self.decimal_fields:
            self.refuse_unbounded_decimals(attrs.__getitem__, decoding=True)
        if self.post_init is not None:
            try:
                self.post_init(obj)
            except Exception as exc:  # whatever the user's own check raises is a refusal
                msg = (
                    f"{self.cls.event_type!r} rejected its own data: "
                    f"{type(exc).__name__}: {log_safe(str(exc))}"
                )
                raise EventDecodeError(msg) from exc
        return obj


_FLOATS: Final = (msgspec.inspect.FloatType, msgspec.inspect.AnyType)
# Not Any: a value decoded as Any is never a Decimal, and a Decimal sent into an Any field
# arrives as a string.
_DECIMALS: Final = (msgspec.inspect.DecimalType,)


def _may_hold(annotation: Any, kinds: tuple[type, ...]) -> bool:
    """Whether a value of this annotation can hold, somewhere inside, one of ``kinds``."""
    try:
        info = msgspec.inspect.type_info(annotation)
    except (TypeError, ValueError):  # pragma: no cover - the plan's decoder reports these
        return True
    return _type_may_hold(info, kinds, set())


def _type_may_hold(info: Any, kinds: tuple[type, ...], seen: set[int]) -> bool:
    if isinstance(info, kinds):
        return True
    if id(info) in seen:
        return False
    seen.add(id(info))
    for value in msgspec.structs.astuple(info):
        items = value if isinstance(value, tuple) else (value,)
        for item in items:
            inner = item.type if isinstance(item, msgspec.inspect.Field) else item
            if isinstance(inner, msgspec.inspect.Type) and _type_may_hold(inner, kinds, seen):
                return True
    return False


def _is_plain_decimal(annotation: Any) -> bool:
    """Whether the annotation is ``Decimal`` or ``Decimal | None``: no walk needed."""
    return annotation is Decimal or (
        typing.get_origin(annotation) in (typing.Union, types.UnionType)
        and set(typing.get_args(annotation)) <= {Decimal, type(None)}
    )


def _decimal_ok(value: Decimal, allow_non_finite: bool, max_exponent: int) -> bool:
    if value.is_finite():
        return -max_exponent <= value.adjusted() <= max_exponent
    return allow_non_finite


def _decimal_bad(allow_non_finite: bool, max_exponent: int, value: object) -> bool:
    return isinstance(value, Decimal) and not _decimal_ok(value, allow_non_finite, max_exponent)


def _non_finite_float(value: object) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _first(value: Any, path: str, bad: Callable[[object], bool]) -> str | None:
    """Return the path of the first value inside ``value`` that ``bad`` flags, else ``None``."""
    if bad(value):
        return path
    if isinstance(value, dict):
        items: Any = ((f"{path}.{key}", item) for key, item in value.items())
    elif isinstance(value, list | tuple | set | frozenset):
        items = ((f"{path}[{index}]", item) for index, item in enumerate(value))
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = ((f"{path}.{f.name}", getattr(value, f.name)) for f in dataclasses.fields(value))
    else:
        return None
    for inner_path, item in items:
        found = _first(item, inner_path, bad)
        if found is not None:
            return found
    return None
