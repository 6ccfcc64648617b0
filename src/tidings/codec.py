"""Events on the wire: event ⇄ dict, and event ⇄ CloudEvents 1.0 JSON envelope.

The envelope is one JSON object in CloudEvents structured mode::

    {"type": "orders.order_placed", "specversion": "1.0", "id": "<event_id>",
     "source": "/tidings", "time": "<occurred_at>", "datacontenttype": "application/json",
     "dataversion": "1", "correlationid": "...", "causationid": "...", "tenantid": "...",
     "traceparent": "...", "data": {<the event's own fields>}}

Context attributes that are ``None`` are left out. ``data`` holds the fields the event class
declares itself; the five base fields travel as the envelope's attributes.

Decoding checks the size and the nesting depth before parsing, finds the class through the
registry only, upcasts old schema versions, then validates every field against its annotation.
Every failure is an :class:`~tidings.errors.EventDecodeError`. Envelopes of registered classes take
a fast path: one parse, through a union of every class's envelope shape tagged by ``type``, so
the parser picks the class from the first key and builds its fields directly; anything else
(aliases, old versions, bad input) takes the general path, which reports precisely.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar, Union

import msgspec

from tidings import _tracing
from tidings._untrusted import log_safe
from tidings._wire import (
    BASE_FIELDS,
    CONTENT_TYPE,
    ID_LIMIT,
    MAX_DECIMAL_EXPONENT,
    SPEC_VERSION,
    TIME_LIMIT,
    ClassPlan,
    Incoming,
    Outgoing,
    check_attributes,
    decimal_bounds,
    is_plain,
    refuse_unreadable,
)
from tidings.errors import (
    EventDecodeError,
    EventDefinitionError,
    EventEncodeError,
    PayloadTooDeepError,
    PayloadTooLargeError,
)
from tidings.events import DomainEvent
from tidings.registry import EventRegistry, default_registry

__all__ = [
    "BASE_FIELDS",
    "CONTENT_TYPE",
    "MAX_DECIMAL_EXPONENT",
    "Codec",
    "Envelope",
    "Limits",
    "decimal_bounds",
    "decode",
    "encode",
    "event_from_dict",
    "event_to_dict",
    "read",
]

T = TypeVar("T", bound=DomainEvent)
Payload = bytes | bytearray | memoryview | str


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds a payload must respect before it is parsed.

    Attributes:
        max_bytes: longest payload accepted, in bytes (UTF-8 for ``str`` input).
        max_depth: deepest nesting of JSON arrays and objects, the envelope itself counting 1.
    """

    max_bytes: int = 1024 * 1024
    max_depth: int = 32

    def __post_init__(self) -> None:
        if self.max_bytes < 64 or self.max_depth < 2:
            msg = "Limits need max_bytes >= 64 and max_depth >= 2 to hold any envelope"
            raise ValueError(msg)


@dataclass(frozen=True, slots=True)
class Envelope:
    """A decoded message: the event and the envelope attributes that are not event fields.

    Attributes:
        event: the decoded, validated event.
        source: the CloudEvents ``source`` of the producer.
        traceparent: the W3C trace context of the producer, if it sent one.
        dataversion: the schema version the payload was written at (before upcasting).
    """

    event: DomainEvent
    source: str
    traceparent: str | None
    dataversion: int


_AT: Final = " - at `$"
_MISSING: Final = "Object missing required field `"
_encoder: Final = msgspec.json.Encoder()
_encode: Final = _encoder.encode
_json_decoder: Final = msgspec.json.Decoder()
_incoming_decoder: Final = msgspec.json.Decoder(Incoming)
_dict_decoder: Final = msgspec.json.Decoder(dict[str, Any])


def _validation_error(
    event_type: str, exc: msgspec.ValidationError, prefix: str
) -> EventDecodeError:
    # msgspec writes "<what is wrong> - at `$<path>`"; <what is wrong> may quote the input
    # (an enum value, say), so it is split with plain string operations (no pattern that the
    # input could make backtrack) and made safe for a log line before it goes anywhere.
    text = str(exc)
    field: str | None = None
    at = text.rfind(_AT)
    if at >= 0 and text.endswith("`"):
        path = text[at + len(_AT) : -1]
        if path.startswith(prefix):
            path = path[len(prefix) :]
        field = path.lstrip(".") or None
        text = text[:at]
    if text.startswith(_MISSING) and text.endswith("`"):
        missing = text[len(_MISSING) : -1]
        field = f"{field}.{missing}" if field else missing
    where = f"field {log_safe(field, 200)!r}: " if field else ""
    msg = (
        f"cannot decode {event_type!r}: {where}{log_safe(text, 300)}; fix the producer or add "
        "an upcaster"
    )
    return EventDecodeError(msg, field=field)


