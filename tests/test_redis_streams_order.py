"""Per-key ordering of the Redis Streams transport (``partitions``), with real worker processes."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import pytest
import redis
from tests.apps.streams_order import PARTITIONS, Keyed, make_bus
from tests.streams_harness import SupervisedWorker
from tests.workers import wait_until

from tidings.deadletter.redis import RedisDeadLetterStore
from tidings.transports._streams_partitions import partition_of

APP = "tests.apps.streams_order:bus"
SERVICE = "orders"
DEADLINE = 30.0
KEYS = [f"k{n}" for n in range(12)]
PER_KEY = 15


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


@contextlib.contextmanager
def workers(redis_url: str, prefix: str, count: int) -> Iterator[list[SupervisedWorker]]:
    """Run ``count`` supervised worker processes of the service for the block."""
    env = {"ORDER_REDIS": redis_url, "ORDER_PREFIX": prefix, "ORDER_SERVICE": SERVICE}
    started = [SupervisedWorker(APP, redis_url, env) for _ in range(count)]
    try:
        yield started
    finally:
        for worker in started:
            worker.close()


def interleaved(special: dict[tuple[str, int], str] | None = None) -> list[Keyed]:
    """Every key's events, each key's in order, the keys shuffled among each other.

    ``special`` marks an event (key, seq) ``"fail"`` or ``"hold"``.
    """
    special = special or {}
    queues = {key: list(range(PER_KEY)) for key in KEYS}
    rng = random.Random(7)  # noqa: S311 - a test's shuffle
    events = []
    while queues:
        key = rng.choice(sorted(queues))
        seq = queues[key].pop(0)
        if not queues[key]:
            del queues[key]
        mark = special.get((key, seq))
        events.append(Keyed(key=key, seq=seq, fail=mark == "fail", hold=mark == "hold"))
    return events


def log(client: redis.Redis, prefix: str) -> list[str]:
    """What the handler did, in order: ``key:seq`` per success, ``fail:key:seq`` per failure."""
    return [_text(raw) for raw in client.lrange(f"{prefix}:log", 0, -1)]


def handled_all(client: redis.Redis, prefix: str) -> bool:
    """Whether every event was handled (at least once)."""
    done = {entry for entry in log(client, prefix) if not entry.startswith("fail:")}
    return len(done) == len(KEYS) * PER_KEY


def assert_ordered_per_key(entries: list[str]) -> None:
    """Per key, the handler succeeded on each event once, in publish order."""
    seen: dict[str, list[int]] = {}
    for entry in entries:
        if not entry.startswith("fail:"):
            key, seq = entry.split(":")
            seen.setdefault(key, []).append(int(seq))
    assert seen == {key: list(range(PER_KEY)) for key in KEYS}


def publish(client: redis.Redis, prefix: str, events: list[Keyed]) -> None:
    """Publish the events one by one, as independent publishers of one key would."""
    publisher, _ = make_bus(client, prefix, service="publisher")
    for event in events:
        publisher.publish(event)


def no_dead_letters(client: redis.Redis, prefix: str) -> None:
    """Nothing was dead-lettered."""
    assert RedisDeadLetterStore(client, prefix=f"{prefix}:dlq").list(limit=10) == []


@pytest.mark.integration
def test_three_consumers_keep_each_keys_publish_order(
    client: redis.Redis, redis_url: str, unique_name: str
) -> None:
    """Three worker processes share the partitions; per key, events are handled in order."""
    events = interleaved()
    leases = [
        f"{unique_name}:stream:{SERVICE}:lease:{unique_name}:stream:order.keyed:p{n}"
        for n in range(PARTITIONS)
    ]
    with workers(redis_url, unique_name, 3):
        wait_until(
            lambda: len({client.get(lease) for lease in leases} - {None}) == 3,
            timeout=DEADLINE,
            what="the three workers to share the partitions",
        )
        publish(client, unique_name, events[: len(events) // 2])
        publish(client, unique_name, events[len(events) // 2 :])
        wait_until(lambda: handled_all(client, unique_name), timeout=DEADLINE, what="every event")
    assert_ordered_per_key(log(client, unique_name))
    assert client.scard(f"{unique_name}:pids") >= 2, "one worker did everything"
    assert not any(client.exists(lease) for lease in leases), "a graceful stop gives leases back"
    no_dead_letters(client, unique_name)


@pytest.mark.integration
def test_failing_handler_holds_its_key_back_while_other_keys_flow(
    client: redis.Redis, redis_url: str, unique_name: str
) -> None:
    """The first event of a key fails once: that key's later events wait for its retry."""
    failing = KEYS[0]
    events = interleaved({(failing, 0): "fail"})
    with workers(redis_url, unique_name, 2):
        publish(client, unique_name, events)
        wait_until(lambda: handled_all(client, unique_name), timeout=DEADLINE, what="every event")
    entries = log(client, unique_name)
    assert_ordered_per_key(entries)
    failed, succeeded = entries.index(f"fail:{failing}:0"), entries.index(f"{failing}:0")
    stream = f"{unique_name}:stream:order.keyed"
    own = partition_of(stream, failing, PARTITIONS)
    meanwhile = {entry.split(":")[0] for entry in entries[failed + 1 : succeeded]}
    assert failing not in meanwhile
    assert any(partition_of(stream, key, PARTITIONS) != own for key in meanwhile), (
        "no other key was handled while the failing event waited for its retry"
    )
    no_dead_letters(client, unique_name)


