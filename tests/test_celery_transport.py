import base64
import json
from types import SimpleNamespace

import pytest
from celery import Celery
from celery._state import _task_stack
from kombu.asynchronous import Hub
from tests.apps import celery_shop
from tests.conftest import require_server
from tests.workers import celery_worker, wait_until

from tidings import EventBus, UsageError, event_context
from tidings.memory import MemoryDeadLetterStore
from tidings.retry import RetryPolicy
from tidings.transports._celery_consumer import DeadLetteringConsumer
from tidings.transports._celery_redis import reuse_redis_clients
from tidings.transports.celery import CeleryTransport

pytestmark = pytest.mark.integration


@pytest.fixture
def shop(redis_url, unique_name):
    """The shop's publishing side and the names of its queue and Redis keys, cleaned up after."""
    app, bus, transport, client = celery_shop.make(unique_name, unique_name)
    yield app, bus, transport, client, unique_name
    for key in client.scan_iter(f"{unique_name}*"):
        client.delete(key)
    transport.close()
    client.close()


def worker_env(name: str, service: str = "shipping") -> dict[str, str]:
    return {"SHOP_QUEUE": name, "SHOP_PREFIX": name, "SHOP_SERVICE": service}


def effects(client, name: str, service: str = "shipping") -> list[list[str]]:
    return [item.decode().split("|") for item in client.lrange(f"{name}:effects:{service}", 0, -1)]


def test_published_event_is_handled_by_a_worker_with_its_context(shop):
    """An event published in a request context is handled in a worker with that context."""
    _app, bus, _transport, client, name = shop
    with celery_worker("tests.apps.celery_shop", name, worker_env(name)):
        with event_context(correlation_id="corr-1", tenant_id="acme"):
            event = celery_shop.ParcelBooked(parcel_id="p-1")
            bus.publish(event)
        (effect,) = wait_until(lambda: effects(client, name), what="the handler's effect")
    assert effect == [event.event_id, "corr-1", "acme", event.event_id]


def test_an_event_delivered_twice_takes_effect_once(shop):
    """Publishing the same event twice runs each handler's effect once; the inbox skips the rest."""
    _app, bus, _transport, client, name = shop
    event = celery_shop.ParcelBooked(parcel_id="p-2")
    marker = celery_shop.ParcelBooked(parcel_id="after")
    with celery_worker("tests.apps.celery_shop", name, worker_env(name)):
        bus.publish(event)
        bus.publish(event)
        bus.publish(marker)
        wait_until(
            lambda: marker.event_id in [e[0] for e in effects(client, name)],
            what="the marker event",
        )
    ids = [e[0] for e in effects(client, name)]
    assert ids.count(event.event_id) == 1


def test_many_events_published_at_once_are_batched_and_each_handled(shop):
    """A list of events travels in few messages and every event is handled exactly once."""
    _app, bus, transport, client, name = shop
    transport.batch_size = 100
    events = [celery_shop.ParcelBooked(parcel_id=f"p-{i}") for i in range(250)]
    with celery_worker("tests.apps.celery_shop", name, worker_env(name)):
        bus.publish(*events)
        wait_until(lambda: len(effects(client, name)) >= 250, what="250 effects")
    assert sorted(e[0] for e in effects(client, name)) == sorted(e.event_id for e in events)


def test_a_poison_handler_is_retried_then_dead_lettered_and_others_are_unaffected(shop):
    """A handler that always fails runs max_attempts times, then lands in the dead-letter store."""
    _, bus, transport, client, name = shop
    event = celery_shop.ParcelBooked(parcel_id="p-bad", poison=True)
    with celery_worker("tests.apps.celery_shop", name, worker_env(name)):
        bus.publish(event)
        letters = wait_until(transport.dead_letters.list, what="a dead letter")
    (letter,) = letters
    assert (letter.handler, letter.attempts, letter.event_id) == (
        "shipping.poison",
        3,
        event.event_id,
    )
    assert "Flaky: parcel p-bad cannot be booked" in letter.reason
    assert int(client.get(f"{name}:poison_attempts")) == 3
    assert [e[0] for e in effects(client, name)] == [event.event_id]


