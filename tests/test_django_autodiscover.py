"""The Django app imports each installed app's ``handlers`` module at start-up."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("django")

ROOT = Path(__file__).resolve().parent.parent

PROGRAM = textwrap.dedent(
    """
    import sys
    import django
    from django.conf import settings

    settings.configure(
        INSTALLED_APPS=["django.contrib.contenttypes", "tidings.integrations.django",
                        "tests.django_discovery"],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
        **eval(sys.argv[1]),
    )
    django.setup()
    print("tests.django_discovery.handlers" in sys.modules)
    """
)


def _discovered(options: str) -> bool:
    result = subprocess.run(  # noqa: S603 - our own program
        [sys.executable, "-c", PROGRAM, options],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.strip() == "True"


def test_an_installed_apps_handlers_module_is_imported_at_setup():
    """django.setup() imports <app>.handlers, so every process subscribes the same handlers."""
    assert _discovered("{}")


def test_discovery_can_be_turned_off():
    """TIDINGS_AUTODISCOVER = False imports no handlers module."""
    assert not _discovered("{'TIDINGS_AUTODISCOVER': False}")


def test_another_module_name_can_be_discovered():
    """TIDINGS_HANDLERS_MODULE names the module looked for instead of handlers."""
    assert not _discovered("{'TIDINGS_HANDLERS_MODULE': 'subscribers'}")
