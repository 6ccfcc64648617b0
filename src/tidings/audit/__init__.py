"""The audit trail: what happened to every event, kept in a store you can query.

Off by default. :func:`install_audit` records, in this process, every publish, relay, handler
run (its outcome, duration, attempt and worker), retry, duplicate, dead letter and rejected
message as an :class:`AuditRecord` carrying the event's ids (event, correlation, causation,
tenant). Records go to a bounded in-memory queue; a background thread writes them to an
:class:`AuditStore` in batches, so a handler never waits on the store. Two stores:
:class:`~tidings.audit.redis.RedisAuditStore` (the ``redis`` extra) and
:class:`~tidings.audit.sql.SqlAuditStore` (the ``sql`` extra); :func:`open_audit_store` picks
one by URL. ``tidings trace CORRELATION_ID`` prints one request's causal tree from a store.

Importing this package imports neither redis-py nor SQLAlchemy, and starts nothing.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from tidings.audit._hooks import audit_installed, flush_audit, install_audit, uninstall_audit
from tidings.audit._record import KINDS, AuditRecord, AuditStore

__all__ = [
    "KINDS",
    "AuditRecord",
    "AuditStore",
    "audit_installed",
    "flush_audit",
    "install_audit",
    "open_audit_store",
    "uninstall_audit",
]

_EXAMPLES = "redis://localhost:6379/0, sqlite:///audit.db or postgresql+psycopg://user@host/db"


def open_audit_store(url: str, *, name: str | None = None, must_exist: bool = False) -> AuditStore:
    """Return the audit store at ``url``: Redis for ``redis://``/``rediss://``, else SQL.

    ``name`` is the Redis key prefix or the SQL table name, when not the default. A SQL
    store's table must exist (:meth:`~tidings.audit.sql.SqlAuditStore.create_tables`); with
    ``must_exist``, a SQLite file that does not exist is refused rather than created empty.
    The store owns its client or engine: call its ``close()`` when done.

    Raises:
        ValueError: the URL has no scheme.
        UsageError: ``must_exist`` and the SQLite file does not exist.
        ImportError: the store's extra or database driver is missing; the message says which.
    """
    from tidings._untrusted import redact_url  # noqa: PLC0415 - keeps this import light

    scheme = urlsplit(url).scheme.lower()
    if scheme in ("redis", "rediss"):
        from tidings.audit.redis import RedisAuditStore  # noqa: PLC0415 - optional extra

        return RedisAuditStore.from_url(url, **({} if name is None else {"prefix": name}))
    if not scheme:
        msg = f"{redact_url(url)!r} is not an audit store URL: use one like {_EXAMPLES}"
        raise ValueError(msg)
    from tidings.audit.sql import SqlAuditStore  # noqa: PLC0415 - optional extra

    options = {} if name is None else {"table_name": name}
    return SqlAuditStore.from_url(url, must_exist=must_exist, **options)
