"""The transactional outbox for SQLAlchemy 2, and the relay that empties it.

Events are stored in an outbox table in the same transaction as the change that raised them
(``pip install 'tidings[sql]'`` plus a driver), so a rollback leaves nothing and a commit
loses nothing; a :class:`Relay` then publishes committed rows and marks them only after the
broker confirmed::

    outbox = Outbox(Base.metadata)               # the table joins your metadata (Alembic)
    with Session(engine) as session, session.begin():
        session.add(order)
        outbox.add(session, OrderPlaced(order_id=order.id))

    Relay(engine, outbox, bus).run(stop)         # in the relay process: `tidings relay`

Or let aggregates record events (:class:`AggregateRoot`) and have the session write them at
flush (:func:`install_session_hook`). Supported: PostgreSQL (psycopg 3; LISTEN/NOTIFY
wake-up), MariaDB/MySQL (pymysql), SQLite (one relay per database). How the relay claims rows
without skipping a late-committing lower id, and keeps order per partition key across several
relays, is explained in :mod:`tidings.outbox.relay`.

Names are imported on first use, so importing this package alone needs no SQLAlchemy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tidings.outbox._common import Backoff, BatchReport, default_partition_key
    from tidings.outbox._table import outbox_table
    from tidings.outbox.relay import Publish, Relay
    from tidings.outbox.writer import (
        AggregateRoot,
        Outbox,
        OutboxStatus,
        PartitionLag,
        QuarantinedRow,
        StuckRow,
        install_session_hook,
    )

__all__ = [
    "AggregateRoot",
    "Backoff",
    "BatchReport",
    "Outbox",
    "OutboxStatus",
    "PartitionLag",
    "Publish",
    "QuarantinedRow",
    "Relay",
    "StuckRow",
    "default_partition_key",
    "install_session_hook",
    "outbox_table",
]

_WHERE = {
    "outbox_table": "_table",
    "Backoff": "_common",
    "BatchReport": "_common",
    "Publish": "relay",
    "Relay": "relay",
    "AggregateRoot": "writer",
    "Outbox": "writer",
    "OutboxStatus": "writer",
    "PartitionLag": "writer",
    "QuarantinedRow": "writer",
    "StuckRow": "writer",
    "default_partition_key": "_common",
    "install_session_hook": "writer",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        msg = f"module 'tidings.outbox' has no attribute {name!r}"
        raise AttributeError(msg)
    if module != "_common":
        # _table first: its import of SQLAlchemy fails with the message naming the extra.
        importlib.import_module("tidings.outbox._table")
    return getattr(importlib.import_module(f"tidings.outbox.{module}"), name)
