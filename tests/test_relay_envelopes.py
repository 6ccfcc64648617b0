"""The relay's pipe in one process: what it forwards, what it refuses at start, what it redacts."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from tests.apps.relay_pipe import Shipped

from tidings import EventBus, PublishError, UsageError
from tidings.memory import MemoryDeadLetterStore
from tidings.outbox import Outbox, Relay
from tidings.outbox._common import read_stored
from tidings.ports import EnvelopeSender, StoredEnvelope
from tidings.testing.workers import wait_until
from tidings.transports.memory import MemoryBroker, MemoryTransport
from tidings.transports.redis_streams import RedisStreamsTransport


@pytest.fixture
def sqlite_outbox(tmp_path: Path) -> Iterator[tuple[sa.Engine, Outbox]]:
    """A SQLite database holding this test's outbox and quarantine tables."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'outbox.db'}")
    outbox = Outbox()
    outbox.create_tables(engine)
    yield engine, outbox
    engine.dispose()


def _memory() -> tuple[MemoryBroker, MemoryTransport]:
    broker = MemoryBroker()
    return broker, MemoryTransport(dead_letters=MemoryDeadLetterStore(), broker=broker)


def test_every_transport_forwards_stored_envelopes() -> None:
    """Memory, Redis Streams and Celery transports are envelope senders (the relay's pipe)."""
    from tidings.transports.celery import CeleryTransport  # noqa: PLC0415 - the celery extra

    assert issubclass(MemoryTransport, EnvelopeSender)
    assert issubclass(RedisStreamsTransport, EnvelopeSender)
    assert hasattr(CeleryTransport, "send_envelopes")


def test_the_memory_pipe_forwards_the_stored_bytes_unchanged(sqlite_outbox) -> None:
    """What reaches the queue is the outbox row's payload, byte for byte, in id order."""
    engine, outbox = sqlite_outbox
    events = [Shipped(aggregate_id="a", seq=n) for n in range(3)]
    with engine.begin() as connection:
        outbox.add(connection, *events)
        stored = [row.payload for row in connection.execute(sa.select(outbox.table.c.payload))]
    broker, transport = _memory()
    assert Relay(engine, outbox, EventBus(transport=transport), listen=False).run_once() == 3
    queued = broker.queue("tidings")
    assert [queued.get_nowait().body for _ in range(3)] == [p.encode() for p in stored]


def test_an_event_class_or_a_non_forwarding_target_is_refused_at_start(sqlite_outbox) -> None:
    """An event class is no publisher; decode=False refuses what cannot forward envelopes."""
    engine, outbox = sqlite_outbox
    with pytest.raises(UsageError, match="not the class Shipped"):
        Relay(engine, outbox, Shipped, listen=False)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="cannot forward stored envelopes"):
        Relay(engine, outbox, lambda events: None, listen=False, decode=False)
    with pytest.raises(UsageError, match="cannot forward stored envelopes"):
        Relay(engine, outbox, EventBus(), listen=False, decode=False)


@pytest.mark.integration
def test_a_custom_route_needs_the_classes_and_is_refused_at_start(sqlite_outbox, redis_url):
    """A Redis transport routing with a function of the class cannot be a pipe: start-up error."""
    engine, outbox = sqlite_outbox
    client = redis.Redis.from_url(redis_url)
    try:
        transport = RedisStreamsTransport(
            client, service="s", dead_letters=MemoryDeadLetterStore(), route=lambda cls: "x"
        )
        with pytest.raises(UsageError, match="needs the event classes"):
            Relay(engine, outbox, transport, listen=False, decode=False)
        # Without decode=False, a bus with such a transport decodes (its process has the classes).
        relay = Relay(engine, outbox, EventBus(transport=transport), listen=False)
        assert relay.sender is None
    finally:
        client.close()


@pytest.mark.integration
def test_an_envelope_the_transport_refuses_is_quarantined_and_its_key_goes_on(
    sqlite_outbox, redis_url, unique_name
):
    """A row without the partition attribute is refused per row, quarantined; the rest go on."""
    engine, outbox = sqlite_outbox
    client = redis.Redis.from_url(redis_url)
    transport = RedisStreamsTransport(
        client,
        service="s",
        dead_letters=MemoryDeadLetterStore(),
        stream_prefix=f"{unique_name}:stream",
        partitions=2,
        partition_key="aggregate_id",
    )
    no_key = json.dumps({"type": "relay_pipe.other", "specversion": "1.0", "id": "o-1",
                         "data": {}})  # fmt: skip
    try:
        with engine.begin() as connection:
            outbox.add(connection, Shipped(aggregate_id="a", seq=0))
            connection.execute(
                sa.insert(outbox.table).values(
                    event_id="o-1", event_type="relay_pipe.other", partition_key="a",
                    payload=no_key, created_at=sa.func.now(), attempts=0,
                )
            )  # fmt: skip
            outbox.add(connection, Shipped(aggregate_id="a", seq=1))
        relay = Relay(engine, outbox, transport, listen=False, max_attempts=2)
        first = relay.run_batch()
        assert (first.relayed, len(first.failed), first.quarantined) == (1, 1, ())
        second = relay.run_batch()
        assert (second.relayed, second.failed, len(second.quarantined)) == (1, (), 1)
        [held] = outbox.quarantined(engine)
        assert held.event_id == "o-1"
        assert "partition key" in held.reason
        entries = [
            json.loads(fields[b"envelope"])["data"]["seq"]
            for stream in client.scan_iter(f"{unique_name}:stream:*")
            for _, fields in client.xrange(stream)
        ]
        assert entries == [0, 1]
    finally:
        for key in client.scan_iter(f"{unique_name}*"):
            client.delete(key)
        client.close()


