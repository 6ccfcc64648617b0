"""Shared test fixtures: real servers on their standard localhost ports.

Each server's address can be overridden with an environment variable. Where a server is not
reachable the test is skipped with the reason, except under ``CI=true``, where an absent server
fails the run: CI must never go green by skipping what it claims to test.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

SERVERS = {
    "redis": ("TIDINGS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
    "postgresql": (
        "TIDINGS_TEST_POSTGRES_URL",
        "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    ),
    "mariadb": ("TIDINGS_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test"),
    "rabbitmq": ("TIDINGS_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"),
}


def server_url(name: str) -> str:
    """Return the URL of a test server: the environment override, else the local default."""
    variable, default = SERVERS[name]
    return os.environ.get(variable, default)


def require_server(name: str) -> str:
    """Return the server's URL if it accepts connections; skip (or fail under CI) otherwise."""
    url = server_url(name)
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or {"redis": 6379, "postgresql": 5432, "mariadb": 3306}.get(name, 5672)
    try:
        with socket.create_connection((host, port), timeout=2):
            pass
    except OSError as exc:
        reason = f"{name} is not reachable at {host}:{port} ({exc}); set {SERVERS[name][0]}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs every server: {reason}")
        pytest.skip(reason)
    return url


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> str:
    """A name no other test uses, for queues, streams, key prefixes and schemas."""
    base = request.node.name.lower().replace("[", "_").replace("]", "")
    return f"t_{base[:40]}_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def redis_url() -> str:
    """URL of the test Redis server (skip or CI failure when absent)."""
    return require_server("redis")


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[object]:
    """A redis-py client on the test server, closed after the test."""
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


def _forget_subscribed_queues(prefix: str) -> None:
    """Drop the Redis routing subscriptions of the queues whose names start with ``prefix``.

    A Celery transport routing by type records its queue in the broker's Redis
    (``tidings.events:*``, see ``tidings.transports._celery_routing``); a test's queue is gone
    with the test, and publishers of later tests (and runs) must not keep sending to it.
    """
    try:
        import redis  # noqa: PLC0415 - only where Redis is installed
    except ImportError:
        return
    from tidings.transports._celery_routing import (  # noqa: PLC0415
        DEFAULT_EXCHANGE,
        SubscriptionRegistry,
    )

    client = redis.Redis.from_url(server_url("redis"), socket_connect_timeout=1)
    registry = SubscriptionRegistry(DEFAULT_EXCHANGE, 0)
    try:
        for queue in registry.queues(client):
            if queue.startswith(prefix):
                registry.unsubscribe(client, queue)
    except (OSError, redis.RedisError):
        return  # no Redis: nothing was recorded there
    finally:
        client.close()


@pytest.fixture(autouse=True)
def _forget_celery_subscriptions(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a test with a unique name, drop the routing subscriptions of its queues."""
    if "unique_name" not in request.fixturenames:
        yield
        return
    name = request.getfixturevalue("unique_name")  # the test's own value, made first
    yield
    _forget_subscribed_queues(name)


@pytest.fixture(autouse=True, scope="session")
def _forget_test_queues_subscriptions() -> Iterator[None]:
    """At the end of the session, drop the subscriptions of every test queue (``t_*``)."""
    yield
    _forget_subscribed_queues("t_")
