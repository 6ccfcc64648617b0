"""``Delivery``: the row a benchmarked handler writes per event (table made by the benchmark)."""

from __future__ import annotations

from django.db import models


class Delivery(models.Model):  # type: ignore[misc]  # Django ships no type information
    """One handled event's effect: its id and the order it belongs to."""

    event_id = models.CharField(max_length=64)
    order_id = models.CharField(max_length=64)

    class Meta:
        """The benchmark's table (created and dropped by the benchmark, no migrations)."""

        app_label = "bench_django"
        db_table = "bench_django_delivery"
