"""OwnConnection: commands sent now whose replies are read later, against a real Redis."""

import os

import pytest
import redis

from tidings._redis import OwnConnection
from tidings.testing.workers import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def own(redis_client, unique_name):
    """A kept connection, and the key prefix it may write under (deleted after the test)."""
    connection = OwnConnection(redis_client)
    yield connection, unique_name
    connection.close()
    for key in redis_client.scan_iter(f"{unique_name}*"):
        redis_client.delete(key)


def test_a_command_sent_later_takes_effect_before_its_reply_is_read(own, redis_client):
    """send_later's command reaches Redis at once; its reply waits for the connection's next use."""
    connection, name = own
    replies = []
    connection.send_later([("SET", f"{name}:k", "v")], replies.append)
    assert connection.call("GET", f"{name}:k") == b"v"
    assert replies == [[b"OK"]]


def test_owed_replies_go_to_their_callbacks_in_order_before_the_next_call(own):
    """Commands sent later get their own replies, in order, errors as exceptions."""
    connection, name = own
    replies = []
    connection.send_later([("INCR", f"{name}:n"), ("HSET", f"{name}:n", "f", "1")], replies.append)
    connection.send_later([("INCR", f"{name}:n")], replies.append)
    assert connection.call("PING") in (b"PONG", "PONG", True)
    (incr, hset), (again,) = replies
    assert incr == 1
    assert isinstance(hset, redis.ResponseError)
    assert again == 2


def test_collect_reads_what_is_owed_and_close_reads_it_too(own):
    """collect() hands over every owed reply; close() reads them before letting go."""
    connection, name = own
    replies = []
    connection.send_later([("INCR", f"{name}:c")], replies.append)
    connection.collect()
    assert replies == [[1]]
    connection.send_later([("INCR", f"{name}:c")], replies.append)
    connection.close()
    assert replies == [[1], [2]]


def test_a_broken_connection_hands_its_failure_to_what_it_owed(own, redis_client):
    """When the server closes the connection, owed callbacks get the failure; then a new one."""
    connection, name = own
    replies = []
    own_id = connection.call("CLIENT", "ID")
    redis_client.client_kill_filter(_id=own_id)
    wait_until(lambda: own_id not in [c["id"] for c in redis_client.client_list()])
    connection.send_later([("INCR", f"{name}:d")], replies.append)  # to a closed socket
    with pytest.raises(redis.ConnectionError):
        connection.call("PING")
    (lost,) = replies
    assert isinstance(lost, redis.ConnectionError)
    assert connection.call("INCR", f"{name}:d") in (1, 2)  # a fresh connection, its own reply


def test_a_forked_child_does_not_read_replies_owed_to_its_parent(own):
    """A child process takes its own connection and ignores what the parent's connection owes."""
    connection, name = own
    replies = []
    connection.send_later([("INCR", f"{name}:f")], replies.append)
    pid = os.fork()
    if pid == 0:  # the child: its answer is its exit status
        ok = connection.call("INCR", f"{name}:f") == 2 and replies == []
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    connection.collect()
    assert replies == [[1]]
