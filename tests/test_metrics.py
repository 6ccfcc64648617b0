"""Prometheus metrics: every hook counts into the right low-cardinality series."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import ClassVar

import pytest
import redis
import sqlalchemy as sa
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from sqlalchemy import orm
from tests.workers import ROOT, wait_until

from tidings import DomainEvent, EventBus, HandlerFailedError, _tracing, read, register_event
from tidings.codec import default_codec
from tidings.deadletter.redis import RedisDeadLetterStore
from tidings.delivery import Dispatcher, Received
from tidings.inbox.redis import RedisInbox
from tidings.integrations._families import FastCounter, FastHistogram, Gathered, Snapshots
from tidings.integrations.otel import install_tracing, uninstall_tracing
from tidings.integrations.prometheus import (
    install_metrics,
    metrics_installed,
    uninstall_metrics,
    watch_outbox,
)
from tidings.memory import MemoryDeadLetterStore, MemoryInbox
from tidings.outbox import Outbox, Relay
from tidings.retry import RetryPolicy
from tidings.transports.memory import MemoryBroker, MemoryTransport
from tidings.transports.redis_streams import RedisStreamsTransport

DEADLINE = 30.0


@register_event
@dataclass(frozen=True)
class PlateServed(DomainEvent):
    event_type: ClassVar[str] = "metrics_test.plate_served"
    table: int = 0


@register_event
@dataclass(frozen=True)
class BillPaid(DomainEvent):
    event_type: ClassVar[str] = "metrics_test.bill_paid"
    table: int = 0


class Spilled(Exception):
    pass


@pytest.fixture
def registry() -> Iterator[CollectorRegistry]:
    """Metrics installed on a fresh registry with service ``diner``, uninstalled after."""
    fresh = CollectorRegistry()
    install_metrics(fresh, service="diner")
    try:
        yield fresh
    finally:
        uninstall_metrics()


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """The sample's value, 0 when it does not exist (yet)."""
    found = registry.get_sample_value(name, {"service": "diner", **labels})
    return 0.0 if found is None else found


def test_nothing_is_counted_until_install_metrics_is_called():
    """Importing the integration installs nothing; uninstalling removes the hooks again."""
    assert not metrics_installed()
    assert _tracing.installed("metrics") is None
    install_metrics(CollectorRegistry())
    assert metrics_installed()
    uninstall_metrics()
    assert not metrics_installed()
    assert _tracing.hooks is None


def test_reinstalling_on_one_registry_replaces_the_series():
    """Installing twice on the same registry unregisters the first series instead of clashing."""
    fresh = CollectorRegistry()
    install_metrics(fresh, service="a")
    try:
        install_metrics(fresh, service="b")
        EventBus().publish(PlateServed())
        labels = {"system": "tidings", "event_type": PlateServed.event_type}
        assert fresh.get_sample_value("tidings_published_total", {"service": "b", **labels}) == 1
        assert fresh.get_sample_value("tidings_published_total", {"service": "a", **labels}) is None
    finally:
        uninstall_metrics()
    assert fresh.get_sample_value("tidings_published_total", {"service": "b", **labels}) is None


def test_the_in_process_bus_counts_published_handled_failed_and_timed_runs(registry):
    """An inline publish counts the event, each handler's outcome, duration and latency."""
    bus = EventBus()
    bus.add_handler(lambda event: None, PlateServed, name="kitchen.log")

    @bus.subscribe(PlateServed, name="kitchen.drop")
    def drop(event: PlateServed) -> None:
        raise Spilled("soup")

    with pytest.raises(HandlerFailedError):
        bus.publish(PlateServed(table=4))
    event = {"system": "tidings", "event_type": PlateServed.event_type}
    assert value(registry, "tidings_published_total", **event) == 1
    assert value(registry, "tidings_handled_total", **event, handler="kitchen.log",
                 outcome="done") == 1  # fmt: skip
    assert value(registry, "tidings_handled_total", **event, handler="kitchen.drop",
                 outcome="done") == 0  # fmt: skip
    assert value(registry, "tidings_handler_failures_total", **event, handler="kitchen.drop") == 1
    for handler in ("kitchen.log", "kitchen.drop"):
        run = {**event, "handler": handler}
        assert value(registry, "tidings_handler_duration_seconds_count", **run) == 1
        assert value(registry, "tidings_delivery_latency_seconds_count", **run) == 1


