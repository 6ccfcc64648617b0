"""Fault tests of the Celery transport: real workers killed, paused, and a broker restarted.

Each test runs real ``celery worker`` processes (:mod:`tests.apps.celery_faults`) and counts,
in Redis, how often the handler started and how often its effect took place; the promise under
test is "delivered at least once, effect once". Broker keys carry the test's own prefix
(kombu's ``global_keyprefix``), so a short visibility timeout never touches other tests' work.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from celery import Celery
from redis.backoff import NoBackoff
from redis.retry import Retry
from tests.apps import celery_faults
from tests.apps.celery_faults import HANDLER, FaultEvent
from tests.workers import celery_worker, wait_until

from tidings import EventBus
from tidings.transports.celery import CeleryTransport

pytestmark = pytest.mark.integration

APP = "tests.apps.celery_faults"


@dataclass
class Service:
    """The publishing side of one test's service, and what its workers left in Redis."""

    name: str
    app: Celery
    bus: EventBus
    transport: CeleryTransport
    client: redis.Redis
    broker: redis.Redis
    env: dict[str, str]

    def count(self, kind: str, event: FaultEvent) -> int:
        """Read one of the per-event counters (``started``, ``effect``, ``busy``, ...)."""
        return int(self.client.get(f"{self.name}:{kind}:{event.event_id}") or 0)

    def settled(self) -> bool:
        """Whether no message is waiting or in flight: the queue and the unacked set are empty."""
        prefix = f"{self.name}:broker:"
        return (
            self.broker.llen(prefix + self.name) == 0 and self.broker.hlen(prefix + "unacked") == 0
        )


@pytest.fixture
def service(redis_url: str, unique_name: str) -> Iterator[Callable[..., Service]]:
    """Build the test's service with the given options; delete every key it made afterwards."""
    made: list[Service] = []

    def build(
        *, broker_url: str = redis_url, visibility_timeout: float = 3600.0, lease: float = 60.0
    ) -> Service:
        app, bus, transport, client = celery_faults.make(
            unique_name,
            unique_name,
            broker_url=broker_url,
            visibility_timeout=visibility_timeout,
            lease=lease,
        )
        env = {
            "FAULTS_QUEUE": unique_name,
            "FAULTS_PREFIX": unique_name,
            "FAULTS_BROKER_URL": broker_url,
            "FAULTS_VISIBILITY_TIMEOUT": str(visibility_timeout),
            "FAULTS_LEASE": str(lease),
        }
        broker = redis.Redis.from_url(broker_url)
        made.append(Service(unique_name, app, bus, transport, client, broker, env))
        return made[-1]

    yield build
    for svc in made:
        for client in (svc.client, svc.broker):
            try:
                for key in client.scan_iter(f"{svc.name}:*"):
                    client.delete(key)
            except redis.ConnectionError:
                pass  # a private broker already gone: its data went with it
            client.close()
        svc.transport.close()


def parent_of(pid: int) -> int:
    """The parent process id of ``pid``, read from ``/proc`` (field 4 of ``stat``)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def handled_before_a_crash_in_a_batch(svc: Service, events: list[FaultEvent]) -> bool:
    """Whether each event took effect once, or twice: the documented price of a batch message.

    A batch's inbox claims are settled after its last handler, so a worker that dies in the
    middle of the batch repeats the effects of the handlers that had finished, once per crash.
    """
    return all(svc.count("effect", e) in (1, 2) for e in events)


@pytest.mark.parametrize("batched", [False, True], ids=["alone", "in-a-batch"])
def test_killing_the_worker_child_mid_handler_redelivers_the_event_and_it_takes_effect_once(
    service, batched
):
    """A prefork child killed with SIGKILL mid-handler gets its message redelivered, effect once."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("finding the worker's child process needs /proc")
    svc = service(lease=2.0)
    event = FaultEvent(mode="block")
    # Alone, the event travels in its own message; with others, all share one batch message.
    before = [FaultEvent() for _ in range(5)] if batched else []
    after = [FaultEvent() for _ in range(5)] if batched else []
    with celery_worker(APP, svc.name, svc.env, pool="prefork", concurrency=1) as worker:
        svc.bus.publish(*before, event, *after)
        wait_until(lambda: svc.count("started", event) == 1, what="the handler to start")
        child = int(svc.client.get(f"{svc.name}:pid:{event.event_id}") or 0)
        assert child != worker.pid
        assert parent_of(child) == worker.pid, "the handler must run in a child of the worker"
        os.kill(child, signal.SIGKILL)
        svc.client.set(f"{svc.name}:go", 1)
        # Celery requeues the message and a new child gets it; the dead child's inbox claim
        # holds it back until its lease ends, then the handler runs again, to the end.
        wait_until(
            lambda: (
                svc.count("effect", event) == 1
                and all(svc.count("effect", e) for e in after)
                and svc.settled()
            ),
            what="the redelivered event to take effect and the queue to settle",
        )
    assert svc.count("started", event) == 2
    assert [svc.count("effect", e) for e in (event, *after)] == [1] * (1 + len(after))
    assert handled_before_a_crash_in_a_batch(svc, before)
    assert svc.transport.inbox.inner.is_done(HANDLER, event.event_id)
    assert svc.transport.dead_letters.count() == 0


