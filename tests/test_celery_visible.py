"""Failures visible in Celery's own tools: a real worker's events of retries and dead letters.

A real prefork worker (:mod:`tests.apps.celery_visible`) runs a handler that fails once and one
that always fails; a real event receiver (what ``celery events --dump`` and Flower read)
records the worker's task events. Retries must show as ``task-retried``, dead letters as
``task-failed``, in equal numbers, each naming its handler, and no event may show the
event's personal data.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from celery import Celery
from tests.apps import celery_visible
from tests.apps.celery_visible import ATTEMPTS, MemberComplained, MemberJoined, Pinged
from tests.conftest import require_server
from tests.workers import celery_worker, wait_until

from tidings import EventBus
from tidings.delivery import Dispatcher, Received, traceback_line
from tidings.memory import MemoryDeadLetterStore
from tidings.retry import RetryPolicy
from tidings.transports.celery import handler_task_name

pytestmark = pytest.mark.integration

APP = "tests.apps.celery_visible"
EMAIL = "ada.lovelace@example.org"


class Monitor:
    """A real Celery event receiver in a thread: every task event of one worker, as dicts."""

    def __init__(self, app: Celery, hostname: str) -> None:
        self.app = app
        self.hostname = hostname
        self.events: list[dict[str, Any]] = []
        self.ready = threading.Event()
        self._lock = threading.Lock()
        self._receiver: Any = None
        self.error: BaseException | None = None

    def of(self, kind: str) -> list[dict[str, Any]]:
        """The events of type ``kind`` received so far."""
        with self._lock:
            return [event for event in self.events if event.get("type") == kind]

    def _on_event(self, event: dict[str, Any]) -> None:
        if str(event.get("hostname", "")).startswith(self.hostname):
            with self._lock:
                self.events.append(event)

    def run(self) -> None:
        """Receive until stopped (the body of the thread)."""
        with self.app.connection_for_read() as connection:
            receiver = self.app.events.Receiver(connection, handlers={"*": self._on_event})
            self._receiver = receiver
            original = receiver.on_consume_ready

            def consuming(*args: Any, **kwargs: Any) -> None:
                original(*args, **kwargs)
                self.ready.set()

            receiver.on_consume_ready = consuming
            try:
                receiver.capture(limit=None, timeout=None, wakeup=False)
            except BaseException as exc:
                self.error = exc
                raise

    def stop(self) -> None:
        """Ask the receiving loop to end (it looks every second)."""
        if self._receiver is not None:
            self._receiver.should_stop = True


@contextmanager
def monitoring(app: Celery, hostname: str) -> Iterator[Monitor]:
    """Run a :class:`Monitor` for the block; it is listening when the block starts."""
    monitor = Monitor(app, hostname)
    thread = threading.Thread(target=monitor.run, daemon=True)
    thread.start()
    assert monitor.ready.wait(30), "the event receiver did not start"
    try:
        yield monitor
    finally:
        monitor.stop()
        thread.join(10)


@pytest.fixture(params=["redis", "rabbitmq"])
def broker(request: pytest.FixtureRequest) -> str:
    """The URL of each broker in turn (skipped, or failed under CI, when it is absent)."""
    return require_server(request.param)


@pytest.fixture
def service(
    broker: str, unique_name: str, redis_url: str
) -> Iterator[tuple[Celery, EventBus, Any, Any]]:
    """The test's service (publishing side); its Redis keys and RabbitMQ queues removed after."""
    require_server("redis")
    app, bus, transport, client = celery_visible.make(unique_name, unique_name, broker)
    try:
        yield app, bus, transport, client
    finally:
        transport.close()
        for key in client.scan_iter(f"{unique_name}*"):
            client.delete(key)
        if broker.startswith("amqp"):
            with Celery("cleanup", broker=broker).connection_for_write() as connection:
                channel = connection.default_channel
                channel.queue_delete(unique_name)
                channel.exchange_delete(f"{unique_name}.events")
        client.close()


def _runs(client: Any, prefix: str, kind: str, handler: str) -> int:
    return int(client.get(f"{prefix}:{kind}:{handler}") or 0)


