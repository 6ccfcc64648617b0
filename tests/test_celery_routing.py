"""Pub/sub by event type on Celery, with real brokers and real ``celery worker`` processes.

Two services that subscribe to each other's events get only their own (RabbitMQ and Redis),
a worker that forgot its handler module dead-letters what reaches it naming the fix, a service
subscribing to a class the codec does not know fails at start, and two transports on one app
run only their own handlers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from celery import Celery
from tests.apps.celery_routing import InvoicePaid, NobodyCares, OrderPlaced, make, make_pair
from tests.conftest import require_server
from tests.workers import ROOT, stop, wait_until

from tidings import EventBus
from tidings.errors import UsageError
from tidings.memory import MemoryDeadLetterStore
from tidings.transports.celery import CeleryTransport

pytestmark = pytest.mark.integration

BROKERS = ["redis", "rabbitmq"]


@pytest.fixture(params=BROKERS)
def broker(request: pytest.FixtureRequest) -> str:
    """The URL of each broker in turn (skipped, or failed under CI, when it is absent)."""
    return require_server(request.param)


@pytest.fixture
def prefix(unique_name: str, redis_client, broker: str) -> Iterator[str]:
    """The test's own name; its Redis keys, and on RabbitMQ its queues and exchange, removed."""
    yield unique_name
    for key in redis_client.scan_iter(f"{unique_name}*"):
        redis_client.delete(key)
    if broker.startswith("amqp"):
        with Celery("cleanup", broker=broker).connection_for_write() as connection:
            channel = connection.default_channel
            for suffix in ("shop", "billing", "unknown", "a", "b"):
                channel.queue_delete(f"{unique_name}.{suffix}")
                channel.exchange_delete(f"{unique_name}.{suffix}")
            channel.exchange_delete(f"{unique_name}.events")


