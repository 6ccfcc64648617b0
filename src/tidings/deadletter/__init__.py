"""Dead-letter stores: where deliveries that failed for good wait for an operator.

Three implement :class:`~tidings.ports.DeadLetterStore`:
:class:`~tidings.deadletter.redis.RedisDeadLetterStore` (the ``redis`` extra),
:class:`~tidings.deadletter.sql.SqlDeadLetterStore` (the ``sql`` extra, plus a driver) and
:class:`~tidings.memory.MemoryDeadLetterStore` (this process only). :func:`open_store` picks one
by URL, for the ``tidings dlq`` command and for configuration read from the environment.
:func:`iter_matching` and :func:`find` pick letters by a :class:`~tidings.ports.DeadLetterFilter`
from any store: the Redis and SQL stores search themselves, another store is paged through.
Importing this package imports neither redis-py nor SQLAlchemy.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

from tidings._untrusted import redact_url
from tidings.errors import TidingsError
from tidings.ports import DeadLetter, DeadLetterFilter, DeadLetterStore, FilteringDeadLetterStore

__all__ = ["DeadLetterStoreURLError", "find", "iter_matching", "open_store", "parse_since"]

_EXAMPLES = (
    "redis://localhost:6379/0, sqlite:///dead-letters.db, "
    "postgresql+psycopg://user@host/db, mysql+pymysql://user@host/db or memory://"
)
_DRIVER_FIXES = {
    "postgresql": "pip install 'tidings[postgres]' and use a postgresql+psycopg:// URL",
    "mysql": "pip install 'tidings[mysql]' and use a mysql+pymysql:// URL",
}


_AGO = re.compile(r"(\d{1,6})([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_since(text: str) -> datetime | None:
    """An operator's ``since``: an ISO-8601 time (UTC unless it has an offset) or an age.

    An age is a whole number of at most six digits and a unit, ``30s``, ``15m``, ``2h`` or
    ``7d``, counted back from now. Empty text is ``None`` (no bound).

    Raises:
        ValueError: neither form, or an age reaching back before the year 1.
    """
    text = text.strip()
    if not text:
        return None
    if match := _AGO.fullmatch(text):
        amount, unit = match.groups()
        try:
            return datetime.now(UTC) - timedelta(**{_UNITS[unit]: int(amount)})
        except OverflowError:
            msg = f"{text!r} reaches back before the year 1"
            raise ValueError(msg) from None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        msg = (
            f"{text[:40]!r} is neither an ISO-8601 time (2026-12-01T00:00, UTC unless an "
            "offset is given) nor an age (30s, 15m, 2h, 7d)"
        )
        raise ValueError(msg) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


class DeadLetterStoreURLError(TidingsError, ValueError):
    """A dead-letter store URL names no store tidings knows; the message lists the ones it does."""


def open_store(url: str, *, name: str | None = None, must_exist: bool = False) -> DeadLetterStore:
    """Return the dead-letter store at ``url``, chosen by its scheme.

    ``redis://`` and ``rediss://`` give a Redis store, ``memory://`` an empty in-process store,
    and any SQLAlchemy URL (``sqlite:///path``, ``postgresql+psycopg://...``,
    ``mysql+pymysql://...``) a SQL store, whose table must exist (see
    :meth:`~tidings.deadletter.sql.SqlDeadLetterStore.create_tables`). ``name`` is the Redis key
    prefix or the SQL table name, when not the default. With ``must_exist`` (the ``tidings dlq``
    commands), a SQLite file that does not exist is refused instead of created empty: a
    mistyped path is an error, not an empty store. Redis and SQL stores own their client or
    engine: call their ``close()`` when done.

    Raises:
        DeadLetterStoreURLError: the URL has no scheme tidings knows.
        UsageError: ``must_exist`` and the SQLite file does not exist.
        ImportError: the store's extra or the database driver is missing; the message says what
            to install.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("redis", "rediss"):
        from tidings.deadletter.redis import RedisDeadLetterStore  # noqa: PLC0415 - optional

        if name is None:
            return RedisDeadLetterStore.from_url(url)
        return RedisDeadLetterStore.from_url(url, prefix=name)
    if scheme == "memory":
        from tidings.memory import MemoryDeadLetterStore  # noqa: PLC0415 - keeps import light

        return MemoryDeadLetterStore()
    if not scheme:
        msg = f"{redact_url(url)!r} is not a dead-letter store URL: use one like {_EXAMPLES}"
        raise DeadLetterStoreURLError(msg)
    return _open_sql(url, scheme, name, must_exist=must_exist)