def test_pausing_a_worker_past_the_visibility_timeout_redelivers_its_message_effect_once(
    service,
):
    """A worker stopped mid-handler past the visibility timeout: another gets it, effect once."""
    # The lease outlasts the pause (the visibility timeout plus a restore sweep), so the second
    # worker finds the claim taken and redelivers later, by which time the first one finished.
    svc = service(visibility_timeout=2.0, lease=8.0)
    event = FaultEvent(mode="block")
    with celery_worker(APP, svc.name, svc.env, pool="solo") as first:
        svc.bus.publish(event)
        wait_until(lambda: svc.count("started", event) == 1, what="the handler to start")
        assert int(svc.client.get(f"{svc.name}:pid:{event.event_id}") or 0) == first.pid
        os.kill(first.pid, signal.SIGSTOP)
        try:
            with celery_worker(APP, svc.name, svc.env, pool="solo"):
                # The duration is the scenario: once the visibility timeout has passed, the
                # second worker's restore sweep puts the message back and it receives it.
                wait_until(
                    lambda: svc.count("busy", event) or svc.count("started", event) > 1,
                    timeout=20,
                    what="the second worker to receive the paused worker's message",
                )
                assert svc.count("busy", event) >= 1, "the inbox must refuse the second copy"
                os.kill(first.pid, signal.SIGCONT)
                svc.client.set(f"{svc.name}:go", 1)
                wait_until(
                    lambda: svc.count("duplicate", event) >= 1 and svc.settled(),
                    timeout=30,
                    what="the redelivered copy to be skipped as a duplicate",
                )
        finally:
            if first.poll() is None:
                os.kill(first.pid, signal.SIGCONT)
    assert svc.count("started", event) == 1
    assert svc.count("effect", event) == 1
    assert svc.transport.dead_letters.count() == 0


class RedisServer:
    """A private ``redis-server`` whose data survives a restart (append-only file)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def client(self) -> redis.Redis:
        """A client that does not retry (redis-py retries a refused connection for seconds)."""
        return redis.Redis(port=self.port, retry=Retry(NoBackoff(), 0))

    def start(self) -> None:
        command = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "yes", "--appendfsync", "always",
            "--dir", str(self.directory),
        ]  # fmt: skip
        self.process = subprocess.Popen(  # noqa: S603 - our own command line
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        with self.client() as client:

            def answers() -> bool:
                try:
                    return bool(client.ping())
                except redis.ConnectionError:
                    return False

            wait_until(answers, timeout=10, what=f"redis-server on port {self.port}")

    def shutdown(self) -> None:
        """SHUTDOWN: the server writes its append-only file and exits."""
        if self.process is None or self.process.poll() is not None:
            return
        # The server closes the connection as it exits, as it should.
        with self.client() as client, contextlib.suppress(redis.ConnectionError):
            client.shutdown()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test only, on a free port, stopped afterwards."""
    server = RedisServer(tmp_path)
    try:
        server.start()
    except (FileNotFoundError, AssertionError) as exc:
        server.shutdown()
        pytest.skip(f"cannot run a private redis-server: {exc}")
    try:
        yield server
    finally:
        server.shutdown()


