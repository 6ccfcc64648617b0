"""Create ``tidings_django_inbox``: the Django inbox's done marks (Django 4.2+)."""

from typing import Any, ClassVar

from django.db import migrations, models

# MySQL's and MariaDB's default collations compare case-blind and ignore trailing spaces: in a
# unique key, "ABC" would be a duplicate of "abc" and its effect skipped. The key columns
# compare bytes instead, without padding where the server has such a collation.
_BINARY = ("utf8mb4_nopad_bin", "utf8mb4_0900_bin", "utf8mb4_bin")


def _binary_keys(apps: Any, schema_editor: Any) -> None:
    connection = schema_editor.connection
    if connection.vendor != "mysql":
        return
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT collation_name FROM information_schema.collations WHERE collation_name IN "
            "(%s, %s, %s)",
            list(_BINARY),
        )
        found = {row[0] for row in cursor.fetchall()}
        collation = next(name for name in _BINARY if name in found)
        cursor.execute(
            f"ALTER TABLE tidings_django_inbox CONVERT TO CHARACTER SET utf8mb4 COLLATE {collation}"
        )


class Migration(migrations.Migration):  # type: ignore[misc]  # Django ships no type information
    """The inbox table, unique on (handler, source, event_id), indexed by ``processed_at``.

    On MySQL/MariaDB its key columns then get a binary collation (see ``_binary_keys``).
    """

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
        migrations.RunPython(_binary_keys, migrations.RunPython.noop, elidable=False),
    ]
