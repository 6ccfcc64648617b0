"""Create the ``Shipment`` table."""

from typing import Any, ClassVar

from django.db import migrations, models


class Migration(migrations.Migration):
    """The effect rows' table."""

    initial = True

    dependencies: ClassVar[list[tuple[str, str]]] = []

    operations: ClassVar[list[Any]] = [
        migrations.CreateModel(
            name="Shipment",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("event_id", models.CharField(max_length=64)),
                ("value", models.CharField(max_length=64)),
            ],
        ),
    ]
