"""The ops page's trace search over 100,000 audited events: ``GET /?q=<correlation id>``.

Fills an audit store (Redis, and PostgreSQL when it is reachable) with 100,000 events of
25,000 requests (an order and the three follow-ups its handlers raised; a publish and two
handler runs each: 300,000 records; 10,000 events with ``--quick``), then asks the UI's search
route, through Starlette's TestClient, for random requests' correlation ids: each search reads
the trail by correlation id, redirects to the trace route, which builds the causal tree and
renders its SVG. The row reports the 95th percentile of a whole search (redirect followed)
against the 200 ms budget; the ratio is budget / p95, so at least 1 is the target met.
"""

from __future__ import annotations

import random
import statistics
import time
import uuid
import warnings

import redis

from benchmarks.apps.audit_store import POSTGRES_URL
from benchmarks.harness import Row
from tidings.audit import AuditRecord, AuditStore
from tidings.audit.redis import RedisAuditStore
from tidings.audit.sql import SqlAuditStore
from tidings.ui import OpsConfig, create_app

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient

BUDGET_MS = 200.0
EVENTS_PER_REQUEST = 4
BATCH = 5_000
REDIS_URL = "redis://127.0.0.1:6379/0"


def _request(index: int, start: float) -> list[AuditRecord]:
    """One request's 12 records: an order, three follow-ups, a publish and two runs each."""
    correlation_id = f"req-{index}-{uuid.uuid4().hex[:8]}"
    root = str(uuid.uuid4())
    events = [(root, "shop.order_placed", None)]
    events += [(str(uuid.uuid4()), f"shop.follow_up_{n}", root) for n in range(3)]
    records = []
    for offset, (event_id, event_type, cause) in enumerate(events):
        at = start + offset * 0.004
        common = {"event_type": event_type, "correlation_id": correlation_id,
                  "causation_id": cause, "tenant_id": f"tenant-{index % 50}",
                  "worker": "bench:1"}  # fmt: skip
        records.append(AuditRecord("published", event_id, at=at, duration=0.0004,
                                   detail="via redis-streams", **common))  # fmt: skip
        for run, handler in enumerate(("billing.charge", "mail.confirm")):
            records.append(AuditRecord("handled", event_id, handler=handler, attempt=1,
                                       at=at + 0.001 * (run + 1), duration=0.0008,
                                       **common))  # fmt: skip
    return records


def _fill(store: AuditStore, events: int) -> list[str]:
    """Write ``events`` events' records; return every request's correlation id."""
    now = time.time()
    ids: list[str] = []
    batch: list[AuditRecord] = []
    for index in range(events // EVENTS_PER_REQUEST):
        records = _request(index, now - 3600 + index * 0.1)
        ids.append(records[0].correlation_id or "")
        batch += records
        if len(batch) >= BATCH:
            store.write(batch)
            batch = []
    store.write(batch)
    return ids


def _search_ms(store: AuditStore, ids: list[str], searches: int) -> list[float]:
    """Time ``searches`` trace searches of random requests through the UI's routes."""
    web = TestClient(create_app(OpsConfig(audit=store)))
    chosen = random.Random(7).sample(ids, searches)  # noqa: S311 - which to ask, no secret
    web.get("/", params={"q": chosen[0]})  # warm: templates compiled, connections open
    times = []
    for correlation_id in chosen:
        start = time.perf_counter()
        page = web.get("/", params={"q": correlation_id})
        times.append((time.perf_counter() - start) * 1000)
        assert page.status_code == 200, page.status_code
        assert page.url.path == "/trace"
        assert page.text.count('class="row event"') == EVENTS_PER_REQUEST
    return times


def _row(kind: str, store: AuditStore, events: int, searches: int) -> Row:
    ids = _fill(store, events)
    times = _search_ms(store, ids, searches)
    p95 = statistics.quantiles(times, n=20)[-1]
    return Row(
        f"ops page: trace search over {events:,} audited events ({kind} store), p95 vs budget",
        round(p95, 1), BUDGET_MS, "ms", round(BUDGET_MS / p95, 2), 1.0, p95 < BUDGET_MS,
    )  # fmt: skip


def rows(*, quick: bool = False, postgres: bool = True) -> list[Row]:
    """The trace-search rows: the Redis store, and the PostgreSQL store when ``postgres``."""
    events = 10_000 if quick else 100_000
    searches = 40 if quick else 200
    name = f"bench_ui_{uuid.uuid4().hex[:8]}"
    made: list[Row] = []
    client = redis.Redis.from_url(REDIS_URL)
    try:
        made.append(_row("Redis", RedisAuditStore(client, prefix=name), events, searches))
    finally:
        for key in client.scan_iter(f"{name}:*"):
            client.delete(key)
        client.close()
    if postgres:
        store = SqlAuditStore.from_url(POSTGRES_URL, table_name=name)
        store.create_tables()
        try:
            made.append(_row("PostgreSQL", store, events, searches))
        finally:
            store.table.drop(store._engine, checkfirst=True)
            store.close()
    return made
