"""End to end over Celery and Redis: publish → handler done, with a real worker process.

tidings (inbox on, no-op handler) against a plain Celery task per event sent with
``apply_async`` (no idempotency), on one worker (prefork, one child) of the same app, on the same
queue, measured in alternating rounds. Throughput counts from the first publish until a marker
event, sent last, has been handled. Latency is publish → handler start on an idle worker.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from benchmarks.apps.celery_bench import Ping, make
from benchmarks.harness import Row
from tidings.testing.workers import celery_worker, wait_until

ROOT = Path(__file__).resolve().parent.parent


def rows(*, quick: bool = False) -> list[Row]:  # noqa: PLR0915 - one scenario, told in order
    """Measure and return the Celery rows."""
    name = f"bench_{uuid.uuid4().hex[:8]}"
    _, bus, transport, plain, client = make(name, name)
    env = {"BENCH_QUEUE": name, "BENCH_PREFIX": name}
    rounds = 1 if quick else 3
    batched_n, single_n, latency_n = (2000, 300, 30) if quick else (20000, 2000, 200)

    def drain(send: Callable[[], None]) -> float:
        client.delete(f"{name}:done")
        start = time.perf_counter()
        send()
        wait_until(lambda: client.get(f"{name}:done"), timeout=300, what="the marker")
        return time.perf_counter() - start

    def tidings_batched() -> float:
        events = [Ping(order_id=f"o-{i}", sequence=i) for i in range(batched_n)]
        events.append(Ping(marker=True))
        return batched_n / drain(lambda: bus.publish(*events))

    def tidings_single() -> float:
        events = [Ping(order_id=f"o-{i}", sequence=i) for i in range(single_n)]

        def send() -> None:
            for event in events:
                bus.publish(event)
            bus.publish(Ping(marker=True))

        return single_n / drain(send)

    def plain_tasks() -> float:
        events = [Ping(order_id=f"o-{i}", sequence=i) for i in range(single_n)]

        def send() -> None:
            for event in events:
                plain.apply_async(args=(event.to_dict(),), queue=name)
            plain.apply_async(args=({"marker": True},), queue=name)

        return single_n / drain(send)

    def latencies(send: Callable[[str], None]) -> list[float]:
        client.delete(f"{name}:started")
        found: list[float] = []
        for i in range(latency_n):
            key = f"l-{i}"
            start = time.time()
            send(key)
            raw = wait_until(
                lambda: client.lindex(f"{name}:started", -1), timeout=30, what="a handler start"
            )
            while raw.decode().split("|")[0] != key:
                raw = wait_until(lambda: client.lindex(f"{name}:started", -1), timeout=30)
            found.append((float(raw.decode().split("|")[1]) - start) * 1e6)
        return found

    def send_tidings(key: str) -> None:
        bus.publish(Ping(order_id=key, latency=True))

    def send_plain(key: str) -> None:
        plain.apply_async(args=({"order_id": key, "latency": True},), queue=name)

    results: dict[str, list[float]] = {"batched": [], "single": [], "plain": []}
    with celery_worker(
        "benchmarks.apps.celery_bench", name, env, pool="prefork", concurrency=1, cwd=ROOT
    ):
        wait_until(lambda: drain(lambda: bus.publish(Ping(marker=True))), timeout=60)  # warm up
        for _ in range(rounds):
            results["batched"].append(tidings_batched())
            results["single"].append(tidings_single())
            results["plain"].append(plain_tasks())
        ours_latency = latencies(send_tidings)
        plain_latency = latencies(send_plain)
    for key in client.scan_iter(f"{name}*"):
        client.delete(key)
    transport.close()
    client.close()

    batched = statistics.median(results["batched"])
    single = statistics.median(results["single"])
    base = statistics.median(results["plain"])

    def pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    p50, p99 = pct(ours_latency, 0.5), pct(ours_latency, 0.99)
    b50, b99 = pct(plain_latency, 0.5), pct(plain_latency, 0.99)
    return [
        Row("celery e2e: batched publish vs plain task per event", round(batched), round(base),
            "events/s", round(batched / base, 2), 20, batched / base >= 20),
        Row("celery e2e: single-event publish vs plain task per event", round(single),
            round(base), "events/s", round(single / base, 2), 1, single / base >= 1),
        Row("celery latency p50: publish → handler start", round(p50), round(b50), "µs",
            round(b50 / p50, 2), None, None),
        Row("celery latency p99: publish → handler start", round(p99), round(b99), "µs",
            round(b99 / p99, 2), None, None),
    ]  # fmt: skip
