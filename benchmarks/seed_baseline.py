"""A faithful re-implementation of the seed module: the approach tidings is measured against.

Same base class, same ``asdict``-based ``to_dict``, same registry-and-filter ``from_dict``. The
one addition is ``default=str`` on ``json.dumps``: without it the seed cannot serialise the
datetime, Decimal and UUID fields of the benchmark event at all.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar


@dataclass(frozen=True)
class SeedDomainEvent:
    """The seed's base class, field for field."""

    event_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    correlation_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    occurred_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    tenant_id: str | None = None
    event_type: ClassVar[str] = "domain_event"

    def to_dict(self) -> dict[str, Any]:
        """Serialise as the seed does."""
        data = asdict(self)
        data["event_type"] = self.__class__.event_type
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SeedDomainEvent:
        """Deserialise as the seed does (including its mutation of ``data``)."""
        event_type = data.pop("event_type", None)
        event_cls = _EVENT_REGISTRY.get(event_type, cls)
        valid_fields = {f.name for f in event_cls.__dataclass_fields__.values()}
        filtered = {k: v for k, v in data.items() if k in valid_fields}
        return event_cls(**filtered)


_EVENT_REGISTRY: dict[str, type[SeedDomainEvent]] = {}


def seed_register_event(event_cls: type[SeedDomainEvent]) -> type[SeedDomainEvent]:
    """Register as the seed does."""
    _EVENT_REGISTRY[event_cls.event_type] = event_cls
    return event_cls


def seed_encode(event: SeedDomainEvent) -> bytes:
    """The seed's wire path: ``to_dict`` then stdlib JSON."""
    return json.dumps(event.to_dict(), default=str).encode()


def seed_decode(payload: bytes) -> SeedDomainEvent:
    """The seed's read path: stdlib JSON then ``from_dict``."""
    return SeedDomainEvent.from_dict(json.loads(payload))
