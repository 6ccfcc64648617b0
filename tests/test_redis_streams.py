"""Redis Streams transport behaviour beyond the conformance suite: groups, reclaim, faults, trim."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from tests.apps.streams_faults import Deadly, Step, Stuck, make_bus
from tests.streams_harness import TIDINGS, SupervisedWorker
from tests.workers import ROOT, stop, wait_until

from tidings import event_context
from tidings.cli import make_cli
from tidings.deadletter.redis import RedisDeadLetterStore
from tidings.errors import PublishError
from tidings.ports import DeadLetter
from tidings.transports.redis_streams import RedisStreamsTransport

APP = "tests.apps.streams_faults:bus"
DEADLINE = 20.0


@pytest.fixture
def client(redis_url: str, unique_name: str) -> Iterator[redis.Redis]:
    """A client on the test server; every key under the test's name is deleted afterwards."""
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        keys = [*client.scan_iter(f"{unique_name}*")]
        if keys:
            client.delete(*keys)
        client.close()


@contextmanager
def consuming(transport: RedisStreamsTransport, concurrency: int = 1) -> Iterator[threading.Thread]:
    """Run ``transport``'s consumers in a thread for the block, then stop them gracefully."""
    stopping = threading.Event()
    thread = threading.Thread(
        target=transport.run, args=(stopping,), kwargs={"concurrency": concurrency}, daemon=True
    )
    thread.start()
    try:
        yield thread
    finally:
        stopping.set()
        thread.join(DEADLINE)
        assert not thread.is_alive(), "the consumers did not stop"


def effects(client: redis.Redis, prefix: str, service: str) -> list[str]:
    """The effects the service's handlers recorded, in order."""
    return [raw.decode() for raw in client.lrange(f"{prefix}:effects:{service}", 0, -1)]


def pending(client: redis.Redis, transport: RedisStreamsTransport) -> int:
    """Entries of the transport's service still pending on any of its streams."""
    streams = transport.streams()
    return sum(
        int(client.xpending(stream, streams.group)["pending"])
        for stream in streams.read
        if client.exists(stream)
    )


def letters(client: redis.Redis, prefix: str) -> list[DeadLetter]:
    """The dead letters stored under ``prefix``."""
    return RedisDeadLetterStore(client, prefix=f"{prefix}:dlq").list(limit=1000)


