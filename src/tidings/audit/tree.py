"""One request's causal tree, built from its audit records (for ``tidings trace`` and the ops page).

The events of a correlation id form a tree by causation: an event whose ``causation_id`` names
another event of the request is under it, the others are roots. Under each event come its own
records (publish, relay, handler runs, retries, duplicates, dead letters) and the events its
handlers raised, all in time order. Records carrying no event id (a message rejected before it
could be read) are kept apart. The data come from messages: escape them before printing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tidings.audit._record import AuditRecord

__all__ = ["MAX_DEPTH", "EventNode", "Trace", "causal_tree"]

MAX_DEPTH = 100
"""Deepest an event is nested; the events under a deeper one become roots of their own."""


@dataclass(frozen=True)
class EventNode:
    """One event of the request, with what happened to it and the events it caused.

    Attributes:
        event_id, event_type, tenant_id, causation_id: the event's.
        at: when its first record started (Unix seconds).
        records: its own records, oldest first.
        caused: the events its handlers raised, by when each was first recorded.
    """

    event_id: str
    event_type: str | None
    tenant_id: str | None
    causation_id: str | None
    at: float
    records: tuple[AuditRecord, ...]
    caused: tuple[EventNode, ...]


@dataclass(frozen=True)
class Trace:
    """The causal tree of one correlation id.

    Attributes:
        correlation_id: the request's.
        start: the ``at`` of its first record (Unix seconds); ``0.0`` when there is none.
        roots: the events no other event of the request caused, by time.
        unattached: records with no event id, oldest first.
        count: how many records the tree holds.
    """

    correlation_id: str
    start: float
    roots: tuple[EventNode, ...]
    unattached: tuple[AuditRecord, ...]
    count: int

    def to_dict(self) -> dict[str, Any]:
        """The tree as plain JSON types, with times in ms since :attr:`start`."""
        return {
            "correlation_id": self.correlation_id,
            "start": self.start,
            "records": self.count,
            "events": [self._node(node) for node in self.roots],
            "unattached": [self._record(record) for record in self.unattached],
        }

    def _node(self, node: EventNode) -> dict[str, Any]:
        return {
            "event_id": node.event_id,
            "event_type": node.event_type,
            "tenant_id": node.tenant_id,
            "causation_id": node.causation_id,
            "offset_ms": self.offset_ms(node.at),
            "records": [self._record(record) for record in node.records],
            "caused": [self._node(child) for child in node.caused],
        }

    def _record(self, record: AuditRecord) -> dict[str, Any]:
        fields = record.to_dict()
        fields["offset_ms"] = self.offset_ms(record.at)
        fields["duration_ms"] = None if record.duration is None else record.duration * 1000
        return fields

    def offset_ms(self, at: float) -> float:
        """Milliseconds from the first record to ``at``."""
        return round((at - self.start) * 1000, 3)


def causal_tree(correlation_id: str, records: Iterable[AuditRecord]) -> Trace:
    """Build the causal tree of ``records`` (those of ``correlation_id``; others are ignored).

    A cycle of causation ids (only forged data can make one) is cut where it is first met,
    and a chain deeper than :data:`MAX_DEPTH` continues as a new root, so every record appears
    exactly once and nothing recurses without bound.
    """
    mine = sorted(
        (record for record in records if record.correlation_id == correlation_id),
        key=lambda record: record.at,
    )
    by_event: dict[str, list[AuditRecord]] = {}
    unattached: list[AuditRecord] = []
    for record in mine:
        if record.event_id is None:
            unattached.append(record)
        else:
            by_event.setdefault(record.event_id, []).append(record)
    cause: dict[str, str | None] = {}
    for event_id, own in by_event.items():
        # The first record naming a cause speaks for the event (a rejected one may name none).
        cause[event_id] = next((r.causation_id for r in own if r.causation_id), None)
    children: dict[str | None, list[str]] = {}
    for event_id in by_event:  # in order of first record
        parent = cause[event_id]
        children.setdefault(parent if parent in by_event else None, []).append(event_id)
    placed: set[str] = set()

    def build(event_id: str, depth: int) -> EventNode:
        placed.add(event_id)
        own = by_event[event_id]
        first = own[0]
        below = children.get(event_id, []) if depth < MAX_DEPTH else []
        caused = [build(child, depth + 1) for child in below if child not in placed]
        return EventNode(
            event_id=event_id,
            event_type=next((r.event_type for r in own if r.event_type), None),
            tenant_id=first.tenant_id,
            causation_id=cause[event_id],
            at=first.at,
            records=tuple(own),
            caused=tuple(caused),
        )

    roots = [build(event_id, 0) for event_id in children.get(None, ())]
    for event_id in by_event:  # a cycle, or a chain cut at MAX_DEPTH: a root where first seen
        if event_id not in placed:
            roots.append(build(event_id, 0))
    roots.sort(key=lambda node: node.at)
    return Trace(
        correlation_id=correlation_id,
        start=mine[0].at if mine else 0.0,
        roots=tuple(roots),
        unattached=tuple(unattached),
        count=len(mine),
    )
