"""The CPU a ``tidings worker`` spends per event, with the metrics on and off (or A/A).

Throughput on a shared two-core machine swings by tens of percent from round to round; the
worker's own CPU time per event does not. The two workers of :mod:`benchmarks.metrics_e2e`
(one with ``--metrics-port``, one without; the publisher counting for the first one's
rounds) drain the same events in alternating rounds, and each round reads the worker's user
and system time (its process and children, from ``/proc``) before and after.
``python -m benchmarks.worker_cpu [rounds] [--aa]``: ``--aa`` starts both workers without
metrics, which shows the measurement's own bias (Linux only).
"""

from __future__ import annotations

import os
import statistics
import sys
import uuid
from contextlib import nullcontext
from pathlib import Path

from prometheus_client import CollectorRegistry

from benchmarks.apps.streams_bench import StreamPing, make
from benchmarks.metrics_e2e import ROOT, _counting, _free_port, _order, _worker
from benchmarks.streams_e2e import CHUNK, _cleanup, _pop
from tidings import EventBus
from tidings.testing.workers import running

_TICK = os.sysconf("SC_CLK_TCK")


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    found = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split():
                found += _tree(int(child))
    except OSError:
        pass  # gone meanwhile
    return found


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of ``pid`` and its descendants so far."""
    total = 0
    for one in _tree(pid):
        try:
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / _TICK


def measure(
    rounds: int = 8, n: int = 50_000, *, aa: bool = False
) -> tuple[list[float], list[float]]:
    """The worker CPU µs per event of each round: (with metrics, without)."""
    plain_name, counted_name = (f"bench_cpu_{uuid.uuid4().hex[:8]}" for _ in range(2))
    plain, plain_transport, client = make(plain_name)
    counted, counted_transport, counted_client = make(counted_name)
    registry = CollectorRegistry()
    extra = [] if aa else ["--metrics-port", str(_free_port())]

    def drain(name: str, bus: EventBus, pid: int) -> float:
        events = [StreamPing(order_id=f"o-{i}", sequence=i) for i in range(n)]
        events.append(StreamPing(marker=True))
        client.delete(f"{name}:done")
        before = cpu_seconds(pid)
        for i in range(0, len(events), CHUNK):
            bus.publish(*events[i : i + CHUNK])
        _pop(client, f"{name}:done", 300, "the marker")
        return (cpu_seconds(pid) - before) / n * 1e6

    on: list[float] = []
    off: list[float] = []
    try:
        with (
            running(_worker(), {"BENCH_PREFIX": plain_name}, cwd=ROOT) as plain_worker,
            running(_worker(*extra), {"BENCH_PREFIX": counted_name}, cwd=ROOT) as worker,
        ):
            for name, bus in ((plain_name, plain), (counted_name, counted)):
                bus.publish(StreamPing(marker=True))
                _pop(client, f"{name}:done", 60, "a tidings worker to start")
            for turn in range(rounds):
                for counting in _order(turn):
                    if counting:
                        with nullcontext() if aa else _counting(registry):
                            on.append(drain(counted_name, counted, worker.pid))
                    else:
                        off.append(drain(plain_name, plain, plain_worker.pid))
    finally:
        for name in (plain_name, counted_name):
            _cleanup(client, name)
        plain_transport.close()
        counted_transport.close()
        client.close()
        counted_client.close()
    return on, off


def main(argv: list[str]) -> None:
    """Measure and print the medians and each round's figures."""
    aa = "--aa" in argv
    numbers = [int(arg) for arg in argv if arg.isdigit()]
    on, off = measure(numbers[0] if numbers else 8, aa=aa)
    with_, without = statistics.median(on), statistics.median(off)
    print("with metrics", [round(x, 1) for x in on])
    print("without", [round(x, 1) for x in off])
    print(
        f"worker CPU per event{' (A/A)' if aa else ''}: {without:.1f} µs without, "
        f"{with_:.1f} µs with: {with_ - without:+.1f} µs ({(with_ / without - 1) * 100:+.1f}%)"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
