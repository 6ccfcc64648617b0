"""What Prometheus metrics cost end to end, over Redis Streams and Celery: with and without.

Two ``tidings worker`` processes (one consumer each, inbox on, the no-op handler of
:mod:`benchmarks.apps.streams_bench`), each on its own streams: one started with
``--metrics-port`` (metrics installed, served), one without. The publisher (this process)
installs the metrics on a registry of its own for the rounds of the first and uninstalls them
for the second; the two runs of a round take turns going first (in an A/A run the second of a
pair came out up to 9% slower), both workers running throughout. Throughput counts from
the first publish until a marker, sent last, has been handled. :func:`celery_rows` does the
same with two prefork Celery workers. The issue's budget: at most 5%.
"""

from __future__ import annotations

import socket
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.apps import celery_bench
from benchmarks.apps.streams_bench import StreamPing, make
from benchmarks.harness import Row
from benchmarks.streams_e2e import CHUNK, _cleanup, _pop
from tidings import EventBus
from tidings.integrations.prometheus import install_metrics, uninstall_metrics
from tidings.testing.workers import celery_worker, running, wait_until

ROOT = Path(__file__).resolve().parent.parent
TIDINGS = str(Path(sys.executable).parent / "tidings")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _worker(*extra: str) -> list[str]:
    app = "benchmarks.apps.streams_bench:bus"
    return [TIDINGS, "worker", "--app", app, "--concurrency", "1", "--loglevel", "WARNING", *extra]


def _order(turn: int) -> tuple[bool, bool]:
    """Which run goes first in round ``turn``: they take turns (the second of a pair is slower)."""
    return (False, True) if turn % 2 == 0 else (True, False)


@contextmanager
def _counting(registry: CollectorRegistry) -> Iterator[None]:
    """The publisher's metrics installed for the block."""
    install_metrics(registry, service="bench")
    try:
        yield
    finally:
        uninstall_metrics()