def test_delivery_latency_is_measured_from_occurred_at_and_never_negative(registry):
    """An event made a minute ago lands in the 60 s bucket; one from the future counts as 0."""
    bus = EventBus()
    bus.add_handler(lambda event: None, PlateServed, name="kitchen.late")
    past = (datetime.now(UTC) - timedelta(seconds=45)).isoformat()
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    bus.publish(PlateServed(occurred_at=past), PlateServed(occurred_at=future))
    run = {"system": "tidings", "event_type": PlateServed.event_type, "handler": "kitchen.late"}
    name = "tidings_delivery_latency_seconds"
    assert value(registry, f"{name}_count", **run) == 2
    assert value(registry, f"{name}_bucket", **run, le="0.001") == 1  # the future one, at 0
    assert value(registry, f"{name}_bucket", **run, le="30.0") == 1
    assert value(registry, f"{name}_bucket", **run, le="60.0") == 2
    assert 45 <= value(registry, f"{name}_sum", **run) < 60


def test_a_memory_transport_worker_counts_retries_dead_letters_and_duplicates(registry):
    """Each delivery of a failing handler retries then dead-letters; a redelivery is a duplicate."""
    broker = MemoryBroker()
    letters = MemoryDeadLetterStore()
    transport = MemoryTransport(
        dead_letters=letters,
        inbox=MemoryInbox(),
        broker=broker,
        queue="diner",
        retry=RetryPolicy(max_attempts=2, initial_delay=0.01, jitter=0.0),
    )
    bus = EventBus(transport=transport)
    bus.add_handler(lambda event: None, BillPaid, name="till.record")

    @bus.subscribe(BillPaid, name="till.print")
    def jam(event: BillPaid) -> None:
        raise Spilled("paper jam")

    transport.start()
    try:
        event = BillPaid(table=7)
        bus.publish(event)
        wait_until(lambda: len(letters.list()) == 1 and transport.idle(), what="a dead letter")
        transport.broker.put("diner", Received(default_codec.encode(event), destination="diner"))
        wait_until(lambda: len(letters.list()) == 2 and transport.idle(), what="the redelivery")
    finally:
        transport.close()
    labels = {"system": "memory", "event_type": BillPaid.event_type}
    record = {**labels, "handler": "till.record"}
    jammed = {**labels, "handler": "till.print"}
    assert value(registry, "tidings_published_total", **labels) == 1
    assert value(registry, "tidings_handled_total", **record, outcome="done") == 1
    assert value(registry, "tidings_handled_total", **record, outcome="duplicate") == 1
    assert value(registry, "tidings_handler_failures_total", **jammed) == 4  # 2 each delivery
    assert value(registry, "tidings_retries_total", **jammed, cause="error") == 2
    assert value(registry, "tidings_dead_letters_total", **labels, reason="handler") == 2
    assert value(registry, "tidings_handler_duration_seconds_count", **jammed) == 4
    assert value(registry, "tidings_handler_duration_seconds_count", **record) == 1  # not the skip


def test_a_claim_held_elsewhere_is_a_busy_retry_not_a_failure(registry):
    """A handler whose inbox claim another worker holds counts a busy retry, no failure or run."""
    bus = EventBus()
    bus.add_handler(lambda event: None, PlateServed, name="kitchen.claimed")
    inbox = MemoryInbox()
    worker = Dispatcher(bus, dead_letters=MemoryDeadLetterStore(), inbox=inbox, transport="test")
    event = PlateServed()
    body = default_codec.encode(event)
    with inbox.guard("kitchen.claimed", event.event_id, source=read(body).source):
        outcome = worker.dispatch(Received(body, destination="q"))
    assert len(outcome.retries) == 1
    run = {"system": "test", "event_type": PlateServed.event_type, "handler": "kitchen.claimed"}
    assert value(registry, "tidings_retries_total", **run, cause="busy") == 1
    assert value(registry, "tidings_retries_total", **run, cause="error") == 0
    assert value(registry, "tidings_handler_failures_total", **run) == 0
    assert value(registry, "tidings_handler_duration_seconds_count", **run) == 0


