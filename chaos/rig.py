"""The chaos rig: servers of its own, the processes under test, a nemesis, and a checker.

``python -m chaos --transport streams --duration 60`` runs one scenario and prints its report;
``make chaos`` runs every transport for longer. See :mod:`chaos` for what is checked.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SERVER_URL = os.environ.get(
    "TIDINGS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
FAULTS = ("kill_relay", "kill_worker", "stop_worker", "kill_redis", "terminate_db")
EXTRA_FAULTS = {
    "streams": (),
    "celery-redis": ("kill_child",),
    "celery-rabbitmq": ("kill_child", "kill_rabbitmq"),
}
DRAIN_WITHIN = 60.0
QUALIFYING_EVENTS = 20_000
QUALIFYING_FAULTS = 40
"""A run proves the durability claim with at least this many events and faults of every kind."""
_SHORT = (
    f" (too short to qualify: under {QUALIFYING_EVENTS:,} events or under {QUALIFYING_FAULTS}"
    " faults of some kind)"
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        with suppress(Exception):
            result = condition()
            if result:
                return result
        if time.monotonic() > deadline:
            msg = f"timed out after {timeout:.0f} s waiting for {what}"
            raise TimeoutError(msg)
        time.sleep(0.05)


def _kib(path: Path, key: str) -> int:
    """The ``key`` line of a ``/proc`` status-like file, in KiB (0 when absent)."""
    for line in path.read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


class OwnRedis:
    """A Redis of the rig's own: a free port, AOF with ``appendfsync always``, a temp dir."""

    def __init__(self, directory: Path) -> None:
        self.port = _free_port()
        self.directory = directory
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        """Start it (again, on the same port and data) and wait until it answers."""
        self.process = subprocess.Popen(  # noqa: S603 - our own command line
            [
                shutil.which("redis-server") or "redis-server",
                "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
                "--appendonly", "yes", "--appendfsync", "always", "--save", "",
                "--logfile", str(self.directory / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        client = redis.Redis.from_url(self.url)
        _wait(client.ping, 30, "the rig's Redis")
        client.close()

    def kill(self) -> None:
        """SIGKILL it (a machine losing power): AOF with fsync on every write keeps all."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        """Stop it for good."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


def amqp_connection(url: str) -> Any:
    """A kombu connection to ``url`` (kombu ships no types)."""
    from kombu.connection import Connection  # noqa: PLC0415 - the celery extra

    return Connection(url, connect_timeout=2)  # type: ignore[no-untyped-call]


class OwnRabbit:
    """A RabbitMQ node of the rig's own: its own name, ports, data and log directories."""

    def __init__(self, directory: Path) -> None:
        self.port = _free_port()
        self.directory = directory / "rabbitmq"
        self.directory.mkdir()
        self.name = f"chaos-{uuid.uuid4().hex[:8]}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        (self.directory / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\nloopback_users = none\n"
        )
        (self.directory / "enabled_plugins").write_text("[].\n")
        # The server script runs the node as the rabbitmq user when it exists: that user must
        # reach the directory and own it.
        directory.chmod(0o755)
        with suppress(LookupError, PermissionError):
            shutil.chown(self.directory, "rabbitmq", "rabbitmq")
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        """Start the node (again, on the same port and data) and wait until it takes AMQP."""
        d = self.directory
        env = {
            **os.environ,
            "HOME": str(d),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(_free_port()),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(d / "feature_flags"),
            "RABBITMQ_CONF_ENV_FILE": str(d / "none.conf"),
        }
        self.process = subprocess.Popen(  # noqa: S603 - our own command line
            [shutil.which("rabbitmq-server") or "rabbitmq-server"],
            cwd=d,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

        def takes_amqp() -> bool:
            with amqp_connection(self.url) as connection:
                connection.connect()
            return True

        _wait(takes_amqp, 120, "the rig's RabbitMQ")

    def kill(self) -> None:
        """SIGKILL the node's whole process group (the Erlang VM and its helpers)."""
        if self.process is not None:
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        """Stop the node for good."""
        self.kill()


@contextmanager
def own_database() -> Iterator[str]:
    """A PostgreSQL database of the rig's own on the shared server, dropped afterwards."""
    name = f"chaos_{uuid.uuid4().hex[:10]}"
    server = sa.create_engine(SERVER_URL, isolation_level="AUTOCOMMIT")
    with server.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield str(sa.make_url(SERVER_URL).set(database=name).render_as_string(False))
    finally:
        with server.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        server.dispose()


@dataclass
class Slot:
    """One process the rig keeps running: its command, environment and current process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    witness: bool = False
    """A witness is never killed (only stopped): its RSS over the run is the one reported."""
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    rss: list[int] = field(default_factory=list)

    def start(self) -> None:
        """Start the process, its output appended to its log."""
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(  # noqa: S603 - our own command line
                self.argv, cwd=ROOT, env=self.env, stdout=out, stderr=out, start_new_session=True
            )

    def pids(self) -> list[int]:
        """The process and its children (a Celery pool's)."""
        if self.process is None:
            return []
        found = [self.process.pid]
        with suppress(OSError):
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
            found += [int(pid) for pid in children.read_text().split()]
        return found

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the whole process group (the worker and its pool)."""
        if self.process is not None:
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)

    def kill_and_restart(self) -> None:
        """SIGKILL the process group, reap it, start again."""
        self.signal_group(signal.SIGKILL)
        if self.process is not None:
            self.process.wait()
        self.restarts += 1
        self.start()

    def sample_rss(self) -> None:
        """Record the resident memory of the process and its children, in KiB.

        Each sample is also appended to ``<log>.rss`` as ``seconds,total,main,pss`` lines (the
        main process's own RSS and the proportional set size of the whole group, which counts a
        page shared by a pool's processes once), to tell a growing main process from children.
        """
        rss: list[int] = []
        pss = 0
        for pid in self.pids():
            with suppress(OSError):
                rss.append(_kib(Path(f"/proc/{pid}/status"), "VmRSS:"))
                pss += _kib(Path(f"/proc/{pid}/smaps_rollup"), "Pss:")
        total = sum(rss)
        self.rss.append(total)
        with self.log.with_suffix(".rss").open("a") as out:
            out.write(f"{time.monotonic():.0f},{total},{rss[0] if rss else 0},{pss}\n")

    def stop(self) -> None:
        """SIGCONT then SIGTERM the group; SIGKILL what is left after 20 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.signal_group(signal.SIGCONT)
        self.signal_group(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.signal_group(signal.SIGKILL)
            self.process.wait()


@dataclass
class Report:
    """What the checker found for one scenario."""

    transport: str
    committed: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    lost: dict[str, int] = field(default_factory=dict)
    duplicated: dict[str, int] = field(default_factory=dict)
    unexpected: dict[str, int] = field(default_factory=dict)
    dead_lettered: dict[str, int] = field(default_factory=dict)
    stuck_in_outbox: int = 0
    drain_seconds: float | None = None
    rss_growth: dict[str, float] = field(default_factory=dict)
    lost_ids: dict[str, list[str]] = field(default_factory=dict)
    """Up to ten lost event ids per service, to look for in the kept logs."""
    exited: Counter[str] = field(default_factory=Counter)
    """Processes that exited by themselves (not killed), by kind; the rig started them again."""

    @property
    def passed(self) -> bool:
        """0 lost, 0 ledger duplicates (SQL inbox), 0 unexpected, drained, RSS flat."""
        return (
            not any(self.lost.values())
            and not self.duplicated.get("ledger")
            and not any(self.unexpected.values())
            and self.stuck_in_outbox == 0
            and self.drain_seconds is not None
            and all(growth <= 0.10 for growth in self.rss_growth.values())
        )

    @property
    def qualifies(self) -> bool:
        """At least 20,000 committed events and 40 faults of every kind the transport gets."""
        kinds = [*FAULTS, *EXTRA_FAULTS[self.transport]]
        return self.committed >= QUALIFYING_EVENTS and all(
            self.faults[kind] >= QUALIFYING_FAULTS for kind in kinds
        )

    def table(self) -> str:
        """The report as a Markdown table (one row per service)."""
        faults = ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items()))
        drain = "not drained" if self.drain_seconds is None else f"{self.drain_seconds:.1f} s"
        worker_faults = sum(self.faults[k] for k in ("kill_worker", "kill_child", "stop_worker"))
        per_fault = self.duplicated.get("mailer", 0) / max(1, worker_faults)
        lines = [
            f"**{self.transport}**: {self.committed} committed events; faults: {faults} "
            f"(total {sum(self.faults.values())}); stuck in outbox {self.stuck_in_outbox}; "
            f"drained in {drain}; Redis-inbox duplicates per worker fault {per_fault:.1f}; "
            f"{'PASS' if self.passed else 'FAIL'}{'' if self.qualifies else _SHORT}",
            "",
            "| service | inbox | lost | duplicate effects | unexpected | dead-lettered "
            "| worker RSS, last vs first quarter |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for service, inbox in (("ledger", "SQL"), ("mailer", "Redis")):
            growth = self.rss_growth.get(service)
            lines.append(
                f"| {service} | {inbox} | {self.lost.get(service, 0)} "
                f"| {self.duplicated.get(service, 0)} | {self.unexpected.get(service, 0)} "
                f"| {self.dead_lettered.get(service, 0)} "
                f"| {'-' if growth is None else f'{growth:+.1%}'} |"
            )
        if self.exited:
            lines.append("")
            lines.append(
                "Exited by themselves and started again: "
                + ", ".join(f"{kind} {n}" for kind, n in sorted(self.exited.items()))
            )
        for service, ids in self.lost_ids.items():
            if ids:
                lines.append(f"Lost by {service} (first ten): {', '.join(ids)}")
        return "\n".join(lines)


class Rig:
    """One scenario: servers, producers, relays, workers, nemesis, checker."""

    def __init__(
        self,
        transport: str,
        *,
        duration: float,
        rate: float,
        workdir: Path,
        fault_every: float,
        seed: int,
        log: Callable[[str], None] = print,
    ) -> None:
        self.transport = transport
        self.duration = duration
        self.rate = rate
        self.workdir = workdir
        self.fault_every = fault_every
        self.random = random.Random(seed)  # noqa: S311 - the nemesis' dice, not a secret
        self.log = log
        self.report = Report(transport)
        self.slots: list[Slot] = []
        self.stop_producing = threading.Event()
        self.stop_nemesis = threading.Event()
        self.rabbit: OwnRabbit | None = None

    # -- processes ------------------------------------------------------------------------

    def _env(self, role: str, redis_url: str, db_url: str) -> dict[str, str]:
        amqp = {} if self.rabbit is None else {"CHAOS_AMQP": self.rabbit.url}
        return {
            **amqp,
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "CHAOS_TRANSPORT": self.transport,
            "CHAOS_ROLE": role,
            "CHAOS_REDIS": redis_url,
            "CHAOS_DB": db_url,
        }

    def _worker_argv(self, service: str) -> list[str]:
        if self.transport == "streams":
            return [str(BIN / "tidings"), "worker", "--app", "chaos.services:bus",
                    "--concurrency", "2", "--loglevel", "WARNING"]  # fmt: skip
        return [str(BIN / "celery"), "-A", "chaos.services", "worker", "-Q", service,
                "--pool", "prefork", "-c", "2", "--loglevel", "WARNING",
                "-n", f"{service}-{uuid.uuid4().hex[:6]}@%h"]  # fmt: skip

    def _start_processes(self, redis_url: str, db_url: str) -> None:
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        for service in ("ledger", "mailer"):
            for index in range(2):
                slot = Slot(
                    f"{service}-worker-{index}",
                    self._worker_argv(service),
                    self._env(service, redis_url, db_url),
                    logs / f"{service}-worker-{index}.log",
                    witness=index == 0,
                )
                self.slots.append(slot)
        for index in range(3):
            argv = [str(BIN / "tidings"), "relay", "--db", db_url,
                    "--transport", "chaos.services:bus", "--poll-interval", "0.2"]  # fmt: skip
            self.slots.append(
                Slot(
                    f"relay-{index}",
                    argv,
                    self._env("relay", redis_url, db_url),
                    logs / f"relay-{index}.log",
                )
            )
        for slot in self.slots:
            slot.start()

    # -- producers ------------------------------------------------------------------------

    def _produce(self, engine: sa.Engine, index: int) -> None:
        from chaos.services import OrderPlaced, orders, outbox  # noqa: PLC0415

        period = 4 / self.rate  # four producers share the rate
        next_at = time.monotonic()
        n = 0
        while not self.stop_producing.is_set():
            n += 1
            event = OrderPlaced(order_id=f"p{index}-{n}")
            try:
                with engine.begin() as connection:
                    connection.execute(
                        orders.insert().values(order_id=event.order_id, event_id=event.event_id)
                    )
                    outbox.add(connection, event)
            except sa.exc.DBAPIError:
                time.sleep(0.05)  # the nemesis terminated our connection: not committed
                continue
            next_at += period
            delay = next_at - time.monotonic()
            if delay > 0:
                self.stop_producing.wait(delay)

    # -- nemesis --------------------------------------------------------------------------

    def _fault(self, kind: str, redis_server: OwnRedis, db_url: str) -> None:
        workers = [s for s in self.slots if "worker" in s.name]
        if kind == "kill_relay":
            self.random.choice(
                [s for s in self.slots if s.name.startswith("relay")]
            ).kill_and_restart()
        elif kind == "kill_worker":
            self.random.choice([s for s in workers if not s.witness]).kill_and_restart()
        elif kind == "kill_child":
            slot = self.random.choice(workers)
            children = slot.pids()[1:]
            if children:
                with suppress(ProcessLookupError):
                    os.kill(self.random.choice(children), signal.SIGKILL)
        elif kind == "stop_worker":
            from chaos.services import CLAIM_IDLE, HEARTBEAT, VISIBILITY_TIMEOUT  # noqa: PLC0415

            slot = self.random.choice(workers)
            past = {
                "streams": CLAIM_IDLE,
                "celery-redis": VISIBILITY_TIMEOUT,
                "celery-rabbitmq": 3 * HEARTBEAT,
            }[self.transport] + 1.0
            slot.signal_group(signal.SIGSTOP)
            self.stop_nemesis.wait(past)
            slot.signal_group(signal.SIGCONT)
        elif kind == "kill_redis":
            redis_server.kill()
            self.stop_nemesis.wait(self.random.uniform(0.2, 2.0))
            redis_server.start()
        elif kind == "kill_rabbitmq" and self.rabbit is not None:
            self.rabbit.kill()
            self.stop_nemesis.wait(self.random.uniform(0.2, 2.0))
            self.rabbit.start()
        elif kind == "terminate_db":
            name = sa.make_url(db_url).database
            engine = sa.create_engine(SERVER_URL, isolation_level="AUTOCOMMIT")
            with engine.connect() as connection:
                connection.execute(
                    sa.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :name AND pid <> pg_backend_pid()"
                    ),
                    {"name": name},
                )
            engine.dispose()
        self.report.faults[kind] += 1

    def _nemesis(self, redis_server: OwnRedis, db_url: str) -> None:
        kinds = [*FAULTS, *EXTRA_FAULTS[self.transport]]
        order: list[str] = []
        while not self.stop_nemesis.wait(self.random.uniform(0.5, 1.5) * self.fault_every):
            if not order:  # every kind once per round, in a random order
                order = self.random.sample(kinds, len(kinds))
            kind = order.pop()
            try:
                self._fault(kind, redis_server, db_url)
            except Exception as exc:  # noqa: BLE001 - a failed fault is reported, not fatal
                self.log(f"  fault {kind} failed: {type(exc).__name__}: {exc}")
            self._supervise()

    def _supervise(self) -> None:
        """Start again what exited by itself (a supervisor's job), counting it in the report."""
        for slot in self.slots:
            if slot.process is not None and slot.process.poll() is not None:
                self.report.exited[slot.name.rsplit("-", 1)[0]] += 1
                slot.start()

    def _sample(self) -> None:
        while not self.stop_nemesis.wait(2.0):
            for slot in self.slots:
                if slot.witness:
                    slot.sample_rss()

    # -- checker --------------------------------------------------------------------------

    def _counts(self, engine: sa.Engine) -> tuple[set[str], dict[str, Counter[str]], int]:
        from chaos.services import effects, orders, outbox  # noqa: PLC0415

        with engine.connect() as connection:
            committed = {row[0] for row in connection.execute(sa.select(orders.c.event_id))}
            seen = {
                service: Counter(row[0] for row in connection.execute(sa.select(table.c.event_id)))
                for service, table in effects.items()
            }
            pending = connection.execute(
                sa.select(sa.func.count()).select_from(outbox.table)
            ).scalar_one()
        return committed, seen, int(pending)

    def _dead_letters(self, redis_url: str) -> dict[str, set[str]]:
        from tidings.deadletter.redis import RedisDeadLetterStore  # noqa: PLC0415

        client = redis.Redis.from_url(redis_url)
        found: dict[str, set[str]] = {}
        for service in ("ledger", "mailer"):
            store = RedisDeadLetterStore(client, prefix=f"chaos:{service}:dlq")
            found[service] = {d.event_id or d.id for d in store.list(limit=100_000)}
        client.close()
        return found

    def _settled(self, engine: sa.Engine, redis_url: str) -> bool:
        self._supervise()
        committed, seen, pending = self._counts(engine)
        letters = self._dead_letters(redis_url)
        return pending == 0 and all(
            committed <= set(seen[service]) | letters[service] for service in seen
        )

    def _check(self, engine: sa.Engine, redis_url: str) -> None:
        committed, seen, pending = self._counts(engine)
        letters = self._dead_letters(redis_url)
        self.report.committed = len(committed)
        self.report.stuck_in_outbox = pending
        for service, counts in seen.items():
            lost = committed - set(counts) - letters[service]
            self.report.lost[service] = len(lost)
            self.report.lost_ids[service] = sorted(lost)[:10]
            self.report.duplicated[service] = sum(n - 1 for n in counts.values() if n > 1)
            self.report.unexpected[service] = len(set(counts) - committed)
            self.report.dead_lettered[service] = len(letters[service])
            if lost:
                self._locate(service, sorted(lost)[:50], redis_url)
        for slot in self.slots:
            if slot.witness and len(slot.rss) >= 8:
                quarter = len(slot.rss) // 4
                first = sum(slot.rss[:quarter]) / quarter
                last = sum(slot.rss[-quarter:]) / quarter
                service = slot.name.split("-")[0]
                self.report.rss_growth[service] = last / first - 1

    def _locate(self, service: str, ids: list[str], redis_url: str) -> None:
        """Write where each lost id still is in the rig's Redis to ``logs/lost-<service>.txt``.

        Every key is searched: lists (queues), hashes (the unacknowledged messages), sorted
        sets (their index), and key names (inbox claims). An id found nowhere left Redis.
        """
        client: Any = redis.Redis.from_url(redis_url)  # replies are bytes (no decoding)
        found: dict[str, list[str]] = {event_id: [] for event_id in ids}
        records: list[tuple[str, bytes, bytes]] = []  # (event id, hash, field) where found
        scored: dict[bytes, list[tuple[str, float]]] = {}  # sorted-set member -> (key, score)
        for key in client.scan_iter(count=1000):
            name = key.decode(errors="replace")
            kind, values, fields, members = _read_key(client, key)
            for member, score in members:
                scored.setdefault(member, []).append((name, score))
            for event_id in ids:
                if event_id in name:
                    found[event_id].append(f"key name {name} ({kind}, ttl {client.ttl(key)} s)")
                raw = event_id.encode()
                hits = sum(raw in value for value in values)
                if hits:
                    found[event_id].append(f"{hits} time(s) in {name} ({kind})")
                records += [(event_id, key, tag) for tag, value in fields.items() if raw in value]
        now = time.time()
        for event_id, key, tag in records:
            # A kombu unacknowledged record: is its delivery tag in the index, and since when?
            index = ", ".join(f"{zset} since {now - at:.1f} s" for zset, at in scored.get(tag, []))
            found[event_id].append(
                f"hash {key.decode(errors='replace')} field {tag.decode(errors='replace')}: "
                + (f"indexed in {index}" if index else "in no sorted set")
            )
        client.close()
        with (self.workdir / "logs" / f"lost-{service}.txt").open("w") as out:
            for event_id, places in found.items():
                out.write(f"{event_id}: {'; '.join(places) or 'nowhere in Redis'}\n")

    # -- the run --------------------------------------------------------------------------

    def run(self) -> Report:
        """Run the scenario and return its report (servers and processes cleaned up)."""
        from chaos.services import create_schema  # noqa: PLC0415

        redis_server = OwnRedis(self.workdir)
        if self.transport == "celery-rabbitmq":
            self.rabbit = OwnRabbit(self.workdir)
        try:
            with own_database() as db_url:
                engine = sa.create_engine(db_url, pool_pre_ping=True)
                create_schema(engine)
                self._start_processes(redis_server.url, db_url)
                self._wait_for_workers(redis_server.url)
                self.log(f"{self.transport}: running for {self.duration:.0f} s")
                threads = [
                    threading.Thread(target=self._produce, args=(engine, i), daemon=True)
                    for i in range(4)
                ]
                threads.append(
                    threading.Thread(target=self._nemesis, args=(redis_server, db_url), daemon=True)
                )
                threads.append(threading.Thread(target=self._sample, daemon=True))
                for thread in threads:
                    thread.start()
                self.stop_producing.wait(self.duration)
                self.stop_producing.set()
                self.stop_nemesis.set()
                for thread in threads:
                    thread.join()
                for slot in self.slots:  # nothing stays stopped after the nemesis
                    slot.signal_group(signal.SIGCONT)
                began = time.monotonic()
                with suppress(TimeoutError):
                    _wait(
                        lambda: self._settled(engine, redis_server.url),
                        DRAIN_WITHIN,
                        "the drain",
                    )
                    self.report.drain_seconds = time.monotonic() - began
                self._check(engine, redis_server.url)
                for slot in self.slots:
                    slot.stop()
                engine.dispose()
        finally:
            for slot in self.slots:
                slot.stop()
            redis_server.stop()
            if self.rabbit is not None:
                self.rabbit.stop()
        return self.report

    def _wait_for_workers(self, redis_url: str) -> None:
        client = redis.Redis.from_url(redis_url)
        if self.transport == "streams":
            from chaos.services import OrderPlaced  # noqa: PLC0415
            from tidings.memory import MemoryDeadLetterStore  # noqa: PLC0415
            from tidings.transports.redis_streams import RedisStreamsTransport  # noqa: PLC0415

            naming = RedisStreamsTransport(
                client,
                service="rig",
                stream_prefix="chaos:stream",
                dead_letters=MemoryDeadLetterStore(),
            )
            stream = naming.stream(OrderPlaced)

            # Each service's worker has started once its consumer group exists.
            def ready() -> bool:
                groups = {g["name"].decode() for g in client.xinfo_groups(stream)}
                return {"ledger", "mailer"} <= groups

            _wait(ready, 60, "the workers' consumer groups")
        elif self.rabbit is not None:
            url = self.rabbit.url

            def consumed() -> bool:
                with amqp_connection(url) as connection:
                    channel = connection.channel()
                    return all(
                        channel.queue_declare(service, passive=True).consumer_count > 0
                        for service in ("ledger", "mailer")
                    )

            _wait(consumed, 120, "the Celery workers' consumers")
        else:
            # A worker declares its queue's binding when it starts consuming.
            _wait(
                lambda: all(client.exists(f"_kombu.binding.{s}") for s in ("ledger", "mailer")),
                60,
                "the Celery workers",
            )
        client.close()


def run(transports: list[str], *, duration: float, rate: float, fault_every: float, seed: int,
        report_path: Path | None) -> int:  # fmt: skip
    """Run each transport's scenario; print (and write) the reports; 0 when all passed."""
    reports = []
    for transport in transports:
        with tempfile.TemporaryDirectory(prefix=f"chaos-{transport}-") as directory:
            rig = Rig(
                transport,
                duration=duration,
                rate=rate,
                workdir=Path(directory),
                fault_every=fault_every,
                seed=seed,
            )
            report = rig.run()
            print(report.table(), flush=True)
            if not report.passed:
                keep = Path(tempfile.mkdtemp(prefix=f"chaos-logs-{transport}-"))
                shutil.copytree(Path(directory) / "logs", keep, dirs_exist_ok=True)
                print(f"logs kept in {keep}", flush=True)
            reports.append(report)
    if report_path is not None:
        report_path.write_text("\n\n".join(r.table() for r in reports) + "\n")
    return 0 if all(r.passed for r in reports) else 1


def _read_key(
    client: Any, key: bytes
) -> tuple[str, list[bytes], dict[bytes, bytes], list[tuple[bytes, float]]]:
    """A Redis key's type, its values, its hash fields and its sorted-set members with scores."""
    kind = client.type(key).decode()
    if kind == "list":
        return kind, client.lrange(key, 0, -1), {}, []
    if kind == "hash":
        fields = client.hgetall(key)
        return kind, [k + b"=" + v for k, v in fields.items()], fields, []
    if kind == "set":
        return kind, list(client.smembers(key)), {}, []
    if kind == "zset":
        members = client.zrange(key, 0, -1, withscores=True)
        return kind, [member for member, _ in members], {}, members
    if kind == "string":
        return kind, [client.get(key) or b""], {}, []
    return kind, [], {}, []
