"""Celery over Redis loses nothing when a worker dies (issue 18, items 2 and 3).

Real Redis, real ``celery worker`` processes (:mod:`tests.apps.celery_reliable`): a worker
killed while it waits for a message, and a delivery whose retry cannot be sent because the
worker is cut off its broker (a TCP proxy the test cuts; the shared Redis is never touched).
Each test's broker keys (queue, unacknowledged hash, index and mutex) carry its own name.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from celery import Celery
from kombu import Connection, Consumer, Exchange, Producer, Queue
from tests import redis_servers
from tests.apps import celery_reliable
from tests.apps.celery_reliable import ReliableEvent
from tests.redis_servers import Server
from tests.tcp_proxy import Proxy
from tests.workers import ROOT, stop, wait_until

from tidings._redis_persistence import persistence
from tidings.transports._celery_redis import close_fetch_window

pytestmark = pytest.mark.integration

APP = "tests.apps.celery_reliable"

redis_server = redis_servers.redis_server  # the fixture, for this module's tests


# -- helpers ---------------------------------------------------------------------------------


@contextmanager
def worker(
    env: dict[str, str], log: Path, *, pool: str = "solo", defaults: bool = False
) -> Iterator[subprocess.Popen[bytes]]:
    """A ``celery worker`` of the reliable app (one process of ``pool``); output to ``log``.

    Without heartbeat, gossip and mingle, unless ``defaults`` (Celery's, as a user runs it).
    """
    queue = env["RELIABLE_QUEUE"]
    quiet = () if defaults else ("--without-heartbeat", "--without-gossip", "--without-mingle")
    command = [
        sys.executable, "-m", "celery", "-A", APP, "worker", "-Q", queue, f"--pool={pool}",
        "--concurrency=1", *quiet, "--loglevel=INFO", "-n", f"{queue}-{log.stem}@%h",
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(  # noqa: S603 - our own command line
            command,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield process
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGCONT)
            stop(process)


def kill(process: subprocess.Popen[bytes]) -> None:
    """``kill -9`` the worker's whole process group, and reap it."""
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


def blocked_clients(client: redis.Redis, name: str) -> list[dict[str, Any]]:
    """The connections named ``name`` that Redis holds blocked in a command (``BRPOP`` …)."""
    return [
        entry
        for entry in client.client_list()
        if entry.get("name") == name and "b" in str(entry.get("flags", ""))
    ]


@pytest.fixture
def reliable(redis_url: str, unique_name: str) -> Iterator[Callable[..., Any]]:
    """Build the test's service (publishing side); delete every key of the test afterwards."""
    made: list[redis.Redis] = []

    def build(**options: Any) -> tuple[Any, redis.Redis, dict[str, str]]:
        broker_url = options.pop("broker_url", redis_url)
        _, bus, _, client = celery_reliable.make(
            unique_name, unique_name, broker_url=redis_url, **options
        )
        made.append(client)
        env = {
            "RELIABLE_QUEUE": unique_name,
            "RELIABLE_PREFIX": unique_name,
            "RELIABLE_BROKER_URL": broker_url,
            "TIDINGS_TEST_REDIS_URL": redis_url,
        }
        if "visibility_timeout" in options:
            env["RELIABLE_VISIBILITY_TIMEOUT"] = str(options["visibility_timeout"])
        if options.get("polling_interval") is not None:
            env["RELIABLE_POLLING_INTERVAL"] = str(options["polling_interval"])
        if options.get("default_sweep"):
            env["RELIABLE_DEFAULT_SWEEP"] = "1"
        return bus, client, env

    yield build
    for client in made:
        keys = list(client.scan_iter(f"{unique_name}*"))
        if keys:
            client.delete(*keys)
        client.close()


def effect(client: redis.Redis, prefix: str, event: ReliableEvent) -> int:
    """How many times the handler's effect took place for ``event``."""
    return int(client.get(f"{prefix}:effect:{event.event_id}") or 0)


# -- the fetch window ------------------------------------------------------------------------


def test_a_fetch_records_the_message_in_the_unacknowledged_index_before_taking_it(
    redis_url: str, unique_name: str
) -> None:
    """A message the fetch took is in kombu's unacknowledged index even if nobody reads it."""
    name = unique_name
    options = {
        "unacked_key": f"{name}:unacked",
        "unacked_index_key": f"{name}:unacked_index",
        "unacked_mutex_key": f"{name}:unacked_mutex",
        "visibility_timeout": 1,
    }
    client = redis.Redis.from_url(redis_url)
    queue = Queue(name, Exchange(name), routing_key=name)
    dying = Connection(redis_url, transport_options=options)
    try:
        channel = dying.channel()
        close_fetch_window(channel)
        Consumer(channel, queues=[queue], callbacks=[lambda body, message: None]).consume()
        Producer(dying.channel()).publish(
            {"n": 1}, exchange=queue.exchange, routing_key=name, declare=[queue]
        )
        assert client.llen(name) == 1
        # The event loop's poll start sends the fetch; its reply is never read: a death.
        dying.transport.cycle.on_poll_start()
        wait_until(lambda: client.llen(name) == 0, timeout=10, what="the fetch to take it")
        assert client.hlen(f"{name}:unacked") == 1
        assert client.zcard(f"{name}:unacked_index") == 1
        channel.client.connection.disconnect()
        dying.release()

        # Another worker's kombu restores it after the visibility timeout, as any unacked one.
        got: list[Any] = []
        alive = Connection(redis_url, transport_options=options)
        try:
            channel = alive.channel()
            close_fetch_window(channel)
            Consumer(
                channel, queues=[queue], callbacks=[lambda body, message: got.append(message)]
            ).consume()

            def delivered() -> bool:
                channel.qos.restore_visible(interval=1)
                with suppress(TimeoutError, socket.timeout):
                    alive.drain_events(timeout=0.5)
                return bool(got)

            wait_until(delivered, timeout=20, what="the restored message")
            assert got[0].payload == {"n": 1}
            assert got[0].delivery_info.get("redelivered") is True
            got[0].ack()
            assert client.hlen(f"{name}:unacked") == 0
        finally:
            alive.release()
    finally:
        client.delete(name, f"{name}:unacked", f"{name}:unacked_index", f"{name}:unacked_mutex")
        client.close()


def test_a_worker_killed_while_it_waits_for_a_message_loses_no_message(
    reliable: Callable[..., Any], unique_name: str, tmp_path: Path
) -> None:
    """SIGSTOP a worker waiting in its fetch, publish, kill -9 it: the next worker handles it."""
    # kombu's BRPOP blocks 10 s: the paused worker is still waiting when the message comes.
    bus, client, env = reliable(visibility_timeout=3, polling_interval=10)
    event = ReliableEvent()
    with worker(env, tmp_path / "first.log") as first:
        wait_until(
            lambda: blocked_clients(client, unique_name),
            timeout=60,
            what="the worker to wait in its fetch",
        )
        os.killpg(first.pid, signal.SIGSTOP)
        assert blocked_clients(client, unique_name), "the paused worker no longer waits"
        # Redis serves a waiting BRPOP as it runs the LPUSH, before the publish returns.
        bus.publish(event)
        kill(first)
    assert effect(client, unique_name, event) == 0
    with worker(env, tmp_path / "second.log"):
        wait_until(
            lambda: effect(client, unique_name, event) == 1,
            timeout=45,
            what="the next worker to handle the event",
        )
    assert effect(client, unique_name, event) == 1


def test_a_message_a_killed_worker_held_is_soon_handled_by_a_running_worker(
    reliable: Callable[..., Any], unique_name: str, tmp_path: Path
) -> None:
    """With the app's sweep options unset, a running worker restores a killed one's message soon.

    kombu alone sweeps one time in ten of its 10 s timer (about every 100 s); tidings' worker
    sweeps every quarter visibility timeout (at least 1 s), holding the sweep's mutex at most
    5 s, so the event runs within the visibility timeout, a sweep interval and a mutex expiry
    of the kill, plus the worker's own time (10 s are allowed for it on a loaded machine).
    """
    timeout = 4.0
    bus, client, env = reliable(visibility_timeout=timeout, default_sweep=True)
    event = ReliableEvent()
    client.set(f"{unique_name}:gate-on", 1)
    with worker(env, tmp_path / "holder.log") as holder:
        bus.publish(event)
        # The gate holds the first claim: the holder is inside the delivery, unacknowledged.
        wait_until(lambda: client.exists(f"{unique_name}:claimed"), timeout=60, what="the claim")
        with worker(env, tmp_path / "sweeper.log"):
            wait_until(
                lambda: blocked_clients(client, unique_name),
                timeout=60,
                what="the second worker to wait in its fetch",
            )
            kill(holder)
            killed = time.monotonic()
            wait_until(
                lambda: effect(client, unique_name, event) == 1,
                timeout=timeout + 60,
                what="the second worker to handle the killed worker's event",
            )
            took = time.monotonic() - killed
    assert took < timeout + 1 + 5 + 10, f"the event waited {took:.1f} s after the kill"
    assert effect(client, unique_name, event) == 1


def test_a_worker_whose_broker_restarts_keeps_only_its_current_transport(
    reliable: Callable[..., Any], unique_name: str, redis_server: Server, tmp_path: Path
) -> None:
    """After three broker restarts, a worker run with Celery's defaults keeps one kombu transport.

    kombu leaves each earlier transport in the loop's ``on_tick``, its repeating timers running
    and, once its channel has delivered a task, that channel's exit-time finalizer registered
    (its close fails while the broker is gone), which keep it alive with its clients and pools:
    memory grew with every restart.
    """
    url = redis_server("--save", "")
    broker = redis.Redis.from_url(url)
    port = int(urlsplit(url).port or 0)
    _, client, env = reliable(broker_url=url, visibility_timeout=3)
    sender = Celery("sender", broker=url)

    def counted(name: str) -> int:
        client.delete(f"{unique_name}:ticks", f"{unique_name}:transports")
        sender.send_task(celery_reliable.TICKS, queue=unique_name)
        wait_until(lambda: client.exists(f"{unique_name}:{name}"), timeout=30, what="a count")
        return int(client.get(f"{unique_name}:{name}") or 0)

    try:
        with worker(env, tmp_path / "worker.log", defaults=True):
            wait_until(
                lambda: blocked_clients(broker, unique_name), timeout=60, what="the worker's fetch"
            )
            before = counted("transports")  # the consumer's and its publishers', if any yet
            for restart in range(3):
                pid = int(broker.info("server")["process_id"])
                os.kill(pid, signal.SIGKILL)
                wait_until(lambda pid=pid: not _alive(pid), timeout=10, what="the broker to die")
                redis_server("--save", "", port=port)
                wait_until(
                    lambda: blocked_clients(broker, unique_name),
                    timeout=60,
                    what=f"the worker to wait in its fetch again ({restart + 1} restarts)",
                )
                counted("ticks")  # the worker has run a task on this connection
            assert counted("ticks") == 1
            assert counted("transports") == before
    finally:
        broker.close()
        sender.close()


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a zombie counts as gone)."""
    try:
        with Path(f"/proc/{pid}/stat").open() as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


# -- a retry that cannot be sent -------------------------------------------------------------


@pytest.fixture
def proxy(redis_url: str) -> Iterator[Proxy]:
    """A cuttable TCP proxy to the test Redis."""
    parts = urlsplit(redis_url)
    made = Proxy(parts.hostname or "127.0.0.1", parts.port or 6379)
    yield made
    made.close()


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_a_delivery_whose_retry_cannot_be_sent_is_handled_later_not_acknowledged(
    reliable: Callable[..., Any], unique_name: str, proxy: Proxy, tmp_path: Path, pool: str
) -> None:
    """Inbox and broker both unreachable mid-delivery: the event is handled once they return."""
    bus, client, env = reliable(broker_url=proxy.url(), visibility_timeout=3)
    client.set(f"{unique_name}:gate-on", 1)
    event = ReliableEvent()
    with worker(env, tmp_path / "worker.log", pool=pool):
        bus.publish(event)
        wait_until(
            lambda: client.exists(f"{unique_name}:claimed"),
            timeout=60,
            what="the worker to claim the event",
        )
        proxy.cut()  # the worker's broker connections are gone, and stay gone for now
        client.set(f"{unique_name}:cut", 1)  # the gate fails the claim; the retry's send fails
        # The task ended (its retry's send refused by the proxy), then the worker went on
        # trying its broker (to settle the message, to reconnect): refused too.
        wait_until(lambda: client.exists(f"{unique_name}:ran"), timeout=60, what="the task")
        refused = proxy.refused
        wait_until(lambda: proxy.refused >= refused + 2, timeout=60, what="the worker's tries")
        assert effect(client, unique_name, event) == 0
        proxy.restore()
        wait_until(
            lambda: effect(client, unique_name, event) == 1,
            timeout=60,
            what="the event to be handled once the broker is back",
        )
    assert effect(client, unique_name, event) == 1
    assert client.zcard(f"{unique_name}:dlq:index") == 0  # handled, not dead-lettered


def test_a_delivery_whose_retries_can_never_be_sent_is_dead_lettered_after_the_bound(
    reliable: Callable[..., Any], unique_name: str, tmp_path: Path
) -> None:
    """A retry the broker never takes: the message is requeued, then dead-lettered at the bound."""
    bus, client, env = reliable()
    client.set(f"{unique_name}:fail", 1)  # the handler fails: a retry must be sent
    client.set(f"{unique_name}:refuse-sends", 1)  # and no retry can be
    event = ReliableEvent()
    with worker(env, tmp_path / "worker.log"):
        bus.publish(event)
        wait_until(
            lambda: client.zcard(f"{unique_name}:dlq:index") == 1,
            timeout=60,
            what="the delivery to be dead-lettered at the bound",
        )
        wait_until(
            lambda: client.llen(unique_name) == 0 and client.hlen(f"{unique_name}:unacked") == 0,
            timeout=30,
            what="nothing left on the broker",
        )
    (letter_id,) = client.zrange(f"{unique_name}:dlq:index", 0, -1)
    letter = client.hgetall(f"{unique_name}:dlq:letter:{letter_id.decode()}")
    assert b"could not send a retry of the delivery 3 times" in b"".join(letter.values())
    # max_infrastructure_retries=3 in the app: three runs, each requeued but the last.
    assert int(client.get(f"{unique_name}:started:{event.event_id}") or 0) == 3
    assert effect(client, unique_name, event) == 0
    # The worker said at start whether its broker keeps anything on disk (item 3).
    said = "keeps nothing on disk" in (tmp_path / "worker.log").read_text(errors="replace")
    assert said == (persistence(client).persists is False)


def test_the_fetch_keeps_kombus_priorities_several_queues_and_prefetch(
    redis_url: str, unique_name: str
) -> None:
    """Priority lists in kombu's order, a second queue, and no fetch beyond the prefetch count."""
    name = unique_name
    other = f"{name}_other"
    options = {
        "unacked_key": f"{name}:unacked",
        "unacked_index_key": f"{name}:unacked_index",
        "unacked_mutex_key": f"{name}:unacked_mutex",
    }
    client = redis.Redis.from_url(redis_url)
    queues = [Queue(q, Exchange(q), routing_key=q) for q in (name, other)]
    connection = Connection(redis_url, transport_options=options)
    got: list[Any] = []
    try:
        producer = Producer(connection.channel())
        # kombu's Redis keeps priorities in lists per step, read 0 (plain list) first.
        for n, priority, queue in ((1, 9, queues[0]), (2, 0, queues[0]), (3, 0, queues[1])):
            producer.publish(
                {"n": n},
                exchange=queue.exchange,
                routing_key=queue.routing_key,
                declare=[queue],
                priority=priority,
            )
        assert client.llen(f"{name}\x06\x169") == 1  # the priority list of kombu's naming
        channel = connection.channel()
        close_fetch_window(channel)
        channel.basic_qos(prefetch_count=1)
        Consumer(channel, queues=queues, callbacks=[lambda body, m: got.append(m)]).consume()

        def one_more() -> bool:
            with suppress(TimeoutError, socket.timeout):
                connection.drain_events(timeout=0.5)
            return len(got) == expected

        for expected in (1, 2, 3):
            wait_until(one_more, timeout=20, what=f"message {expected}")
            # Prefetch 1: nothing more is taken (or recorded) until this one is acknowledged.
            assert client.hlen(f"{name}:unacked") == 1
            assert client.llen(name) + client.llen(f"{name}\x06\x169") + client.llen(other) == (
                3 - expected
            )
            got[-1].ack()
        assert sorted(m.payload["n"] for m in got) == [1, 2, 3]
        # Within a queue, the plain list (priority step 0) before the list of step 9.
        ours = [m.payload["n"] for m in got if m.delivery_info["routing_key"] == name]
        assert ours == [2, 1]
        assert client.hlen(f"{name}:unacked") == 0
    finally:
        connection.release()
        client.delete(
            name, other, f"{name}\x06\x169", *(f"{name}:{k}" for k in ("unacked", "unacked_index"))
        )
        client.close()