def test_a_workers_batch_measures_latency_from_occurred_at_like_the_bus(registry):
    """Runs a worker reports in one batch land in the same latency buckets as in-process runs."""
    bus = EventBus()
    bus.add_handler(lambda event: None, PlateServed, name="kitchen.batched")
    worker = Dispatcher(bus, dead_letters=MemoryDeadLetterStore(), transport="test")
    past = (datetime.now(UTC) - timedelta(seconds=45)).isoformat()
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    events = [PlateServed(occurred_at=past), PlateServed(occurred_at=future)]
    worker.dispatch_many([Received(default_codec.encode(e), destination="q") for e in events])
    run = {"system": "test", "event_type": PlateServed.event_type, "handler": "kitchen.batched"}
    name = "tidings_delivery_latency_seconds"
    assert value(registry, "tidings_handled_total", **run, outcome="done") == 2
    assert value(registry, "tidings_handler_duration_seconds_count", **run) == 2
    assert value(registry, f"{name}_count", **run) == 2
    assert value(registry, f"{name}_bucket", **run, le="0.001") == 1  # the future one, at 0
    assert value(registry, f"{name}_bucket", **run, le="30.0") == 1
    assert value(registry, f"{name}_bucket", **run, le="60.0") == 2
    assert 45 <= value(registry, f"{name}_sum", **run) < 60


def test_a_worker_with_metrics_and_tracing_traces_each_run_and_counts_the_batch(registry):
    """In a worker beside OpenTelemetry, every run still has its span, and every run is counted."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    install_tracing(provider)
    try:
        bus = EventBus()
        bus.add_handler(lambda event: None, PlateServed, name="kitchen.worked")
        worker = Dispatcher(bus, dead_letters=MemoryDeadLetterStore(), transport="test")
        bodies = [default_codec.encode(PlateServed()) for _ in range(3)]
        worker.dispatch_many([Received(body, destination="q") for body in bodies])
    finally:
        uninstall_tracing()
        provider.shutdown()
    handled = [s for s in exporter.get_finished_spans() if s.name == "handle kitchen.worked"]
    assert len(handled) == 3
    run = {"system": "test", "event_type": PlateServed.event_type, "handler": "kitchen.worked"}
    assert value(registry, "tidings_handled_total", **run, outcome="done") == 3


def test_metrics_and_tracing_installed_together_each_see_every_run(registry):
    """Beside OpenTelemetry tracing, a run is both a span and a count, and envelopes keep traces."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    install_tracing(provider)
    try:
        bus = EventBus()
        bus.add_handler(lambda event: None, PlateServed, name="kitchen.traced")
        with provider.get_tracer("test").start_as_current_span("request"):
            bus.publish(PlateServed())
            body = default_codec.encode(PlateServed())
    finally:
        uninstall_tracing()
        provider.shutdown()
    assert [s.name for s in exporter.get_finished_spans()][:2] == [
        "handle kitchen.traced",
        f"publish {PlateServed.event_type}",
    ]
    assert read(body).traceparent is not None
    run = {"system": "tidings", "event_type": PlateServed.event_type, "handler": "kitchen.traced"}
    assert value(registry, "tidings_handled_total", **run, outcome="done") == 1