@pytest.mark.parametrize(
    "args",
    [("not json at all",), ({"type": "x"},), ("a", "b", "c", "d"), ()],
    ids=["garbage", "dict", "too-many-args", "no-args"],
)
def test_malformed_task_messages_are_dead_lettered_and_the_worker_goes_on(shop, args):
    """A tidings.deliver message with bad arguments is dead-lettered; the next event is handled."""
    app, bus, transport, client, name = shop
    after = celery_shop.ParcelBooked(parcel_id="after-garbage")
    with celery_worker("tests.apps.celery_shop", name, worker_env(name)):
        app.send_task("tidings.deliver", args=args, queue=name)
        bus.publish(after)
        wait_until(lambda: effects(client, name), what="the next event's effect")
        (letter,) = wait_until(transport.dead_letters.list, what="a dead letter")
    assert letter.handler is None
    assert letter.destination == name
    assert [e[0] for e in effects(client, name)] == [after.event_id]


def test_a_second_service_receives_every_event_on_its_own_queue(redis_url, unique_name):
    """Publishing to two services' queues gives each service's handlers every event."""
    billing = f"{unique_name}_billing"
    _app, bus, transport, client = celery_shop.make(
        unique_name, unique_name, publish_to=(unique_name, billing)
    )
    try:
        events = [celery_shop.ParcelBooked(parcel_id=f"p-{i}") for i in range(5)]
        with (
            celery_worker("tests.apps.celery_shop", unique_name, worker_env(unique_name)),
            celery_worker(
                "tests.apps.celery_shop",
                billing,
                {**worker_env(billing, "billing"), "SHOP_PREFIX": unique_name},
            ),
        ):
            bus.publish(*events)
            wait_until(lambda: len(effects(client, unique_name)) == 5, what="shipping effects")
            wait_until(
                lambda: len(effects(client, unique_name, "billing")) == 5, what="billing effects"
            )
        expected = sorted(e.event_id for e in events)
        assert sorted(e[0] for e in effects(client, unique_name)) == expected
        assert sorted(e[0] for e in effects(client, unique_name, "billing")) == expected
    finally:
        for key in client.scan_iter(f"{unique_name}*"):
            client.delete(key)
        transport.close()
        client.close()


def test_a_retry_delay_longer_than_the_visibility_timeout_is_refused(redis_url, unique_name):
    """On a Redis broker, a retry policy that could outwait the visibility timeout is refused."""
    app = Celery("t", broker=redis_url)
    app.conf.broker_transport_options = {"visibility_timeout": 60}
    bus = EventBus(transport=CeleryTransport(app, dead_letters=MemoryDeadLetterStore()))
    with pytest.raises(UsageError, match="visibility_timeout"):
        bus.add_handler(
            lambda e: None,
            celery_shop.ParcelBooked,
            name="t.slow_retry",
            retry=RetryPolicy(max_attempts=10, initial_delay=30, max_delay=600),
        )


def test_an_app_accepting_pickle_gets_a_warning(redis_url):
    """A Celery app configured to accept pickle is warned about when the transport binds."""
    app = Celery("t", broker=redis_url)
    app.conf.accept_content = ["json", "pickle"]
    with pytest.warns(UserWarning, match="accepts pickle"):
        EventBus(transport=CeleryTransport(app, dead_letters=MemoryDeadLetterStore()))


def test_envelope_travels_as_json_string_argument(shop):
    """The task message carries the CloudEvents envelope as a JSON string, nothing pickled."""
    _, bus, _transport, client, name = shop
    bus.publish(celery_shop.ParcelBooked(parcel_id="inspect"))
    raw = client.lindex(name, 0)
    message = json.loads(raw)
    assert message["content-type"] == "application/json"
    assert message["headers"]["task"] == "tidings.deliver"
    body = json.loads(base64.b64decode(message["body"]))
    envelope = json.loads(body[0][0])
    assert envelope["type"] == "celery_shop.parcel_booked"
    assert envelope["data"]["parcel_id"] == "inspect"


