"""Database URLs as users write them: one place that turns them into SQLAlchemy engines.

Users copy URLs from Heroku, Django settings or docker-compose files: ``postgres://`` is as
common as ``postgresql://``, and neither names a driver. tidings' ``postgres`` extra installs
psycopg 3 and its ``mysql`` extra PyMySQL, so a URL without a driver gets the one the extra
installed (SQLAlchemy's own defaults, psycopg2 and mysqlclient, are not installed by them).
A SQLite file that does not exist is refused where an existing database is expected (the
relay, ``tidings outbox status``, ``tidings dlq``): SQLite would create an empty file for a
mistyped path and the command would report an empty outbox.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tidings._untrusted import redact_url
from tidings.errors import UsageError

if TYPE_CHECKING:
    import sqlalchemy as sa

__all__ = ["create_engine", "normalize_url"]

_DRIVERS = {
    "postgres": "postgresql+psycopg",
    "postgresql": "postgresql+psycopg",
    "mysql": "mysql+pymysql",
    "mariadb": "mariadb+pymysql",
}


def normalize_url(url: str) -> str:
    """Return ``url`` with the driver tidings' extras install when it names none.

    ``postgres://`` and ``postgresql://`` become ``postgresql+psycopg://``; ``mysql://`` and
    ``mariadb://`` get ``+pymysql``. A URL naming its driver is returned unchanged.
    """
    scheme, sep, rest = url.partition("://")
    driver = _DRIVERS.get(scheme.lower()) if sep else None
    return f"{driver}://{rest}" if driver else url


def create_engine(url: str, *, must_exist: bool = False, **options: Any) -> sa.Engine:
    """Return a SQLAlchemy engine for ``url`` (see :func:`normalize_url`).

    Args:
        url: the database URL as the user wrote it.
        must_exist: refuse a SQLite file that does not exist (the caller reads a database
            that something else created), instead of letting SQLite create an empty one.
        options: passed to :func:`sqlalchemy.create_engine`.

    Raises:
        UsageError: a SQLite path that does not exist, with ``must_exist``.
    """
    import sqlalchemy as sa  # noqa: PLC0415 - the sql extra, imported when an engine is made

    parsed = sa.engine.make_url(normalize_url(url))
    if must_exist and parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        in_memory = database in ("", ":memory:") or database.startswith("file::memory:")
        if not in_memory and not Path(database).is_file():
            msg = (
                f"no SQLite database at {database!r} ({redact_url(url)}): check the path "
                "(sqlite:///relative/path or sqlite:////absolute/path); tidings does not "
                "create an empty one where it expects your data"
            )
            raise UsageError(msg)
    return sa.create_engine(parsed, **options)
