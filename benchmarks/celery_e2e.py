"""End to end over Celery and Redis: publish → handler done, with real worker processes.

tidings (inbox on, no-op handler, one prefork worker with one child) against the baseline: a
plain Celery task per event sent with ``apply_async`` (no idempotency), handled by a stock Celery
worker with the same settings (:mod:`benchmarks.apps.celery_plain`). Both workers run for the
whole measurement, each on its own queue (the idle one blocked in its read), and the rounds
alternate. tidings' worker also serves the plain task: a third, informational figure runs it
there, showing what tidings' worker does for every task it runs. Throughput counts from the
first publish until a marker event, sent last, has been handled. Latency is publish → handler
start on an idle worker.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from benchmarks.apps.celery_bench import Ping, make, make_fanout
from benchmarks.harness import Row
from tidings import EventBus
from tidings.testing.workers import celery_worker, wait_until

ROOT = Path(__file__).resolve().parent.parent


def rows(*, quick: bool = False) -> list[Row]:  # noqa: PLR0915 - one scenario, told in order
    """Measure and return the Celery rows."""
    name = f"bench_{uuid.uuid4().hex[:8]}"
    stock = f"{name}_stock"
    _, bus, transport, plain, client = make(name, name)
    # What is measured is the default: events routed by type (the Redis subscription registry).
    assert transport.routes_by_type
    fanout_bus, fanout = make_fanout(name, name)
    env = {"BENCH_QUEUE": name, "BENCH_PREFIX": name}
    stock_env = {"BENCH_PLAIN_QUEUE": stock, "BENCH_PREFIX": name}
    rounds = 1 if quick else 3
    batched_n, single_n, latency_n = (2000, 300, 30) if quick else (20000, 2000, 200)

    def drain(send: Callable[[], None]) -> float:
        client.delete(f"{name}:done")
        start = time.perf_counter()
        send()
        wait_until(lambda: client.get(f"{name}:done"), timeout=300, what="the marker")
        return time.perf_counter() - start

    def tidings_batched(bus: EventBus = bus) -> float:
        events = [Ping(order_id=f"o-{i}", sequence=i) for i in range(batched_n)]
        events.append(Ping(marker=True))
        return batched_n / drain(lambda: bus.publish(*events))

    def tidings_single(bus: EventBus = bus) -> float:
        events = [Ping(order_id=f"o-{i}", sequence=i) for i in range(single_n)]

        def send() -> None:
            for event in events:
                bus.publish(event)
            bus.publish(Ping(marker=True))

        return single_n / drain(send)

    def plain_tasks(queue: str) -> float:
        events = [Ping(order_id=f"o-{i}", sequence=i) for i in range(single_n)]

        def send() -> None:
            for event in events:
                plain.apply_async(args=(event.to_dict(),), queue=queue)
            plain.apply_async(args=({"marker": True},), queue=queue)

        return single_n / drain(send)

    def publish_cpu(bus: EventBus, batched: bool) -> float:
        """The publishing process's CPU time per event (µs): what routing adds is spent there."""
        n = batched_n if batched else single_n
        events = [Ping(order_id=f"c-{i}", sequence=i) for i in range(n)]
        start = time.process_time()
        if batched:
            bus.publish(*events)
        else:
            for event in events:
                bus.publish(event)
        spent = time.process_time() - start
        drain(lambda: bus.publish(Ping(marker=True)))  # the worker has caught up
        return spent / n * 1e6

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
        plain.apply_async(args=({"order_id": key, "latency": True},), queue=stock)

    results: dict[str, list[float]] = {
        "batched": [], "single": [], "plain": [], "shared": [], "fan_batched": [],
        "fan_single": [], "cpu_batched": [], "cpu_single": [], "cpu_fan_batched": [],
        "cpu_fan_single": [],
    }  # fmt: skip
    with (
        celery_worker(
            "benchmarks.apps.celery_bench", name, env, pool="prefork", concurrency=1, cwd=ROOT
        ),
        celery_worker(
            "benchmarks.apps.celery_plain",
            stock,
            stock_env,
            pool="prefork",
            concurrency=1,
            cwd=ROOT,
        ),
    ):
        # Warm both up: the first message of each worker is handled.
        wait_until(lambda: drain(lambda: bus.publish(Ping(marker=True))), timeout=60)
        wait_until(
            lambda: drain(lambda: plain.apply_async(args=({"marker": True},), queue=stock)),
            timeout=60,
        )
        for _ in range(rounds):
            results["batched"].append(tidings_batched())
            results["single"].append(tidings_single())
            results["plain"].append(plain_tasks(stock))
            results["shared"].append(plain_tasks(name))
            results["fan_batched"].append(tidings_batched(fanout_bus))
            results["fan_single"].append(tidings_single(fanout_bus))
        for _ in range(rounds * 3):  # cheap and steadier: more rounds
            results["cpu_single"].append(publish_cpu(bus, batched=False))
            results["cpu_fan_single"].append(publish_cpu(fanout_bus, batched=False))
            results["cpu_batched"].append(publish_cpu(bus, batched=True))
            results["cpu_fan_batched"].append(publish_cpu(fanout_bus, batched=True))
        ours_latency = latencies(send_tidings)
        plain_latency = latencies(send_plain)
    for key in client.scan_iter(f"{name}*"):
        client.delete(key)
    transport.close()
    fanout.close()
    client.close()

    batched = statistics.median(results["batched"])
    single = statistics.median(results["single"])
    base = statistics.median(results["plain"])
    shared = statistics.median(results["shared"])
    fan_batched = statistics.median(results["fan_batched"])
    fan_single = statistics.median(results["fan_single"])
    cpu = {key: statistics.median(results[f"cpu_{key}"]) for key in ("single", "fan_single",
           "batched", "fan_batched")}  # fmt: skip

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
        Row("celery e2e: single-event publish vs plain task on tidings' worker", round(single),
            round(shared), "events/s", round(single / shared, 2), None, None),
        Row("celery e2e: plain task on tidings' worker vs on a stock worker", round(shared),
            round(base), "events/s", round(shared / base, 2), None, None),
        Row("celery routing by type: batched publish vs publish_to=[queue]", round(batched),
            round(fan_batched), "events/s", round(batched / fan_batched, 2), 0.9,
            batched / fan_batched >= 0.9),
        Row("celery routing by type: single-event publish vs publish_to=[queue]", round(single),
            round(fan_single), "events/s", round(single / fan_single, 2), 0.9,
            single / fan_single >= 0.9),
        Row("celery publish CPU, single event: routed by type vs publish_to=[queue]",
            round(cpu["single"], 1), round(cpu["fan_single"], 1), "µs/event",
            round(cpu["fan_single"] / cpu["single"], 2), 0.9,
            cpu["fan_single"] / cpu["single"] >= 0.9),
        Row("celery publish CPU, batched: routed by type vs publish_to=[queue]",
            round(cpu["batched"], 1), round(cpu["fan_batched"], 1), "µs/event",
            round(cpu["fan_batched"] / cpu["batched"], 2), 0.9,
            cpu["fan_batched"] / cpu["batched"] >= 0.9),
        Row("celery latency p50: publish → handler start", round(p50), round(b50), "µs",
            round(b50 / p50, 2), None, None),
        Row("celery latency p99: publish → handler start", round(p99), round(b99), "µs",
            round(b99 / p99, 2), None, None),
    ]  # fmt: skip
