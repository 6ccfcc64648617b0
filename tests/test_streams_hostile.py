"""Hostile entries XADDed straight onto the streams a real ``tidings worker`` process consumes.

One worker for the module. Each case adds what anyone who can write to Redis could add, and
checks the rules of "hostile input never stops a worker": the entry ends as a dead letter with
its reason within a time bound (or handled, for the cases that are valid events), a valid event
published after it is handled, and the worker is the same process throughout. Its log lines
never carry a control character from an entry.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from tests import hostile_envelopes
from tests.apps.hostile_events import Priced
from tests.apps.streams_faults import Flaky, Step, make_bus
from tests.streams_harness import TIDINGS
from tests.workers import ROOT, stop, wait_until

from conftest import require_server
from tidings.deadletter.redis import RedisDeadLetterStore
from tidings.ports import DeadLetter
from tidings.transports.redis_streams import RedisStreamsTransport

pytestmark = pytest.mark.integration

APP = "tests.apps.streams_faults:bus"
BOUND = 10.0  # seconds an entry may take to be dead-lettered
MIB = 1024 * 1024
TIMINGS: dict[str, float] = {}


class Hostile:
    """The module's worker process, its Redis keys, and a publisher of its service."""

    def __init__(self, client: redis.Redis, prefix: str, log: Path) -> None:
        self.client, self.prefix, self.log = client, prefix, log
        self.publisher, self.transport = make_bus(client, prefix, service="hostile")
        self.streams = self.transport.streams()
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "FAULTS_REDIS": require_server("redis"),
            "FAULTS_PREFIX": prefix,
            "FAULTS_SERVICE": "hostile",
        }
        self._log_file = log.open("wb")
        self.process = subprocess.Popen(  # noqa: S603 - our own command line
            [TIDINGS, "worker", "--app", APP, "--transport", env["FAULTS_REDIS"]],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self._log_file,
            start_new_session=True,
        )
        self.pid = self.process.pid
        # The worker has started once its groups exist.
        wait_until(
            lambda: all(client.exists(s) for s in self.streams.read),
            timeout=20,
            what="the worker's groups",
        )

    def letters(self) -> list[DeadLetter]:
        """Every dead letter of the module."""
        return RedisDeadLetterStore(self.client, prefix=f"{self.prefix}:dlq").list(limit=1000)

    def letter_of(self, entry_id: str) -> DeadLetter:
        """Wait (up to BOUND) for the dead letter of the entry ``entry_id``, and return it."""
        (letter,) = wait_until(
            lambda: [d for d in self.letters() if d.headers.get("tidings_stream_id") == entry_id],
            timeout=BOUND,
            what=f"the dead letter of entry {entry_id}",
        )
        return letter

    def effects(self) -> list[str]:
        """What the service's handlers recorded."""
        raw = self.client.lrange(f"{self.prefix}:effects:hostile", 0, -1)
        return [value.decode() for value in raw]

    def still_works(self) -> None:
        """A valid event published now is handled, by the same worker process."""
        event = Step()
        self.publisher.publish(event)
        wait_until(
            lambda: event.event_id in self.effects(), timeout=BOUND, what="a valid event after"
        )
        assert self.process.poll() is None, "the worker died"
        assert self.process.pid == self.pid

    def close(self) -> None:
        """Stop the worker gracefully."""
        stop(self.process)
        self._log_file.close()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    """One worker process of the faults app for the module, with keys of its own."""
    client = redis.Redis.from_url(require_server("redis"))
    prefix = f"t_hostile_{uuid.uuid4().hex[:8]}"
    world = Hostile(client, prefix, tmp_path_factory.mktemp("hostile") / "worker.log")
    try:
        yield world
    finally:
        world.close()
        keys = [*client.scan_iter(f"{prefix}*")]
        if keys:
            client.delete(*keys)
        client.close()
        if TIMINGS:
            longest = max(TIMINGS, key=TIMINGS.__getitem__)
            print(  # the figures asked for, shown with -s
                "\ntime to dead letter:",
                ", ".join(f"{k} {v:.2f}s" for k, v in TIMINGS.items()),
                f"(longest: {longest})",
            )


def _valid(transport: RedisStreamsTransport) -> bytes:
    return transport.codec.encode(Step())


def _nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def _case_fields(case: str, transport: RedisStreamsTransport) -> tuple[str, dict[Any, Any]]:
    """(which stream, the entry's fields) of one hostile case."""
    topic, redeliver = transport.stream(Step), transport.streams().redeliver
    handler = "hostile.record"
    many = {f"x{n}": "v" for n in range(5000)}
    evil = "\x1b[31mred\r\nFAKE LOG LINE\x1b]0;title\x07\x00\u2028"
    cases: dict[str, tuple[str, dict[Any, Any]]] = {
        "no envelope": (topic, {"something": "else"}),
        "empty envelope": (topic, {"envelope": b""}),
        "garbage envelope": (topic, {"envelope": b"\xff\xfe\x00 not json"}),
        "json not an envelope": (topic, {"envelope": b'["a", 1, null]'}),
        "envelope at 1 MiB": (topic, {"envelope": b'"' + b"a" * (MIB - 2) + b'"'}),
        "envelope over 1 MiB": (topic, {"envelope": b'"' + b"a" * (MIB + 10) + b'"'}),
        "deeply nested envelope": (topic, {"envelope": _nested(100_000)}),
        "thousands of fields": (topic, {"envelope": b"nope", **many}),
        "control characters everywhere": (
            redeliver,
            {"envelope": evil, "tidings_handler": evil, "tidings_attempt": evil, evil: evil},
        ),
        "unknown handler": (redeliver, {"envelope": _valid(transport), "tidings_handler": evil}),
    }
    for name, value in (
        ("superscript", "²"),
        ("5000 digits", "9" * 5000),
        ("negative", "-1"),
        ("float", "1.5"),
        ("arabic-indic", "\u0663"),
        ("huge", "10000001"),
    ):
        cases[f"attempt {name}"] = (
            redeliver,
            {"envelope": _valid(transport), "tidings_handler": handler, "tidings_attempt": value},
        )
        cases[f"deliveries {name}"] = (
            topic,
            {"envelope": _valid(transport), "tidings_deliveries": value},
        )
    return cases[case]


