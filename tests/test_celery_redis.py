"""kombu's Redis channel made cheaper: the unacknowledged index stays exactly what kombu keeps."""

import logging

import pytest
from celery import Celery
from kombu import Exchange, Queue

from tidings.testing.workers import wait_until
from tidings.transports._celery_redis import acknowledge_without_waiting, reuse_redis_clients

pytestmark = pytest.mark.integration


@pytest.fixture
def channel(redis_url, redis_client, unique_name):
    """A kombu Redis channel on its own queue and index keys, served by both changes."""
    app = Celery("t", broker=redis_url)
    app.conf.broker_transport_options = {
        "unacked_key": f"{unique_name}:unacked",
        "unacked_index_key": f"{unique_name}:unacked_index",
        "unacked_mutex_key": f"{unique_name}:unacked_mutex",
    }
    connection = app.connection_for_read()
    channel = connection.channel()
    queue = Queue(unique_name, Exchange(unique_name, type="direct"), routing_key=unique_name)
    queue(channel).declare()
    reuse_redis_clients(channel)
    acknowledge_without_waiting(channel)
    yield channel, unique_name
    channel.close()
    connection.release()
    for key in redis_client.scan_iter(f"{unique_name}*"):
        redis_client.delete(key)
    for key in redis_client.scan_iter(f"_kombu.binding.{unique_name}*"):
        redis_client.delete(key)


def _publish(channel, name, body="hello"):
    channel.basic_publish(channel.prepare_message(body), exchange=name, routing_key=name)


def _index(redis_client, name):
    return (
        {key.decode() for key in redis_client.hkeys(f"{name}:unacked")},
        {tag.decode() for tag in redis_client.zrange(f"{name}:unacked_index", 0, -1)},
    )


def test_a_delivery_is_recorded_until_it_is_acknowledged(channel, redis_client):
    """A received message is in kombu's unacknowledged index until its ack removes it."""
    channel, name = channel
    _publish(channel, name)
    message = channel.basic_get(name)
    tag = message.delivery_tag
    assert wait_until(lambda: _index(redis_client, name) == ({tag}, {tag}))
    message.ack()
    assert wait_until(lambda: _index(redis_client, name) == (set(), set()))
    assert redis_client.llen(name) == 0


def test_a_requeued_rejection_puts_the_message_back_on_its_queue(channel, redis_client):
    """reject(requeue=True) restores the message to its queue, and the index forgets it."""
    channel, name = channel
    _publish(channel, name, "again")
    message = channel.basic_get(name)
    message.reject(requeue=True)
    assert redis_client.llen(name) == 1
    assert _index(redis_client, name) == (set(), set())
    assert channel.basic_get(name).body == b"again"


def test_a_rejection_without_requeue_drops_the_message(channel, redis_client):
    """reject() without requeue removes the delivery from the index, nothing goes back."""
    channel, name = channel
    _publish(channel, name)
    channel.basic_get(name).reject()
    assert wait_until(lambda: _index(redis_client, name) == (set(), set()))
    assert redis_client.llen(name) == 0


def test_unacknowledged_deliveries_are_restored_when_the_channel_closes(
    redis_url, redis_client, unique_name
):
    """A message received and never acknowledged is back on its queue once the channel closes."""
    app = Celery("t", broker=redis_url)
    app.conf.broker_transport_options = {"unacked_key": f"{unique_name}:unacked"}
    app.conf.broker_transport_options["unacked_index_key"] = f"{unique_name}:unacked_index"
    with app.connection_for_read() as connection:
        channel = connection.channel()
        Queue(unique_name, Exchange(unique_name), routing_key=unique_name)(channel).declare()
        acknowledge_without_waiting(channel)
        _publish(channel, unique_name, "kept")
        assert channel.basic_get(unique_name) is not None
        channel.close()
    assert redis_client.lrange(unique_name, 0, -1) != []
    assert _index(redis_client, unique_name) == (set(), set())
    for key in redis_client.scan_iter(f"*{unique_name}*"):
        redis_client.delete(key)


def test_writes_a_broken_connection_did_not_confirm_are_sent_again(channel, redis_client):
    """After the kept connection is killed, the next write sends the lost ones first, in order."""
    channel, name = channel
    writes = channel.qos.tidings_writes
    _publish(channel, name)
    message = channel.basic_get(name)
    writes.settle()
    own_id = writes.connection.call("CLIENT", "ID")
    redis_client.client_kill_filter(_id=own_id)
    wait_until(lambda: own_id not in [c["id"] for c in redis_client.client_list()])
    message.ack()  # sent on the dead connection: lost, and noticed at the next write
    _publish(channel, name)
    second = channel.basic_get(name)
    writes.settle()
    assert _index(redis_client, name) == ({second.delivery_tag}, {second.delivery_tag})


def test_a_write_redis_refuses_is_logged(channel, redis_client, caplog):
    """An index write Redis refuses is logged with what it means, and nothing raises."""
    channel, name = channel
    redis_client.set(f"{name}:unacked", "not a hash")
    _publish(channel, name)
    with caplog.at_level(logging.ERROR, "tidings.celery"):
        channel.basic_get(name)
        channel.qos.tidings_writes.settle()
    redis_client.delete(f"{name}:unacked")  # so that closing the channel can restore
    assert "Redis refused to record a delivery" in caplog.text


def test_a_channel_with_a_key_prefix_keeps_kombus_own_writes(redis_url):
    """A channel whose keys kombu prefixes is left to kombu, clients and index writes alike."""
    app = Celery("t", broker=redis_url)
    app.conf.broker_transport_options = {"global_keyprefix": "t_prefix:"}
    with app.connection_for_read() as connection:
        channel = connection.channel()
        reuse_redis_clients(channel)
        acknowledge_without_waiting(channel)
        assert not hasattr(channel.qos, "tidings_writes")
        assert channel._create_client() is not channel._create_client()
        channel.close()
