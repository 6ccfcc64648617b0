"""The Django app that holds the outbox model: add ``"tidings.integrations.django"``."""

from __future__ import annotations

from importlib import import_module

from django.apps import AppConfig, apps
from django.conf import settings
from django.utils.module_loading import module_has_submodule

__all__ = ["TidingsConfig"]


class TidingsConfig(AppConfig):  # type: ignore[misc]  # Django ships no type information
    """The ``tidings`` app: the outbox models and migrations, ``tidings_relay``, discovery."""

    name = "tidings.integrations.django"
    label = "tidings"
    verbose_name = "tidings outbox"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        """Import the ``handlers`` module of every installed app that has one.

        So that every process Django starts (the web server, ``manage.py`` commands, a Celery
        worker of the project) has subscribed the same handlers: a handler module nobody
        imported is the classic way to lose events in silence. Django's own apps are skipped;
        ``TIDINGS_AUTODISCOVER = False`` turns discovery off, and
        ``TIDINGS_HANDLERS_MODULE`` names another module than ``handlers``. An import error in
        a handlers module propagates: start-up fails, naming it.
        """
        if not getattr(settings, "TIDINGS_AUTODISCOVER", True):
            return
        name = getattr(settings, "TIDINGS_HANDLERS_MODULE", "handlers")
        for config in apps.get_app_configs():
            if config.name.startswith("django.") or config.name == self.name:
                continue
            if module_has_submodule(config.module, name):
                import_module(f"{config.name}.{name}")
