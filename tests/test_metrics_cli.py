"""Served metrics: real ``tidings worker``, ``tidings relay`` and Celery worker processes."""

from __future__ import annotations

import socket
import sys
import urllib.request
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import orm
from tests.apps import celery_metrics
from tests.apps.metrics_streams import Cooked, make_bus
from tests.workers import ROOT, celery_worker, wait_until

from tidings.cli import make_cli
from tidings.outbox import Outbox
from tidings.testing.workers import running

TIDINGS = str(Path(sys.executable).parent / "tidings")
DEADLINE = 30.0
BAKED = {"service": "bakery", "system": "celery", "handler": "bakery.bake",
         "event_type": celery_metrics.LoafBaked.event_type}  # fmt: skip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def page(port: int) -> str | None:
    """The text served on ``port`` at /metrics, ``None`` while nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
            return str(answer.read().decode())
    except OSError:
        return None


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample served on ``port``, by name and labels; empty while nothing answers."""
    text = page(port) or ""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(port: int, name: str, **labels: str) -> float | None:
    return scrape(port).get((name, frozenset(labels.items())))


@pytest.mark.integration
def test_a_tidings_worker_serves_its_handling_metrics(redis_url, unique_name):
    """A worker with --metrics-port counts handled runs and dead letters, labelled by service."""
    client = redis.Redis.from_url(redis_url)
    port = free_port()
    bus, transport = make_bus(client, unique_name)
    env = {"METRICS_REDIS": redis_url, "METRICS_PREFIX": unique_name}
    command = [TIDINGS, "worker", "--app", "tests.apps.metrics_streams:bus",
               "--metrics-port", str(port)]  # fmt: skip
    try:
        transport.streams()  # the group exists before anything is published
        with running(command, env, cwd=ROOT) as worker:
            wait_until(lambda: scrape(port), timeout=DEADLINE, what="the metrics endpoint")
            bus.publish(Cooked(), Cooked(burnt=True))
            run = {"service": "kitchen", "system": "redis-streams", "event_type": Cooked.event_type}
            cook = {**run, "handler": "kitchen.cook", "outcome": "done"}
            wait_until(
                lambda: sample(port, "tidings_handled_total", **cook) == 2,
                timeout=DEADLINE,
                what="two handled runs served",
            )
            wait_until(
                lambda: sample(port, "tidings_dead_letters_total", **run, reason="handler") == 1,
                timeout=DEADLINE,
                what="the burnt dish's dead letter served",
            )
            served = scrape(port)
            burn = frozenset({**run, "handler": "kitchen.burn"}.items())
            assert served[("tidings_handler_failures_total", burn)] == 1
            assert served[("tidings_handler_duration_seconds_count", burn)] == 2
            assert served[("tidings_delivery_latency_seconds_count", burn)] == 2
            assert worker.poll() is None
        assert client.llen(f"{unique_name}:cooked") == 2
    finally:
        for key in client.scan_iter(f"{unique_name}*"):
            client.delete(key)
        transport.close()
        client.close()


@pytest.mark.integration
def test_a_tidings_relay_serves_its_backlog_and_relay_metrics(tmp_path, redis_url, unique_name):
    """A relay with --metrics-port serves the table's backlog, relayed events, batches and lag."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'outbox.db'}")
    outbox = Outbox()
    outbox.create_tables(engine)
    client = redis.Redis.from_url(redis_url)
    port = free_port()
    command = [TIDINGS, "relay", "--db", f"sqlite:///{tmp_path / 'outbox.db'}", "--transport",
               f"{redis_url}?prefix={unique_name}", "--poll-interval", "0.05",
               "--metrics-port", str(port)]  # fmt: skip
    table = {"service": "", "table": "tidings_outbox"}
    try:
        with running(command, {}, cwd=ROOT) as relay:
            wait_until(
                lambda: sample(port, "tidings_outbox_pending_rows", **table) == 0,
                timeout=DEADLINE,
                what="an empty backlog served",
            )
            assert sample(port, "tidings_outbox_up", **table) == 1
            with orm.Session(engine) as session:
                outbox.add(session, Cooked(), Cooked(), Cooked())
                session.commit()
            relayed = {**table, "event_type": Cooked.event_type}
            wait_until(
                lambda: sample(port, "tidings_relayed_total", **relayed) == 3,
                timeout=DEADLINE,
                what="three relayed events served",
            )
            served = scrape(port)
            labels = frozenset(table.items())
            assert served[("tidings_relay_batch_size_sum", labels)] == 3
            assert served[("tidings_relay_lag_seconds_count", labels)] == 3
            assert served[("tidings_outbox_pending_rows", labels)] == 0
            assert relay.poll() is None
        (stream,) = client.scan_iter(f"{unique_name}:*")
        assert client.xlen(stream) == 3
    finally:
        for key in client.scan_iter(f"{unique_name}*"):
            client.delete(key)
        client.close()
        engine.dispose()


def test_a_metrics_port_in_use_is_a_clear_error_before_anything_runs(tmp_path):
    """A relay whose metrics port is taken exits 1 naming the port, and relays nothing."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'outbox.db'}")
    outbox = Outbox()
    outbox.create_tables(engine)
    with orm.Session(engine) as session:
        outbox.add(session, Cooked())
        session.commit()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["relay", "--db", f"sqlite:///{tmp_path / 'outbox.db'}", "--transport",
                "memory://", "--once", "--metrics-port", str(port)]  # fmt: skip
        result = CliRunner().invoke(make_cli(), args)
    assert result.exit_code == 1, result.output
    assert f"cannot listen on 127.0.0.1:{port}" in result.output
    assert "Traceback" not in result.output
    assert outbox.status(engine).pending == 1
    engine.dispose()


