"""Fault tests of the outbox relay: real ``tidings relay`` processes killed, a broker stopped.

Every test has its own outbox table in PostgreSQL and its own Redis stream prefix, runs the
relay as a real process (``tidings relay --transport tests.apps.outbox_faults:relay_transport``) and
checks the promise by reconciliation: the events committed (read back from the outbox, or
reported by the process that committed them) against what reached the stream, and, where
"effect once" is the claim, against what a real ``tidings worker`` (RedisInbox, effects counted
per event id in Redis) did with them. Order is checked per partition key as the order in which
event ids first appear on the stream, against the outbox ids (the commit order here: every test
commits from one thread).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from random import Random

import pytest
import redis
import sqlalchemy as sa
from tests.apps.outbox_faults import Tick
from tests.tcp_proxy import Proxy
from tests.workers import ROOT, stop, wait_until

from conftest import require_server
from tidings.outbox import Outbox

pytestmark = pytest.mark.integration

TIDINGS = str(Path(sys.executable).parent / "tidings")
PUBLISH = "tests.apps.outbox_faults:relay_transport"
BUS = "tests.apps.outbox_faults:bus"
STREAM = Tick.event_type
DEADLINE = 30.0


@dataclass
class Scene:
    """One test's outbox table, broker keys, and the processes it started."""

    db_url: str
    engine: sa.Engine
    outbox: Outbox
    prefix: str
    logs: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def stream(self) -> str:
        return f"{self.prefix}:stream:{STREAM}"

    def spawn(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Start ``command`` in its own process group, its output in ``logs/name.log``."""
        with (self.logs / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(  # noqa: S603 - our own command line
                command,
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes.append(process)
        return process

    def relay(
        self, redis_url: str, *args: str, name: str = "relay", hold: bool = False
    ) -> subprocess.Popen[bytes]:
        """Start ``tidings relay`` on this test's table, publishing to ``redis_url``."""
        env = {"OUTBOX_FAULTS_REDIS": redis_url, "OUTBOX_FAULTS_PREFIX": self.prefix}
        if hold:
            env["OUTBOX_FAULTS_HOLD"] = f"{self.prefix}:hold"
        command = [TIDINGS, "relay", "--db", self.db_url, "--table", self.outbox.table.name,
                   "--transport", PUBLISH, "--poll-interval", "0.1", *args]  # fmt: skip
        return self.spawn(name, command, env)

    def worker(self, redis_url: str) -> subprocess.Popen[bytes]:
        """Start ``tidings worker`` of the consuming service (RedisInbox, effects counted)."""
        env = {"OUTBOX_FAULTS_REDIS": redis_url, "OUTBOX_FAULTS_PREFIX": self.prefix}
        command = [TIDINGS, "worker", "--app", BUS, "--loglevel", "WARNING"]
        return self.spawn("worker", command, env)

    def wait(
        self, condition: Callable[[], object], what: str, *logs: str, timeout: float = DEADLINE
    ) -> None:
        """Wait for ``condition``; on timeout, fail showing the output of the ``logs``."""
        try:
            wait_until(condition, timeout=timeout, what=what)
        except AssertionError as exc:
            output = "".join(f"\n--- {name} ---\n{self.log(name)}" for name in logs)
            raise AssertionError(f"{exc}{output}") from None

    def log(self, name: str) -> str:
        """The last lines a process wrote, for assertion messages."""
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def commit(self, events: Iterable[Tick], per_transaction: int = 10) -> list[Tick]:
        """Commit ``events`` into the outbox, ``per_transaction`` at a time; return them."""
        committed = list(events)
        for start in range(0, len(committed), per_transaction):
            with self.engine.begin() as connection:
                self.outbox.add(connection, *committed[start : start + per_transaction])
        return committed

    def rows(self) -> list[tuple[int, str, str, bool]]:
        """Every outbox row: (id, event_id, partition_key, published)."""
        table = self.outbox.table
        query = sa.select(
            table.c.id, table.c.event_id, table.c.partition_key, table.c.published_at.is_not(None)
        ).order_by(table.c.id)
        with self.engine.connect() as connection:
            return [(row[0], row[1], row[2], bool(row[3])) for row in connection.execute(query)]

    def pending(self) -> int:
        return self.outbox.status(self.engine, partitions=0).pending

    def max_attempts(self) -> int:
        """The most failed publish attempts a pending row went through."""
        table = self.outbox.table
        query = sa.select(sa.func.max(table.c.attempts)).where(table.c.published_at.is_(None))
        with self.engine.connect() as connection:
            return int(connection.execute(query).scalar() or 0)


@pytest.fixture(scope="module")
def db_url() -> str:
    return require_server("postgresql")


@pytest.fixture
def scene(db_url: str, unique_name: str, tmp_path: Path) -> Iterator[Scene]:
    """The test's own outbox table; every process it started is stopped, the table dropped."""
    engine = sa.create_engine(db_url)
    outbox = Outbox(table_name=unique_name)
    outbox.create_tables(engine)
    scene = Scene(db_url, engine, outbox, unique_name, tmp_path)
    try:
        yield scene
    finally:
        for process in scene.processes:
            stop(process)
        outbox.drop_tables(engine)
        engine.dispose()


@pytest.fixture
def client(redis_url: str, unique_name: str) -> Iterator[redis.Redis]:
    """A client on the shared test Redis; every key of the test is deleted afterwards."""
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        delete_keys(client, unique_name)
        client.close()


def delete_keys(client: redis.Redis, prefix: str) -> None:
    keys = [*client.scan_iter(f"{prefix}*")]
    if keys:
        client.delete(*keys)


def kill9(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process (and its group), and reap it."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(DEADLINE)


def stream_ids(client: redis.Redis, stream: str) -> list[str]:
    """The event id of every entry of ``stream``, in stream order (duplicates included)."""
    ids: list[str] = []
    start = "-"
    while True:
        page = client.xrange(stream, start, "+", count=2000)
        ids.extend(json.loads(fields[b"envelope"])["id"] for _, fields in page)
        if len(page) < 2000:
            return ids
        start = "(" + page[-1][0].decode()


def first_appearances(ids: list[str]) -> list[str]:
    return list(dict.fromkeys(ids))


def order_violations(rows: list[tuple[int, str, str, bool]], on_stream: list[str]) -> list[str]:
    """Keys whose events first appeared on the stream out of outbox-id (commit) order."""
    by_event = {event_id: (key, row_id) for row_id, event_id, key, _ in rows}
    seen: dict[str, list[int]] = {}
    for event_id in first_appearances(on_stream):
        key, row_id = by_event[event_id]
        seen.setdefault(key, []).append(row_id)
    return [key for key, ids in seen.items() if ids != sorted(ids)]


def effects(client: redis.Redis, prefix: str) -> dict[str, int]:
    """How often the consumer's handler took effect, per event id."""
    raw = client.hgetall(f"{prefix}:effects")
    return {key.decode(): int(value) for key, value in raw.items()}


def consumer_settled(client: redis.Redis, stream: str) -> bool:
    """Whether the consuming service read and acknowledged every entry of ``stream``."""
    if not client.exists(stream):
        return False
    last = client.xinfo_stream(stream)["last-generated-id"]
    groups = client.xinfo_groups(stream)
    return bool(groups) and all(
        group["pending"] == 0 and group["last-delivered-id"] == last for group in groups
    )


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far (from /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ticks(count: int, keys: int, *, seed: int = 0) -> list[Tick]:
    """``count`` events over ``keys`` aggregates, picked at random; ``seq`` counts per key."""
    random = Random(seed)  # noqa: S311 - not cryptographic
    seqs: dict[str, int] = {}
    events = []
    for _ in range(count):
        key = f"a{random.randrange(keys)}"
        seqs[key] = seqs.get(key, 0) + 1
        events.append(Tick(aggregate_id=key, seq=seqs[key]))
    return events


# -- 1. crash after commit, before anything was published -------------------------------------


def test_events_committed_by_a_crashed_process_are_published_by_a_relay_started_later(
    scene: Scene, client: redis.Redis, redis_url: str
) -> None:
    """Commits of a writer killed afterwards, with no relay running, are published later.

    A relay started afterwards publishes every committed event, once each, in order per key;
    the consumer takes effect of each once; the transaction the crash cut short leaves nothing.
    """
    writer = subprocess.run(  # noqa: S603 - our own command line
        [sys.executable, "-m", "tests.apps.outbox_faults", scene.db_url, scene.outbox.table.name,
         "50"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        timeout=DEADLINE,
        check=False,
    )  # fmt: skip
    assert writer.returncode == -signal.SIGKILL, writer.stderr.decode()
    lines = writer.stdout.decode().splitlines()
    committed = [line for line in lines if not line.startswith("doomed ")]
    doomed = {line.removeprefix("doomed ") for line in lines if line.startswith("doomed ")}
    assert len(committed) == 50
    assert len(doomed) == 5
    rows = scene.rows()
    assert [event_id for _, event_id, _, _ in rows] == committed, "the outbox is not the commits"
    assert not client.exists(scene.stream), "something published without a relay"

    scene.worker(redis_url)
    relay = scene.relay(redis_url)
    scene.wait(
        lambda: (
            scene.pending() == 0
            and len(effects(client, scene.prefix)) == 50
            and consumer_settled(client, scene.stream)
        ),
        "the relay to publish the backlog",
        "relay",
        "worker",
    )
    on_stream = stream_ids(client, scene.stream)
    assert sorted(on_stream) == sorted(committed), "lost, repeated or invented entries"
    assert effects(client, scene.prefix) == dict.fromkeys(committed, 1)
    assert not doomed & set(on_stream)
    assert order_violations(rows, on_stream) == []
    relay.send_signal(signal.SIGTERM)
    assert relay.wait(DEADLINE) == 0, scene.log("relay")


# -- 2. the relay killed after the broker confirmed, before the rows were marked -------------


def test_relay_killed_between_publish_and_mark_republishes_and_the_effect_stays_once(
    scene: Scene, client: redis.Redis, redis_url: str
) -> None:
    """A relay killed (-9) after publishing, before marking: re-published, effect once.

    The rows stay pending; the next relay publishes them again (duplicates on the stream), and
    the consumer's inbox keeps the effect of each event at exactly one.
    """
    client.set(f"{scene.prefix}:hold", 1)
    scene.worker(redis_url)
    victim = scene.relay(redis_url, hold=True, name="victim")
    committed = scene.commit(ticks(30, 3), per_transaction=30)
    wanted = {event.event_id for event in committed}
    rows = scene.rows()
    scene.wait(
        lambda: client.exists(f"{scene.prefix}:holding"),
        "the relay to publish and hold",
        "victim",
    )
    held = {raw.decode() for raw in client.lrange(f"{scene.prefix}:held", 0, -1)}
    assert held == wanted, "the held batch is not the committed events"
    scene.wait(
        lambda: len(effects(client, scene.prefix)) == 30 and consumer_settled(client, scene.stream),
        "the consumer to handle the first copies",
        "worker",
    )
    assert int(client.get(f"{scene.prefix}:holding") or 0) == victim.pid
    kill9(victim)
    assert scene.pending() == 30, "rows were marked although the relay died before marking"

    client.delete(f"{scene.prefix}:hold")
    scene.relay(redis_url)
    scene.wait(
        lambda: (
            scene.pending() == 0
            and len(stream_ids(client, scene.stream)) == 60
            and consumer_settled(client, scene.stream)
        ),
        "the restarted relay to publish again",
        "relay",
        "worker",
    )
    on_stream = stream_ids(client, scene.stream)
    assert sorted(on_stream) == sorted([*wanted, *wanted]), "each event should be there twice"
    assert effects(client, scene.prefix) == dict.fromkeys(wanted, 1), "an effect repeated"
    assert order_violations(rows, on_stream) == []


# -- 3. the broker stopped for a while -------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@contextmanager
def private_redis(directory: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """A redis-server of our own on ``port``, persisting to ``directory`` (appendonly)."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not on PATH")
    process = subprocess.Popen(  # noqa: S603 - our own command line
        [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
         "--appendonly", "yes", "--save", ""],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    probe = redis.Redis(port=port)
    try:
        wait_until(lambda: _pings(probe), timeout=DEADLINE, what="the private redis-server")
        yield process
    finally:
        probe.close()
        if process.poll() is None:
            process.terminate()
            process.wait(DEADLINE)


def test_broker_outage_relay_backs_off_then_drains_the_backlog(
    scene: Scene, tmp_path: Path
) -> None:
    """A broker stopped for a while: the relay backs off, then drains the backlog.

    While Redis is down the relay retries with growing waits (its CPU time stays low) and
    counts the attempts on the rows; once Redis is back it publishes everything committed
    meanwhile: nothing lost, order kept per key.
    """
    port = _free_port()
    url = f"redis://127.0.0.1:{port}/0"
    data = tmp_path / "redis"
    data.mkdir()
    before, during = ticks(20, 4, seed=1), ticks(100, 4, seed=2)
    client = redis.Redis(port=port)
    try:
        with private_redis(data, port) as server:
            relay = scene.relay(url, "--keep-published", "3600")
            scene.commit(before)
            scene.wait(
                lambda: scene.pending() == 0 and len(stream_ids(client, scene.stream)) == 20,
                "the first events",
                "relay",
            )
            server.terminate()  # SHUTDOWN: the append-only file keeps what was published
            server.wait(DEADLINE)
            cpu, down = cpu_seconds(relay.pid), time.monotonic()
            scene.commit(during)
            # The outage lasts until the relay failed four times in a row (its default backoff
            # waits ~0.5 + 1 + 2 s in between), and at least 3 s: long enough to catch a loop.
            scene.wait(
                lambda: scene.max_attempts() >= 4 and time.monotonic() - down >= 3.0,
                "the relay to try four times",
                "relay",
            )
            outage, spent = time.monotonic() - down, cpu_seconds(relay.pid) - cpu
            attempts = scene.max_attempts()
            assert relay.poll() is None, scene.log("relay")
            assert scene.pending() == 100
        # A busy loop would burn about one CPU second per second of outage, and try thousands
        # of times; the next wait after the fourth failure is ~4 s.
        assert spent < 0.1 * outage + 0.3, f"{spent:.2f} s of CPU in a {outage:.1f} s outage"
        assert attempts <= 5, f"{attempts} attempts in a {outage:.1f} s outage"
        with private_redis(data, port):
            scene.wait(
                lambda: scene.pending() == 0,
                "the relay to drain after the outage",
                "relay",
            )
            on_stream = stream_ids(client, scene.stream)
            delete_keys(client, scene.prefix)
    finally:
        client.close()
    rows = scene.rows()
    assert len(rows) == 120
    assert all(published for *_, published in rows)
    committed = [event.event_id for event in (*before, *during)]
    assert sorted(set(on_stream)) == sorted(committed), "lost or invented events"
    assert order_violations(rows, on_stream) == []


def test_a_relay_started_while_its_database_is_away_waits_for_it_then_relays(
    scene: Scene, client: redis.Redis, redis_url: str
) -> None:
    """A relay whose database refuses it at start-up warns, waits, and relays once it is back."""
    url = sa.make_url(scene.db_url)
    proxy = Proxy(url.host or "127.0.0.1", url.port or 5432, cut_off=True)
    try:
        through = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        env = {"OUTBOX_FAULTS_REDIS": redis_url, "OUTBOX_FAULTS_PREFIX": scene.prefix}
        relay = scene.spawn(
            "relay",
            [TIDINGS, "relay", "--db", through, "--table", scene.outbox.table.name,
             "--transport", PUBLISH, "--poll-interval", "0.1"],
            env,
        )  # fmt: skip
        scene.wait(
            lambda: "the outbox database cannot be reached" in scene.log("relay"),
            "the relay to warn that its database is away",
            "relay",
        )
        assert relay.poll() is None, scene.log("relay")
        committed = scene.commit(ticks(20, keys=4))
        proxy.restore()
        scene.wait(lambda: scene.pending() == 0, "the relay to publish", "relay")
        assert sorted(stream_ids(client, scene.stream)) == sorted(t.event_id for t in committed)
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(DEADLINE) == 0, scene.log("relay")
    finally:
        proxy.close()


# -- 4. three relays, one killed mid-batch ---------------------------------------------------


def _three_relays_one_killed(
    scene: Scene, client: redis.Redis, redis_url: str, count: int, keys: int
) -> None:
    events = ticks(count, keys, seed=4)
    relays = [scene.relay(redis_url, "--keep-published", "3600", "--batch-size", "100",
                          name=f"relay{n}", hold=n == 0) for n in range(3)]  # fmt: skip
    victim = relays[0]
    third = threading.Event()
    failure: list[BaseException] = []

    def write() -> None:
        try:
            for start in range(0, count, 100):
                scene.commit(events[start : start + 100], per_transaction=100)
                if start >= count // 3:
                    third.set()
        except Exception as exc:  # noqa: BLE001 - reported by the test thread
            failure.append(exc)
            third.set()

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        assert third.wait(DEADLINE), "the writer is stuck"
        client.set(f"{scene.prefix}:hold", 1)  # the victim holds its next published batch
        scene.wait(
            lambda: client.exists(f"{scene.prefix}:holding"),
            "the victim to publish and hold a batch",
            "relay0",
        )
        kill9(victim)
        client.delete(f"{scene.prefix}:hold")
    finally:
        writer.join(DEADLINE)
    assert not failure, failure
    held = {raw.decode() for raw in client.lrange(f"{scene.prefix}:held", 0, -1)}
    assert held, "the victim held an empty batch"

    def survivors() -> bool:
        return all(relay.poll() is None for relay in relays[1:])

    scene.wait(
        lambda: scene.pending() == 0 or not survivors(),
        "the two other relays to drain",
        "relay1",
        "relay2",
        timeout=DEADLINE * 2,
    )
    assert survivors(), scene.log("relay1") + scene.log("relay2")
    rows = scene.rows()
    on_stream = stream_ids(client, scene.stream)
    assert len(rows) == count
    assert all(published for *_, published in rows)
    assert set(on_stream) == {event.event_id for event in events}, "events were lost"
    assert held <= set(on_stream)
    assert order_violations(rows, on_stream) == []


def test_three_relays_one_killed_mid_batch_lose_nothing_and_keep_order_per_key(
    scene: Scene, client: redis.Redis, redis_url: str
) -> None:
    """Three relays, one killed mid-batch: nothing lost, per-key order kept.

    10,000 events in 50 keys are committed while three relays run; one is killed (-9) holding
    a published, unmarked batch. Every event reaches the stream, and per key the events first
    appear in commit order.
    """
    _three_relays_one_killed(scene, client, redis_url, 10_000, 50)


@pytest.mark.slow
def test_three_relays_one_killed_over_fifty_thousand_events(
    scene: Scene, client: redis.Redis, redis_url: str
) -> None:
    """The same over 50,000 events in 200 keys."""
    _three_relays_one_killed(scene, client, redis_url, 50_000, 200)
