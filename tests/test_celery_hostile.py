"""Hostile input never stops a Celery worker: a matrix of bad messages fed to real workers.

Anyone who can write to a queue can publish any body, content type and headers. One real
``celery worker`` per broker (Redis and RabbitMQ; :mod:`tests.apps.celery_hostile`) receives
every case in turn: each must end as a dead letter within a time bound, with bounded fields,
and a valid event published after it must be handled by the same worker process and the same
pool child (no crash, no restart).
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from subprocess import Popen
from typing import Any

import pytest
import redis
from celery import Celery
from tests import hostile_envelopes
from tests.apps import celery_hostile
from tests.apps.celery_hostile import MAX_INFRASTRUCTURE_RETRIES, Probe
from tests.conftest import require_server
from tests.workers import celery_worker, wait_until

from tidings import EventBus
from tidings._letters import MAX_HEADER_KEY, MAX_HEADER_VALUE, MAX_HEADERS
from tidings.codec import default_codec
from tidings.ports import DeadLetter
from tidings.transports.celery import CeleryTransport

pytestmark = pytest.mark.integration

APP = "tests.apps.celery_hostile"
DEAD_LETTER_WITHIN = 10.0
"""Seconds from publishing a hostile message to its dead letter, at most (measured: < 1 s)."""
MARK = "hostile_case"


@dataclass
class Worker:
    """One broker's worker, the publishing side of its service, and what was measured."""

    broker: str
    name: str
    app: Celery
    bus: EventBus
    transport: CeleryTransport
    client: redis.Redis
    process: Popen[bytes]
    child: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def publish_raw(self, body: bytes, content_type: str, encoding: str, headers: dict) -> None:
        """Publish one message with kombu, straight to the service's queue."""
        with self.app.connection_for_write() as connection:
            connection.Producer().publish(
                body,
                exchange=self.name,
                routing_key=self.name,
                content_type=content_type,
                content_encoding=encoding,
                headers=headers,
                declare=[self.app.amqp.queues[self.name]],
            )

    def letters_marked(self, mark: str) -> list[DeadLetter]:
        """The dead letters whose ``hostile_case`` header is ``mark``."""
        letters = self.transport.dead_letters.list(limit=1000)
        return [letter for letter in letters if letter.headers.get(MARK) == mark]

    def effect_pid(self, event_id: str) -> int:
        """The process that handled ``event_id``, or 0 if none has."""
        for item in self.client.lrange(f"{self.name}:effects", 0, -1):
            handled, pid = item.decode().split("|")
            if handled == event_id:
                return int(pid)
        return 0

    def probe(self) -> int:
        """Publish a valid event; return the process that handled it (within 20 s)."""
        event = Probe(label="probe")
        self.bus.publish(event)
        return wait_until(lambda: self.effect_pid(event.event_id), timeout=20, what="a probe")


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def worker(request: pytest.FixtureRequest) -> Iterator[Worker]:
    """One prefork worker (one child) per broker for the whole matrix; keys removed after."""
    require_server("redis")  # the dead-letter store and the effects live there
    broker_url = require_server(request.param)
    name = f"t_hostile_{request.param}_{uuid.uuid4().hex[:8]}"
    app, bus, transport, client = celery_hostile.make(name, name, broker_url=broker_url)
    env = {"HOSTILE_QUEUE": name, "HOSTILE_PREFIX": name, "HOSTILE_BROKER_URL": broker_url}
    try:
        with celery_worker(APP, name, env, pool="prefork", concurrency=1) as process:
            running = Worker(request.param, name, app, bus, transport, client, process)
            running.child = running.probe()
            assert running.child != process.pid
            yield running
            if running.timings:
                slowest = max(running.timings, key=running.timings.__getitem__)
                print(
                    f"\n{request.param}: {len(running.timings)} hostile cases, publish to dead "
                    f"letter at most {running.timings[slowest]:.3f} s ({slowest})"
                )
    finally:
        if request.param == "rabbitmq":
            with app.connection_for_write() as connection:
                connection.default_channel.queue_delete(name)
        for key in client.scan_iter(f"{name}*"):
            client.delete(key)
        transport.close()
        client.close()


@dataclass(frozen=True)
class Case:
    """One hostile message: its body, content type, encoding and headers (a builder of them)."""

    id: str
    body: Callable[[str], bytes]
    content_type: str = "application/json"
    encoding: str = "utf-8"
    headers: Callable[[str, str], dict[str, Any]] = lambda mark, broker: task_headers(mark)
    brokers: tuple[str, ...] = ("redis", "rabbitmq")


def task_headers(mark: str, task: Any = "tidings.deliver", **more: Any) -> dict[str, Any]:
    """Protocol 2 headers of a tidings task, the case's mark first."""
    return {MARK: mark, "task": task, "id": str(uuid.uuid4()), "lang": "py", **more}