@pytest.mark.integration
def test_killed_holder_partition_is_taken_over_in_order(
    client: redis.Redis, redis_url: str, unique_name: str
) -> None:
    """A worker killed (-9) in the middle of a key: another takes its partition, order holds."""
    held = KEYS[3]
    events = interleaved({(held, 5): "hold"})
    with workers(redis_url, unique_name, 3) as running:
        publish(client, unique_name, events)
        raw = wait_until(
            lambda: client.lindex(f"{unique_name}:holders", 0), timeout=DEADLINE, what="the hold"
        )
        assert raw is not None
        victim = next(w for w in running if w.process.pid == int(_text(raw)))
        victim.kill()
        wait_until(lambda: handled_all(client, unique_name), timeout=DEADLINE, what="every event")
        client.set(f"{unique_name}:release", 1)
    entries = log(client, unique_name)
    assert_ordered_per_key(entries)
    attempts = client.get(f"{unique_name}:attempts:{_event_id(events, held, 5)}")
    assert attempts is not None
    assert int(_text(attempts)) >= 2, "the held event was handled again by the next holder"
    no_dead_letters(client, unique_name)


def _event_id(events: list[Keyed], key: str, seq: int) -> str:
    return next(e.event_id for e in events if e.key == key and e.seq == seq)


def test_partitions_are_opt_in_and_need_a_key(client: redis.Redis, unique_name: str) -> None:
    """Without ``partitions`` streams are per topic; with it, per key hash; a key is required."""
    _, plain = make_bus(client, unique_name, service="plain", partitions=None)
    event = Keyed(key="k1", seq=0)
    assert plain.stream_of(event) == plain.stream(Keyed) == f"{unique_name}:stream:order.keyed"
    assert plain.streams().ordered == ()
    _, ordered = make_bus(client, unique_name, service="ordered")
    assert ordered.stream_of(event) == partition_of(ordered.stream(Keyed), "k1", PARTITIONS)
    assert ordered.streams().topics == ()
    assert len(ordered.streams().ordered) == PARTITIONS
    with pytest.raises(ValueError, match="partition_key"):
        make_bus(client, unique_name, service="bad", partition_key=None)
    with pytest.raises(ValueError, match="claim_idle"):
        make_bus(client, unique_name, service="bad", claim_idle=0.1)


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw
