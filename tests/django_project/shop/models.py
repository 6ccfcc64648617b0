"""``Shipment``: one row per effect a handler wrote (no unique key: a repeat would show)."""

from __future__ import annotations

from django.db import models


class Shipment(models.Model):  # type: ignore[misc]  # Django ships no type information
    """An effect row: the event that caused it and a value."""

    event_id = models.CharField(max_length=64)
    value = models.CharField(max_length=64)

    class Meta:
        """The ``shop`` app's table."""

        app_label = "shop"