def test_restarting_the_broker_while_publishing_loses_no_accepted_event(service, private_redis):
    """Every publish during a broker restart returns or raises; every returned one is handled."""
    svc = service(broker_url=private_redis.url)
    # Celery retries a publish that hit a broken connection: reconnecting after 0, 0.1, 0.2 ...
    # seconds (at most 0.5 apart), up to 40 times, about 18 s, far longer than the restart.
    # (Celery reads these settings when the app first sends, so before the first publish.)
    svc.app.conf.task_publish_retry = True
    svc.app.conf.task_publish_retry_policy = {
        "max_retries": 40,
        "interval_start": 0,
        "interval_step": 0.1,
        "interval_max": 0.5,
    }
    accepted: list[FaultEvent] = []
    refused: list[tuple[FaultEvent, Exception]] = []
    spans: list[tuple[float, float]] = []
    done = threading.Event()

    def publish_stream() -> None:
        while not done.is_set():
            event = FaultEvent()
            began = time.monotonic()
            try:
                svc.bus.publish(event)
            except Exception as exc:  # noqa: BLE001 - a raised publish is a refused event
                refused.append((event, exc))
            else:
                accepted.append(event)
            spans.append((began, time.monotonic()))

    publisher = threading.Thread(target=publish_stream, name="publisher", daemon=True)
    publisher.start()
    try:
        wait_until(lambda: len(accepted) >= 20, what="events published before the restart")
        private_redis.shutdown()
        down = time.monotonic()
        private_redis.start()
        up = time.monotonic()
        before = len(accepted)
        wait_until(lambda: len(accepted) >= before + 20, what="events published after it")
    finally:
        done.set()
        publisher.join(timeout=30)
    assert not publisher.is_alive(), "a publish call hung"
    assert any(began < up and ended > down for began, ended in spans), "no publish met the outage"

    with celery_worker(APP, svc.name, svc.env, pool="solo"):
        wait_until(
            lambda: all(svc.count("effect", e) for e in accepted) and svc.settled(),
            timeout=60,
            what="every accepted event to take effect",
        )
    lost = [e.event_id for e in accepted if svc.count("effect", e) != 1]
    assert not lost, f"{len(lost)} of {len(accepted)} accepted events without exactly one effect"
    # Refused events are the caller's to publish again (an outbox relay would); report them.
    print(
        f"{len(accepted)} publishes accepted, {len(refused)} refused "
        f"({sorted({type(exc).__name__ for _, exc in refused})}), "
        f"broker down for {up - down:.2f} s, longest publish "
        f"{max(ended - began for began, ended in spans):.2f} s"
    )


@pytest.mark.parametrize(
    ("batched", "lease"),
    # A redelivered batch whose claims are still held goes on as one message per event; so the
    # lease outlasts the ~5 s Celery's prefork pool may take to notice a dead child. (With a
    # shorter one the whole batch may run again at every crash, the poison in it.)
    [(False, 1.0), (True, 8.0)],
    ids=["own-messages", "in-a-batch"],
)
def test_a_handler_that_kills_its_worker_every_time_does_not_block_the_other_events(
    service, batched, lease
):
    """A poison event that ends its worker child on every delivery leaves the others flowing."""
    svc = service(lease=lease)
    poison = FaultEvent(mode="crash")
    before, after = [FaultEvent() for _ in range(10)], [FaultEvent() for _ in range(10)]
    if batched:  # one message carries them all, the poison in the middle
        svc.bus.publish(*before, poison, *after)
    else:
        for event in (*before, poison, *after):
            svc.bus.publish(event)
    with celery_worker(APP, svc.name, svc.env, pool="prefork", concurrency=1):
        wait_until(
            lambda: (
                all(svc.count("effect", e) for e in (*before, *after))
                and svc.count("started", poison) >= 2
            ),
            timeout=45,
            what="the other events to take effect and the poison event to crash again",
        )
    assert [svc.count("effect", e) for e in after] == [1] * len(after)
    if batched:
        assert handled_before_a_crash_in_a_batch(svc, before)
    else:
        assert [svc.count("effect", e) for e in before] == [1] * len(before)
    assert svc.count("effect", poison) == 0


MAX_CRASHES = 3


def test_a_handler_that_kills_its_worker_every_time_is_dead_lettered(service):
    """A poison event that ends its worker child on every delivery is dead-lettered after a few."""
    svc = service(lease=0.5)
    poison = FaultEvent(mode="crash")
    with celery_worker(APP, svc.name, svc.env, pool="prefork", concurrency=1):
        svc.bus.publish(poison)
        wait_until(
            lambda: (
                svc.transport.dead_letters.count() or svc.count("started", poison) > MAX_CRASHES
            ),
            timeout=30,
            what="the poison event to be dead-lettered or to crash too often",
        )
        letters = svc.transport.dead_letters.list()
    assert [letter.event_id for letter in letters] == [poison.event_id]
    assert svc.count("started", poison) <= MAX_CRASHES
    assert svc.count("effect", poison) == 0
