"""Transports built with no stores get a scoped inbox and dead letters, and workers find them."""

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import pytest
from celery import Celery
from tests.apps import celery_defaults

from tidings import DomainEvent, EventBus, UsageError, register_event
from tidings.deadletter.redis import RedisDeadLetterStore
from tidings.inbox.redis import RedisInbox
from tidings.memory import MemoryDeadLetterStore
from tidings.testing.workers import running, wait_until
from tidings.transports.celery import CeleryTransport
from tidings.transports.redis_streams import RedisStreamsTransport

pytestmark = pytest.mark.integration


@pytest.fixture
def service(redis_url, unique_name):
    """The defaults service's publishing side, its Redis keys removed after the test."""
    app, bus, transport, client = celery_defaults.make(unique_name)
    yield app, bus, transport, client, unique_name
    transport.close()
    for pattern in (
        f"{unique_name}*",
        f"tidings:*:{unique_name}*",
        f"_kombu.binding.{unique_name}*",
    ):
        for key in client.scan_iter(pattern):
            client.delete(key)
    client.close()


def _worker(name: str, *queues: str, exclude: str = ""):
    command = [
        sys.executable, "-m", "celery", "-A", "tests.apps.celery_defaults", "worker",
        "--pool=solo", "--without-heartbeat", "--without-gossip", "--without-mingle",
        "--loglevel=WARNING", "-n", f"{name}@%h",
    ]  # fmt: skip
    if queues:
        command += ["-Q", ",".join(queues)]
    if exclude:
        command += ["-X", exclude]
    return running(command, {"DEFAULTS_QUEUE": name})


def test_on_a_redis_broker_the_stores_default_to_that_redis_scoped_to_the_queue(redis_url):
    """CeleryTransport(app) alone gets a RedisInbox and a Redis dead-letter store on the broker."""
    transport = CeleryTransport(Celery("t", broker=redis_url), queue="shop")
    assert isinstance(transport.inbox, RedisInbox)
    assert transport.inbox.prefix == "tidings:inbox:shop"
    assert isinstance(transport.dead_letters, RedisDeadLetterStore)
    assert transport.dead_letters.prefix == "tidings:dlq:shop"


def test_close_disconnects_the_default_stores_client(redis_url):
    """close() lets go of the Redis connections the default stores opened; later use reconnects."""
    transport = CeleryTransport(Celery("t", broker=redis_url), queue="shop-close")
    assert isinstance(transport.dead_letters, RedisDeadLetterStore)
    transport.dead_letters.count()  # opens a connection of the default stores' client
    pool = transport._owned_client.connection_pool
    assert any(c._sock is not None for c in pool._available_connections)
    transport.close()
    assert all(c._sock is None for c in pool._available_connections)
    assert transport.dead_letters.count() >= 0  # connects again


def test_inbox_none_is_the_explicit_opt_out(redis_url):
    """inbox=None means no inbox, while what is given explicitly is kept as it is."""
    store = MemoryDeadLetterStore()
    transport = CeleryTransport(Celery("t", broker=redis_url), dead_letters=store, inbox=None)
    assert transport.inbox is None
    assert transport.dead_letters is store


def test_on_rabbitmq_the_constructor_says_exactly_what_to_pass():
    """Without stores on an AMQP broker the error names inbox= and dead_letters= with examples."""
    with pytest.raises(UsageError) as refused:
        CeleryTransport(Celery("t", broker="amqp://guest:s3cret@localhost:5672//"))
    message = str(refused.value)
    assert "inbox=SqlInbox(engine)" in message
    assert "dead_letters=SqlDeadLetterStore(engine)" in message
    assert "inbox=None" in message
    assert "s3cret" not in message
    with pytest.raises(UsageError, match="no default inbox=") as only_inbox:
        CeleryTransport(
            Celery("t", broker="amqp://localhost//"), dead_letters=MemoryDeadLetterStore()
        )
    assert "dead_letters=SqlDeadLetterStore" not in str(only_inbox.value)


def test_a_worker_without_q_consumes_the_transport_queue_and_the_apps_own(service):
    """`celery -A app worker` without -Q runs the handlers (inbox-guarded) and the app tasks."""
    app, bus, _transport, client, name = service
    with _worker(name):
        bus.publish(celery_defaults.BellRung(bell="front"))
        app.send_task(f"{name}.plain", args=("hello",))
        wait_until(lambda: client.lrange(f"{name}:rung", 0, -1) == [b"front"], what="the handler")
        wait_until(lambda: client.lrange(f"{name}:plain", 0, -1) == [b"hello"], what="app task")
    assert list(client.scan_iter(f"tidings:inbox:{name}:defaults.ring:*"))


