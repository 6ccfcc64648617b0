"""The audit store a benchmark records into, by name: ``redis``, ``postgresql`` or ``none``."""

from __future__ import annotations

import os
from collections.abc import Sequence

import redis

from tidings.audit import AuditRecord, AuditStore
from tidings.audit.redis import RedisAuditStore
from tidings.audit.sql import SqlAuditStore

POSTGRES_URL = os.environ.get(
    "TIDINGS_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


class NoStore:
    """Takes every batch and keeps nothing: the hooks' and the writer thread's cost alone."""

    def write(self, records: Sequence[AuditRecord]) -> None:
        """Drop ``records``."""

    def by_correlation(self, correlation_id: str) -> list[AuditRecord]:
        """Nothing is kept."""
        return []

    def by_event(self, event_id: str) -> list[AuditRecord]:
        """Nothing is kept."""
        return []

    def by_tenant(
        self, tenant_id: str, *, limit: int = 100, since: float | None = None
    ) -> list[AuditRecord]:
        """Nothing is kept."""
        return []

    def trim(self, older_than: float) -> int:
        """Nothing to remove."""
        return 0

    def close(self) -> None:
        """Nothing to release."""


def bench_store(kind: str, prefix: str, client: redis.Redis) -> AuditStore:
    """The store of ``kind`` for the run ``prefix`` (the SQL table is named after it)."""
    if kind == "redis":
        return RedisAuditStore(client, prefix=f"{prefix}:audit")
    if kind == "postgresql":
        store = SqlAuditStore.from_url(POSTGRES_URL, table_name=prefix)
        store.create_tables()
        return store
    return NoStore()
