"""The relay is a pipe, refuses what cannot work, and quarantines poison rows (real processes).

Every relay here is a real ``tidings relay`` process on a real outbox (PostgreSQL, or SQLite
where noted) publishing to the test Redis. The relay runs in an empty directory with no
``PYTHONPATH``: the module of the event classes (:mod:`tests.apps.relay_pipe`) cannot be
imported there, so whatever it forwards, it forwards without them. The consuming service is a
real ``tidings worker`` that has the classes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from tests.apps.celery_shop import ParcelBooked
from tests.apps.relay_pipe import Shipped
from tests.workers import ROOT, celery_worker, stop, wait_until

from conftest import require_server
from tidings import DomainEvent, EventBus
from tidings.deadletter.redis import RedisDeadLetterStore
from tidings.memory import MemoryDeadLetterStore
from tidings.outbox import Outbox, Relay
from tidings.transports.memory import MemoryBroker, MemoryTransport

pytestmark = pytest.mark.integration

TIDINGS = str(Path(sys.executable).parent / "tidings")
DEADLINE = 60.0


@dataclass
class Scene:
    """One test's outbox table (with its quarantine), Redis keys, and its processes."""

    db_url: str
    engine: sa.Engine
    outbox: Outbox
    prefix: str
    redis_url: str
    client: redis.Redis
    bare: Path  # an empty directory: the relay's working directory
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def stream(self) -> str:
        return f"{self.prefix}:stream:{Shipped.event_type}"

    def bare_env(self) -> dict[str, str]:
        """The relay's environment: no PYTHONPATH, so tests.apps is not importable."""
        return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def tidings(self, *args: str, bare: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a ``tidings`` command to completion (in the empty directory unless told)."""
        env = self.bare_env() if bare else {**os.environ, "PYTHONPATH": str(ROOT)}
        return subprocess.run(  # noqa: S603 - our own command line
            [TIDINGS, *args],
            cwd=self.bare if bare else ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            check=False,
        )

    def relay_once(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``tidings relay --once`` to this test's streams, from the empty directory."""
        transport = f"{self.redis_url}?prefix={self.prefix}:stream"
        return self.tidings("relay", "--db", self.db_url, "--table", self.outbox.table.name,
                            "--transport", transport, "--once", *args)  # fmt: skip

    def worker(self) -> subprocess.Popen[bytes]:
        """Start ``tidings worker`` of the consuming service (it has the event classes)."""
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RELAY_PIPE_REDIS": self.redis_url,
               "RELAY_PIPE_PREFIX": self.prefix}  # fmt: skip
        log = (self.bare.parent / "worker.log").open("ab")
        process = subprocess.Popen(  # noqa: S603 - our own command line
            [TIDINGS, "worker", "--app", "tests.apps.relay_pipe:bus", "--loglevel", "WARNING"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.processes.append(process)
        return process

    def pending(self) -> int:
        return self.outbox.status(self.engine, partitions=0).pending

    def stream_events(self) -> list[tuple[str, int, str]]:
        """(aggregate id, seq, event id) of every entry of the stream, in stream order."""
        found = []
        for _, fields in self.client.xrange(self.stream, "-", "+"):
            envelope = json.loads(fields[b"envelope"])
            found.append((envelope["data"]["aggregate_id"], envelope["data"]["seq"],
                          envelope["id"]))  # fmt: skip
        return found

    def insert_poison(self, key: str, payload: str = "{not json") -> int:
        """Write an outbox row no worker could decode; return its id."""
        table = self.outbox.table
        with self.engine.begin() as connection:
            result = connection.execute(
                sa.insert(table).values(
                    event_id=f"poison-{self.prefix}"[:64],
                    event_type="relay_pipe.shipped",
                    partition_key=key,
                    payload=payload,
                    created_at=sa.func.now(),
                    attempts=0,
                )
            )
            return int(result.inserted_primary_key[0])


def _postgres() -> str:
    return require_server("postgresql")


def _sqlite(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'outbox.db'}"


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return _postgres() if request.param == "postgresql" else _sqlite(tmp_path)


@pytest.fixture
def scene(db_url: str, redis_url: str, unique_name: str, tmp_path: Path) -> Iterator[Scene]:
    """The test's own outbox and quarantine tables and Redis keys, all removed afterwards."""
    require_server("redis")
    engine = sa.create_engine(db_url)
    outbox = Outbox(table_name=unique_name)
    outbox.create_tables(engine)
    client = redis.Redis.from_url(redis_url)
    bare = tmp_path / "bare"
    bare.mkdir()
    scene = Scene(db_url, engine, outbox, unique_name, redis_url, client, bare)
    try:
        yield scene
    finally:
        for process in scene.processes:
            stop(process)
        outbox.drop_tables(engine)
        engine.dispose()
        keys = [*client.scan_iter(f"{unique_name}*")]
        if keys:
            client.delete(*keys)
        client.close()


def _commit(scene: Scene, events: Sequence[DomainEvent], per_transaction: int = 50) -> None:
    for start in range(0, len(events), per_transaction):
        with scene.engine.begin() as connection:
            scene.outbox.add(connection, *events[start : start + per_transaction])


def _in_key_order(events: list[tuple[str, int, str]]) -> bool:
    last: dict[str, int] = {}
    for key, seq, _ in events:
        if seq <= last.get(key, -1):
            return False
        last[key] = seq
    return True


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_relay_without_the_event_classes_forwards_rows_a_worker_handles(scene: Scene) -> None:
    """A relay that cannot import the event module forwards every row; the worker handles all."""
    premise = subprocess.run(
        [sys.executable, "-c", "import tests.apps.relay_pipe"],
        cwd=scene.bare,
        env=scene.bare_env(),
        capture_output=True,
        check=False,
    )
    assert premise.returncode != 0, "the relay's process could import the event module"
    scene.worker()
    wait_until(
        lambda: scene.client.exists(scene.stream) and scene.client.xinfo_groups(scene.stream),
        timeout=DEADLINE,
        what="the worker's consumer group",
    )
    events = [Shipped(aggregate_id=f"k{n % 2}", seq=n) for n in range(40)]
    _commit(scene, events)
    result = scene.relay_once()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Relayed 40 events." in result.stdout
    assert "unknown event type" not in result.stderr
    assert scene.pending() == 0
    handled = wait_until(
        lambda: (
            (done := scene.client.lrange(f"{scene.prefix}:handled", 0, -1))
            and len(done) >= 40
            and done
        ),
        timeout=DEADLINE,
        what="the worker to handle the 40 relayed events",
    )
    seen = [entry.decode().split(":") for entry in handled]
    assert sorted(e[2] for e in seen) == sorted(e.event_id for e in events)
    assert RedisDeadLetterStore(scene.client, prefix=f"{scene.prefix}:dlq").count() == 0


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("routed", [True, False], ids=["routed-by-type", "queues"])
def test_a_relay_without_the_classes_feeds_a_real_celery_worker(scene: Scene, routed: bool) -> None:
    """``celery+redis://...`` (by type, or ``?queues=Q``) from a relay without the classes."""
    events = [ParcelBooked(parcel_id=f"p-{n}") for n in range(20)]
    _commit(scene, events)
    env = {"SHOP_QUEUE": scene.prefix, "SHOP_PREFIX": scene.prefix}
    if routed:
        env["SHOP_ROUTED"] = "1"
    with celery_worker("tests.apps.celery_shop", scene.prefix, env):
        transport = f"celery+{scene.redis_url}" + ("" if routed else f"?queues={scene.prefix}")
        result = scene.tidings("relay", "--db", scene.db_url, "--table", scene.outbox.table.name,
                               "--transport", transport, "--once")  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Relayed 20 events." in result.stdout
        effects = f"{scene.prefix}:effects:shipping"
        done = wait_until(
            lambda: len(found := scene.client.lrange(effects, 0, -1)) >= 20 and found,
            timeout=DEADLINE,
            what="the Celery worker to handle the 20 relayed events",
        )
    assert sorted(e.decode().split("|")[0] for e in done) == sorted(e.event_id for e in events)
    assert RedisDeadLetterStore(scene.client, prefix=f"{scene.prefix}:dlq").count() == 0
    assert scene.pending() == 0


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("spec", ["tests.apps.relay_pipe:Shipped", "tidings:encode"])
def test_a_relay_given_an_event_class_or_function_is_refused_and_deletes_nothing(
    scene: Scene, spec: str
) -> None:
    """``--transport module:EventClass`` (or a function) exits 2 at start; every row stays."""
    _commit(scene, [Shipped(aggregate_id="a", seq=n) for n in range(5)])
    result = scene.tidings("relay", "--db", scene.db_url, "--table", scene.outbox.table.name,
                           "--transport", spec, "--once", bare=False)  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert "not an EventBus or a Transport" in result.stderr
    assert "Traceback" not in result.stderr
    assert scene.pending() == 5
    assert not scene.client.exists(scene.stream)


def test_a_poison_row_is_quarantined_and_its_key_goes_on_in_order(scene: Scene) -> None:
    """A poison row among 1,000 good ones across 4 keys: quarantined, the rest relayed in order.

    ``--once`` exits 1 naming it; ``outbox status`` and ``dlq outbox list`` name it with its
    reason; ``dlq outbox requeue`` puts it back as a pending row.
    """
    first = [Shipped(aggregate_id=f"k{n % 4}", seq=n) for n in range(400)]
    rest = [Shipped(aggregate_id=f"k{n % 4}", seq=n) for n in range(400, 1000)]
    _commit(scene, first)
    poison = scene.insert_poison("k1")
    _commit(scene, rest)
    result = scene.relay_once("--batch-size", "300", "--max-attempts", "3")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Relayed 1000 events." in result.stdout
    assert "1 row(s) could not be relayed and were quarantined" in result.stderr
    assert str(poison) in result.stderr
    on_stream = scene.stream_events()
    assert len(on_stream) == 1000
    assert {e[2] for e in on_stream} == {e.event_id for e in first + rest}
    assert _in_key_order(on_stream)
    assert scene.pending() == 0

    status = scene.tidings("outbox", "status", "--db", scene.db_url,
                           "--table", scene.outbox.table.name)  # fmt: skip
    assert status.returncode == 0, status.stderr
    assert "quarantined: 1" in status.stdout
    assert str(poison) in status.stdout
    assert "not a CloudEvents JSON envelope" in status.stdout
    listed = scene.tidings("dlq", "outbox", "list", "--db", scene.db_url,
                           "--table", scene.outbox.table.name)  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert str(poison) in listed.stdout
    assert "k1" in listed.stdout
    [held] = scene.outbox.quarantined(scene.engine)
    assert (held.id, held.partition_key, held.payload, held.attempts) == (
        poison,
        "k1",
        "{not json",
        3,
    )

    requeued = scene.tidings("dlq", "outbox", "requeue", str(poison), "--db", scene.db_url,
                             "--table", scene.outbox.table.name)  # fmt: skip
    assert requeued.returncode == 0, requeued.stderr
    assert "Re-queued 1" in requeued.stdout
    assert scene.pending() == 1
    assert scene.outbox.count_quarantined(scene.engine) == 0
    again = scene.relay_once("--max-attempts", "2")
    assert again.returncode == 1, again.stdout + again.stderr
    assert scene.outbox.count_quarantined(scene.engine) == 1
    assert len(scene.stream_events()) == 1000


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_row_pending_after_failures_is_named_stuck_by_outbox_status(scene: Scene) -> None:
    """Before its bound, a failing row stays pending, holds its key, and status names it stuck."""
    poison = scene.insert_poison("k9", payload='{"type": "x", "specversion": "1.0", "id": "p", '
                                 '"data": []}')  # fmt: skip
    _commit(scene, [Shipped(aggregate_id="k9", seq=1), Shipped(aggregate_id="k8", seq=1)])
    memory = MemoryTransport(dead_letters=MemoryDeadLetterStore(), broker=MemoryBroker())
    relay = Relay(scene.engine, scene.outbox, EventBus(transport=memory), listen=False)
    report = relay.run_batch()
    assert (report.relayed, report.failed, report.quarantined) == (1, (poison,), ())
    status = scene.tidings("outbox", "status", "--db", scene.db_url,
                           "--table", scene.outbox.table.name)  # fmt: skip
    assert status.returncode == 0, status.stderr
    assert "pending: 2" in status.stdout
    assert "stuck: 1" in status.stdout
    assert str(poison) in status.stdout