def test_retries_and_dead_letters_show_in_celery_events(
    service: tuple[Celery, EventBus, Any, Any], unique_name: str, broker: str
) -> None:
    """Each retry is one task-retried, each dead letter one task-failed, naming the handler only."""
    app, bus, transport, client = service
    env = {"VISIBLE_QUEUE": unique_name, "VISIBLE_PREFIX": unique_name, "VISIBLE_BROKER": broker}
    with (
        monitoring(app, f"{unique_name}@") as monitor,
        celery_worker(APP, unique_name, env, pool="prefork", concurrency=1),
    ):
        last_ping = [0.0]

        def heard_a_ping() -> bool:
            # The receiver may subscribe after it says it is ready: ping (every 2 s at most)
            # until one of the pings' task events arrives.
            if monitor.of("task-succeeded"):
                return True
            if time.monotonic() - last_ping[0] > 2:
                last_ping[0] = time.monotonic()
                bus.publish(Pinged())
            return False

        wait_until(heard_a_ping, timeout=60, what="the worker's first task event")
        pings = len(monitor.of("task-succeeded"))
        bus.publish(MemberJoined(email=EMAIL))
        bus.publish(MemberComplained(email=EMAIL))
        wait_until(
            lambda: (
                transport.dead_letters.count() == 1
                and _runs(client, unique_name, "runs", "visible.flaky") == 2
            ),
            timeout=60,
            what="the flaky handler's success and the doomed handler's dead letter",
        )
        # The flaky handler's second run and the doomed handler's last are reported too.
        wait_until(
            lambda: (
                len(monitor.of("task-failed")) == 1
                and len(monitor.of("task-succeeded")) >= pings + 1
            ),
            timeout=30,
            what=f"the task events of the last runs ({monitor.error!r})",
        )
    assert _runs(client, unique_name, "runs", "visible.doomed") == ATTEMPTS
    failures = sum(
        _runs(client, unique_name, "fails", name) for name in ("visible.flaky", "visible.doomed")
    )
    dead = transport.dead_letters.count()
    retried, failed = monitor.of("task-retried"), monitor.of("task-failed")
    # What tidings recorded: every failure was retried or dead-lettered, once each.
    assert (len(retried), len(failed)) == (failures - dead, dead) == (ATTEMPTS, 1)

    # Each handler is told apart: by the task name of its retries, and in the exception text.
    names = {event["uuid"]: str(event.get("name")) for event in monitor.of("task-received")}
    doomed = handler_task_name("visible.doomed")
    assert sorted(names[event["uuid"]] for event in retried) == sorted(
        ["tidings.deliver", "tidings.deliver", doomed]
    )
    assert names[failed[0]["uuid"]] == doomed
    assert "visible.doomed" in failed[0]["exception"]
    assert "DeliveryFailed" in failed[0]["exception"]
    assert "DoomedError" in failed[0]["exception"]
    assert sum("visible.flaky" in event["exception"] for event in retried) == 1
    assert sum("visible.doomed" in event["exception"] for event in retried) == 2

    # Every delivery, first or retried, shows `<type id>` as its arguments: never the payload.
    for event in monitor.of("task-received"):
        assert str(event["args"]).startswith("<celery_visible."), event
    everything = json.dumps(monitor.events, default=str)
    assert EMAIL not in everything
    letter = transport.dead_letters.list()[0]
    assert letter.handler == "visible.doomed"
    assert letter.attempts == ATTEMPTS


def test_the_dead_letter_log_line_carries_the_traceback_summary(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A dead letter's ERROR line names the error and its innermost frames, escaped, bounded."""
    bus = EventBus()

    @bus.subscribe(MemberJoined, name="visible.log")
    def explode(event: MemberJoined) -> None:
        msg = "forged\nINFO all is well " + "x" * 5000
        raise ValueError(msg)

    store = MemoryDeadLetterStore()
    dispatcher = Dispatcher(bus, dead_letters=store, retry=RetryPolicy(max_attempts=1))
    body = dispatcher.codec.encode(MemberJoined(email=EMAIL))
    with caplog.at_level(logging.ERROR, logger="tidings.worker"):
        outcome = dispatcher.dispatch(Received(body))
    assert len(outcome.dead) == 1
    [line] = [r.getMessage() for r in caplog.records if "dead-lettered as" in r.getMessage()]
    assert "ValueError: forged\\nINFO all is well" in line
    assert "| at test_celery_visible.py:" in line
    assert "in explode" in line
    assert "\n" not in line
    assert len(line) < 1200  # bounded, however long the error's text
    assert EMAIL not in line


def test_traceback_line_is_bounded_and_names_frames() -> None:
    """traceback_line puts the error first, innermost frame next, and cuts at its limit."""

    def inner() -> None:
        msg = "deep \x1b[31m trouble"
        raise KeyError(msg)

    try:
        inner()
    except KeyError as exc:
        line = traceback_line(exc, limit=120)
    assert line.startswith("KeyError: 'deep \\x1b[31m trouble'")
    assert "in inner <" in line
    assert "\x1b" not in line
    assert len(line) <= 120 + 2 * len("…(999 chars)")
