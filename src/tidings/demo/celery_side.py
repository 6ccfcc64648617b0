"""The shop as a Celery service: what the demo's worker processes and its relay share.

:func:`build` makes the Celery app, a :class:`~tidings.transports.celery.CeleryTransport`
with its inbox and dead-letter store, the shop and its journal, from :class:`CelerySettings`
that travel to the workers as environment variables. The broker is Redis or RabbitMQ; the
inbox is in Redis with a Redis broker, else in SQL (PostgreSQL: the shop's database; SQLite:
a file of its own, since a SQLite inbox holds the file's only write lock while a handler runs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from tidings.audit import AuditStore
from tidings.bus import EventBus
from tidings.demo.journal import BufferedJournal, CountingInbox, Journal, SqlJournal
from tidings.demo.shop import RETRY, Shop, make_engine
from tidings.demo.trail import Trail
from tidings.ports import DeadLetterStore, Inbox

__all__ = ["CelerySettings", "CelerySide", "build"]

_ENV = "TIDINGS_DEMO_"


@dataclass(frozen=True)
class CelerySettings:
    """Where the Celery side of one demo run lives.

    Attributes:
        broker: the Celery broker URL (``redis://`` or ``amqp://``).
        db: the SQLAlchemy URL of the shop's database.
        prefix: this run's name: the queue, the tables' and the Redis keys' prefix.
        seed: the shop's seed (which orders the loyalty handler fails on).
        metrics_port: where the worker serves its Prometheus metrics (0: nowhere).
    """

    broker: str
    db: str
    prefix: str
    seed: int = 0
    metrics_port: int = 0

    @property
    def redis_broker(self) -> bool:
        """Whether the broker is Redis (then the inbox and dead letters are in Redis too)."""
        return self.broker.startswith(("redis://", "rediss://"))

    def env(self) -> dict[str, str]:
        """The environment variables that carry these settings to a worker process."""
        return {
            f"{_ENV}BROKER": self.broker,
            f"{_ENV}DB": self.db,
            f"{_ENV}PREFIX": self.prefix,
            f"{_ENV}SEED": str(self.seed),
            f"{_ENV}METRICS_PORT": str(self.metrics_port),
        }

    @classmethod
    def from_env(cls) -> CelerySettings | None:
        """Read the settings :meth:`env` wrote, or ``None`` when they are not set."""
        if f"{_ENV}PREFIX" not in os.environ:
            return None
        return cls(
            os.environ[f"{_ENV}BROKER"],
            os.environ[f"{_ENV}DB"],
            os.environ[f"{_ENV}PREFIX"],
            int(os.environ.get(f"{_ENV}SEED", "0")),
            int(os.environ.get(f"{_ENV}METRICS_PORT", "0")),
        )


@dataclass
class CelerySide:
    """Everything :func:`build` wires together for one process."""

    settings: CelerySettings
    app: Any
    bus: EventBus
    shop: Shop
    journal: SqlJournal
    dead_letters: DeadLetterStore
    inbox: Inbox
    inbox_engine: sa.Engine
    redis: Any
    audit: AuditStore
    trail: Trail

    def create_tables(self, tenants: tuple[str, ...]) -> None:
        """Create the shop's, the journal's, the inbox's and the dead letters' tables."""
        self.shop.create_tables(tenants)
        self.journal.create_tables()
        for store in (self.dead_letters, getattr(self.inbox, "inner", None), self.audit):
            create = getattr(store, "create_tables", None)
            if create is not None:
                create()

    def dead_letters_prefix(self) -> str:
        """The Redis key prefix of the run's dead letters (its queue's default store)."""
        from tidings.transports._defaults import dead_letter_prefix  # noqa: PLC0415

        return dead_letter_prefix(self.settings.prefix)

    def clean_up(self) -> None:
        """Drop the run's tables and Redis keys, and release connections."""
        for store in (self.dead_letters, getattr(self.inbox, "inner", None), self.audit):
            table = getattr(store, "table", None)
            engine = getattr(store, "engine", None) or getattr(store, "_engine", None)
            if isinstance(table, sa.Table) and engine is not None:
                table.drop(engine, checkfirst=True)
        self.journal.drop_tables()
        self.shop.drop_tables()
        if self.redis is not None:
            for pattern in (f"{self.settings.prefix}*", f"{self.dead_letters_prefix()}*"):
                for key in self.redis.scan_iter(pattern):
                    self.redis.delete(key)
            self.redis.close()
        transport = self.bus.transport
        if transport is not None:
            transport.close()
        self.inbox_engine.dispose()
        self.shop.engine.dispose()