def nests_within(payload: bytes, max_depth: int = 32) -> bool:
    """Whether JSON ``payload`` nests arrays and objects at most ``max_depth`` deep.

    Linear in the payload (``max_depth`` passes at most). For code that peeks into a body the
    codec did not decode (a hook reading a dead letter's ids): a parser meeting deeper nesting
    may recurse until Python's recursion limit.
    """
    return not _too_deep(payload, max_depth)


def _too_deep(payload: bytes, max_depth: int) -> bool:
    # Brackets inside strings are not nesting; arrays and objects nest alike, so { } count as [ ].
    brackets = _STRINGS.sub(b"", payload).translate(_UNIFY_BRACKETS, _NOT_BRACKETS)
    # Each pass removes exactly one level, the innermost (empty) pairs. (Chaining
    # .replace(b"{}", b"") in the same pass removed two levels of alternating nesting.)
    for level in range(max_depth):
        stripped = brackets.replace(b"[]", b"")
        if not stripped:
            return False
        if stripped == brackets:
            # Unbalanced (a truncated payload, say): the parser still descends through every
            # unclosed opener before it finds the fault, so those count towards the depth too.
            return level + stripped.count(b"[") > max_depth
        brackets = stripped
    return True


def _check_content_type(content_type: str) -> None:
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != CONTENT_TYPE and not media_type.endswith("+json"):
        msg = (
            f"datacontenttype {content_type!r} is not JSON; tidings reads and writes JSON "
            "only (never pickle)"
        )
        raise EventDecodeError(msg, field="datacontenttype")


