"""The typed event the hostile-envelope matrix spoils field by field (tests/hostile_envelopes.py).

Both hostile-input worker apps (Celery's and Redis Streams') subscribe a handler to it, so a
spoiled envelope of it reaches a real decode in a real worker process.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from decimal import Decimal
from typing import ClassVar

from tidings import DomainEvent, register_event


class Kind(enum.Enum):
    """An enum field: its value is where msgspec's error message names the field."""

    SALE = "sale"
    REFUND = "refund"


@register_event
@dataclass(frozen=True)
class Priced(DomainEvent):
    """A decimal, an enum, a text and a tuple field; ``__post_init__`` raises on one label."""

    event_type: ClassVar[str] = "hostile.priced"
    amount: Decimal = Decimal("1.50")
    kind: Kind = Kind.SALE
    label: str = ""
    tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Raise ``KeyError`` (not a ValueError) on the label ``boom``: a user's own check."""
        if self.label == "boom":
            raise KeyError(self.label)
