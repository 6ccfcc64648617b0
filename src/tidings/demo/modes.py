"""Where the demo's handlers run: worker threads in this process, or Celery worker processes.

A mode provides the shop, the bus the relay publishes to, the journal, the dead-letter store,
the audit store and where both are (:class:`~tidings.demo.trail.Trail`), and where the
handlers' metrics are scraped; :meth:`start` makes the workers consume, :meth:`idle` says
when nothing is left to do, :meth:`close` stops the workers and :meth:`clean_up` removes what
the run stored.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Protocol

from tidings.audit import AuditStore
from tidings.bus import EventBus
from tidings.demo.journal import CountingInbox, Journal, MemoryJournal
from tidings.demo.shop import RETRY, TENANTS, Shop, make_engine
from tidings.demo.trail import Trail
from tidings.memory import MemoryInbox
from tidings.ports import DeadLetterStore
from tidings.transports.memory import MemoryBroker, MemoryTransport

__all__ = ["CeleryMode", "EmbeddedMode", "Mode", "redacted"]


def redacted(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``."""
    return re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", url)


class Mode(Protocol):
    """What the demo needs from where its handlers run."""

    description: str
    shop: Shop
    bus: EventBus
    journal: Journal
    dead_letters: DeadLetterStore
    audit: AuditStore
    trail: Trail
    metrics_url: str | None
    """Where the handlers' metrics are served; ``None``: in this process."""

    def start(self, timeout: float) -> None:
        """Create the tables and make the workers consume; return once they do."""
        ...

    def idle(self) -> bool:
        """Whether no message is queued, running or waiting for a retry (as far as known)."""
        ...

    def close(self) -> None:
        """Stop the workers."""
        ...

    def clean_up(self) -> None:
        """Remove the run's tables and keys and release connections."""
        ...


def _free_port() -> int:
    """A local TCP port nobody listens on now (the worker binds it a moment later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class EmbeddedMode:
    """Handlers in worker threads of this process (:class:`MemoryTransport`), memory inbox.

    The dead letters and the audit trail are tables in the shop's database, so that the
    ``tidings`` commands can open them.
    """

    def __init__(self, db: str, prefix: str, seed: int, workers: int) -> None:
        from tidings.audit.sql import SqlAuditStore  # noqa: PLC0415 - the sql extra
        from tidings.deadletter.sql import SqlDeadLetterStore  # noqa: PLC0415

        self.journal: Journal = MemoryJournal()
        self.shop = Shop(make_engine(db), self.journal, seed=seed, prefix=prefix)
        self._letters = SqlDeadLetterStore(self.shop.engine, table_name=f"{prefix}_dead_letters")
        self.dead_letters: DeadLetterStore = self._letters
        self._audit = SqlAuditStore(self.shop.engine, table_name=f"{prefix}_audit")
        self.audit: AuditStore = self._audit
        letters = ("--name", f"{prefix}_dead_letters")
        self.trail = Trail(db, f"{prefix}_audit", db, letters, db, self.shop.outbox.table.name)
        self.metrics_url: str | None = None
        self.transport = MemoryTransport(
            dead_letters=self.dead_letters,
            queue=prefix,
            inbox=CountingInbox(MemoryInbox(), self.journal),
            retry=RETRY,
            workers=workers,
            broker=MemoryBroker(),  # the run's own queues
        )
        self.bus = EventBus(transport=self.transport)
        self.shop.subscribe(self.bus)
        database = self.shop.engine.dialect.name
        self.description = (
            f"embedded: {database} outbox, relay, {workers} worker threads (in-process "
            "transport), memory inbox"
        )

    def start(self, timeout: float) -> None:
        """Create the tables and start the worker threads."""
        self.shop.create_tables(TENANTS)
        self._letters.create_tables()
        self._audit.create_tables()
        self.transport.start()

    def idle(self) -> bool:
        """Whether every message was handled and no retry waits."""
        return self.transport.idle()

    def close(self) -> None:
        """Stop the worker threads."""
        self.transport.close()

    def clean_up(self) -> None:
        """Drop the shop's tables and release its connections."""
        for table in (self._letters.table, self._audit.table):
            table.drop(self.shop.engine, checkfirst=True)
        self.shop.drop_tables()
        self.shop.engine.dispose()


class CeleryMode:
    """Handlers in a real Celery worker (prefork, ``workers`` processes) started for the run.

    The worker runs ``celery -A tidings.demo.worker_app worker -E`` (task events on, for
    ``celery events`` and Flower) with this run's settings in its environment, and serves its
    metrics on a free local port; its output goes to ``worker.log`` in ``directory``, shown if
    it fails to start. The worker's journal entries come back through the database.
    """

    def __init__(
        self, broker: str, db: str, prefix: str, seed: int, *, workers: int, directory: Path
    ) -> None:
        from tidings.demo.celery_side import CelerySettings, build  # noqa: PLC0415

        self.settings = CelerySettings(broker, db, prefix, seed, metrics_port=_free_port())
        self.side = build(self.settings, buffered=True)
        self.shop = self.side.shop
        self.bus = self.side.bus
        self.journal: Journal = self.shop.journal
        self.dead_letters = self.side.dead_letters
        self.audit = self.side.audit
        self.trail = self.side.trail
        self.metrics_url: str | None = f"http://127.0.0.1:{self.settings.metrics_port}/metrics"
        self.workers = workers
        self.log_path = directory / "worker.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._seen = -1
        inbox = "Redis" if self.settings.redis_broker else "SQL"
        database = self.shop.engine.dialect.name
        self.description = (
            f"Celery: 1 worker, {workers} prefork processes, broker {redacted(broker)}, "
            f"{inbox} inbox, {database} outbox and results"
        )

    def start(self, timeout: float) -> None:
        """Create the tables, start the worker and wait until it consumes.

        Raises:
            RuntimeError: it did not get ready within ``timeout`` seconds (its log is quoted).
        """
        try:
            with self.side.app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, interval_start=0.5)
        except Exception as exc:
            msg = f"cannot reach the broker {redacted(self.settings.broker)}: {exc}"
            raise RuntimeError(msg) from exc
        self.side.create_tables(TENANTS)
        command = [
            sys.executable, "-m", "celery", "-A", "tidings.demo.worker_app", "worker",
            "-Q", self.settings.prefix, "--pool=prefork", f"--concurrency={self.workers}", "-E",
            "--without-heartbeat", "--without-gossip", "--without-mingle",
            "--loglevel=WARNING", "-n", f"{self.settings.prefix}@%h",
        ]  # fmt: skip
        with self.log_path.open("wb") as output:
            self._process = subprocess.Popen(  # noqa: S603 - our own command line
                command,
                env={**os.environ, **self.settings.env()},
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while self.journal.count("ready") < 1:
            if self._process.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                msg = f"the Celery worker did not get ready; its output:\n{tail}"
                raise RuntimeError(msg)
            time.sleep(0.05)

    def idle(self) -> bool:
        """Whether the journal stopped growing since the last call (workers are quiet)."""
        now = self.journal.count("log") + self.journal.count("duplicate")
        seen, self._seen = self._seen, now
        return seen == self._seen

    def close(self) -> None:
        """Stop the worker (SIGTERM to its process group, SIGKILL after a grace period)."""
        from tidings.testing.workers import stop  # noqa: PLC0415

        if self._process is not None:
            stop(self._process)
            self._process = None

    def clean_up(self) -> None:
        """Drop the run's tables and Redis keys."""
        self.side.clean_up()