def test_read_stored_refuses_what_no_worker_could_decode() -> None:
    """Not JSON, data not an object, control characters in an id: each an EventDecodeError."""
    from tidings.errors import EventDecodeError  # noqa: PLC0415

    class Row:
        id = 1
        partition_key = "k"
        attempts = 0

        def __init__(self, payload: str) -> None:
            self.payload = payload

    good = read_stored(Row('{"type":"t","specversion":"1.0","id":"i","data":{"x":1}}'))
    assert (good.event_type, good.event_id, good.data) == ("t", "i", {"x": 1})
    for payload in ("{not json", '{"type":"t","specversion":"1.0","id":"i","data":[1]}',
                    '{"type":"t","specversion":"1.0","id":"i\\u001b[31m","data":{}}',
                    '{"type":"t","specversion":"0.3","id":"i","data":{}}',
                    "[" * 5000):  # fmt: skip
        with pytest.raises(EventDecodeError):
            read_stored(Row(payload))


class _Failing:
    """An envelope sender whose broker error quotes the broker URL with its password."""

    url = "redis://:pw-in-url-7@broker.example:6379/0"

    def send_envelopes(self, envelopes: list[StoredEnvelope]) -> None:
        if envelopes:
            raise PublishError(f"cannot reach {self.url} (password pw-in-url-7)")


def test_relay_log_lines_and_tracebacks_never_print_the_broker_password(
    sqlite_outbox, caplog
) -> None:
    """The relay's failure log, traceback included, has the password of a redact URL as ***."""
    engine, outbox = sqlite_outbox
    with engine.begin() as connection:
        outbox.add(connection, Shipped(aggregate_id="a"))
    relay = Relay(engine, outbox, _Failing(), listen=False, redact=[_Failing.url])
    stop = threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop,), daemon=True)
    with caplog.at_level(logging.WARNING, logger="tidings.outbox.relay"):
        thread.start()
        try:
            wait_until(
                lambda: any(r.exc_text or r.exc_info for r in caplog.records),
                timeout=10,
                what="the relay's failure to be logged",
            )
        finally:
            stop.set()
            thread.join(10)
    assert "pw-in-url-7" not in caplog.text
    assert "cannot reach" in caplog.text
    assert "PublishError" in caplog.text  # the traceback is there, redacted


def test_the_relay_redacts_its_transports_broker_password_without_being_told(
    sqlite_outbox,
) -> None:
    """The broker password of a Celery app or a redis-py client is among the relay's secrets."""
    from celery import Celery  # noqa: PLC0415 - the celery extra

    from tidings.transports.celery import CeleryTransport  # noqa: PLC0415

    engine, outbox = sqlite_outbox
    app = Celery("relay-secrets", broker="redis://:celery-pw-3@localhost:6379/0")
    celery = CeleryTransport(app, queue="q", dead_letters=MemoryDeadLetterStore())
    relay = Relay(engine, outbox, EventBus(transport=celery), listen=False)
    assert any("celery-pw-3" in url for url in relay.secrets)
    client = redis.Redis(password="redis-pw-4")  # noqa: S106 - the fake password hunted for
    streams = RedisStreamsTransport(client, service="s", dead_letters=MemoryDeadLetterStore())
    relay = Relay(engine, outbox, streams, listen=False)
    assert any("redis-pw-4" in url for url in relay.secrets)
    logger = logging.getLogger("tidings.outbox.relay")
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 1,
                               "failed: %s", ("auth redis-pw-4 celery-pw-3",), None)  # fmt: skip
    for found in logger.filters:
        found.filter(record)
    assert record.getMessage() == "failed: auth *** ***"


@pytest.mark.integration
@pytest.mark.parametrize("options", [{"entry_headers": True}, {"partitions": 3,
                                     "partition_key": "aggregate_id"}])  # fmt: skip
def test_redis_streams_forwards_an_envelope_where_and_as_send_would(
    redis_url, unique_name, options
):
    """An event sent, and its stored envelope forwarded, land on one stream with equal fields."""
    client = redis.Redis.from_url(redis_url)
    transport = RedisStreamsTransport(
        client,
        service="s",
        dead_letters=MemoryDeadLetterStore(),
        stream_prefix=f"{unique_name}:stream",
        **options,
    )
    EventBus(transport=transport)
    event = Shipped(aggregate_id="order-17", seq=3, correlation_id="c-1", tenant_id="t-1")

    class Row:
        id = 1
        partition_key = "order-17"
        attempts = 0
        payload = transport.codec.encode(event).decode()

    try:
        transport.send([event])
        transport.send_envelopes([read_stored(Row())])
        stream = transport.stream_of(event)
        sent, forwarded = (fields for _, fields in client.xrange(stream))
        assert sent == forwarded
        assert client.xlen(stream) == 2
    finally:
        for key in client.scan_iter(f"{unique_name}*"):
            client.delete(key)
        client.close()
