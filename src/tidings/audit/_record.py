"""The audit record and the store port; re-exported by :mod:`tidings.audit`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, Protocol, runtime_checkable

import msgspec

__all__ = ["FIELDS", "KINDS", "AuditRecord", "AuditStore", "storable"]

KINDS: Final = frozenset(
    {"published", "relayed", "handled", "duplicate", "retried", "dead_lettered", "rejected"}
)
"""Every :attr:`AuditRecord.kind`."""


class AuditRecord(msgspec.Struct, frozen=True, gc=False):
    """One thing that happened to one event, as the audit trail keeps it.

    Immutable and cheap to make (a ``msgspec.Struct``: a hook makes one per handler run).

    Attributes:
        kind: ``published`` (sent, or added to the outbox), ``relayed`` (sent on by the
            relay), ``handled`` (a handler run that ended: ``outcome`` says how),
            ``duplicate`` (the inbox skipped a run whose effect had taken place), ``retried``
            (a run that failed, or found the inbox claimed elsewhere, and will be tried
            again), ``dead_lettered`` (a run that failed for good) or ``rejected`` (a message
            dead-lettered without any handler running: undecodable, or aimed at a handler that
            does not take it).
        event_id, event_type, correlation_id, causation_id, tenant_id: the event's, as far
            as they are known (a rejected message may have none).
        handler: the handler's name, for handler runs and targeted rejections.
        outcome: ``ok``; for a run ``failed`` (an in-process handler raised), ``aborted``
            (the worker's own error cut it short), ``retry``, ``busy``, ``duplicate``,
            ``dead_letter``; ``error`` for a publish or relay that raised; ``rejected``.
        attempt: the handler run's attempt, from 1 (0 where no handler ran).
        duration: seconds the publish, relay or run took (``None`` where nothing ran).
        worker: ``host:pid`` of the process that recorded it.
        at: when it started, Unix time in seconds (UTC).
        detail: what else a person needs: the error, the retry delay, the dead letter's id,
            where the event was sent. It may come from a message: escape it before printing.
    """

    kind: str
    event_id: str | None
    event_type: str | None = None
    correlation_id: str | None = None
    causation_id: str | None = None
    tenant_id: str | None = None
    handler: str | None = None
    outcome: str = "ok"
    attempt: int = 0
    duration: float | None = None
    worker: str = ""
    at: float = 0.0
    detail: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            msg = f"an audit record's kind is one of {sorted(KINDS)}, not {self.kind!r}"
            raise ValueError(msg)

    def to_dict(self) -> dict[str, Any]:
        """Every field by name, as plain JSON types."""
        return {name: getattr(self, name) for name in FIELDS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AuditRecord:
        """The record :meth:`to_dict` gave ``data``; keys that are not fields are ignored.

        Raises:
            ValueError: ``kind`` is not one of :data:`KINDS`.
            TypeError: ``kind`` or ``event_id`` is missing.
        """
        return cls(**{name: data[name] for name in FIELDS if name in data})


FIELDS: Final[tuple[str, ...]] = AuditRecord.__struct_fields__
"""The names of an :class:`AuditRecord`'s fields, in order."""


@runtime_checkable
class AuditStore(Protocol):
    """Where audit records are kept, and found again by correlation id, event id or tenant.

    Contract: ``write`` stores a batch (one round trip or one transaction where the store
    can) and is called from one background thread at a time; the lookups read only the
    records they return (an index, never a scan of the trail), each oldest first except
    ``by_tenant``; every method is safe from several processes. Records are kept until
    ``trim`` removes them (a Redis store also lets them expire after its ``max_age``).
    """

    def write(self, records: Sequence[AuditRecord]) -> None:
        """Store ``records``; they can be read back once this returns."""
        ...

    def by_correlation(self, correlation_id: str) -> list[AuditRecord]:
        """Every record of this correlation id (one request), oldest first."""
        ...

    def by_event(self, event_id: str) -> list[AuditRecord]:
        """Every record of this event, oldest first."""
        ...

    def by_tenant(
        self, tenant_id: str, *, limit: int = 100, since: float | None = None
    ) -> list[AuditRecord]:
        """Up to ``limit`` records of this tenant, newest first, none before ``since``."""
        ...

    def trim(self, older_than: float) -> int:
        """Remove the records more than ``older_than`` seconds old; return how many went."""
        ...

    def close(self) -> None:
        """Release the store's connections (those it made itself)."""
        ...


def storable(text: str) -> str:
    """``text`` as every store keeps it: NUL and lone surrogates escaped, the rest unchanged.

    PostgreSQL refuses NUL in text, and no driver or JSON encoder takes a lone surrogate (an
    exception message may hold one); escaping beats losing the record.
    """
    if "\x00" not in text and text.isascii():
        return text
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")