def build(settings: CelerySettings, *, buffered: bool = False) -> CelerySide:
    """Wire the Celery app, transport, inbox, dead letters, shop and journal for ``settings``.

    ``buffered`` writes the shop's journal entries in batches
    (:class:`~tidings.demo.journal.BufferedJournal`).

    Raises:
        ImportError: Celery (or redis-py for a Redis broker) is not installed.
    """
    from celery import Celery  # noqa: PLC0415 - the optional `celery` extra

    from tidings.transports.celery import CeleryTransport  # noqa: PLC0415

    engine = make_engine(settings.db)
    journal = SqlJournal(engine, table_name=f"{settings.prefix}_journal")
    writer: Journal = BufferedJournal(journal) if buffered else journal
    shop = Shop(engine, writer, seed=settings.seed, prefix=settings.prefix)
    outbox = shop.outbox.table.name
    client: Any = None
    inbox_engine = engine
    inner: Inbox
    dead_letters: DeadLetterStore
    audit: AuditStore
    if settings.redis_broker:
        import redis  # noqa: PLC0415

        from tidings.audit.redis import RedisAuditStore  # noqa: PLC0415
        from tidings.deadletter.redis import RedisDeadLetterStore  # noqa: PLC0415
        from tidings.inbox.redis import RedisInbox  # noqa: PLC0415
        from tidings.transports._defaults import dead_letter_prefix  # noqa: PLC0415

        client = redis.Redis.from_url(settings.broker)
        inner = RedisInbox(client, prefix=f"{settings.prefix}:inbox", lease=5.0, keep=3600.0)
        # The queue's default store, so that `tidings dlq list --service QUEUE` finds it.
        dead_letters = RedisDeadLetterStore(client, prefix=dead_letter_prefix(settings.prefix))
        audit = RedisAuditStore(client, prefix=f"{settings.prefix}:audit")
        audit_name = f"{settings.prefix}:audit"
        letters = ("--service", settings.prefix)
        trail = Trail(settings.broker, audit_name, settings.broker, letters, settings.db, outbox)
    else:
        from tidings.audit.sql import SqlAuditStore  # noqa: PLC0415
        from tidings.deadletter.sql import SqlDeadLetterStore  # noqa: PLC0415
        from tidings.inbox.sql import SqlInbox  # noqa: PLC0415

        if engine.dialect.name == "sqlite":
            inbox_engine = make_engine(str(engine.url).replace(".db", "-inbox.db"))
        inner = SqlInbox(inbox_engine, table_name=f"{settings.prefix}_inbox")
        dead_letters = SqlDeadLetterStore(engine, table_name=f"{settings.prefix}_dead_letters")
        audit = SqlAuditStore(engine, table_name=f"{settings.prefix}_audit")
        trail = Trail(
            settings.db,
            f"{settings.prefix}_audit",
            settings.db,
            ("--name", f"{settings.prefix}_dead_letters"),
            settings.db,
            outbox,
        )
    inbox = CountingInbox(inner, writer)
    app = Celery(f"tidings-demo-{settings.prefix}", broker=settings.broker)
    app.conf.update(
        task_default_queue=settings.prefix,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_prefetch_multiplier=4,
    )
    transport = CeleryTransport(
        app,
        queue=settings.prefix,
        inbox=inbox,
        dead_letters=dead_letters,
        retry=RETRY,
        exchange=f"{settings.prefix}.events",  # the run's own routing keys, removed with it
    )
    bus = EventBus(transport=transport)
    return CelerySide(
        settings, app, bus, shop, journal, dead_letters, inbox, inbox_engine, client, audit, trail
    )
