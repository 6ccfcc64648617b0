"""The Django app that holds the outbox model: add ``"tidings.integrations.django"``."""

from __future__ import annotations

from django.apps import AppConfig

__all__ = ["TidingsConfig"]


class TidingsConfig(AppConfig):  # type: ignore[misc]  # Django ships no type information
    """The ``tidings`` app: the ``OutboxEvent`` model, its migration, ``tidings_relay``."""

    name = "tidings.integrations.django"
    label = "tidings"
    verbose_name = "tidings outbox"
    default_auto_field = "django.db.models.BigAutoField"
