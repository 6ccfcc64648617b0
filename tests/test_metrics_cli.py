"""``--metrics-port``: real ``tidings worker`` and ``tidings relay`` processes serve /metrics."""

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
from tests.apps.metrics_streams import Cooked, make_bus
from tests.workers import ROOT, wait_until

from tidings.cli import make_cli
from tidings.outbox import Outbox
from tidings.testing.workers import running

TIDINGS = str(Path(sys.executable).parent / "tidings")
DEADLINE = 30.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample served on ``port``, by name and labels; empty while nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
            text = answer.read().decode()
    except OSError:
        return {}
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