@pytest.mark.parametrize("command", ["EVAL", "BLMOVE"])
def test_a_redis_without_eval_or_blmove_gets_kombus_own_fetch_and_a_warning(
    redis_server: Server, command: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With EVAL or BLMOVE renamed away, the channel warns, falls back to BRPOP, loses nothing."""
    url = redis_server("--rename-command", command, "")
    queue = Queue("q", Exchange("q"), routing_key="q")
    connection = Connection(url)
    got: list[Any] = []
    try:
        channel = connection.channel()
        close_fetch_window(channel)
        Consumer(channel, queues=[queue], callbacks=[lambda body, m: got.append(m)]).consume()

        def drained() -> bool:
            with suppress(TimeoutError, socket.timeout):
                connection.drain_events(timeout=0.5)
            return bool(got)

        producer = Producer(connection.channel())
        # EVAL fails at the first fetch, BLMOVE at the first wait (with nothing queued yet).
        with suppress(TimeoutError, socket.timeout):
            connection.drain_events(timeout=1.5)
        producer.publish({"n": 1}, exchange=queue.exchange, routing_key="q", declare=[queue])
        wait_until(drained, timeout=20, what="the message, fetched by kombu's BRPOP")
        assert got[0].payload == {"n": 1}
        got[0].ack()
    finally:
        connection.release()
    (warning,) = [r.getMessage() for r in caplog.records if "kombu's BRPOP" in r.getMessage()]
    assert command in warning


def test_a_worker_cut_off_its_broker_as_it_records_a_delivery_loses_nothing(
    reliable: Callable[..., Any], unique_name: str, proxy: Proxy, tmp_path: Path
) -> None:
    """Broker lost as the worker records a delivery, its retry unsendable: handled later."""
    bus, client, env = reliable(broker_url=proxy.url(), visibility_timeout=3)
    client.set(f"{unique_name}:gate-on", 1)
    # The write that records a delivery in the unacknowledged index never reaches Redis: kombu's
    # MULTI/ZADD after its BRPOP, or tidings' fetch script (which holds the ZADD itself).
    proxy.cut_at(b"ZADD", f"{unique_name}:unacked_index".encode())
    event = ReliableEvent()
    with worker(env, tmp_path / "worker.log"):
        bus.publish(event)
        wait_until(lambda: proxy.cut_off, timeout=60, what="the worker to record a delivery")
        # If the worker holds the message, its claim fails and its retry cannot be sent.
        client.set(f"{unique_name}:cut", 1)
        if client.llen(unique_name) == 0:  # the worker took it: the cut outlasts the task
            wait_until(lambda: client.exists(f"{unique_name}:ran"), timeout=60, what="the task")
        refused = proxy.refused
        wait_until(lambda: proxy.refused >= refused + 3, timeout=60, what="the worker's tries")
        assert effect(client, unique_name, event) == 0
        proxy.restore()
        wait_until(
            lambda: effect(client, unique_name, event) == 1,
            timeout=60,
            what="the event to be handled once the broker is back",
        )
    assert effect(client, unique_name, event) == 1
