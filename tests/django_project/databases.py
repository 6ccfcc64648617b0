"""Create and drop the test project's per-run PostgreSQL database (from the maintenance one)."""

from __future__ import annotations

import pytest
from django.conf import settings


def _maintenance() -> object:
    psycopg = pytest.importorskip("psycopg")
    pg = settings.DATABASES["postgres"]
    return psycopg.connect(
        host=pg["HOST"],
        port=pg["PORT"],
        user=pg["USER"],
        password=pg["PASSWORD"] or None,
        dbname=settings.POSTGRES_MAINTENANCE_DB,
        autocommit=True,
    )


def create_postgres(name: str) -> None:
    """(Re)create the empty database ``name`` on the test PostgreSQL server."""
    with _maintenance() as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}"')
        connection.execute(f'CREATE DATABASE "{name}"')


def drop_postgres(name: str) -> None:
    """Drop database ``name``, closing the connections still open on it."""
    with _maintenance() as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
