"""End to end over Redis Streams: publish → handler done, with a real ``tidings worker`` process.

tidings (``bus.publish`` in chunks of 100, one ``tidings worker`` process with one consumer,
inbox on, no-op handler) against a hand-written redis-py loop: the producer pipelines ``XADD``
of the same envelope bytes in batches of 100, and a consumer process (``python -m
benchmarks.apps.streams_bench``) reads with ``XREADGROUP COUNT 100`` and acknowledges each
batch with one ``XACK``. Both consumer processes run for the whole measurement (each idle,
blocked in its read, while the other is measured) and the rounds alternate. Throughput counts
from the first publish until a marker, sent last, has been handled (tidings) or acknowledged
(the loop). Latency is publish → handler start (the loop: → entry read) on an idle consumer.

:func:`memory_rows` (``python -m benchmarks --only streams-memory``) pushes 1,000,000 events
through one worker process and samples its resident set size.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import redis

from benchmarks.apps.streams_bench import LATENCY, MARKER, StreamPing, make, raw_stream
from benchmarks.harness import Row
from tidings.codec import default_codec
from tidings.testing.workers import running, wait_until

ROOT = Path(__file__).resolve().parent.parent
TIDINGS = str(Path(sys.executable).parent / "tidings")
CHUNK = 100


def _worker() -> list[str]:
    app = "benchmarks.apps.streams_bench:bus"
    return [TIDINGS, "worker", "--app", app, "--concurrency", "1", "--loglevel", "WARNING"]


def _cleanup(client: redis.Redis, prefix: str) -> None:
    """Delete every key of the run (streams, inbox markers, dead letters, probes)."""
    batch: list[bytes] = []
    for key in client.scan_iter(f"{prefix}*", count=10_000):
        batch.append(key)
        if len(batch) >= 10_000:
            client.unlink(*batch)
            batch = []
    if batch:
        client.unlink(*batch)


def _pop(client: redis.Redis, key: str, timeout: float, what: str) -> bytes:
    """BLPOP ``key`` for up to ``timeout`` s, in 1 s waits (redis-py's socket timeout is 5 s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply = client.blpop([key], timeout=1)
        if reply:
            return reply[1]  # type: ignore[no-any-return]
    msg = f"gave up after {timeout} s waiting for {what}"
    raise AssertionError(msg)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rows(*, quick: bool = False) -> list[Row]:  # noqa: PLR0915 - one scenario, told in order
    """Measure and return the Redis Streams rows."""
    name = f"bench_streams_{uuid.uuid4().hex[:8]}"
    bus, transport, client = make(name)
    env = {"BENCH_PREFIX": name}
    stream = raw_stream(name)
    rounds = 1 if quick else 5
    n, latency_n = (10_000, 30) if quick else (100_000, 200)

    def drain(send: Callable[[], None]) -> tuple[float, float]:
        """Return (seconds until the marker was handled, seconds the sending took)."""
        client.delete(f"{name}:done")
        start = time.perf_counter()
        send()
        sent = time.perf_counter()
        _pop(client, f"{name}:done", 300, "the marker")
        return time.perf_counter() - start, sent - start

    def ours() -> tuple[float, float]:
        events = [StreamPing(order_id=f"o-{i}", sequence=i) for i in range(n)]
        events.append(StreamPing(marker=True))
        chunks = [events[i : i + CHUNK] for i in range(0, len(events), CHUNK)]

        def send() -> None:
            for chunk in chunks:
                bus.publish(*chunk)

        return drain(send)

    def baseline() -> tuple[float, float]:
        events = [StreamPing(order_id=f"o-{i}", sequence=i) for i in range(n)]
        entries: list[dict[bytes, bytes]] = [{b"envelope": default_codec.encode(e)} for e in events]
        entries.append({b"envelope": default_codec.encode(StreamPing(marker=True)), MARKER: b"1"})
        batches = [entries[i : i + CHUNK] for i in range(0, len(entries), CHUNK)]

        def send() -> None:
            for batch in batches:
                with client.pipeline(transaction=False) as pipe:
                    for fields in batch:
                        pipe.xadd(stream, fields)  # type: ignore[arg-type]
                    pipe.execute()

        return drain(send)

    def probe(send: Callable[[str], None], key: str) -> float:
        start = time.time()
        send(key)
        while True:
            found, at = _pop(client, f"{name}:started", 30, "a handler start").decode().split("|")
            if found == key:
                return (float(at) - start) * 1e6

    def send_ours(key: str) -> None:
        bus.publish(StreamPing(order_id=key, latency=True))

    def send_raw(key: str) -> None:
        envelope = default_codec.encode(StreamPing(order_id=key, latency=True))
        client.xadd(stream, {b"envelope": envelope, LATENCY: key.encode()})

    results: dict[str, list[float]] = {"ours": [], "base": [], "ours_pub": [], "base_pub": []}
    ours_latency: list[float] = []
    base_latency: list[float] = []
    try:
        with (
            running(_worker(), env, cwd=ROOT),
            running([sys.executable, "-m", "benchmarks.apps.streams_bench"], env, cwd=ROOT),
        ):
            # Warm up both consumers (their groups start at id 0: nothing sent now is missed).
            bus.publish(StreamPing(marker=True))
            _pop(client, f"{name}:done", 60, "the tidings worker to start")
            client.xadd(stream, {b"envelope": b"{}", MARKER: b"1"})
            _pop(client, f"{name}:done", 60, "the raw consumer to start")
            for _ in range(rounds):
                for key, run in (("ours", ours), ("base", baseline)):
                    total, sending = run()
                    results[key].append(n / total)
                    results[f"{key}_pub"].append(n / sending)
            for i in range(latency_n):
                ours_latency.append(probe(send_ours, f"t-{i}"))
                time.sleep(0.002)
                base_latency.append(probe(send_raw, f"r-{i}"))
                time.sleep(0.002)
    finally:
        _cleanup(client, name)
        transport.close()
        client.close()

    e2e, base = statistics.median(results["ours"]), statistics.median(results["base"])
    pub, base_pub = statistics.median(results["ours_pub"]), statistics.median(results["base_pub"])
    p50, p99 = _pct(ours_latency, 0.5), _pct(ours_latency, 0.99)
    b50, b99 = _pct(base_latency, 0.5), _pct(base_latency, 0.99)
    return [
        Row("streams e2e: publish → no-op handler done (inbox on) vs raw XADD/XREADGROUP+XACK",
            round(e2e), round(base), "events/s", round(e2e / base, 2), 0.5, e2e / base >= 0.5),
        Row("streams e2e: its publish half (bus.publish × 100) vs pipelined XADD × 100",
            round(pub), round(base_pub), "events/s", round(pub / base_pub, 2), None, None),
        Row("streams latency p50: publish → handler start (raw: → entry read)", round(p50),
            round(b50), "µs", round(b50 / p50, 2), None, None),
        Row("streams latency p99: publish → handler start (raw: → entry read)", round(p99),
            round(b99), "µs", round(b99 / p99, 2), None, None),
    ]  # fmt: skip


def _rss_kb(pid: int) -> int | None:
    """Return the VmRSS of ``pid`` in kB, or None when it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


def memory_rows(*, quick: bool = False) -> list[Row]:
    """Push 1,000,000 events through one worker process; sample its RSS; return two rows.

    The worker trims its stream (``maxlen`` 100,000) as a production worker would; its RSS is
    read from ``/proc/<pid>/status`` every second. Flat means the peak of the last quarter of
    the samples is within 10% of the peak of the first quarter.
    """
    total = 100_000 if quick else 1_000_000
    name = f"bench_streams_mem_{uuid.uuid4().hex[:8]}"
    bus, transport, client = make(name)
    env = {"BENCH_PREFIX": name, "BENCH_MAXLEN": "100000"}
    samples: list[int] = []
    began = time.perf_counter()
    try:
        with running(_worker(), env, cwd=ROOT) as worker:
            bus.publish(StreamPing(marker=True))
            _pop(client, f"{name}:done", 60, "the tidings worker to start")
            idle = wait_until(lambda: _rss_kb(worker.pid), timeout=5, what="the worker's RSS")
            finished = threading.Event()

            def sample() -> None:
                while not finished.wait(1.0):
                    rss = _rss_kb(worker.pid)
                    if rss is not None:
                        samples.append(rss)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            start = time.perf_counter()
            for first in range(0, total, 500):
                bus.publish(
                    *(StreamPing(order_id=f"o-{i}", sequence=i) for i in range(first, first + 500))
                )
            bus.publish(StreamPing(marker=True))
            _pop(client, f"{name}:done", 1800, "the marker")
            elapsed = time.perf_counter() - start
            finished.set()
            sampler.join()
            samples.append(_rss_kb(worker.pid) or 0)
    finally:
        _cleanup(client, name)
        transport.close()
        client.close()
    quarter = max(1, len(samples) // 4)
    first_peak, last_peak, peak = max(samples[:quarter]), max(samples[-quarter:]), max(samples)
    flat = last_peak <= 1.1 * first_peak
    print(
        f"streams memory: {total:,} events through one worker in {elapsed:.1f} s "
        f"({total / elapsed:,.0f} events/s; {time.perf_counter() - began:.1f} s with start-up "
        f"and clean-up); {len(samples)} RSS samples, idle {idle / 1024:.1f} MB, peak "
        f"{peak / 1024:.1f} MB, first-quarter peak {first_peak / 1024:.1f} MB, last-quarter "
        f"peak {last_peak / 1024:.1f} MB: {'flat' if flat else 'GROWING'}\n"
    )
    return [
        Row(f"streams memory: worker peak RSS over {total:,} events vs idle worker",
            round(peak / 1024, 1), round(idle / 1024, 1), "MB", round(idle / peak, 2), None,
            None),
        Row("streams memory: last-quarter vs first-quarter peak RSS (flat: within 10%)",
            round(last_peak / 1024, 1), round(first_peak / 1024, 1), "MB",
            round(first_peak / last_peak, 2), 0.91, flat),
    ]  # fmt: skip