def _handled(port: int) -> float:
    """The ``tidings_handled_total`` the worker on ``port`` serves, summed (0 if it is down)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
            text = answer.read().decode()
    except OSError:
        return 0.0
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "tidings_handled_total"
    )


def rows(*, quick: bool = False) -> list[Row]:
    """Measure and return the row: Streams e2e with metrics against the same without."""
    plain_name, counted_name = (f"bench_metrics_{uuid.uuid4().hex[:8]}" for _ in range(2))
    plain, plain_transport, client = make(plain_name)
    counted, counted_transport, counted_client = make(counted_name)
    rounds = 2 if quick else 10
    n = 10_000 if quick else 100_000
    registry = CollectorRegistry()
    port = _free_port()

    def drain(name: str, publish: Callable[..., None]) -> float:
        """Publish n events and a marker through ``publish``; return events/s to the marker."""
        events = [StreamPing(order_id=f"o-{i}", sequence=i) for i in range(n)]
        events.append(StreamPing(marker=True))
        chunks = [events[i : i + CHUNK] for i in range(0, len(events), CHUNK)]
        client.delete(f"{name}:done")
        start = time.perf_counter()
        for chunk in chunks:
            publish(*chunk)
        _pop(client, f"{name}:done", 300, "the marker")
        return n / (time.perf_counter() - start)

    with_metrics: list[float] = []
    without: list[float] = []
    sent = 0
    try:
        with (
            running(_worker(), {"BENCH_PREFIX": plain_name}, cwd=ROOT),
            running(_worker("--metrics-port", str(port)), {"BENCH_PREFIX": counted_name}, cwd=ROOT),
        ):
            for name, bus in ((plain_name, plain), (counted_name, counted)):
                bus.publish(StreamPing(marker=True))
                _pop(client, f"{name}:done", 60, "a tidings worker to start")
            for turn in range(rounds):
                for counting in _order(turn):
                    if counting:
                        with _counting(registry):
                            with_metrics.append(drain(counted_name, counted.publish))
                    else:
                        without.append(drain(plain_name, plain.publish))
                sent += n + 1
            served = _handled(port)
            # The warm-up marker, then every event and marker of the rounds, once each.
            assert served == sent + 1, f"the worker counted {served} runs, not {sent + 1}"
    finally:
        for name in (plain_name, counted_name):
            _cleanup(client, name)
        plain_transport.close()
        counted_transport.close()
        client.close()
        counted_client.close()
    ours, base = statistics.median(with_metrics), statistics.median(without)
    return [
        Row("streams e2e with metrics (worker --metrics-port, publisher install_metrics) "
            "vs the same without", round(ours), round(base), "events/s", round(ours / base, 2),
            0.95, ours / base >= 0.95),
    ]  # fmt: skip


def celery_rows(*, quick: bool = False) -> list[Row]:
    """The Celery row: batched publish → handler done, with metrics against the same without.

    Two prefork workers with one child each, on queues of their own: one serves the metrics
    (:func:`~tidings.integrations.prometheus.serve_celery_metrics`, multiprocess mode), one
    does not; the publisher installs the metrics for the first one's rounds only.
    """
    plain_name, counted_name = (f"bench_metrics_{uuid.uuid4().hex[:8]}" for _ in range(2))
    _, plain, plain_transport, _, client = celery_bench.make(plain_name, plain_name)
    _, counted, counted_transport, _, counted_client = celery_bench.make(counted_name, counted_name)
    rounds = 2 if quick else 10
    n = 2000 if quick else 20000
    port = _free_port()
    registry = CollectorRegistry()

    def drain(name: str, bus: EventBus) -> float:
        events = [celery_bench.Ping(order_id=f"o-{i}", sequence=i) for i in range(n)]
        events.append(celery_bench.Ping(marker=True))
        client.delete(f"{name}:done")
        start = time.perf_counter()
        bus.publish(*events)
        wait_until(lambda: client.get(f"{name}:done"), timeout=300, what="the marker")
        return n / (time.perf_counter() - start)

    with_metrics: list[float] = []
    without: list[float] = []
    with tempfile.TemporaryDirectory() as shared:
        counted_env = {"BENCH_QUEUE": counted_name, "BENCH_PREFIX": counted_name,
                       "BENCH_METRICS_PORT": str(port),
                       "PROMETHEUS_MULTIPROC_DIR": shared}  # fmt: skip
        try:
            with (
                celery_worker("benchmarks.apps.celery_bench", plain_name,
                              {"BENCH_QUEUE": plain_name, "BENCH_PREFIX": plain_name},
                              pool="prefork", concurrency=1, cwd=ROOT),
                celery_worker("benchmarks.apps.celery_bench", counted_name, counted_env,
                              pool="prefork", concurrency=1, cwd=ROOT),
            ):  # fmt: skip
                for name, bus in ((plain_name, plain), (counted_name, counted)):
                    client.delete(f"{name}:done")
                    bus.publish(celery_bench.Ping(marker=True))
                    wait_until(lambda n=name: client.get(f"{n}:done"), timeout=60)
                for turn in range(rounds):
                    for counting in _order(turn):
                        if counting:
                            with _counting(registry):
                                with_metrics.append(drain(counted_name, counted))
                        else:
                            without.append(drain(plain_name, plain))
                expected = rounds * (n + 1) + 1  # every event and marker, and the warm-up
                # The children write their counts every second: the last ones come a bit later.
                wait_until(lambda: _handled(port) == expected, timeout=30, what="every run served")
        finally:
            for name in (plain_name, counted_name):
                _cleanup(client, name)
            plain_transport.close()
            counted_transport.close()
            client.close()
            counted_client.close()
    ours, base = statistics.median(with_metrics), statistics.median(without)
    return [
        Row("celery e2e with metrics (serve_celery_metrics, prefork, publisher install_metrics) "
            "vs the same without", round(ours), round(base), "events/s", round(ours / base, 2),
            0.95, ours / base >= 0.95),
    ]  # fmt: skip