# A JSON string, or an unterminated one up to the end: every match attempt succeeds (possessive,
# so nothing backtracks), which keeps the substitution linear in the payload whatever it holds.
_STRINGS: Final = re.compile(rb'"(?:[^"\\]|\\.)*+(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKETS: Final = bytes(c for c in range(256) if c not in b"[]{}")
_NOT_OPENERS: Final = bytes(c for c in range(256) if c not in b"[{")
_UNIFY_BRACKETS: Final = bytes.maketrans(b"{}", b"[]")


class _NoEnvelope(msgspec.Struct, tag_field="type", tag="\x00"):
    """The fast decoder's second union member: it keeps ``type`` required (see there).

    Its tag is a NUL, which no registered event type is; a payload that spells it decodes to
    this (which has no ``plan``) and is refused.
    """


def _decode_nothing(payload: bytes) -> Any:
    msg = "no event class is registered"
    raise msgspec.ValidationError(msg)


def _malformed(exc: Exception) -> EventDecodeError:
    return EventDecodeError(f"payload is not valid JSON: {log_safe(str(exc))}")


def _type_of(payload: object) -> str | None:
    """The ``type`` a payload claims, if it parses as an envelope at all (for error messages)."""
    try:
        return str(_incoming_decoder.decode(payload).type)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - naming the type is a courtesy
        return None


def _refused(event_type: str | None, exc: Exception) -> EventDecodeError:
    """The decode failure for an exception the codec did not raise itself (a user's check)."""
    which = "the event" if event_type is None else repr(log_safe(event_type, 200))
    msg = (
        f"cannot decode {which}: building it raised {type(exc).__name__}: "
        f"{log_safe(str(exc))}; fix the producer, or the event class's own checks"
    )
    return EventDecodeError(msg)


class Codec:
    """Turns events into CloudEvents JSON bytes and back, through one registry.

    Thread-safe and cheap to share: per-class plans are built on first use and cached.

    Args:
        registry: where decoding looks event types up (the default registry if omitted).
        source: the CloudEvents ``source`` written on encode, e.g. ``"/orders-service"``.
        limits: size and nesting bounds checked before any payload is parsed.
    """

    def __init__(
        self,
        registry: EventRegistry | None = None,
        *,
        source: str = "/tidings",
        limits: Limits | None = None,
    ) -> None:
        self.registry = default_registry if registry is None else registry
        self.source = source
        self.limits = Limits() if limits is None else limits
        self._max_bytes = self.limits.max_bytes
        self._max_depth = self.limits.max_depth
        self._plans: dict[type[DomainEvent], ClassPlan] = {}
        # Type name (as written by tidings) -> plan, filled by the long way, emptied by the
        # registry whenever a class or alias is (re-)registered.
        # One decoder for the envelopes of every registered class, a union tagged by "type":
        # the parser picks the class's shape from the tag, in C. Rebuilt after the registry
        # changes, so a re-registered class is never decoded through a stale shape.
        self._fast_decode: Callable[[bytes], Any] | None = None
        self.registry.on_change(self._forget_fast_decoder)

    def _forget_fast_decoder(self) -> None:
        self._fast_decode = None

    def _build_fast_decoder(self) -> Callable[[bytes], Any]:
        shapes = []
        for name in self.registry:
            cls = self.registry.get(name)
            if cls is None:
                continue
            try:
                shapes.append(self._plan(cls).envelope_type)
            except EventDefinitionError:
                continue  # the long way reports it, for the payloads that need this class
        if not shapes:
            return _decode_nothing
        # A union of one type is that type, whose tag msgspec then does not require: with one
        # event class registered, an envelope with no "type" would decode as it. A second,
        # unmatchable member keeps the tag required.
        shapes.append(_NoEnvelope)
        decode: Callable[[bytes], Any] = msgspec.json.Decoder(Union[tuple(shapes)]).decode  # noqa: UP007
        self._fast_decode = decode
        return decode

    def _plan(self, cls: type[DomainEvent]) -> ClassPlan:
        plan = self._plans.get(cls)
        if plan is None:
            plan = self._plans[cls] = ClassPlan(cls)
        return plan

    # -- encoding ---------------------------------------------------------------------------

    def encode(self, event: DomainEvent, *, traceparent: str | None = None) -> bytes:
        """Return the event as CloudEvents JSON bytes.

        With no ``traceparent`` given and tracing installed (:mod:`tidings.integrations.otel`),
        the envelope carries the current span's.

        Raises:
            EventEncodeError: a field value has no JSON form.
        """
        if traceparent is None and _tracing.hooks is not None:
            traceparent = _tracing.hooks.traceparent(event)
        cls = event.__class__
        plan = self._plans.get(cls) or self._plan(cls)
        if plan.value_checks:
            plan.refuse_non_finite(event)
        if plan.slotted:
            data = {name: getattr(event, name) for name in plan.own}
        else:
            data = event.__dict__.copy()
            del data["event_id"], data["correlation_id"], data["occurred_at"]
            del data["tenant_id"], data["causation_id"]
        try:
            payload = _encode(
                Outgoing(
                    plan.event_type,
                    SPEC_VERSION,
                    event.event_id,
                    self.source,
                    event.occurred_at,
                    CONTENT_TYPE,
                    plan.version,
                    data,
                    event.correlation_id,
                    event.causation_id,
                    event.tenant_id,
                    traceparent,
                )
            )
        except (TypeError, ValueError, OverflowError) as exc:
            msg = f"cannot encode {cls.event_type!r}: {exc}; use JSON-friendly field types"
            raise EventEncodeError(msg) from exc
        except RecursionError as exc:
            msg = f"cannot encode {cls.event_type!r}: its values nest too deeply for JSON"
            raise EventEncodeError(msg) from exc
        # What decoding would refuse is refused here, at the producer (is_plain, inlined).
        if (
            not (payload.isascii() and 92 not in payload and 127 not in payload)
            or not 0 < len(event.event_id) <= ID_LIMIT
            or not 0 < len(event.correlation_id) <= ID_LIMIT
            or not 0 < len(event.occurred_at) <= TIME_LIMIT
            or (event.tenant_id is not None and not 0 < len(event.tenant_id) <= ID_LIMIT)
            or (event.causation_id is not None and not 0 < len(event.causation_id) <= ID_LIMIT)
        ):
            refuse_unreadable(_json_decoder.decode(payload))
        return payload

    def to_envelope(self, event: DomainEvent, *, traceparent: str | None = None) -> dict[str, Any]:
        """Return the envelope as a dict of plain JSON types (what :meth:`encode` serialises)."""
        result: dict[str, Any] = _json_decoder.decode(self.encode(event, traceparent=traceparent))
        return result

    # -- decoding ---------------------------------------------------------------------------

    def decode(self, payload: Payload, expected: type[T] = DomainEvent) -> T:  # type: ignore[assignment]
        """Decode a payload into an event of ``expected`` (or a subclass of it).

        Raises:
            PayloadTooLargeError, PayloadTooDeepError: refused before parsing.
            UnknownEventTypeError: the type is not registered.
            EventTypeMismatchError: the type is registered but not ``expected`` or a subclass.
            EventDecodeError: anything else wrong (malformed JSON or UTF-8, not an envelope,
                a content type other than JSON, a missing or wrongly typed field).
        """
        return self._decode(payload, expected)[1]  # type: ignore[return-value]

    def read(self, payload: Payload, expected: type[T] = DomainEvent) -> Envelope:  # type: ignore[assignment]
        """Decode a payload into an :class:`Envelope`: the event plus producer attributes.

        Raises the same errors as :meth:`decode`.
        """
        incoming, event = self._decode(payload, expected)
        return Envelope(event, incoming.source, incoming.traceparent, int(incoming.dataversion))

    def from_envelope(self, envelope: Mapping[str, Any], expected: type[T] = DomainEvent) -> T:  # type: ignore[assignment]
        """Decode an envelope already parsed into a dict; ``envelope`` is not changed."""
        if not isinstance(envelope, Mapping):
            msg = f"an envelope is a JSON object, not {type(envelope).__name__}"
            raise EventDecodeError(msg)
        try:
            payload = _encoder.encode(dict(envelope))
        except (TypeError, ValueError, OverflowError) as exc:
            msg = f"envelope holds a value with no JSON form: {exc}"
            raise EventDecodeError(msg) from exc
        except RecursionError as exc:
            raise self._too_deep_for_parser() from exc
        return self.decode(payload, expected)

    def _decode(self, payload: Any, expected: type[DomainEvent]) -> tuple[Any, DomainEvent]:
        # Whatever goes wrong in here is the message's fault (a user's __post_init__ or an
        # upcaster raising KeyError, say): it leaves as an EventDecodeError, never as anything
        # a worker would retry.
        try:
            if type(payload) is not bytes:
                payload = self._as_bytes(payload)
            if len(payload) > self._max_bytes:
                raise self._too_large(len(payload))
            # Fewer openers than the limit cannot nest deeper than it: one C pass decides most.
            max_depth = self._max_depth
            if len(payload.translate(None, _NOT_OPENERS)) > max_depth and _too_deep(
                payload, max_depth
            ):
                msg = (
                    f"payload nests deeper than {max_depth} levels; refused before "
                    "parsing (raise Limits.max_depth if such events are legitimate)"
                )
                raise PayloadTooDeepError(msg)
            # Fast path: one pass, straight into the registered class's own shape (tidings
            # writes "type" first, so the parser knows the shape from the first key).
            try:
                fast: Any = (self._fast_decode or self._build_fast_decoder())(payload)
            except msgspec.ValidationError:
                pass  # unknown type, alias, old version or a bad field: the long way says which
            except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                raise _malformed(exc) from exc
            else:
                plan = fast.plan
                if expected is DomainEvent or issubclass(plan.cls, expected):
                    # (is_plain, inlined: most payloads need no look at each attribute)
                    if not (payload.isascii() and 92 not in payload and 127 not in payload):
                        check_attributes(fast)
                    return fast, plan.build(fast, fast.data)
            return self._decode_slowly(payload, expected)
        except EventDecodeError:
            raise
        except RecursionError as exc:
            raise self._too_deep_for_parser() from exc
        except Exception as exc:  # every failure here is a refusal (see above)
            raise _refused(_type_of(payload), exc) from exc

    def _too_deep_for_parser(self) -> PayloadTooDeepError:
        msg = (
            "payload nests deeper than the JSON parser can recurse; lower Limits.max_depth "
            f"(now {self.limits.max_depth}) so that such payloads are refused before parsing"
        )
        return PayloadTooDeepError(msg)

    def _decode_slowly(
        self, payload: bytes, expected: type[DomainEvent]
    ) -> tuple[Any, DomainEvent]:
        """Decode through the generic envelope: aliases, old versions, precise errors."""
        try:
            incoming = _incoming_decoder.decode(payload)
        except msgspec.ValidationError as exc:
            msg = f"payload is not a CloudEvents envelope: {exc}"
            raise EventDecodeError(msg, field=_validation_error("envelope", exc, "").field) from exc
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise _malformed(exc) from exc
        if not is_plain(payload):
            check_attributes(incoming)
        if incoming.specversion != SPEC_VERSION:
            msg = f"specversion {incoming.specversion!r} is not supported; tidings reads '1.0'"
            raise EventDecodeError(msg, field="specversion")
        _check_content_type(incoming.datacontenttype)
        plan = self._plan(self.registry.resolve(incoming.type, expected))
        try:
            version = int(incoming.dataversion)
        except ValueError:
            msg = f"dataversion {incoming.dataversion!r} is not an integer"
            raise EventDecodeError(msg, field="dataversion") from None
        try:
            if version == plan.cls.event_version:
                data = msgspec.json.decode(incoming.data, type=plan.data_type)
            else:
                upcast = self.registry.upcast(
                    plan.cls, version, _dict_decoder.decode(incoming.data)
                )
                data = msgspec.convert(upcast, plan.data_type, str_keys=True)
        except msgspec.ValidationError as exc:
            raise _validation_error(plan.cls.event_type, exc, "") from exc
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise _malformed(exc) from exc
        return incoming, plan.build(incoming, data)

    def _as_bytes(self, payload: object) -> bytes:
        if isinstance(payload, str):
            if len(payload) > self.limits.max_bytes:  # each character is at least one byte
                raise self._too_large(len(payload))
            try:
                return payload.encode("utf-8")
            except UnicodeEncodeError as exc:
                msg = f"payload is not valid Unicode text: {exc}"
                raise EventDecodeError(msg) from exc
        if isinstance(payload, bytes | bytearray | memoryview):
            return bytes(payload)
        msg = f"a payload is bytes or str, not {type(payload).__name__}"
        raise EventDecodeError(msg)

    def _too_large(self, size: int) -> PayloadTooLargeError:
        msg = (
            f"payload of {size} bytes exceeds the {self.limits.max_bytes}-byte limit; refused "
            "before parsing (raise Limits.max_bytes if such events are legitimate)"
        )
        return PayloadTooLargeError(msg)

    # -- dicts (the seed's to_dict / from_dict) ---------------------------------------------

    def to_dict(self, event: DomainEvent) -> dict[str, Any]:
        """Return every field of ``event`` plus ``"event_type"``, as plain JSON types."""
        self._plan(type(event)).refuse_non_finite(event)
        try:
            result: dict[str, Any] = _json_decoder.decode(_encoder.encode(event))
        except (TypeError, ValueError, OverflowError) as exc:
            msg = f"cannot encode {type(event).event_type!r}: {exc}; use JSON-friendly field types"
            raise EventEncodeError(msg) from exc
        result["event_type"] = type(event).event_type
        return result

    def from_dict(self, data: Mapping[str, Any], expected: type[T]) -> T:
        """Build an event from a :meth:`to_dict`-style dict; see ``DomainEvent.from_dict``."""
        if not isinstance(data, Mapping):
            msg = f"from_dict takes a mapping, not {type(data).__name__}"
            raise EventDecodeError(msg)
        event_type = data.get("event_type")
        cls: type[DomainEvent]
        if event_type is None or event_type == expected.event_type:
            cls = expected
        elif isinstance(event_type, str):
            cls = self.registry.resolve(event_type, expected)
        else:
            msg = f"event_type must be a string, not {type(event_type).__name__}"
            raise EventDecodeError(msg, field="event_type")
        try:
            event: T = msgspec.convert(dict(data), cls, str_keys=True)  # type: ignore[assignment]
        except msgspec.ValidationError as exc:
            raise _validation_error(cls.event_type, exc, "") from exc
        except RecursionError as exc:
            raise self._too_deep_for_parser() from exc
        except Exception as exc:  # every failure here is a refusal (see above)
            raise _refused(cls.event_type, exc) from exc
        plan = self._plan(cls)
        if plan.decimal_fields:
            plan.refuse_unbounded_decimals(event.__getattribute__, decoding=True)
        return event


default_codec: Final = Codec()
"""The codec behind the module-level functions: default registry, default limits."""


# The module-level functions are the default codec's bound methods: no extra call on the hot path.
encode: Final = default_codec.encode
decode: Final = default_codec.decode
read: Final = default_codec.read
event_to_dict: Final = default_codec.to_dict
event_from_dict: Final = default_codec.from_dict