def test_a_worker_with_q_other_consumes_only_other(service):
    """`-Q other` still means only `other`: the transport's queue is left to its own workers."""
    app, bus, _transport, client, name = service
    other = f"{name}-other"
    with _worker(name, other):
        bus.publish(celery_defaults.BellRung(bell="back"))
        app.send_task(f"{name}.plain", args=("here",), queue=other)
        wait_until(lambda: client.lrange(f"{name}:plain", 0, -1) == [b"here"], what="app task")
        assert client.llen(name) == 1
    assert client.llen(f"{name}:rung") == 0
    client.delete(other)


def test_a_worker_with_x_the_transport_queue_leaves_it_out(service):
    """`-X <transport queue>` still excludes it: the app's own queue alone is consumed."""
    app, bus, _transport, client, name = service
    with _worker(name, exclude=name):
        bus.publish(celery_defaults.BellRung(bell="side"))
        app.send_task(f"{name}.plain", args=("there",))
        wait_until(lambda: client.lrange(f"{name}:plain", 0, -1) == [b"there"], what="app task")
        assert client.llen(name) == 1
    assert client.llen(f"{name}:rung") == 0


@register_event
@dataclass(frozen=True)
class Chimed(DomainEvent):
    event_type: ClassVar[str] = "transport_defaults.chimed"
    n: int = 0


@contextmanager
def _consuming(transport: RedisStreamsTransport) -> Iterator[None]:
    stopping = threading.Event()
    thread = threading.Thread(target=transport.run, args=(stopping,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stopping.set()
        thread.join(30)
        assert not thread.is_alive(), "the consumers did not stop"


def test_streams_from_a_url_and_a_service_guard_every_handler_with_a_scoped_inbox(
    redis_url, unique_name
):
    """RedisStreamsTransport(url, service=...) runs a redelivered event's handler once."""
    transport = RedisStreamsTransport(
        redis_url, service=unique_name, stream_prefix=f"{unique_name}:stream", block_ms=100
    )
    client = transport.client
    try:
        assert isinstance(transport.inbox, RedisInbox)
        assert transport.inbox.client is client
        assert transport.inbox.prefix == f"tidings:inbox:{unique_name}"
        assert isinstance(transport.dead_letters, RedisDeadLetterStore)
        assert transport.dead_letters.prefix == f"tidings:dlq:{unique_name}"
        bus = EventBus(transport=transport)

        @bus.subscribe(Chimed, name="defaults.chime")
        def chime(event: Chimed) -> None:
            client.rpush(f"{unique_name}:effects", event.n)

        first = Chimed(n=1)
        bus.publish(first)
        bus.publish(first)  # the same event again: a producer's retry
        bus.publish(Chimed(n=2))
        with _consuming(transport):
            wait_until(lambda: b"2" in client.lrange(f"{unique_name}:effects", 0, -1), what="2")
        assert client.lrange(f"{unique_name}:effects", 0, -1) == [b"1", b"2"]
        assert transport.dead_letters.count() == 0
    finally:
        for pattern in (f"{unique_name}*", f"tidings:*:{unique_name}*"):
            for key in client.scan_iter(pattern):
                client.delete(key)
        client.close()


def test_streams_inbox_none_is_the_explicit_opt_out(redis_url, unique_name):
    """inbox=None on RedisStreamsTransport means no inbox; dead letters still default."""
    transport = RedisStreamsTransport(redis_url, service=unique_name, inbox=None)
    assert transport.inbox is None
    assert isinstance(transport.dead_letters, RedisDeadLetterStore)
    transport.client.close()


def test_the_default_stores_drop_kombus_own_url_options(redis_url):
    """A broker URL with kombu-only options still gives default stores that reach Redis."""
    app = Celery("t", broker=f"{redis_url}?global_keyprefix=kombu:&socket_timeout=5")
    transport = CeleryTransport(app, queue="shop")
    assert isinstance(transport.inbox, RedisInbox)
    kwargs = transport.inbox.client.connection_pool.connection_kwargs
    assert "global_keyprefix" not in kwargs
    assert kwargs["socket_timeout"] == 5.0
    assert transport.inbox.client.ping()
    assert not transport.inbox.is_done("h", "e", source="/s")
    transport.inbox.client.close()