def iter_matching(
    store: DeadLetterStore, where: DeadLetterFilter, *, page_size: int = 500
) -> Iterator[DeadLetter]:
    """Yield the letters of ``store`` that ``where`` matches, newest first, once each.

    A :class:`~tidings.ports.FilteringDeadLetterStore` searches itself; any other store is read
    through ``list`` a page of ``page_size`` at a time and filtered here (a letter added or
    removed meanwhile may then shift a page: collect the ids before removing any).

    Raises:
        ValueError: ``page_size`` is below 1.
    """
    if page_size < 1:
        msg = f"page_size must be >= 1, not {page_size}"
        raise ValueError(msg)
    if isinstance(store, FilteringDeadLetterStore):
        return store.iter_matching(where, page_size=page_size)
    return _paged(store, where, page_size)


def _paged(store: DeadLetterStore, where: DeadLetterFilter, page_size: int) -> Iterator[DeadLetter]:
    seen: set[str] = set()
    offset = 0
    while page := store.list(limit=page_size, offset=offset):
        offset += len(page)
        for letter in page:
            if letter.id not in seen and where.matches(letter):
                seen.add(letter.id)
                yield letter


def find(
    store: DeadLetterStore, where: DeadLetterFilter, *, limit: int = 100, offset: int = 0
) -> list[DeadLetter]:
    """Return up to ``limit`` letters ``where`` matches, newest first, skipping ``offset`` of them.

    Raises:
        ValueError: ``limit`` or ``offset`` is negative.
    """
    if limit < 0 or offset < 0:
        msg = f"limit and offset must be >= 0, not {limit} and {offset}"
        raise ValueError(msg)
    if limit == 0:
        return []
    if where.is_empty:
        return store.list(limit=limit, offset=offset)  # the store's own paging, no letter read
    page_size = min(max(limit + offset, 1), 500)
    matching = iter_matching(store, where, page_size=page_size)
    return list(itertools.islice(matching, offset, offset + limit))


def _open_sql(url: str, scheme: str, name: str | None, *, must_exist: bool) -> DeadLetterStore:
    try:
        import sqlalchemy as sa  # noqa: PLC0415 - optional extra, imported when a store is made
    except ImportError as exc:
        msg = "the SQL dead-letter store needs SQLAlchemy: pip install 'tidings[sql]'"
        raise ImportError(msg, name=exc.name) from exc

    from tidings._sql import normalize_url  # noqa: PLC0415
    from tidings.deadletter.sql import SqlDeadLetterStore  # noqa: PLC0415

    try:
        sa.engine.make_url(normalize_url(url)).get_dialect()
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError) as exc:
        msg = (
            f"no dead-letter store for {scheme}:// URLs (SQLAlchemy knows no such database "
            f"either): use one like {_EXAMPLES}"
        )
        raise DeadLetterStoreURLError(msg) from exc
    try:
        if name is None:
            return SqlDeadLetterStore.from_url(url, must_exist=must_exist)
        return SqlDeadLetterStore.from_url(url, table_name=name, must_exist=must_exist)
    except ImportError as exc:
        database = scheme.split("+", maxsplit=1)[0]
        fix = _DRIVER_FIXES.get("mysql" if database == "mariadb" else database)
        fix = fix or "install the driver the URL names"
        msg = f"the {scheme}:// dead-letter store needs a database driver ({exc.name}): {fix}"
        raise ImportError(msg, name=exc.name) from exc
