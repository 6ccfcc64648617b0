"""Which driver errors mean "another transaction holds the row, retry later", by database.

Shared by the SQL inboxes (SQLAlchemy's and Django's), which see the same drivers' errors.
"""

from __future__ import annotations

from typing import Final

__all__ = ["is_busy"]

_PG_BUSY: Final = {"55P03", "40P01", "40001"}  # lock_not_available, deadlock, serialization
_MYSQL_BUSY: Final = {1205, 1213}  # lock wait timeout, deadlock
_SQLITE_BUSY: Final = {5, 6}  # SQLITE_BUSY, SQLITE_LOCKED (primary codes)


def is_busy(database: str, original: object) -> bool:
    """Whether the driver exception ``original`` of ``database`` means a held row or lock.

    ``database`` is the SQLAlchemy dialect or Django vendor name (``postgresql``, ``sqlite``,
    ``mysql``, ``mariadb``). psycopg and psycopg2 (``sqlstate``, ``pgcode``), sqlite3
    (``sqlite_errorcode``) and the MySQL drivers (``args[0]``, the errno) are understood.
    """
    if database == "postgresql":
        state = getattr(original, "sqlstate", None) or getattr(original, "pgcode", None)
        return state in _PG_BUSY
    if database == "sqlite":
        return (getattr(original, "sqlite_errorcode", 0) & 0xFF) in _SQLITE_BUSY
    args: tuple[object, ...] = getattr(original, "args", ())  # MySQL drivers: (errno, message)
    return bool(args) and args[0] in _MYSQL_BUSY
