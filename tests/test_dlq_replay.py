"""`tidings dlq replay` is a real retry: a fresh attempt budget, the same --app as the worker."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from tests.apps import celery_shop, replay_streams

from tidings.testing.workers import celery_worker, running, wait_until

pytestmark = pytest.mark.integration

TIDINGS = str(Path(sys.executable).with_name("tidings"))


def _replay(redis_url: str, dlq: str, app: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run `tidings dlq replay --all` in its own process, as an operator would."""
    command = [TIDINGS, "dlq", "replay", "--store", redis_url, "--name", dlq, "--all", "--app", app]
    return subprocess.run(  # noqa: S603 - our own command line
        command,
        env={**os.environ, "PYTHONPATH": str(Path.cwd()), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _int(client: redis.Redis, key: str) -> int:
    return int(client.get(key) or 0)


@pytest.fixture
def streams_service(redis_url, unique_name):
    """The replay service's publishing side; every key under the test's name removed after."""
    bus, transport, client = replay_streams.make(unique_name)
    yield bus, transport, client, unique_name
    for key in client.scan_iter(f"{unique_name}*"):
        client.delete(key)
    client.close()


@pytest.mark.parametrize("attr", ["bus", "transport"])
def test_a_replayed_streams_letter_gets_a_fresh_attempt_budget(streams_service, redis_url, attr):
    """A letter replayed with the worker's --app (or the transport) is tried max_attempts again."""
    bus, transport, client, name = streams_service
    env = {"REPLAY_PREFIX": name}
    client.set(f"{name}:broken", "1")
    worker = [TIDINGS, "worker", "--app", "tests.apps.replay_streams:bus"]
    with running(worker, env):
        bus.publish(replay_streams.InvoiceSent(invoice_id="inv-1"))
        wait_until(lambda: transport.dead_letters.count() == 1, what="the first dead letter")
        assert _int(client, f"{name}:attempts") == replay_streams.ATTEMPTS
        done = _replay(redis_url, f"{name}:dlq", f"tests.apps.replay_streams:{attr}", env)
        assert done.returncode == 0, done.stderr
        wait_until(lambda: transport.dead_letters.count() == 1, what="the replay's dead letter")
        wait_until(lambda: _int(client, f"{name}:attempts") == 2 * replay_streams.ATTEMPTS)
        (letter,) = transport.dead_letters.list()
        assert letter.attempts == replay_streams.ATTEMPTS
        # Repaired: the next replay is handled, once.
        client.delete(f"{name}:broken")
        done = _replay(redis_url, f"{name}:dlq", f"tests.apps.replay_streams:{attr}", env)
        assert done.returncode == 0, done.stderr
        wait_until(lambda: client.lrange(f"{name}:mailed", 0, -1) == [b"inv-1"], what="mailed")
    assert transport.dead_letters.count() == 0


@pytest.fixture
def celery_service(redis_url, unique_name):
    """The Celery shop's publishing side; its keys removed after the test."""
    _app, bus, transport, client = celery_shop.make(unique_name, unique_name)
    yield bus, transport, client, unique_name
    transport.close()
    for key in client.scan_iter(f"{unique_name}*"):
        client.delete(key)
    client.close()


def test_a_replayed_celery_letter_gets_a_fresh_attempt_budget_with_the_bus_as_app(
    celery_service, redis_url
):
    """On Celery, `dlq replay --app module:bus` retries the handler max_attempts times anew."""
    bus, transport, client, name = celery_service
    env = {"SHOP_QUEUE": name, "SHOP_PREFIX": name, "SHOP_SERVICE": "shipping"}
    with celery_worker("tests.apps.celery_shop", name, env):
        bus.publish(celery_shop.ParcelBooked(parcel_id="p-1", poison=True))
        wait_until(lambda: transport.dead_letters.count() == 1, what="the first dead letter")
        assert _int(client, f"{name}:poison_attempts") == 3
        done = _replay(redis_url, f"{name}:dlq", "tests.apps.celery_shop:bus", env)
        assert done.returncode == 0, done.stderr
        wait_until(lambda: _int(client, f"{name}:poison_attempts") == 6, what="three more tries")
        wait_until(lambda: transport.dead_letters.count() == 1, what="the replay's dead letter")
    (letter,) = transport.dead_letters.list()
    assert letter.attempts == 3
    assert letter.handler == "shipping.poison"
