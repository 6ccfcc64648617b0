"""Create ``tidings_django_inbox``: the Django inbox's done marks (Django 4.2+)."""

from typing import Any, ClassVar

from django.db import migrations, models


class Migration(migrations.Migration):  # type: ignore[misc]  # Django ships no type information
    """The inbox table, unique on (handler, source, event_id), indexed by ``processed_at``."""

    dependencies: ClassVar[list[tuple[str, str]]] = [("tidings", "0002_outboxquarantine")]

    operations: ClassVar[list[Any]] = [
        migrations.CreateModel(
            name="InboxEntry",
            fields=[
                ("id", models.BigAutoField(primary_key=True, serialize=False)),
                ("handler", models.CharField(max_length=200)),
                ("source", models.CharField(max_length=200)),
                ("event_id", models.CharField(max_length=64)),
                ("processed_at", models.DateTimeField(db_index=True)),
            ],
            options={
                "db_table": "tidings_django_inbox",
                "constraints": [
                    models.UniqueConstraint(
                        fields=("handler", "source", "event_id"),
                        name="uq_tidings_django_inbox_key",
                    )
                ],
            },
        ),
    ]