@contextmanager
def worker(
    prefix: str, broker: str, queues: str, log: Path, **env: str
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``celery -A tests.apps.celery_routing worker -Q queues`` at INFO, output to ``log``."""
    command = [
        sys.executable, "-m", "celery", "-A", "tests.apps.celery_routing", "worker",
        "-Q", queues, "--pool=solo", "--without-heartbeat", "--without-gossip",
        "--without-mingle", "--loglevel=INFO", "-n", f"{queues.replace(',', '_')}@%h",
    ]  # fmt: skip
    variables = {"ROUTING_PREFIX": prefix, "ROUTING_BROKER": broker, **env}
    with log.open("wb") as out:
        process = subprocess.Popen(  # noqa: S603 - our own command line
            command,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **variables},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        stop(process)


def logged(log: Path, text: str) -> bool:
    """Whether the worker's output so far contains ``text``."""
    return text in log.read_text(errors="replace")


def effects(client, prefix: str, service: str) -> list[str]:
    """What a service's handlers did, in order: ``<event type>|<order id>``."""
    return [e.decode() for e in client.lrange(f"{prefix}:effects:{service}", 0, -1)]


def test_two_services_subscribing_to_each_others_events_get_only_their_own(
    broker, prefix, tmp_path
):
    """Shop → billing → shop: each service receives only the types it handles, 0 dead letters."""
    _, shop, shop_transport, client = make("shop", prefix, broker)
    _, _, billing_transport, _ = make("billing", prefix, broker)
    shop_log, billing_log = tmp_path / "shop.log", tmp_path / "billing.log"
    with (
        worker(prefix, broker, f"{prefix}.shop", shop_log, ROUTING_SERVICE="shop"),
        worker(prefix, broker, f"{prefix}.billing", billing_log, ROUTING_SERVICE="billing"),
    ):
        # Each worker lists what it serves once it has subscribed its queue.
        assert wait_until(lambda: logged(billing_log, "serves 1 event type(s)"), timeout=60)
        assert wait_until(lambda: logged(shop_log, "serves 1 event type(s)"), timeout=60)
        assert logged(billing_log, "routing_shop.order_placed -> billing.invoice")
        assert logged(shop_log, "routing_billing.invoice_paid -> shop.mark_paid")
        shop.publish(*[OrderPlaced(order_id=f"o-{i}") for i in range(20)])  # batched
        for i in range(20, 25):
            shop.publish(OrderPlaced(order_id=f"o-{i}"))
        shop.publish(NobodyCares())  # normal pub/sub: nothing to deliver
        wanted = {f"o-{i}" for i in range(25)}
        wait_until(lambda: len(effects(client, prefix, "shop")) >= 25, timeout=60)
    billed, paid = effects(client, prefix, "billing"), effects(client, prefix, "shop")
    assert {e.split("|")[1] for e in billed} == wanted
    assert {e.split("|")[1] for e in paid} == wanted
    assert {e.split("|")[0] for e in billed} == {OrderPlaced.event_type}
    assert {e.split("|")[0] for e in paid} == {InvoicePaid.event_type}
    assert shop_transport.dead_letters.count() == 0
    assert billing_transport.dead_letters.count() == 0
    assert shop_transport.unrouted == {NobodyCares.event_type: 1}
    shop_transport.close()
    billing_transport.close()


def test_a_worker_without_its_handler_module_dead_letters_with_the_fix(broker, prefix, tmp_path):
    """An event reaching a worker with no handler for it is dead-lettered, naming the fix."""
    # The publisher's process imports the handlers (its bus subscribes billing's queue); the
    # worker forgot the module that subscribes them.
    _, billing, transport, _ = make("billing", prefix, broker)
    event = OrderPlaced(order_id="forgotten")
    billing.publish(event)
    log = tmp_path / "billing.log"
    with worker(
        prefix, broker, f"{prefix}.billing", log, ROUTING_SERVICE="billing", ROUTING_HANDLERS="0"
    ):
        wait_until(lambda: transport.dead_letters.count() == 1, timeout=60)
        assert wait_until(lambda: logged(log, "serves no event type"), timeout=30)
    [letter] = transport.dead_letters.list()
    assert letter.event_id == event.event_id
    assert letter.event_type == OrderPlaced.event_type
    assert "not imported" in letter.reason
    assert "bus.autodiscover" in letter.reason
    assert letter.destination == f"{prefix}.billing"
    transport.close()


def test_a_retry_goes_to_the_services_own_queue_not_one_named_by_the_routing_key(
    broker, prefix, tmp_path
):
    """A failed attempt is retried on the service's queue: handled once, no stray queue."""
    _, shop, shop_transport, client = make("shop", prefix, broker)
    log = tmp_path / "billing.log"
    with worker(prefix, broker, f"{prefix}.billing", log, ROUTING_SERVICE="billing"):
        assert wait_until(lambda: logged(log, "serves 1 event type(s)"), timeout=60)
        shop.publish(OrderPlaced(order_id="flaky-1"))
        wait_until(lambda: effects(client, prefix, "billing"), timeout=60)
    assert effects(client, prefix, "billing") == [f"{OrderPlaced.event_type}|flaky-1"]
    assert int(client.get(f"{prefix}:attempts:flaky-1")) == 2
    assert client.exists(OrderPlaced.event_type) == 0  # no Redis list named by the type
    if broker.startswith("amqp"):
        look = Celery("look", broker=broker)
        with look.connection_for_write() as connection, pytest.raises(connection.channel_errors):
            connection.channel().queue_declare(queue=OrderPlaced.event_type, passive=True)
    shop_transport.close()


def test_a_handler_subscribed_after_the_first_publish_is_subscribed_at_the_next(
    redis_url, unique_name, redis_client
):
    """The publisher subscribes its bus's new handler's type before its next send (Redis)."""
    prefix = unique_name
    _, shop, transport, _ = make("shop", prefix, redis_url)
    shop.publish(NobodyCares())
    assert transport.unrouted == {NobodyCares.event_type: 1}
    shop.add_handler(lambda event: None, NobodyCares, name="shop.audit")
    shop.publish(NobodyCares())
    assert transport.unrouted == {NobodyCares.event_type: 1}
    key = f"{prefix}.events:subscribers:{NobodyCares.event_type}"
    assert redis_client.smembers(key) == {f"{prefix}.shop".encode()}
    assert redis_client.llen(f"{prefix}.shop") == 1  # the second one waits for the shop
    transport.unsubscribe(NobodyCares.event_type)
    assert redis_client.smembers(key) == set()
    transport.close()
    for key in redis_client.scan_iter(f"{prefix}*"):
        redis_client.delete(key)


def test_a_service_subscribing_to_a_class_the_codec_does_not_know_fails_at_start(
    broker, prefix, tmp_path
):
    """A handler of an unregistered class stops the worker at start-up, with the reason."""
    log = tmp_path / "unknown.log"
    with worker(prefix, broker, f"{prefix}.unknown", log, ROUTING_SERVICE="unknown") as process:
        code = wait_until(process.poll, timeout=60, what="the worker to exit")
    assert code != 0
    assert logged(log, "NotRegistered")
    assert logged(log, "not registered with the transport's codec")


def test_a_second_transport_on_one_app_is_refused_and_the_first_bus_works(
    redis_url, tmp_path, unique_name
):
    """A second transport on an app is refused saying what to do; the first one's bus works."""
    prefix = unique_name
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Celery's DuplicateTaskNameWarning would raise here
        app, bus, refused, client = make_pair(prefix, redis_url)
    assert "one Celery app per service" in refused
    assert sorted(t for t in app.tasks if t.startswith("tidings.")) == [
        "tidings.deliver",
        "tidings.deliver_batch",
    ]
    transport = bus.transport
    assert isinstance(transport, CeleryTransport)
    log = tmp_path / "pair.log"
    try:
        with worker(prefix, redis_url, f"{prefix}.a", log, ROUTING_SERVICE="pair"):
            bus.publish(OrderPlaced(order_id="o-1"))
            bus.publish(OrderPlaced(order_id="o-2"), InvoicePaid(order_id="o-3"))
            wait_until(lambda: len(effects(client, prefix, "a")) == 2, timeout=60)
            assert wait_until(lambda: logged(log, "a.record"), timeout=30)
        assert sorted(effects(client, prefix, "a")) == [
            f"{OrderPlaced.event_type}|o-1",
            f"{OrderPlaced.event_type}|o-2",
        ]
        assert transport.dead_letters.count() == 0
        assert transport.unrouted == {InvoicePaid.event_type: 1}
    finally:
        transport.close()
        for key in client.scan_iter(f"{prefix}*"):
            client.delete(key)


def test_a_second_transport_for_the_same_queue_on_one_app_is_refused(unique_name):
    """Two transports on one app are refused even for one queue, saying what to do instead."""
    app = Celery(unique_name, broker="redis://127.0.0.1:6379/0")
    EventBus(
        transport=CeleryTransport(app, queue=unique_name, dead_letters=MemoryDeadLetterStore())
    )
    second = CeleryTransport(app, queue=unique_name, dead_letters=MemoryDeadLetterStore())
    with pytest.raises(UsageError, match="one Celery app per service"):
        EventBus(transport=second)