def test_rejected_and_unrouted_messages_are_counted_without_their_ids(registry):
    """An undecodable body, a forged handler target and an event nobody takes count by kind."""
    bus = EventBus()
    bus.add_handler(lambda event: None, PlateServed, name="kitchen.only")
    worker = Dispatcher(bus, dead_letters=MemoryDeadLetterStore(), transport="test")
    worker.dispatch(Received(b"{not json", destination="q"))
    forged = "x" * 500 + "\nmalicious"
    body = default_codec.encode(PlateServed())
    worker.dispatch(Received(body, destination="q", handler=forged, attempt=1))
    worker.dispatch(Received(default_codec.encode(BillPaid()), destination="q"))
    assert value(registry, "tidings_rejected_total", system="test", reason="undecodable") == 1
    assert value(registry, "tidings_rejected_total", system="test", reason="refused") == 1
    assert value(registry, "tidings_dead_letters_total", system="test", event_type="",
                 reason="undecodable") == 1  # fmt: skip
    assert value(registry, "tidings_dead_letters_total", system="test",
                 event_type=PlateServed.event_type, reason="refused") == 1  # fmt: skip
    assert value(registry, "tidings_unrouted_total", system="test",
                 event_type=BillPaid.event_type) == 1  # fmt: skip
    for metric in registry.collect():
        for sample in metric.samples:
            assert all(len(v) <= 100 and "\n" not in v for v in sample.labels.values())


def test_label_values_are_bounded_and_printable(registry):
    """A handler name with a newline and 300 characters becomes a short, escaped label."""
    bus = EventBus()
    name = "kitchen." + "y" * 300 + "\nforged"
    bus.add_handler(lambda event: None, PlateServed, name=name)
    bus.publish(PlateServed())
    (label,) = {
        sample.labels["handler"]
        for metric in registry.collect()
        for sample in metric.samples
        if "handler" in sample.labels
    }
    assert len(label) <= 100
    assert label.isprintable()
    assert label.startswith("kitchen.yyy")


