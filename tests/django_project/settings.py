"""Settings of the test project: the tidings app on SQLite, PostgreSQL and MariaDB.

``default`` is a SQLite file and ``postgres`` the test PostgreSQL server, both with names no
other run uses; ``tests/test_django_outbox.py`` creates them, migrates them, and drops them.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from urllib.parse import urlsplit

# A relay started as a subprocess passes its parent's run id, to open the same databases.
_RUN = os.environ.get("TIDINGS_DJANGO_TEST_RUN") or uuid.uuid4().hex[:8]
RUN = _RUN
_PG = urlsplit(
    os.environ.get("TIDINGS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
)

SECRET_KEY = "tidings-tests-only"  # noqa: S105 - a test project, never deployed
USE_TZ = True
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "tidings.integrations.django",
    "tests.django_project.shop",
]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.path.join(tempfile.gettempdir(), f"tidings_django_{_RUN}.sqlite3"),
    },
    "postgres": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": f"t_django_{_RUN}",
        "USER": _PG.username or "postgres",
        "PASSWORD": _PG.password or "",
        "HOST": _PG.hostname or "127.0.0.1",
        "PORT": str(_PG.port or 5432),
        "TEST": {"NAME": f"t_django_{_RUN}_test"},
    },
}
_MARIADB = urlsplit(
    os.environ.get("TIDINGS_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
)
# Needs MySQLdb: tests/django_project/databases.py lets PyMySQL stand in for mysqlclient.
DATABASES["mariadb"] = {
    "ENGINE": "django.db.backends.mysql",
    "NAME": f"t_django_{_RUN}",
    "USER": _MARIADB.username or "root",
    "PASSWORD": _MARIADB.password or "",
    "HOST": _MARIADB.hostname or "127.0.0.1",
    "PORT": str(_MARIADB.port or 3306),
    "OPTIONS": {"charset": "utf8mb4"},
}
# The same databases through connections that stop waiting for a row lock within a second
# (tests/test_django_inbox.py: a claimer that gives up).
DATABASES["default_impatient"] = {**DATABASES["default"], "OPTIONS": {"timeout": 0.2}}
DATABASES["postgres_impatient"] = {
    **DATABASES["postgres"],
    "OPTIONS": {"options": "-c lock_timeout=300"},
}
DATABASES["mariadb_impatient"] = {
    **DATABASES["mariadb"],
    "OPTIONS": {"charset": "utf8mb4", "init_command": "SET SESSION innodb_lock_wait_timeout = 1"},
}
# The server's own database, where the per-run database is created and dropped from.
POSTGRES_MAINTENANCE_DB = (_PG.path or "/test").lstrip("/") or "test"