def envelope(label: str) -> str:
    """A valid envelope of a probe event, as the transport sends it."""
    return default_codec.encode(Probe(label=label)).decode()


def task_body(*args: Any, kwargs: Any = None, embed: Any = None) -> Callable[[str], bytes]:
    """A body ``[args, kwargs, embed]``; the string ``ENVELOPE`` in args becomes a valid one."""

    def build(mark: str) -> bytes:
        real = [envelope(mark) if a == "ENVELOPE" else a for a in args]
        return json.dumps([real, {} if kwargs is None else kwargs, embed]).encode()

    return build


def raw(data: bytes) -> Callable[[str], bytes]:
    """A body of these exact bytes."""
    return lambda mark: data


GARBAGE = task_body("not an envelope")
NASTY = "\r\n\x1b[31mFORGED LOG LINE\x1b[0m\x00\u2028\u202e"
FIVE_THOUSAND = "9" * 5000

CASES = [
    Case("application-data", raw(b"\x00\x01garbage"), "application/data", "binary"),
    Case("application-text", raw(b"plain text"), "application/text", "utf-8"),
    Case("text-plain", raw(b"plain text"), "text/plain", "utf-8"),
    Case("x-nonsense", raw(b"\xff\xfe?"), "application/x-nonsense", "binary"),
    Case("raw-data-no-task", raw(b"\x00raw"), "application/data", "binary", lambda m, b: {MARK: m}),
    Case("non-task-json", raw(b'{"just": "json"}'), headers=lambda m, b: {MARK: m}),
    Case("body-a-map", raw(b'{"args": 1}')),
    Case("body-two-items", raw(b"[[], {}]")),
    Case("body-a-string", raw(b'"[[], {}, {}]"')),
    Case("args-not-a-list", raw(b'["x", {}, {}]')),
    Case("kwargs-not-a-map", raw(b"[[], [], {}]")),
    Case("embed-with-callbacks", task_body("ENVELOPE", embed={"callbacks": [{"task": "x"}]})),
    Case("json-garbage", raw(b"\x00\xff{not json")),
    Case("int-of-5000-digits", raw(b"[[" + FIVE_THOUSAND.encode() + b"], {}, {}]")),
    Case("missing-id", GARBAGE, headers=lambda m, b: {MARK: m, "task": "tidings.deliver"}),
    Case("id-a-list", GARBAGE, headers=lambda m, b: {**task_headers(m), "id": ["x"]}),
    Case("task-a-list", GARBAGE, headers=lambda m, b: task_headers(m, task=["tidings.deliver"])),
    Case("eta-a-number", GARBAGE, headers=lambda m, b: task_headers(m, eta=12)),
    Case("eta-garbage", GARBAGE, headers=lambda m, b: task_headers(m, eta="not a date")),
    Case("timelimit-text", GARBAGE, headers=lambda m, b: task_headers(m, timelimit="x")),
    Case("argsrepr-a-list", GARBAGE, headers=lambda m, b: task_headers(m, argsrepr=[1])),
    Case(
        "batch-garbage",
        raw(b'[[["not an envelope"]], {}, {}]'),
        headers=lambda m, b: task_headers(m, task="tidings.deliver_batch"),
    ),
    *(
        Case(f"attempt-{label}", task_body("ENVELOPE", None, attempt))
        for label, attempt in [
            ("superscript", "²"),
            ("5000-digits", FIVE_THOUSAND),
            ("negative", -1),
            ("huge", 10**30),
            ("float", 1.5),
            ("list", [1]),
            ("bool", True),
        ]
    ),
    Case("attempt-kwarg-nonsense", task_body("ENVELOPE", kwargs={"attempt": "²"})),
    *(
        Case(
            f"retries-{label}",
            task_body("ENVELOPE"),
            headers=lambda m, b, r=retries: task_headers(m, retries=r),
            brokers=brokers,
        )
        for label, retries, brokers in [
            ("superscript", "²", ("redis", "rabbitmq")),
            ("5000-digits", FIVE_THOUSAND, ("redis", "rabbitmq")),
            ("digits-as-text", "3", ("redis", "rabbitmq")),
            ("negative", -1, ("redis", "rabbitmq")),
            ("huge", 10**30, ("redis",)),  # AMQP tables hold 64-bit integers only
            ("float", 1.5, ("redis", "rabbitmq")),
            ("list", [1], ("redis", "rabbitmq")),
        ]
    ),
    Case(
        "thousands-of-headers",
        GARBAGE,
        headers=lambda m, b: {**task_headers(m), **{f"h{i}": "v" * 8 for i in range(3000)}},
    ),
    Case(
        "megabyte-header-values",
        GARBAGE,
        # A RabbitMQ message's headers must fit in one frame (128 KiB by default).
        headers=lambda m, b: {
            **task_headers(m),
            **{f"big{i}": "x" * (2**21 if b == "redis" else 50_000) for i in range(2)},
            "k" * 200: "long name",
        },
    ),
    Case(
        "control-characters-in-every-header",
        GARBAGE,
        headers=lambda m, b: {
            **task_headers(m, argsrepr=NASTY, kwargsrepr=NASTY, origin=NASTY, root_id=NASTY),
            f"x{NASTY}": NASTY,
        },
    ),
    Case(
        "control-characters-in-the-id",
        task_body("ENVELOPE"),
        headers=lambda m, b: {**task_headers(m), "id": f"x{NASTY}"},
    ),
    Case(
        "control-characters-in-the-task-name",
        GARBAGE,
        headers=lambda m, b: task_headers(m, task=f"tidings.deliver{NASTY}"),
    ),
    Case("body-of-three-mebibytes", task_body("x" * 3 * 2**20)),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_a_hostile_message_is_dead_lettered_and_the_same_worker_goes_on(worker, case):
    """The message ends a bounded dead letter in time; the same worker and child handle the next."""
    if worker.broker not in case.brokers:
        pytest.skip(f"{worker.broker} cannot carry this message")
    mark = uuid.uuid4().hex
    began = time.monotonic()
    worker.publish_raw(
        case.body(mark), case.content_type, case.encoding, case.headers(mark, worker.broker)
    )
    letters = wait_until(
        lambda: worker.letters_marked(mark), timeout=DEAD_LETTER_WITHIN, what="its dead letter"
    )
    worker.timings[case.id] = time.monotonic() - began
    assert worker.probe() == worker.child, "the pool child handling events must be the same"
    assert worker.process.poll() is None, "the worker must not have exited"
    assert len(worker.letters_marked(mark)) == 1
    (letter,) = letters
    assert len(letter.body) <= worker.transport.codec.limits.max_bytes
    assert len(letter.headers) <= MAX_HEADERS + 1  # and the content type the consumer adds
    assert all(len(k) <= MAX_HEADER_KEY for k in letter.headers)
    assert all(len(v) <= MAX_HEADER_VALUE for v in letter.headers.values())


def test_a_retries_header_of_five_thousand_digits_dead_letters_at_once(worker):
    """A 5,000-digit retries header on a valid event is dead-lettered within 2 s, not run."""
    mark = uuid.uuid4().hex
    began = time.monotonic()
    worker.publish_raw(
        task_body("ENVELOPE")(mark),
        "application/json",
        "utf-8",
        task_headers(mark, retries=FIVE_THOUSAND),
    )
    (letter,) = wait_until(lambda: worker.letters_marked(mark), timeout=2, what="a dead letter")
    assert time.monotonic() - began < 2
    assert "retries" in letter.reason


def test_a_delivery_whose_store_is_down_is_retried_a_bounded_number_of_times_and_kept(worker):
    """With the dead-letter store down, a delivery retries up to the bound and is never acked."""
    if worker.broker != "redis":
        pytest.skip("the unacknowledged index read here is the Redis broker's")
    mark = uuid.uuid4().hex
    switch = f"{worker.name}:store-down"
    worker.client.set(switch, 1)
    try:
        worker.publish_raw(GARBAGE(mark), "application/json", "utf-8", task_headers(mark))
        # Attempts with retries 0, 1, …, the bound each ask the store, which refuses; at the
        # bound the dead letter is refused too.
        wait_until(
            lambda: (
                int(worker.client.get(switch + ":refused") or 0) >= MAX_INFRASTRUCTURE_RETRIES + 2
            ),
            timeout=20,
            what="the retries up to the bound",
        )

        def kept() -> list[int]:
            found = []
            for record in worker.client.hvals("unacked"):
                message = json.loads(record)[0]
                if message["headers"].get(MARK) == mark:
                    found.append(message["headers"]["retries"])
            return found

        # Past the bound the message waits for the store, unacknowledged, the next try 60 s on.
        wait_until(
            lambda: kept() == [MAX_INFRASTRUCTURE_RETRIES + 1],
            timeout=10,
            what="the message to be kept for later, unacknowledged",
        )
        assert int(worker.client.get(switch + ":refused") or 0) == MAX_INFRASTRUCTURE_RETRIES + 2
        assert not worker.letters_marked(mark)
    finally:
        worker.client.delete(switch)
    assert worker.probe() == worker.child


def test_a_message_celery_cannot_run_is_kept_while_the_store_is_down(worker):
    """With the store down, a message Celery cannot run is kept, unacked, and the worker goes on."""
    mark = uuid.uuid4().hex
    switch = f"{worker.name}:store-down"
    worker.client.set(switch, 1)
    try:
        worker.publish_raw(b"\x00raw", "application/data", "binary", task_headers(mark))
        wait_until(
            lambda: int(worker.client.get(switch + ":refused") or 0) >= 1,
            timeout=20,
            what="the store to refuse its dead letter",
        )
        assert worker.process.poll() is None, "the worker must not have exited"
    finally:
        worker.client.delete(switch)
    # The consumer reconnects and the broker hands the message out again: now it is stored.
    wait_until(lambda: worker.letters_marked(mark), timeout=30, what="its dead letter")
    assert len(worker.letters_marked(mark)) == 1
    assert worker.process.poll() is None
    assert worker.probe() == worker.child


def _kombu_item(mark: str, **changes: Any) -> bytes:
    """A kombu Redis queue item carrying ``mark``, with some of its fields replaced."""
    item: dict[str, Any] = {
        "body": base64.b64encode(b'[["x"], {}, {}]').decode(),
        "content-type": "application/json",
        "content-encoding": "utf-8",
        "headers": {MARK: mark, "task": "tidings.deliver", "id": mark},
        "properties": {
            "delivery_tag": mark,
            "body_encoding": "base64",
            "delivery_info": {"exchange": "", "routing_key": ""},
        },
    }
    item.update(changes)
    return json.dumps(item).encode()


RAW_ITEMS: dict[str, Callable[[str], bytes]] = {
    "not-json": lambda m: f"not json {m}".encode(),
    "a-json-list": lambda m: json.dumps([m]).encode(),
    "no-properties": lambda m: _kombu_item(m, properties=None),
    "properties-text": lambda m: _kombu_item(m, properties=m),
    "headers-a-list": lambda m: _kombu_item(m, headers=[m]),
    "body-not-base64": lambda m: _kombu_item(m, body=f"%%%{m}"),
    "no-delivery-info": lambda m: _kombu_item(
        m, properties={"delivery_tag": m, "body_encoding": "base64"}
    ),
}


@pytest.mark.parametrize(("label", "build"), RAW_ITEMS.items(), ids=RAW_ITEMS.keys())
def test_a_redis_queue_item_that_is_not_a_kombu_message_is_dead_lettered(worker, label, build):
    """An LPUSHed item kombu cannot take is dead-lettered; the same worker and child go on."""
    if worker.broker != "redis":
        pytest.skip("only a Redis queue takes arbitrary items")
    mark = uuid.uuid4().hex
    began = time.monotonic()
    worker.client.lpush(worker.name, build(mark))

    def found() -> list[DeadLetter]:
        letters = worker.transport.dead_letters.list(limit=1000)
        return [letter for letter in letters if mark.encode() in letter.body]

    (letter,) = wait_until(found, timeout=DEAD_LETTER_WITHIN, what="its dead letter")
    worker.timings[f"raw-item-{label}"] = time.monotonic() - began
    assert "not a kombu message" in letter.headers["tidings_malformed"]
    assert letter.destination == worker.name
    assert worker.probe() == worker.child
    assert worker.process.poll() is None


ENVELOPES_WITHIN = 90.0
"""Seconds for the whole envelope matrix (about 160 messages) to be settled, at most."""


def test_every_spoiled_envelope_field_ends_as_the_codec_says_and_the_worker_goes_on(worker):
    """Each hostile envelope is dead-lettered (or, if the codec takes it, handled), none lost."""
    cases = hostile_envelopes.cases()
    marks = {name: uuid.uuid4().hex for name in cases}
    expected = {name: hostile_envelopes.expected(body) for name, body in cases.items()}
    assert sum(event_id is None for event_id in expected.values()) > 0.8 * len(cases)
    began = time.monotonic()
    for name, body in cases.items():
        message = json.dumps([[body.decode()], {}, None]).encode()
        worker.publish_raw(message, "application/json", "utf-8", task_headers(marks[name]))

    def unsettled() -> list[str]:
        letters = worker.transport.dead_letters.list(limit=10_000)
        lettered = {letter.headers.get(MARK) for letter in letters}
        handled = {
            line.decode().split("|")[0]
            for line in worker.client.lrange(f"{worker.name}:effects", 0, -1)
        }
        return [
            name
            for name in cases
            if not (
                marks[name] in lettered if expected[name] is None else expected[name] in handled
            )
        ]

    wait_until(lambda: not unsettled(), timeout=ENVELOPES_WITHIN, what="every envelope settled")
    print(
        f"\n{worker.broker}: {len(cases)} spoiled envelopes settled in "
        f"{time.monotonic() - began:.2f} s"
    )
    letters = worker.transport.dead_letters.list(limit=10_000)
    by_mark = [letter for letter in letters if letter.headers.get(MARK) in marks.values()]
    assert len(by_mark) == sum(event_id is None for event_id in expected.values())
    assert all(letter.reason for letter in by_mark)
    assert worker.probe() == worker.child, "the pool child handling events must be the same"
    assert worker.process.poll() is None, "the worker must not have exited"
