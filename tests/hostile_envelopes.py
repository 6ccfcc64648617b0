"""Hostile envelopes: every envelope attribute and data field of a valid event, spoiled.

The matrix of issue 11's tests: each attribute (``id``, ``type``, ``source``, ``time``, the
context ids…) and each data field of :class:`tests.apps.hostile_events.Priced` is replaced in
turn by each hostile value (huge, control characters, lone surrogates, dots and backquotes,
wrong JSON types, non-finite and enormous decimals, deep nesting), giving one envelope per
case. The worker tests feed them to real workers; :func:`expected` says, from the codec run in
the test process, what each must become there (a dead letter, or a handled event).
"""

from __future__ import annotations

import json
from typing import Any

from tests.apps.hostile_events import Priced

from tidings.codec import default_codec
from tidings.errors import EventDecodeError

ATTRIBUTES = (
    "id",
    "type",
    "specversion",
    "source",
    "time",
    "datacontenttype",
    "dataversion",
    "correlationid",
    "causationid",
    "tenantid",
    "traceparent",
)

_NEST = 40
HOSTILE_VALUES: dict[str, Any] = {
    "huge": "a" * 300_000,
    "control": "x\r\n\x1b[31mFORGED LOG LINE\x1b[0m\x00",
    "separators": "x\u2028y\u202ez",
    "surrogate": "\ud800x",
    "dots-backquotes": ".`" * 200,
    "number": 12,
    "big-int": 10**400,
    "object": {"a": [1, {"b": None}]},
    "list": ["x"],
    "null": None,
    "empty": "",
    "deep": json.loads("[" * _NEST + "]" * _NEST),
}

DATA_VALUES: dict[str, dict[str, Any]] = {
    "amount": {
        "nan": "NaN",
        "snan": "sNaN",
        "infinity": "-Infinity",
        "huge-exponent": "1e999999999",
        "million-digits": "9" * 1_000_000,
        "float": 1.5e308,
        "text": "one",
    },
    "kind": {"dots-backquotes": ".`" * 200, "unknown": "gift", "number": 5},
    "label": {"post-init-raises": "boom", "object": {"x": 1}, "huge": "b" * 500_000},
    "tags": {"deep": json.loads("[" * _NEST + "]" * _NEST), "mixed": ["a", 1, None]},
}


def valid() -> dict[str, Any]:
    """A valid envelope of a ``Priced`` event, as a dict."""
    envelope: dict[str, Any] = json.loads(default_codec.encode(Priced(label="valid")))
    envelope["causationid"] = envelope["correlationid"]
    envelope["tenantid"] = "acme"
    envelope["traceparent"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    return envelope


def _dumps(envelope: dict[str, Any]) -> bytes:
    return json.dumps(envelope, separators=(",", ":")).encode()


def cases() -> dict[str, bytes]:
    """Every hostile envelope, by case name (``attribute:value`` or ``data.field:value``)."""
    found: dict[str, bytes] = {}
    for attribute in ATTRIBUTES:
        for label, value in HOSTILE_VALUES.items():
            envelope = valid()
            envelope[attribute] = value
            found[f"{attribute}:{label}"] = _dumps(envelope)
        envelope = valid()
        del envelope[attribute]
        found[f"{attribute}:missing"] = _dumps(envelope)
    for name, values in DATA_VALUES.items():
        for label, value in values.items():
            envelope = valid()
            envelope["data"][name] = value
            found[f"data.{name}:{label}"] = _dumps(envelope)
    for label, data in {"null": None, "text": "x", "list": [], "many-keys": {}}.items():
        envelope = valid()
        envelope["data"] = data
        if label == "many-keys":
            envelope["data"] = {f"k{n}": n for n in range(50_000)}
        found[f"data:{label}"] = _dumps(envelope)
    return found


def expected(body: bytes) -> str | None:
    """The event id a worker must handle ``body`` as, or ``None`` if it must dead-letter it.

    What the codec does in this process, which must also be what it does in the worker: any
    exception other than an ``EventDecodeError`` fails the test here.
    """
    try:
        return default_codec.decode(body).event_id
    except EventDecodeError:
        return None