def worker_process(redis_url: str, prefix: str, service: str) -> subprocess.Popen[bytes]:
    """Start an unsupervised ``tidings worker`` of the faults app."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "FAULTS_REDIS": redis_url,
        "FAULTS_PREFIX": prefix,
        "FAULTS_SERVICE": service,
    }
    return subprocess.Popen(  # noqa: S603 - our own command line
        [TIDINGS, "worker", "--app", APP, "--transport", redis_url],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


@pytest.mark.integration
def test_each_service_receives_every_event_once(client: redis.Redis, unique_name: str) -> None:
    """Two services (two groups, one with three consumers) each take effect of every event once."""
    _, billing = make_bus(client, unique_name, service="billing")
    _, shipping = make_bus(client, unique_name, service="shipping")
    publisher, _ = make_bus(client, unique_name, service="publisher")
    events = [Step(seq=seq) for seq in range(60)]
    with consuming(billing), consuming(shipping, concurrency=3):
        publisher.publish(*events[:30])
        for event in events[30:]:
            publisher.publish(event)
        wanted = {event.event_id for event in events}
        for service, transport in (("billing", billing), ("shipping", shipping)):
            wait_until(
                lambda s=service, t=transport: (
                    set(effects(client, unique_name, s)) >= wanted and pending(client, t) == 0
                ),
                timeout=DEADLINE,
                what=f"{service} to handle every event",
            )
    for service in ("billing", "shipping"):
        seen = effects(client, unique_name, service)
        assert sorted(seen) == sorted(wanted), f"{service} repeated or missed an effect"


def test_entries_hold_the_envelope_alone_or_readable_headers_when_asked(
    client: redis.Redis, unique_name: str
) -> None:
    """An entry is the envelope alone, or with entry_headers also its ids; both are handled."""
    _, worker = make_bus(client, unique_name, service="billing")
    plain, lean = make_bus(client, unique_name, service="lean")
    labelled, _ = make_bus(client, unique_name, service="labelled", entry_headers=True)
    with event_context(correlation_id="req-9", tenant_id="acme"):
        first, second = Step(seq=1), Step(seq=2)
    plain.publish(first)
    labelled.publish(second)
    entries = client.xrange(lean.stream(Step))
    assert [sorted(fields) for _, fields in entries] == [
        [b"envelope"],
        sorted([b"envelope", b"tidings_event_type", b"tidings_event_id",
                b"tidings_correlation_id", b"tidings_tenant_id"]),
    ]  # fmt: skip
    assert entries[1][1][b"tidings_event_id"] == second.event_id.encode()
    assert entries[1][1][b"tidings_correlation_id"] == b"req-9"
    with consuming(worker):
        wait_until(
            lambda: (
                sorted(effects(client, unique_name, "billing"))
                == sorted([first.event_id, second.event_id])
            ),
            timeout=DEADLINE,
            what="both entries handled",
        )


@pytest.mark.integration
def test_killed_consumer_entry_is_reclaimed_and_takes_effect_once(
    client: redis.Redis, redis_url: str, unique_name: str
) -> None:
    """A worker killed (-9) mid-handler leaves its entry pending; another consumer reclaims it."""
    publisher, transport = make_bus(client, unique_name, service="orders")
    event = Stuck()
    process = worker_process(redis_url, unique_name, "orders")
    try:
        publisher.publish(event)
        wait_until(
            lambda: client.lrange(f"{unique_name}:started", 0, -1),
            timeout=DEADLINE,
            what="the handler to start",
        )
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(DEADLINE)
    finally:
        stop(process)
    assert pending(client, transport) == 1, "the killed worker's entry is not pending"
    with consuming(transport):
        wait_until(
            lambda: (
                f"stuck:{event.event_id}" in effects(client, unique_name, "orders")
                and pending(client, transport) == 0
            ),
            timeout=DEADLINE,
            what="the reclaimed entry to take effect",
        )
    assert effects(client, unique_name, "orders").count(event.event_id) == 1
    assert effects(client, unique_name, "orders").count(f"stuck:{event.event_id}") == 1


@pytest.mark.integration
def test_poison_entry_is_dead_lettered_after_max_deliveries(
    client: redis.Redis, redis_url: str, unique_name: str
) -> None:
    """An entry that kills its worker every time is dead-lettered; the others take effect once."""
    publisher, _ = make_bus(client, unique_name, service="orders")
    env = {
        "FAULTS_REDIS": redis_url,
        "FAULTS_PREFIX": unique_name,
        "FAULTS_SERVICE": "orders",
        "FAULTS_CLAIM_IDLE": "0.3",
        "FAULTS_MAX_DELIVERIES": "2",
    }
    before, deadly, after = Step(seq=0), Deadly(), [Step(seq=1), Step(seq=2)]
    worker = SupervisedWorker(APP, redis_url, env)
    try:
        publisher.publish(before, deadly, after[0])
        (letter,) = wait_until(
            lambda: [d for d in letters(client, unique_name) if d.event_id == deadly.event_id],
            timeout=DEADLINE,
            what="the poison entry's dead letter",
        )
        publisher.publish(after[1])
        wanted = {before.event_id, *(e.event_id for e in after)}
        wait_until(
            lambda: set(effects(client, unique_name, "orders")) >= wanted,
            timeout=DEADLINE,
            what="the other events to take effect",
        )
        restarts = worker.restarts
    finally:
        worker.close()
    assert letter.reason.startswith("DeliveryLimitExceeded"), letter.reason
    assert letter.event_type == "faults.deadly"
    assert letter.transport == "redis-streams"
    assert restarts == 2, f"the poison entry killed {restarts} workers, expected 2"
    seen = effects(client, unique_name, "orders")
    # Events read in the poison entry's batch may take effect again: the batch inbox settles
    # after the batch (tidings.ports.BatchInbox), and the crash came first. Later ones, once.
    assert all(seen.count(event_id) >= 1 for event_id in wanted), seen
    assert seen.count(after[1].event_id) == 1, seen


@pytest.mark.integration
def test_undecodable_entries_are_dead_lettered_at_once(
    client: redis.Redis, unique_name: str
) -> None:
    """Garbage bytes, and an entry with no envelope, are dead-lettered unretried; work goes on."""
    publisher, transport = make_bus(client, unique_name, service="orders")
    stream = transport.stream(Step)
    garbage = b"\xff\xfe\x00 not json"
    client.xadd(stream, {"envelope": garbage, "tidings_tenant_id": "t1"})
    client.xadd(stream, {"something": "else"})
    after = Step(seq=1)
    publisher.publish(after)
    with consuming(transport):
        found = wait_until(
            lambda: len(letters(client, unique_name)) == 2 and letters(client, unique_name),
            timeout=DEADLINE,
            what="two dead letters",
        )
        wait_until(
            lambda: (
                after.event_id in effects(client, unique_name, "orders")
                and pending(client, transport) == 0
            ),
            timeout=DEADLINE,
            what="the event after them",
        )
    by_body = {letter.body: letter for letter in found}
    assert set(by_body) == {garbage, b""}
    assert all(letter.attempts == 0 and letter.handler is None for letter in found)
    assert all(letter.reason.startswith("EventDecodeError") for letter in found), found
    assert by_body[garbage].headers["tidings_tenant_id"] == "t1"
    assert by_body[garbage].destination == stream


@pytest.mark.integration
def test_entry_deleted_while_pending_is_reported(client: redis.Redis, unique_name: str) -> None:
    """An entry trimmed by hand while pending is never lost silently: a dead letter says so."""
    publisher, transport = make_bus(client, unique_name, service="orders", claim_idle=0.2)
    stream = transport.stream(Step)
    client.xgroup_create(stream, "orders", id="0", mkstream=True)
    publisher.publish(Step())
    client.xreadgroup("orders", "ghost", {stream: ">"}, count=10)
    client.xtrim(stream, maxlen=0)
    with consuming(transport):
        (letter,) = wait_until(
            lambda: letters(client, unique_name), timeout=DEADLINE, what="the loss report"
        )
    assert letter.reason.startswith("EntryLost"), letter.reason
    assert letter.destination == stream


@pytest.mark.integration
def test_trimming_never_drops_entries_a_group_still_needs(
    client: redis.Redis, unique_name: str
) -> None:
    """trim() keeps every entry pending for, or unread by, any group; then trims to maxlen."""
    _, transport = make_bus(client, unique_name, service="orders", maxlen=2)
    stream = f"{unique_name}:trimmed"
    ids = [client.xadd(stream, {"n": str(n)}).decode() for n in range(10)]
    for group in ("fast", "slow", "idle"):
        client.xgroup_create(stream, group, id="0")
    fast = client.xreadgroup("fast", "c", {stream: ">"}, count=100)[0][1]
    client.xack(stream, "fast", *(entry_id for entry_id, _ in fast))
    assert transport.trim(stream) == 0, "trimmed entries the idle group never read"
    client.xgroup_destroy(stream, "idle")
    slow = client.xreadgroup("slow", "c", {stream: ">"}, count=6)[0][1]
    client.xack(stream, "slow", *(entry_id for entry_id, _ in slow[:3]))
    assert transport.trim(stream) == 3
    assert [e.decode() for e, _ in client.xrange(stream)] == ids[3:]
    client.xack(stream, "slow", *(entry_id for entry_id, _ in slow[3:]))
    assert transport.trim(stream) == 3, "entries the slow group never read were trimmed"
    rest = client.xreadgroup("slow", "c", {stream: ">"}, count=100)[0][1]
    client.xack(stream, "slow", *(entry_id for entry_id, _ in rest))
    assert transport.trim(stream) == 2
    assert [e.decode() for e, _ in client.xrange(stream)] == ids[-2:]


@pytest.mark.integration
def test_replay_goes_to_the_dead_lettering_service_and_handler_only(
    client: redis.Redis, unique_name: str
) -> None:
    """A replayed letter naming a handler reaches that service's handler, and no other service."""
    _, orders = make_bus(client, unique_name, service="orders")
    _, audit = make_bus(client, unique_name, service="audit")
    event = Step()
    letter = DeadLetter(
        body=orders.codec.encode(event),
        reason="HandlerError: for the test",
        handler="orders.record",
        headers={"tidings_group": "orders"},
        destination=orders.stream(Step),
    )
    audit.replay(letter)  # any service's transport replays to the service that failed
    with consuming(orders), consuming(audit):
        wait_until(
            lambda: (
                effects(client, unique_name, "orders") == [event.event_id]
                and pending(client, orders) == 0
            ),
            timeout=DEADLINE,
            what="the replayed delivery",
        )
    assert effects(client, unique_name, "audit") == []
    assert letters(client, unique_name) == []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def private_redis(directory: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """A redis-server of our own, persisting to ``directory`` (appendonly)."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not on PATH")
    process = subprocess.Popen(  # noqa: S603 - our own command line
        [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
         "--appendonly", "yes", "--save", ""],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        probe = redis.Redis(port=port)
        wait_until(lambda: _pings(probe), timeout=DEADLINE, what="the private redis-server")
        probe.close()
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(DEADLINE)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.mark.integration
def test_consumers_reconnect_after_redis_restarts(
    tmp_path: Path, unique_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Consumers ride out a Redis restart with bounded backoff and carry on by themselves."""
    port = _free_port()
    # redis-py retries a failed command itself (10 times by default, ~5 s); once here, so that
    # the transport's own backoff is what the test sees.
    client = redis.Redis(port=port, retry=Retry(ExponentialBackoff(cap=0.05), 1))
    publisher, transport = make_bus(client, unique_name, service="orders")
    first, second = [Step(seq=n) for n in range(3)], [Step(seq=n) for n in range(3, 6)]
    with private_redis(tmp_path, port) as server, consuming(transport, concurrency=2) as thread:
        publisher.publish(*first)
        wait_until(
            lambda: len(effects(client, unique_name, "orders")) == 3,
            timeout=DEADLINE,
            what="the first events",
        )
        with caplog.at_level(logging.WARNING, logger="tidings.streams"):
            with contextlib.suppress(redis.ConnectionError):  # the server hung up on us
                client.shutdown()
            server.wait(DEADLINE)
            down = time.monotonic()
            with pytest.raises(PublishError):
                publisher.publish(second[0])
            wait_until(
                lambda: sum("unreachable" in r.message for r in caplog.records) >= 2,
                timeout=DEADLINE,
                what="the consumers to notice",
            )
            with private_redis(tmp_path, port):
                publisher.publish(*second)
                wait_until(
                    lambda: len(effects(client, unique_name, "orders")) == 6,
                    timeout=DEADLINE,
                    what="the events published after the restart",
                )
                downtime = time.monotonic() - down
                assert thread.is_alive()
                seen = effects(client, unique_name, "orders")
                client.delete(*client.scan_iter(f"{unique_name}*"))
    retries = sum("unreachable" in r.message for r in caplog.records)
    # Backoff doubles from 0.1 s: a busy loop would log thousands of times.
    assert retries <= 2 * (downtime / 0.1 + 1), (retries, downtime)
    assert sorted(seen) == sorted(e.event_id for e in (*first, *second))
    client.close()


@pytest.mark.integration
def test_worker_command_stops_gracefully_on_sigterm(
    client: redis.Redis, redis_url: str, unique_name: str
) -> None:
    """`tidings worker` handles events, and on SIGTERM acknowledges and exits with status 0."""
    publisher, transport = make_bus(client, unique_name, service="orders")
    event = Step()
    process = worker_process(redis_url, unique_name, "orders")
    try:
        publisher.publish(event)
        wait_until(
            lambda: event.event_id in effects(client, unique_name, "orders"),
            timeout=DEADLINE,
            what="the worker to handle the event",
        )
        process.send_signal(signal.SIGTERM)
        assert process.wait(DEADLINE) == 0
    finally:
        stop(process)
    assert pending(client, transport) == 0


def test_worker_command_refuses_what_it_cannot_run() -> None:
    """`tidings worker` names the problem for a bad --app, a non-bus, and a non-Redis URL."""
    runner = CliRunner()
    result = runner.invoke(make_cli(), ["worker", "--app", "nocolon"])
    assert result.exit_code == 2
    assert "module:attribute" in result.output
    result = runner.invoke(make_cli(), ["worker", "--app", "tests.apps.streams_faults:Step"])
    assert result.exit_code == 1
    assert "not an EventBus" in result.output
    result = runner.invoke(make_cli(), ["worker", "--app", "tidings.testing.transport:nothing"])
    assert result.exit_code == 1


def test_streams_are_trimmed_by_default() -> None:
    """The default transport trims to DEFAULT_MAXLEN (100,000) entries beyond what groups need."""
    from tidings.memory import MemoryDeadLetterStore  # noqa: PLC0415
    from tidings.transports.redis_streams import DEFAULT_MAXLEN  # noqa: PLC0415

    transport = RedisStreamsTransport(
        redis.Redis(), service="orders", dead_letters=MemoryDeadLetterStore()
    )
    assert transport.maxlen == DEFAULT_MAXLEN == 100_000


@pytest.mark.integration
def test_running_worker_never_trims_what_a_slow_group_has_not_read(
    client: redis.Redis, unique_name: str
) -> None:
    """A worker trimming as it runs keeps every entry a slow group has not read yet."""
    publisher, transport = make_bus(
        client, unique_name, service="orders", maxlen=3, trim_interval=0.05
    )
    stream = transport.stream(Step)
    client.xgroup_create(stream, "slow", id="0", mkstream=True)
    events = [Step(seq=n) for n in range(10)]
    publisher.publish(*events)
    read = client.xreadgroup("slow", "c", {stream: ">"}, count=4)[0][1]
    client.xack(stream, "slow", *(entry_id for entry_id, _ in read))
    with consuming(transport):
        wait_until(
            lambda: len(effects(client, unique_name, "orders")) == 10 and client.xlen(stream) == 6,
            timeout=DEADLINE,
            what="the worker to handle everything and trim what the slow group read",
        )
    unread = client.xreadgroup("slow", "c", {stream: ">"}, count=100)[0][1]
    assert len(unread) == 6, "the worker trimmed entries the slow group had not read"


@pytest.mark.integration
def test_a_claim_held_for_ever_ends_as_a_dead_letter(
    client: redis.Redis, unique_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Busy-inbox redeliveries are bounded: past MAX_BUSY in a row the delivery is dead-lettered."""
    from tidings.transports import _streams_worker  # noqa: PLC0415

    monkeypatch.setattr(_streams_worker, "MAX_BUSY", 2)
    publisher, transport = make_bus(client, unique_name, service="orders")
    event = Step()
    assert transport.inbox is not None
    key = transport.inbox.key("orders.record", event.event_id, "/tidings")  # type: ignore[attr-defined]
    client.set(key, "a claim without expiry")
    publisher.publish(event)
    with consuming(transport):
        (letter,) = wait_until(
            lambda: letters(client, unique_name), timeout=DEADLINE, what="the busy dead letter"
        )
        wait_until(lambda: pending(client, transport) == 0, timeout=DEADLINE, what="the acks")
    assert letter.reason.startswith("RedeliveryLimitExceeded"), letter.reason
    assert letter.handler == "orders.record"
    assert letter.event_id == event.event_id
    assert client.zcard(transport.streams().retry) == 0