def test_an_event_sent_outside_any_context_carries_its_own_ids_in_the_headers(shop):
    """An event published with no context bound (as the relay does) stamps its ids on the task."""
    _, bus, _transport, client, name = shop
    with event_context(correlation_id="req-7", tenant_id="acme"):
        event = celery_shop.ParcelBooked(parcel_id="relayed")
    bus.publish(event)
    headers = json.loads(client.lindex(name, 0))["headers"]
    assert headers["tidings_correlation_id"] == "req-7"
    assert headers["tidings_tenant_id"] == "acme"


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"\x80\x04\x95garbage-pickle", "application/x-python-serialize"),
        (b"\x00\xff{not json", "application/json"),
        (b'{"just": "json, not a task"}', "application/json"),
    ],
    ids=["pickle", "garbage", "not-a-task"],
)
def test_messages_celery_cannot_decode_are_dead_lettered_and_the_worker_goes_on(
    shop, body, content_type
):
    """Pickle, garbage and non-task messages on the queue are dead-lettered; work continues."""
    app, bus, transport, client, name = shop
    after = celery_shop.ParcelBooked(parcel_id="after-poison-message")
    headers = {} if body.startswith(b'{"just"') else {"task": "tidings.deliver", "id": "p-1"}
    with celery_worker("tests.apps.celery_shop", name, worker_env(name)):
        with app.connection_for_write() as connection:
            connection.Producer().publish(
                body,
                exchange=name,
                routing_key=name,
                content_type=content_type,
                content_encoding="binary",
                headers=headers,
                declare=[app.amqp.queues[name]],
            )
        bus.publish(after)
        wait_until(lambda: effects(client, name), what="the next event's effect")
        (letter,) = wait_until(transport.dead_letters.list, what="a dead letter")
    assert letter.body == body
    assert letter.headers["content-type"] == content_type
    assert letter.destination == name
    assert [e[0] for e in effects(client, name)] == [after.event_id]


def test_an_app_with_its_own_worker_consumer_is_warned_and_kept(redis_url):
    """A custom worker_consumer is kept, with a warning that undecodable messages are dropped."""
    app = Celery("t", broker=redis_url)
    app.conf.worker_consumer = "myapp.workers:Consumer"
    with pytest.warns(UserWarning, match="worker_consumer"):
        EventBus(transport=CeleryTransport(app, dead_letters=MemoryDeadLetterStore()))
    assert app.conf.worker_consumer == "myapp.workers:Consumer"


def test_an_event_sent_before_any_worker_waits_in_its_declared_queue_on_rabbitmq(unique_name):
    """On RabbitMQ the publisher declares its bus's subscriptions: an early event is kept."""
    app = Celery("t", broker=require_server("rabbitmq"))
    transport = CeleryTransport(
        app, queue=unique_name, dead_letters=MemoryDeadLetterStore(), inbox=None
    )
    bus = EventBus(transport=transport)
    bus.add_handler(lambda event: None, celery_shop.ParcelBooked, name=f"{unique_name}.h")
    bus.publish(celery_shop.ParcelBooked(parcel_id="early"))
    transport.close()
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        try:
            _, waiting, _ = channel.queue_declare(queue=unique_name, passive=True)
        finally:
            channel.queue_delete(unique_name)
    assert waiting == 1


def test_publishing_reuses_one_redis_client_on_its_channel(shop):
    """The transport's Redis channel hands out one client for its commands, and still publishes."""
    _, bus, transport, client, name = shop
    bus.publish(celery_shop.ParcelBooked(parcel_id="one"))
    channel = transport._idle[0].producer.channel
    first = channel._create_client()
    bus.publish(celery_shop.ParcelBooked(parcel_id="two"))
    assert channel._create_client() is first
    assert channel._create_client(asynchronous=True) is not first  # kombu's other pool
    assert client.llen(name) == 2


