"""Create and drop the test project's per-run PostgreSQL and MariaDB databases."""

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


def use_pymysql() -> None:
    """Let PyMySQL (a test dependency) stand in for mysqlclient under Django's MySQL backend."""
    pymysql = pytest.importorskip("pymysql")
    pymysql.install_as_MySQLdb()


def _mariadb() -> object:
    pymysql = pytest.importorskip("pymysql")
    db = settings.DATABASES["mariadb"]
    return pymysql.connect(
        host=db["HOST"],
        port=int(db["PORT"]),
        user=db["USER"],
        password=db["PASSWORD"] or "",
        autocommit=True,
    )


def create_mariadb(name: str) -> None:
    """(Re)create the empty database ``name`` on the test MariaDB server."""
    connection = _mariadb()
    try:
        with connection.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
            cursor.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    finally:
        connection.close()


def drop_mariadb(name: str) -> None:
    """Drop database ``name`` on the test MariaDB server."""
    connection = _mariadb()
    try:
        with connection.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
    finally:
        connection.close()
