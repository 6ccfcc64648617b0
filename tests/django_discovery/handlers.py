"""Subscribes a handler when imported: what the tidings app's ``ready()`` must import."""

from __future__ import annotations

from tidings import DomainEvent, EventBus

bus = EventBus()
seen: list[DomainEvent] = []
bus.add_handler(seen.append, DomainEvent, name="django_discovery.record")
