"""What the audit trail costs over Redis Streams: the end-to-end row with the audit on and off.

Two ``tidings worker`` processes (one consumer each, inbox on, no-op handler), each on streams
of its own: one plain, one with the audit installed (``BENCH_AUDIT``: a
:class:`~tidings.audit.redis.RedisAuditStore` on the same Redis server). In the audited rounds
the publishing process has the audit installed too, so every event leaves two records (its
publish and its handler run); it is uninstalled after each such round, once the marker was
handled, and that final flush is not timed (the writer threads work during the round, on the
same two cores). Both workers run for the whole measurement and the rounds alternate, as in
:mod:`benchmarks.streams_e2e`, the two runs of a round taking turns going first; throughput
counts from the first publish until the marker has been handled.

Two rows by default: with no store (``NoStore``: what the hooks and the writer thread cost the
two processes) and with the Redis store (that, plus encoding each batch and Redis's own work,
on the Redis server the stream uses). ``rows(kinds=("postgresql",))`` measures the SQL store
on the local PostgreSQL.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable

from benchmarks.apps.audit_store import bench_store
from benchmarks.apps.streams_bench import StreamPing, make
from benchmarks.harness import Row
from benchmarks.streams_e2e import CHUNK, ROOT, _cleanup, _pop, _worker
from tidings.audit import install_audit, uninstall_audit
from tidings.testing.workers import running

_STORES = {
    "none": "hooks and writer thread, no store",
    "redis": "Redis store",
    "postgresql": "PostgreSQL store",
}
TARGET = 0.9
"""The audited rate must be at least this share of the plain one (at most 10% slower)."""


def rows(*, quick: bool = False, kinds: tuple[str, ...] = ("none", "redis")) -> list[Row]:
    """The audit-on vs audit-off Streams rows, one for each store kind of ``kinds``."""
    return [row for kind in kinds for row in _rows(quick=quick, kind=kind)]


def _rows(*, quick: bool, kind: str) -> list[Row]:
    """Measure and return the audit-on vs audit-off Streams row, recording into ``kind``."""
    plain_name = f"bench_audit_off_{uuid.uuid4().hex[:8]}"
    audited_name = f"bench_audit_on_{uuid.uuid4().hex[:8]}"
    plain_bus, plain_transport, client = make(plain_name)
    audited_bus, audited_transport, audited_client = make(audited_name)
    store = bench_store(kind, audited_name, client)
    rounds = 1 if quick else 5
    n = 10_000 if quick else 100_000

    def drain(name: str, publish: Callable[..., None]) -> float:
        events = [StreamPing(order_id=f"o-{i}", sequence=i) for i in range(n)]
        events.append(StreamPing(marker=True))
        chunks = [events[i : i + CHUNK] for i in range(0, len(events), CHUNK)]
        client.delete(f"{name}:done")
        start = time.perf_counter()
        for chunk in chunks:
            publish(*chunk)
        _pop(client, f"{name}:done", 300, "the marker")
        return n / (time.perf_counter() - start)

    def audited() -> float:
        install_audit(store)
        try:
            return drain(audited_name, audited_bus.publish)
        finally:
            uninstall_audit()

    results: dict[str, list[float]] = {"off": [], "on": []}
    try:
        with (
            running(_worker(), {"BENCH_PREFIX": plain_name}, cwd=ROOT),
            running(_worker(), {"BENCH_PREFIX": audited_name, "BENCH_AUDIT": kind}, cwd=ROOT),
        ):
            for name, bus in ((plain_name, plain_bus), (audited_name, audited_bus)):
                bus.publish(StreamPing(marker=True))
                _pop(client, f"{name}:done", 60, "a tidings worker to start")
            for turn in range(rounds):
                # The two runs of a round take turns going first: the second of a pair comes
                # out slower (up to 9% in an A/A run, see benchmarks.metrics_e2e).
                for on in (False, True) if turn % 2 == 0 else (True, False):
                    if on:
                        results["on"].append(audited())
                    else:
                        results["off"].append(drain(plain_name, plain_bus.publish))
    finally:
        _cleanup(client, plain_name)
        _cleanup(client, audited_name)
        plain_transport.close()
        audited_transport.close()
        audited_client.close()
        client.close()
    on, off = statistics.median(results["on"]), statistics.median(results["off"])
    return [
        Row(f"streams e2e: audit trail on ({_STORES[kind]}) vs off, same run",
            round(on), round(off), "events/s", round(on / off, 2), TARGET, on / off >= TARGET),
    ]  # fmt: skip
