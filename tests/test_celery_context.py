"""Context propagation through Celery: real worker processes, real Redis and RabbitMQ.

One worker per broker and pool serves the whole module (prefork with one child, and solo, on
Redis; prefork on RabbitMQ), consuming a queue of its own, with every Redis key of its broker
and result backend under a prefix of its own. Each test records into its own Redis list: the
tasks push what ``current_context()`` said there, and the test waits for the records with a
deadline.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from conftest import require_server
from tidings import EventContext, current_context, event_context
from tidings.transports.celery import (
    CAUSATION_HEADER,
    CORRELATION_HEADER,
    TENANT_HEADER,
    install_context_propagation,
)

celery = pytest.importorskip("celery")
redis = pytest.importorskip("redis")

WAIT = 20.0  # seconds a test waits for its records once the worker is up
STARTUP = 60.0  # seconds a worker may take to consume its first task

# The Celery app the workers run. Its settings come from config.json next to it, so that the
# worker (celery -A ctxapp) and this test process (which loads the same file to send tasks)
# configure it identically.
APP_SOURCE = '''
"""Celery app of tidings' context propagation tests: every task records what it saw."""

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import redis
from celery import Celery

from tidings import DomainEvent, EventBus, current_context
from tidings.transports.celery import install_context_propagation

config = json.loads(Path(__file__).with_name("config.json").read_text())

app = Celery("ctxapp", broker=config["broker_url"], backend=config["backend_url"])
app.conf.update(
    task_default_queue=config["queue"],
    result_backend_transport_options={"global_keyprefix": config["prefix"]},
    broker_connection_retry_on_startup=True,
)
if config["broker_url"].startswith("redis"):
    app.conf.broker_transport_options = {"global_keyprefix": config["prefix"]}
install_context_propagation(app)

_store = []


def store():
    if not _store:
        _store.append(redis.Redis.from_url(config["record_url"]))
    return _store[0]


def record_context(key, label, **extra):
    context = current_context()
    entry = {
        "label": label,
        "pid": os.getpid(),
        "correlation_id": context.correlation_id,
        "causation_id": context.causation_id,
        "tenant_id": context.tenant_id,
        **extra,
    }
    store().rpush(key, json.dumps(entry))


@app.task(name="ctx.record", shared=False)
def record(key, label):
    record_context(key, label)


@app.task(name="ctx.step", shared=False)
def step(previous, key, label):
    record_context(key, label, previous=previous)
    return label


@app.task(name="ctx.collect", shared=False)
def collect(results, key, label):
    record_context(key, label, results=sorted(results))
    return label


@app.task(name="ctx.fail", shared=False)
def fail(key, label):
    record_context(key, label)
    raise ValueError("this task fails on purpose")


@app.task(name="ctx.spawn", shared=False)
def spawn(key, label, child_label):
    record_context(key, label)
    record.delay(key, child_label)


@app.task(name="ctx.retry_once", bind=True, max_retries=2, shared=False)
def retry_once(self, key, label):
    record_context(key, label, retries=self.request.retries)
    if self.request.retries == 0:
        raise self.retry(countdown=0)


@app.task(
    name="ctx.autoretry",
    bind=True,
    autoretry_for=(RuntimeError,),
    retry_kwargs={"max_retries": 2, "countdown": 0},
    shared=False,
)
def autoretry(self, key, label):
    record_context(key, label, retries=self.request.retries)
    if self.request.retries == 0:
        raise RuntimeError("the first attempt fails on purpose")


@dataclass(frozen=True)
class Pinged(DomainEvent):  # published in-process only: no need to register it for decoding
    event_type: ClassVar[str] = "test_celery_context.pinged"
    key: str = ""


bus = EventBus()


@bus.subscribe(Pinged, name="ctx.on_pinged")
def on_pinged(event):
    record.delay(event.key, "from-handler")


@app.task(name="ctx.raise_event", shared=False)
def raise_event(key, label):
    event = Pinged(key=key)
    record_context(key, label, event_id=event.event_id)
    bus.publish(event)