@pytest.mark.integration
def test_a_prefork_celery_worker_serves_the_sum_over_its_children(redis_url, unique_name, tmp_path):
    """serve_celery_metrics serves what two pool children counted, beside multiprocess mode."""
    _app, bus, transport, client = celery_metrics.make(unique_name, unique_name)
    port = free_port()
    shared = tmp_path / "prometheus"
    shared.mkdir()
    # An application already in prometheus_client's multiprocess mode keeps it.
    env = {"METRICS_QUEUE": unique_name, "METRICS_PREFIX": unique_name,
           "METRICS_PORT": str(port), "PROMETHEUS_MULTIPROC_DIR": str(shared)}  # fmt: skip
    try:
        with celery_worker(
            "tests.apps.celery_metrics", unique_name, env, pool="prefork", concurrency=2
        ) as worker:
            wait_until(lambda: page(port) is not None, timeout=DEADLINE, what="the endpoint")
            for _ in range(6):
                bus.publish(celery_metrics.LoafBaked())
            wait_until(
                lambda: sample(port, "tidings_handled_total", **BAKED, outcome="done") == 6,
                timeout=DEADLINE,
                what="six handled runs served",
            )
            assert sample(port, "tidings_handler_duration_seconds_count", **BAKED) == 6
            assert sample(port, "tidings_delivery_latency_seconds_count", **BAKED) == 6
            children = {int(pid) for pid in client.smembers(f"{unique_name}:pids")}
            assert children
            assert worker.pid not in children  # the handlers ran in the pool's children
        assert client.llen(f"{unique_name}:baked") == 6
    finally:
        for key in client.scan_iter(f"{unique_name}*"):
            client.delete(key)
        transport.close()
        client.close()


@pytest.mark.integration
def test_the_runs_of_pool_children_that_exited_stay_counted(redis_url, unique_name):
    """Children replaced after each task (max tasks per child 1) leave every run counted."""
    _app, bus, transport, client = celery_metrics.make(unique_name, unique_name)
    port = free_port()
    env = {"METRICS_QUEUE": unique_name, "METRICS_PREFIX": unique_name,
           "METRICS_PORT": str(port), "METRICS_MAX_TASKS": "1"}  # fmt: skip
    try:
        with celery_worker("tests.apps.celery_metrics", unique_name, env, pool="prefork"):
            wait_until(lambda: page(port) is not None, timeout=DEADLINE, what="the endpoint")
            for _ in range(4):
                bus.publish(celery_metrics.LoafBaked())
            wait_until(
                lambda: client.llen(f"{unique_name}:baked") == 4,
                timeout=DEADLINE,
                what="four loaves baked",
            )
            wait_until(
                lambda: sample(port, "tidings_handled_total", **BAKED, outcome="done") == 4,
                timeout=DEADLINE,
                what="four handled runs served",
            )
            assert len(client.smembers(f"{unique_name}:pids")) == 4  # four children, one each
    finally:
        for key in client.scan_iter(f"{unique_name}*"):
            client.delete(key)
        transport.close()
        client.close()