CASES = [
    "no envelope",
    "empty envelope",
    "garbage envelope",
    "json not an envelope",
    "envelope at 1 MiB",
    "envelope over 1 MiB",
    "deeply nested envelope",
    "thousands of fields",
    "control characters everywhere",
    "unknown handler",
    *(
        f"{counter} {name}"
        for counter in ("attempt", "deliveries")
        for name in ("superscript", "5000 digits", "negative", "float", "arabic-indic", "huge")
    ),
]


@pytest.mark.parametrize("case", CASES)
def test_hostile_entry_is_dead_lettered_and_the_worker_goes_on(hostile: Hostile, case: str) -> None:
    """The hostile entry becomes a dead letter in time, and the same worker handles what follows."""
    stream, fields = _case_fields(case, hostile.transport)
    started = time.monotonic()
    entry_id = hostile.client.xadd(stream, fields).decode()
    letter = hostile.letter_of(entry_id)
    TIMINGS[case] = time.monotonic() - started
    assert letter.reason, case
    assert len(letter.body) <= MIB
    assert len(letter.headers) <= 64
    if case.startswith(("attempt", "deliveries")) and not case.endswith("huge"):
        assert letter.reason.startswith("InvalidEntry"), letter.reason
    hostile.still_works()


def test_entry_with_thousands_of_fields_whose_handler_fails_once_is_retried(
    hostile: Hostile,
) -> None:
    """A failing entry with 5000 extra fields is retried and handled; later retries still run."""
    event = Flaky()
    fields = {"envelope": hostile.transport.codec.encode(event)}
    fields.update({f"x{n}": "v" * 10 for n in range(5000)})
    hostile.client.xadd(hostile.transport.stream(Flaky), fields)  # type: ignore[arg-type]
    wait_until(
        lambda: f"flaky:{event.event_id}" in hostile.effects(),
        timeout=BOUND,
        what="the many-field entry's retry",
    )
    later = Flaky()
    hostile.publisher.publish(later)
    wait_until(
        lambda: f"flaky:{later.event_id}" in hostile.effects(),
        timeout=BOUND,
        what="a later event's retry",
    )
    hostile.still_works()


def test_retry_members_the_mover_cannot_move_are_dead_lettered(hostile: Hostile) -> None:
    """Garbage, oversized and never-due members of the retry set never stop the retries."""
    retry = hostile.streams.retry
    too_many = '["envelope", "x"' + ', "f", "v"' * 5000 + "]"
    members = {
        "not json": 0.0,
        '{"an": "object"}': 0.0,
        '["odd"]': 0.0,
        '["envelope", ["nested"]]': 0.0,
        too_many: 0.0,
        '["envelope", "never due"]': float("inf"),
    }
    hostile.client.zadd(retry, members)
    wait_until(
        lambda: len([d for d in hostile.letters() if d.reason.startswith("UnmovableRetry")]) == 5,
        timeout=BOUND,
        what="the unmovable members' dead letters",
    )
    event = Flaky()
    hostile.publisher.publish(event)
    wait_until(
        lambda: f"flaky:{event.event_id}" in hostile.effects(),
        timeout=BOUND,
        what="a retry after them",
    )
    hostile.still_works()
    assert hostile.client.llen(hostile.streams.unmovable) == 0


def test_log_lines_carry_no_control_characters_from_entries(hostile: Hostile) -> None:
    """After the matrix, no line of the worker's log has a raw ESC, NUL or a forged line."""
    hostile.still_works()
    text = hostile.log.read_bytes().decode("utf-8", "replace")
    assert "\x1b" not in text
    assert "\x00" not in text
    assert "\u2028" not in text
    assert not any(line.startswith("FAKE LOG LINE") for line in text.splitlines())


def test_every_spoiled_envelope_field_ends_as_the_codec_says(hostile: Hostile) -> None:
    """Each hostile envelope entry is dead-lettered (or, if the codec takes it, handled)."""
    cases = hostile_envelopes.cases()
    expected = {name: hostile_envelopes.expected(body) for name, body in cases.items()}
    assert sum(event_id is None for event_id in expected.values()) > 0.8 * len(cases)
    stream = hostile.transport.stream(Priced)
    started = time.monotonic()
    entries = {
        name: hostile.client.xadd(stream, {"envelope": body}).decode()
        for name, body in cases.items()
    }

    def unsettled() -> list[str]:
        lettered = {d.headers.get("tidings_stream_id") for d in hostile.letters()}
        handled = set(hostile.effects())
        return [
            name
            for name in cases
            if not (
                entries[name] in lettered if expected[name] is None else expected[name] in handled
            )
        ]

    wait_until(lambda: not unsettled(), timeout=90, what="every envelope settled")
    TIMINGS["spoiled envelopes (all)"] = time.monotonic() - started
    lettered = [
        d for d in hostile.letters() if d.headers.get("tidings_stream_id") in entries.values()
    ]
    assert len(lettered) == sum(event_id is None for event_id in expected.values())
    hostile.still_works()
