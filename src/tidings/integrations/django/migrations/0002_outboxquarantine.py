"""Create ``tidings_outbox_quarantine``: outbox rows the relay gave up on (Django 4.2+)."""

from typing import Any, ClassVar

from django.db import migrations, models


class Migration(migrations.Migration):  # type: ignore[misc]  # Django ships no type information
    """The quarantine table, next to the outbox (rows moved there keep their outbox id)."""

    dependencies: ClassVar[list[tuple[str, str]]] = [("tidings", "0001_initial")]

    operations: ClassVar[list[Any]] = [
        migrations.CreateModel(
            name="OutboxQuarantine",
            fields=[
                ("id", models.BigIntegerField(primary_key=True, serialize=False)),
                ("event_id", models.CharField(max_length=64)),
                ("event_type", models.CharField(max_length=200)),
                ("partition_key", models.CharField(max_length=200)),
                ("payload", models.TextField()),
                ("created_at", models.DateTimeField()),
                ("quarantined_at", models.DateTimeField()),
                ("attempts", models.IntegerField()),
                ("reason", models.TextField()),
            ],
            options={"db_table": "tidings_outbox_quarantine"},
        ),
    ]