'''


@dataclass
class Worker:
    """A worker subprocess and, loaded in this process, the same app module to send tasks with."""

    name: str
    tasks: ModuleType
    process: subprocess.Popen[bytes]
    log: Path
    store: Any
    prefix: str

    def key(self, unique_name: str) -> str:
        """The Redis list a test records into, under this worker's prefix."""
        return f"{self.prefix}records:{unique_name}"

    def records(self, key: str, count: int, timeout: float = WAIT) -> list[dict[str, Any]]:
        """Wait until ``key`` holds ``count`` records and return them, failing at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            raw = self.store.lrange(key, 0, -1)
            if len(raw) >= count:
                return [json.loads(item) for item in raw]
            if self.process.poll() is not None:
                pytest.fail(
                    f"worker {self.name} exited ({self.process.returncode}):\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                seen = [json.loads(item) for item in raw]
                log = self.tail()
                pytest.fail(f"{count} records expected in {timeout}s, got {seen}; log:\n{log}")
            time.sleep(0.02)  # poll interval, not a wait for work: the deadline decides

    def tail(self, lines: int = 60) -> str:
        """The end of the worker's log, for failure messages."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def load_app(directory: Path, module_name: str) -> ModuleType:
    """Import ctxapp.py from ``directory`` under a name of its own, in this process."""
    spec = importlib.util.spec_from_file_location(module_name, directory / "ctxapp.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def stop(process: subprocess.Popen[bytes]) -> None:
    """Shut the worker down warmly (SIGTERM), killing its process group if it hangs."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: only the worker's processes
            process.wait(timeout=15)


def delete_keys(store: Any, prefix: str) -> None:
    """Delete every Redis key under ``prefix``: the worker's queue, results and records."""
    keys = list(store.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        store.delete(*keys)


def close_app(app: Any) -> None:
    """Close the sending app's broker and result-backend connections (app.close() spares both)."""
    app.pool.force_close_all()
    app.backend.result_consumer.stop()
    app.backend.client.connection_pool.disconnect()
    app.close()


def delete_queue(app: Any, queue: str) -> None:
    """Delete a RabbitMQ queue and its exchange of the same name, which outlive the run."""
    with app.connection_for_write() as connection:
        connection.default_channel.queue_delete(queue)
        connection.default_channel.exchange_delete(queue)


@pytest.fixture(scope="module")
def start_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Worker]]:
    """Start workers on demand; stop each and remove its keys and queue when the module ends."""
    processes: list[subprocess.Popen[bytes]] = []
    cleanup = contextlib.ExitStack()

    def start(*, broker_url: str, pool: str) -> Worker:
        record_url = require_server("redis")
        tag = f"{pool}_{uuid.uuid4().hex[:8]}"
        prefix = f"tidings_test_ctx_{tag}:"
        queue = f"tidings_test_ctx_{tag}"
        directory = tmp_path_factory.mktemp(f"ctxapp_{pool}")
        (directory / "ctxapp.py").write_text(textwrap.dedent(APP_SOURCE))
        config = {
            "broker_url": broker_url,
            "backend_url": record_url,
            "record_url": record_url,
            "queue": queue,
            "prefix": prefix,
        }
        (directory / "config.json").write_text(json.dumps(config))
        store = redis.Redis.from_url(record_url)
        cleanup.callback(store.close)
        cleanup.callback(delete_keys, store, prefix)
        module_name = f"ctxapp_{tag}"
        cleanup.callback(sys.modules.pop, module_name, None)
        tasks = load_app(directory, module_name)
        cleanup.callback(close_app, tasks.app)
        if broker_url.startswith("amqp"):
            cleanup.callback(delete_queue, tasks.app, queue)
        log = directory / "worker.log"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(directory), os.environ.get("PYTHONPATH", "")]),
        }
        command = [
            sys.executable, "-m", "celery", "-A", "ctxapp", "worker", f"--pool={pool}",
            "--concurrency=1", "--loglevel=INFO", "--without-gossip", "--without-mingle",
            "--without-heartbeat", f"--hostname={tag}@%h",
        ]  # fmt: skip
        with log.open("wb") as output:
            process = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
                command,
                cwd=directory,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        processes.append(process)
        worker = Worker(pool, tasks, process, log, store, prefix)
        ready = f"{prefix}ready"
        tasks.record.delay(ready, "ready")
        worker.records(ready, 1, timeout=STARTUP)
        return worker

    try:
        yield start
    finally:
        try:
            for process in processes:  # all at once: a warm shutdown takes seconds on RabbitMQ
                if process.poll() is None:
                    process.terminate()
            for process in processes:
                stop(process)
        finally:
            cleanup.close()  # once the workers are gone: queues, keys, clients


@pytest.fixture(scope="module", params=["prefork", "solo"])
def worker(request: pytest.FixtureRequest, start_worker: Callable[..., Worker]) -> Worker:
    """A worker on Redis (broker and results), prefork with one child or solo."""
    return start_worker(broker_url=require_server("redis"), pool=request.param)


@pytest.fixture(scope="module")
def rabbit_worker(start_worker: Callable[..., Worker]) -> Worker:
    """A prefork worker on RabbitMQ, with results in Redis."""
    return start_worker(broker_url=require_server("rabbitmq"), pool="prefork")


@pytest.fixture
def ids(unique_name: str) -> EventContext:
    """Ids no other test uses, so a stale value from elsewhere cannot pass for them."""
    return EventContext(f"corr-{unique_name}", f"cause-{unique_name}", f"tenant-{unique_name}")


def seen(entry: dict[str, Any]) -> EventContext:
    """The context a task recorded."""
    return EventContext(entry["correlation_id"], entry["causation_id"], entry["tenant_id"])


def bound(context: EventContext) -> event_context:
    """A scope binding all three ids of ``context``."""
    return event_context(
        correlation_id=context.correlation_id,
        causation_id=context.causation_id,
        tenant_id=context.tenant_id,
    )


def by_label(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Records keyed by their label."""
    return {entry["label"]: entry for entry in entries}


# -- through a worker on Redis, prefork and solo --------------------------------------------


@pytest.mark.integration
def test_delay_inside_event_context_carries_ids(
    worker: Worker, unique_name: str, ids: EventContext
) -> None:
    """A task sent with .delay() inside event_context sees the sender's three ids."""
    key = worker.key(unique_name)
    with bound(ids):
        worker.tasks.record.delay(key, "plain")
    [entry] = worker.records(key, 1)
    assert seen(entry) == ids


@pytest.mark.integration
def test_task_sent_from_a_task_carries_ids(
    worker: Worker, unique_name: str, ids: EventContext
) -> None:
    """A task sent from inside a task carries the ids that task was sent with."""
    key = worker.key(unique_name)
    with bound(ids):
        worker.tasks.spawn.delay(key, "parent", "child")
    entries = by_label(worker.records(key, 2))
    assert seen(entries["parent"]) == ids
    assert seen(entries["child"]) == ids


@pytest.mark.integration
def test_task_sent_from_a_handler_has_the_event_as_cause(
    worker: Worker, unique_name: str, ids: EventContext
) -> None:
    """A task sent by a handler run in a task keeps correlation and tenant, caused by the event."""
    key = worker.key(unique_name)
    with bound(ids):
        worker.tasks.raise_event.delay(key, "raiser")
    entries = by_label(worker.records(key, 2))
    assert seen(entries["raiser"]) == ids
    assert seen(entries["from-handler"]) == EventContext(
        ids.correlation_id, entries["raiser"]["event_id"], ids.tenant_id
    )


@pytest.mark.integration
def test_task_sent_without_context_gets_a_correlation_id_of_its_own(
    worker: Worker, unique_name: str
) -> None:
    """A task sent with no context bound (as beat sends) runs with a fresh correlation id only."""
    assert current_context() == EventContext()
    key = worker.key(unique_name)
    worker.tasks.record.delay(key, "bare")
    worker.tasks.record.delay(key, "bare too")
    first, second = worker.records(key, 2)
    for entry in (first, second):
        assert entry["correlation_id"]
        assert (entry["causation_id"], entry["tenant_id"]) == (None, None)
    assert first["correlation_id"] != second["correlation_id"]


@pytest.mark.integration
def test_no_tenant_leaks_into_the_next_task_of_the_process(
    worker: Worker, unique_name: str, ids: EventContext
) -> None:
    """After tasks for tenant A succeed, fail and retry, the next one sent without ids sees none."""
    key = worker.key(unique_name)
    with bound(ids):
        worker.tasks.record.delay(key, "succeeded")
        worker.tasks.fail.delay(key, "failed")
        worker.tasks.retry_once.delay(key, "retried")
    worker.records(key, 4)
    worker.tasks.record.delay(key, "after")
    entries = worker.records(key, 5)
    assert len({entry["pid"] for entry in entries}) == 1, "all must run in the same process"
    labels = [entry["label"] for entry in entries]
    assert labels == ["succeeded", "failed", "retried", "retried", "after"]
    assert [seen(entry) for entry in entries[:4]] == [ids] * 4
    after = seen(entries[4])
    assert (after.causation_id, after.tenant_id) == (None, None)
    assert after.correlation_id not in (None, ids.correlation_id)


@pytest.mark.integration
def test_hostile_context_headers_are_not_bound(worker: Worker, unique_name: str) -> None:
    """Header values with CR/LF, escapes or excess length never become the task's context."""
    key = worker.key(unique_name)
    worker.tasks.record.apply_async(
        (key, "hostile"),
        headers={
            CORRELATION_HEADER: "c-1\r\nINFO forged line",
            TENANT_HEADER: "t" * 300,
            CAUSATION_HEADER: "\x1b[31mred",
        },
    )
    [entry] = worker.records(key, 1)
    assert (entry["causation_id"], entry["tenant_id"]) == (None, None)
    assert entry["correlation_id"]
    assert "\n" not in entry["correlation_id"]


@pytest.mark.integration
def test_caller_set_header_is_not_overwritten(
    worker: Worker, unique_name: str, ids: EventContext
) -> None:
    """A context header the caller set explicitly wins over the bound id; the others still flow."""
    key = worker.key(unique_name)
    with bound(ids):
        worker.tasks.record.apply_async((key, "explicit"), headers={TENANT_HEADER: "chosen"})
    [entry] = worker.records(key, 1)
    assert seen(entry) == EventContext(ids.correlation_id, ids.causation_id, "chosen")


@pytest.mark.integration
def test_retry_keeps_ids(worker: Worker, unique_name: str, ids: EventContext) -> None:
    """A task that calls self.retry() sees the same ids on its second attempt."""
    key = worker.key(unique_name)
    with bound(ids):
        worker.tasks.retry_once.delay(key, "retry")
    first, second = worker.records(key, 2)
    assert (first["retries"], second["retries"]) == (0, 1)
    assert seen(first) == ids
    assert seen(second) == ids


@pytest.mark.integration
def test_autoretry_keeps_ids(worker: Worker, unique_name: str, ids: EventContext) -> None:
    """A task retried by autoretry_for sees the same ids on its second attempt."""
    key = worker.key(unique_name)
    with bound(ids):
        worker.tasks.autoretry.delay(key, "autoretry")
    first, second = worker.records(key, 2)
    assert (first["retries"], second["retries"]) == (0, 1)
    assert seen(first) == ids
    assert seen(second) == ids


@pytest.mark.integration
def test_countdown_and_eta_keep_ids(worker: Worker, unique_name: str, ids: EventContext) -> None:
    """Tasks delayed by countdown and by eta see the sender's ids when they finally run."""
    key = worker.key(unique_name)
    with bound(ids):
        worker.tasks.record.apply_async((key, "countdown"), countdown=1)
        eta = datetime.now(UTC) + timedelta(seconds=1)
        worker.tasks.record.apply_async((key, "eta"), eta=eta)
    entries = by_label(worker.records(key, 2))
    assert seen(entries["countdown"]) == ids
    assert seen(entries["eta"]) == ids


@pytest.mark.integration
def test_chain_steps_carry_ids(worker: Worker, unique_name: str, ids: EventContext) -> None:
    """Every step of a chain, each sent by the worker after the one before, sees the ids."""
    key = worker.key(unique_name)
    step = worker.tasks.step
    with bound(ids):
        (step.s(None, key, "a") | step.s(key, "b") | step.s(key, "c")).apply_async()
    entries = worker.records(key, 3)
    assert [(entry["label"], entry["previous"]) for entry in entries] == [
        ("a", None),
        ("b", "a"),
        ("c", "b"),
    ]
    assert [seen(entry) for entry in entries] == [ids] * 3


@pytest.mark.integration
def test_group_members_carry_ids(worker: Worker, unique_name: str, ids: EventContext) -> None:
    """Every member of a group sees the ids."""
    key = worker.key(unique_name)
    record = worker.tasks.record
    with bound(ids):
        result = celery.group(record.s(key, f"member-{n}") for n in range(3)).apply_async()
    entries = worker.records(key, 3)
    # Waiting on the group's result also releases it: Celery holds every pending group member.
    assert result.get(timeout=WAIT) == [None, None, None]
    assert sorted(entry["label"] for entry in entries) == ["member-0", "member-1", "member-2"]
    assert [seen(entry) for entry in entries] == [ids] * 3


@pytest.mark.integration
def test_chord_callback_carries_ids(worker: Worker, unique_name: str, ids: EventContext) -> None:
    """A chord's header tasks and its callback, sent by the worker, all see the ids."""
    key = worker.key(unique_name)
    step, collect = worker.tasks.step, worker.tasks.collect
    with bound(ids):
        header = [step.s(None, key, "h1"), step.s(None, key, "h2")]
        result = celery.chord(header)(collect.s(key, "callback"))
    entries = by_label(worker.records(key, 3))
    # Waiting on the results also releases them: Celery holds every pending chord member.
    assert result.get(timeout=WAIT) == "callback"
    assert result.parent.get(timeout=WAIT) == ["h1", "h2"]
    assert entries["callback"]["results"] == ["h1", "h2"]
    assert {label: seen(entry) for label, entry in entries.items()} == {
        "h1": ids,
        "h2": ids,
        "callback": ids,
    }


# -- through a worker on RabbitMQ -----------------------------------------------------------


@pytest.mark.integration
def test_rabbitmq_delay_carries_ids(
    rabbit_worker: Worker, unique_name: str, ids: EventContext
) -> None:
    """Over RabbitMQ, a task sent with .delay() inside event_context sees the sender's ids."""
    key = rabbit_worker.key(unique_name)
    with bound(ids):
        rabbit_worker.tasks.record.delay(key, "plain")
    [entry] = rabbit_worker.records(key, 1)
    assert seen(entry) == ids


@pytest.mark.integration
def test_rabbitmq_chain_steps_carry_ids(
    rabbit_worker: Worker, unique_name: str, ids: EventContext
) -> None:
    """Over RabbitMQ, every step of a chain sees the ids."""
    key = rabbit_worker.key(unique_name)
    step = rabbit_worker.tasks.step
    with bound(ids):
        (step.s(None, key, "a") | step.s(key, "b")).apply_async()
    entries = rabbit_worker.records(key, 2)
    assert [entry["label"] for entry in entries] == ["a", "b"]
    assert [seen(entry) for entry in entries] == [ids] * 2


# -- installing, eager runs and published headers, in this process --------------------------


@pytest.mark.integration
def test_importing_the_module_installs_nothing_and_imports_no_celery() -> None:
    """Importing tidings.transports.celery neither imports Celery nor connects any signal."""
    code = (
        "import sys, tidings.transports.celery\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] == 'celery'))"
    )
    done = subprocess.run(  # noqa: S603 - our own interpreter
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"


def test_missing_celery_raises_import_error_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without Celery, installing raises ImportError saying which extra to install."""
    monkeypatch.setitem(sys.modules, "celery", None)
    with pytest.raises(ImportError, match=r"pip install 'tidings\[celery\]'"):
        install_context_propagation(object())


def make_app(name: str) -> Any:
    """A Celery app on the in-memory broker, not made current, with one task recording context."""
    app = celery.Celery(name, broker="memory://", set_as_current=False)
    app.conf.task_default_queue = f"tidings_test_{name}_{uuid.uuid4().hex[:8]}"

    @app.task(name=f"{name}.see", shared=False, bind=True)
    def see(self: Any, fail: bool = False, retry: bool = False) -> EventContext:
        if fail:
            raise ValueError("this task fails on purpose")
        if retry and self.request.retries == 0:
            raise self.retry(countdown=0, max_retries=1)
        return current_context()

    app.see = see
    return app


@pytest.fixture
def installed_app() -> Iterator[Any]:
    """An in-memory app with context propagation installed."""
    app = make_app("installed")
    install_context_propagation(app)
    try:
        yield app
    finally:
        app.close()


def test_install_twice_connects_each_receiver_once(installed_app: Any) -> None:
    """Installing again, on the same app or another, leaves one receiver per signal."""
    other = make_app("other")
    try:
        install_context_propagation(installed_app)
        install_context_propagation(other)
        install_context_propagation(other)
        signals = celery.signals
        for sig in (signals.before_task_publish, signals.task_prerun, signals.task_postrun):
            ours = [key for key, _ in sig.receivers if str(key[0]).startswith("tidings.")]
            assert len(ours) == 1, sig.name
    finally:
        other.close()


def test_eager_task_keeps_the_callers_context(installed_app: Any, ids: EventContext) -> None:
    """A task run eagerly, never published, sees the caller's context and leaves it as it was."""
    with bound(ids):
        assert installed_app.see.apply().get() == ids
        assert current_context() == ids
    assert current_context() == EventContext()


def test_eager_task_binds_the_headers_it_is_given(installed_app: Any, ids: EventContext) -> None:
    """Headers given to an eager run, flat or nested under "headers", are what the task sees."""
    flat = {CORRELATION_HEADER: "c-flat", TENANT_HEADER: "t-flat"}
    nested = {"headers": {CAUSATION_HEADER: "cause-nested"}}
    with bound(ids):
        assert installed_app.see.apply(headers=flat).get() == EventContext("c-flat", None, "t-flat")
        assert installed_app.see.apply(headers=nested).get() == EventContext(None, "cause-nested")
        assert current_context() == ids


def _prerun_context(task: Any, headers: dict[str, Any] | None = None) -> EventContext:
    """The context ``task_prerun`` binds for a published (not eager) run of ``task``."""
    task.push_request(id="published", is_eager=False, headers=headers or {})
    try:
        celery.signals.task_prerun.send(sender=task, task_id="published", task=task)
        try:
            return current_context()
        finally:
            celery.signals.task_postrun.send(sender=task, task_id="published", task=task)
    finally:
        task.pop_request()


def test_minting_for_tasks_without_ids_can_be_turned_off(installed_app: Any) -> None:
    """``mint_correlation_id=False`` runs a task that carries no ids with none."""
    minted = _prerun_context(installed_app.see)
    assert minted.correlation_id is not None
    assert (minted.causation_id, minted.tenant_id) == (None, None)
    install_context_propagation(installed_app, mint_correlation_id=False)
    assert _prerun_context(installed_app.see) == EventContext()
    install_context_propagation(installed_app)  # a later call without the option keeps it
    assert _prerun_context(installed_app.see) == EventContext()
    carried = _prerun_context(installed_app.see, {TENANT_HEADER: "acme"})
    assert carried == EventContext(tenant_id="acme")
    assert current_context() == EventContext()


def test_context_is_restored_after_failure_and_retry(installed_app: Any, ids: EventContext) -> None:
    """task_postrun restores the caller's context after a task that failed or retried."""
    headers = {TENANT_HEADER: "t-task"}
    with bound(ids):
        failed = installed_app.see.apply(kwargs={"fail": True}, headers=headers)
        assert isinstance(failed.result, ValueError)
        assert current_context() == ids
        retried = installed_app.see.apply(kwargs={"retry": True}, headers=headers)
        assert retried.get() == EventContext(tenant_id="t-task")
        assert current_context() == ids


def test_task_of_an_app_without_propagation_binds_nothing(
    installed_app: Any, ids: EventContext
) -> None:
    """A task of another app in the same process ignores the context headers it is given."""
    other = make_app("uninstalled")
    try:
        with bound(ids):
            assert other.see.apply(headers={TENANT_HEADER: "t-other"}).get() == ids
    finally:
        other.close()


def test_published_headers_hold_only_the_bound_ids(installed_app: Any) -> None:
    """A message gets a header for each id bound and none for the ids that are not."""
    sent: list[dict[str, Any]] = []

    def capture(headers: dict[str, Any], **_: Any) -> None:
        sent.append({name: headers.get(name) for name in headers if name.startswith("tidings_")})

    uid = f"test-capture-{uuid.uuid4().hex}"
    celery.signals.after_task_publish.connect(capture, weak=False, dispatch_uid=uid)
    try:
        installed_app.see.delay()
        with event_context(correlation_id="c-only"):
            installed_app.see.delay()
        with event_context(correlation_id="c", causation_id="e", tenant_id="t"):
            installed_app.send_task("some.other.service.task")
    finally:
        celery.signals.after_task_publish.disconnect(dispatch_uid=uid)
    assert sent == [
        {},
        {CORRELATION_HEADER: "c-only"},
        {CORRELATION_HEADER: "c", CAUSATION_HEADER: "e", TENANT_HEADER: "t"},
    ]