def test_client_reuse_leaves_other_channels_alone():
    """A channel that is not kombu's Redis channel keeps its own way of making clients."""

    class Channel:
        def _create_client(self, asynchronous=False):
            return object()

    channel = Channel()
    reuse_redis_clients(channel)
    assert channel._create_client() is not channel._create_client()


def test_the_worker_consumer_serves_its_redis_channel_before_its_loop_starts(redis_url):
    """The consumer's loop arguments are Celery's, its task channel reusing one Redis client."""
    app = Celery("t", broker=redis_url)
    with app.connection_for_read() as connection:
        channel = connection.default_channel
        consumer = DeadLetteringConsumer.__new__(DeadLetteringConsumer)
        consumer.app = SimpleNamespace(clock="clock")
        consumer.connection, consumer.blueprint, consumer.hub = connection, "bp", Hub()
        consumer.qos, consumer.amqheartbeat, consumer.amqheartbeat_rate = "qos", None, 2.0
        consumer.task_consumer = SimpleNamespace(channel=channel)
        args = consumer.loop_args()
        assert args[:3] == (consumer, connection, consumer.task_consumer)
        assert channel._create_client() is channel._create_client()


def test_a_published_message_is_the_task_message_apply_async_would_send(shop):
    """An event's message names its task, queue and event, ignores results, and has no parent."""
    _, bus, _transport, client, name = shop
    event = celery_shop.ParcelBooked(parcel_id="shape")
    bus.publish(event)
    message = json.loads(client.lindex(name, 0))
    headers = message["headers"]
    assert headers["task"] == "tidings.deliver"
    assert headers["argsrepr"] == f"<celery_shop.parcel_booked {event.event_id}>"
    assert headers["ignore_result"] is True
    assert headers["parent_id"] is None
    assert headers["root_id"] == headers["id"] == message["properties"]["correlation_id"]
    assert message["properties"]["delivery_info"]["routing_key"] == name


def test_an_event_published_from_inside_a_task_names_that_task_as_its_parent(shop):
    """Published while a task runs, an event's message carries the task's id and root id."""
    _app, bus, transport, client, name = shop
    running = transport._deliver
    running.push_request(id="task-1", root_id="root-1", called_directly=False)
    _task_stack.push(running)
    try:
        bus.publish(celery_shop.ParcelBooked(parcel_id="follow-up"))
    finally:
        _task_stack.pop()
        running.pop_request()
    headers = json.loads(client.lindex(name, 0))["headers"]
    assert (headers["parent_id"], headers["root_id"]) == ("task-1", "root-1")


def test_an_eager_app_handles_a_published_event_in_the_publishing_process(shop):
    """With task_always_eager, publish runs the handlers at once, as Celery runs eager tasks."""
    app, bus, _transport, client, name = shop
    app.conf.task_always_eager = True
    with event_context(correlation_id="corr-eager"):
        event = celery_shop.ParcelBooked(parcel_id="eager")
        bus.publish(event)
    assert effects(client, name) == [[event.event_id, "corr-eager", "None", event.event_id]]
    assert client.llen(name) == 0


def _unacked_on(client, queue):
    """Delivery tags kombu's unacknowledged index holds for messages of ``queue``."""
    return [
        tag for tag, record in client.hgetall("unacked").items() if json.loads(record)[2] == queue
    ]


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_every_delivery_is_acknowledged_whatever_the_pool(shop, pool):
    """With four processes or threads, each event is handled once and no delivery stays unacked."""
    _, bus, _transport, client, name = shop
    events = [celery_shop.ParcelBooked(parcel_id=f"p-{n}") for n in range(200)]
    with celery_worker("tests.apps.celery_shop", name, worker_env(name), pool=pool, concurrency=4):
        for event in events:
            bus.publish(event)
        wait_until(lambda: len(effects(client, name)) >= len(events), what="every effect")
        wait_until(lambda: not _unacked_on(client, name), what="every acknowledgement")
    assert sorted(e[0] for e in effects(client, name)) == sorted(e.event_id for e in events)