@pytest.fixture
def sqlite_outbox(tmp_path: Path) -> Iterator[tuple[sa.Engine, Outbox]]:
    """A SQLite database holding an outbox table."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'outbox.db'}")
    outbox = Outbox()
    outbox.create_tables(engine)
    yield engine, outbox
    engine.dispose()


def test_outbox_add_and_relay_count_published_relayed_batch_and_backlog(registry, sqlite_outbox):
    """Stored rows are published (system tidings), show as backlog, then as one relayed batch."""
    engine, outbox = sqlite_outbox
    watch_outbox(engine, outbox, registry, service="diner")
    with orm.Session(engine) as session:
        outbox.add(session, PlateServed(table=1), PlateServed(table=2), BillPaid(table=1))
        session.commit()
    table = {"table": "tidings_outbox"}
    assert value(registry, "tidings_outbox_up", **table) == 1
    assert value(registry, "tidings_outbox_pending_rows", **table) == 3
    assert value(registry, "tidings_outbox_oldest_pending_age_seconds", **table) >= 0
    stored = {"system": "tidings", "event_type": PlateServed.event_type}
    assert value(registry, "tidings_published_total", **stored) == 2
    inline = EventBus()
    inline.add_handler(lambda event: None, PlateServed, name="kitchen.relayed")
    assert Relay(engine, outbox, inline, listen=False).run_once() == 3
    assert value(registry, "tidings_published_total", **stored) == 2  # not counted again
    assert value(registry, "tidings_relayed_total", **table,
                 event_type=PlateServed.event_type) == 2  # fmt: skip
    assert value(registry, "tidings_relay_batch_size_count", **table) == 1
    assert value(registry, "tidings_relay_batch_size_sum", **table) == 3
    assert value(registry, "tidings_relay_lag_seconds_count", **table) == 3
    assert value(registry, "tidings_handled_total", **stored, handler="kitchen.relayed",
                 outcome="done") == 2  # fmt: skip
    assert value(registry, "tidings_outbox_pending_rows", **table) == 0
    assert value(registry, "tidings_outbox_oldest_pending_age_seconds", **table) == 0


def test_what_a_handler_the_relay_runs_inline_publishes_is_counted(registry, sqlite_outbox):
    """Events a handler publishes while the relay runs it in-process count as published."""
    engine, outbox = sqlite_outbox
    with orm.Session(engine) as session:
        outbox.add(session, PlateServed(table=1), PlateServed(table=2))
        session.commit()
    inline = EventBus()
    inline.add_handler(
        lambda event: inline.publish(BillPaid(table=event.table)), PlateServed, name="k.bill"
    )
    before = published(registry, BillPaid.event_type)
    assert Relay(engine, outbox, inline, listen=False).run_once() == 2
    assert published(registry, BillPaid.event_type) == before + 2
    relayed = {"system": "tidings", "event_type": PlateServed.event_type}
    assert value(registry, "tidings_published_total", **relayed) == 2  # the rows, not again


def published(registry, event_type: str) -> float:
    """Published events of ``event_type`` over every system."""
    return sum(
        sample.value
        for family in registry.collect()
        for sample in family.samples
        if sample.name == "tidings_published_total"
        and sample.labels.get("event_type") == event_type
    )


def test_the_outbox_gauges_answer_a_scrape_with_the_database_gone(registry, tmp_path):
    """A backlog query that fails reports tidings_outbox_up 0 instead of failing the scrape."""
    path = tmp_path / "gone.db"
    engine = sa.create_engine(f"sqlite:///{path}")
    outbox = Outbox()
    watch_outbox(engine, outbox, registry, service="diner")  # the table was never created
    assert value(registry, "tidings_outbox_up", table="tidings_outbox") == 0
    assert registry.get_sample_value("tidings_outbox_pending_rows", {"service": "diner",
                                      "table": "tidings_outbox"}) is None  # fmt: skip
    engine.dispose()


@pytest.mark.integration
def test_a_redis_streams_worker_counts_what_it_handled(registry, redis_url, unique_name):
    """Events through a real Redis stream count as published and handled, system redis-streams."""
    client = redis.Redis.from_url(redis_url)
    transport = RedisStreamsTransport(
        client,
        service="diner",
        stream_prefix=f"{unique_name}:stream",
        inbox=RedisInbox(client, prefix=f"{unique_name}:inbox"),
        dead_letters=RedisDeadLetterStore(client, prefix=f"{unique_name}:dlq"),
        block_ms=100,
    )
    stopping = threading.Event()
    thread = threading.Thread(target=transport.run, args=(stopping,), daemon=True)
    try:
        bus = EventBus(transport=transport)
        bus.add_handler(
            lambda event: client.rpush(f"{unique_name}:effects", event.event_id),
            PlateServed,
            name="kitchen.streamed",
        )
        transport.streams()  # the group exists before anything is published
        thread.start()
        bus.publish(PlateServed(table=1), PlateServed(table=2))
        run = {"system": "redis-streams", "event_type": PlateServed.event_type,
               "handler": "kitchen.streamed"}  # fmt: skip
        wait_until(
            lambda: value(registry, "tidings_handled_total", **run, outcome="done") == 2,
            timeout=DEADLINE,
            what="two handled runs counted",
        )
        assert client.llen(f"{unique_name}:effects") == 2
        published = {"system": "redis-streams", "event_type": PlateServed.event_type}
        assert value(registry, "tidings_published_total", **published) == 2
        assert value(registry, "tidings_delivery_latency_seconds_count", **run) == 2
        assert value(registry, "tidings_handler_duration_seconds_count", **run) == 2
    finally:
        stopping.set()
        if thread.is_alive():
            thread.join(DEADLINE)
        for key in client.scan_iter(f"{unique_name}*"):
            client.delete(key)
        transport.close()
        client.close()


def test_the_grafana_dashboard_queries_only_series_and_labels_the_integration_serves(
    registry, sqlite_outbox
):
    """Every series docs/grafana/tidings.json queries exists here, with the labels it groups by."""
    engine, outbox = sqlite_outbox
    watch_outbox(engine, outbox, registry)
    labels: dict[str, set[str]] = {}
    for family in registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
        for suffix in suffixes.get(family.type, [""]):
            labels[family.name + suffix] = set()
    # A labelled family shows its label names only once it has a sample: make one of each.
    bus = EventBus()
    bus.add_handler(lambda event: None, PlateServed, name="kitchen.everything")
    bus.publish(PlateServed())
    worker = Dispatcher(bus, dead_letters=MemoryDeadLetterStore(), transport="test")
    worker.dispatch(Received(b"{", destination="q"))
    worker.dispatch(Received(default_codec.encode(BillPaid()), destination="q"))
    with orm.Session(engine) as session:
        outbox.add(session, PlateServed())
        session.commit()
    Relay(engine, outbox, bus, listen=False).run_once()
    for family in registry.collect():
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    dashboard = json.loads((ROOT / "docs" / "grafana" / "tidings.json").read_text())
    assert dashboard["title"] == "tidings"
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert len(panels) >= 10
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            used = re.findall(r"\btidings_[a-z_]+", expr)
            assert used, expr
            for name in used:
                assert name in labels, f"{panel['title']}: {name} is not served"
                grouped = {g.strip() for by in re.findall(r"by \(([^)]*)\)", expr)
                           for g in by.split(",")}  # fmt: skip
                assert grouped <= labels[name] | {"le"}, f"{panel['title']}: {grouped}"
                assert 'service=~"$service"' in expr


def test_the_fast_histogram_exposes_what_prometheus_clients_histogram_does():
    """Same observations, same exposition: buckets (edges included), sums and counts per label."""
    buckets = (0.001, 0.01, 0.1, 1.0, 10.0)
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = FastHistogram("probe_seconds", "A probe", ["kind"], buckets)
    ours.register(fast)
    reference = Histogram("probe_seconds", "A probe", ["kind"], buckets=buckets, registry=theirs)
    for kind, amounts in (("a", [0.0, 0.001, 0.0011, 0.5, 10.0, 11.0]), ("b", [0.01, 3.0])):
        for amount in amounts:
            fast.labels(kind).observe(amount)
            reference.labels(kind).observe(amount)

    def exposed(registry: CollectorRegistry) -> list[str]:
        return [line for line in generate_latest(registry).decode().splitlines()
                if "_created" not in line]  # fmt: skip

    assert exposed(ours) == exposed(theirs)
    with pytest.raises(ValueError, match="takes 1 label values"):
        fast.labels("a", "b")


def test_gathered_sums_this_process_and_every_childs_snapshot(tmp_path):
    """Gathered adds each snapshot written to this process's live counts; bad entries skip."""
    counter = FastCounter("probe_runs", "Runs", ["kind"])
    timing = FastHistogram("probe_seconds", "A probe", ["kind"], (0.1, 1.0))
    families = (counter, timing)
    counter.labels("a").inc(2)
    timing.labels("a").observe(0.5)
    Snapshots(tmp_path, lambda: families).write()  # as a child would, under this pid
    (tmp_path / "tidings-1.json").write_text(
        json.dumps({"probe_runs": [[["a"], [3.0]], [["b"], [1.0]]],
                    "probe_seconds": [[["a"], [1.0, 0.0, 0.0, 0.05]], [["c"], [1.0]]]})
    )  # fmt: skip
    (tmp_path / "tidings-2.json").write_text("{torn")
    counter.labels("a").inc()  # this process counts on after its own snapshot
    registry = CollectorRegistry()
    registry.register(Gathered(tmp_path, lambda: families))
    assert registry.get_sample_value("probe_runs_total", {"kind": "a"}) == 2 + 3 + 3
    assert registry.get_sample_value("probe_runs_total", {"kind": "b"}) == 1
    assert registry.get_sample_value("probe_seconds_count", {"kind": "a"}) == 1 + 1 + 1
    assert registry.get_sample_value("probe_seconds_bucket", {"kind": "a", "le": "0.1"}) == 1
    assert registry.get_sample_value("probe_seconds_sum", {"kind": "a"}) == 0.5 + 0.5 + 0.05
    assert (
        registry.get_sample_value("probe_seconds_count", {"kind": "c"}) is None
    )  # not a histogram
