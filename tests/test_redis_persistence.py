"""What the broker keeps (issue 18, item 3): a warning, once, when Redis keeps nothing on disk.

Each test starts its own ``redis-server`` on a free port with the persistence settings under
test (and stops it afterwards); the shared test Redis is only read.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from celery import Celery
from click.testing import CliRunner
from redis.backoff import NoBackoff
from redis.retry import Retry
from tests import redis_servers
from tests.redis_servers import Server

from tidings import EventBus, _redis_persistence
from tidings._redis_persistence import describe_url, persistence, warn_if_forgetful
from tidings.cli import make_cli
from tidings.memory import MemoryDeadLetterStore
from tidings.outbox import Outbox
from tidings.testing.outbox import Probe
from tidings.transports.celery import CeleryTransport
from tidings.transports.redis_streams import RedisStreamsTransport

pytestmark = pytest.mark.integration

redis_server = redis_servers.redis_server  # the fixture, for this module's tests


@pytest.fixture(autouse=True)
def _fresh_checks() -> Iterator[None]:
    """Each test starts with no server checked (the warning is once per server and process)."""
    for memo in (_redis_persistence._checked, _redis_persistence._pools):
        memo.clear()
    _redis_persistence._failed.clear()
    yield
    for memo in (_redis_persistence._checked, _redis_persistence._pools):
        memo.clear()
    _redis_persistence._failed.clear()


def forgetful_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The warnings of ``tidings.redis`` that a Redis keeps nothing on disk."""
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "tidings.redis"
        and record.levelno == logging.WARNING
        and "keeps nothing on disk" in record.getMessage()
    ]


def test_a_redis_without_aof_or_snapshots_keeps_nothing(redis_server: Server) -> None:
    """``appendonly no`` and ``save ""``: persistence says nothing survives, naming the setting."""
    url = redis_server("--appendonly", "no", "--save", "")
    found = persistence(redis.Redis.from_url(url))
    assert found.persists is False
    assert "appendonly yes" in found.describe()


def test_a_redis_with_the_append_only_file_persists(redis_server: Server) -> None:
    """``appendonly yes``: persistence says a restart keeps the data, with its fsync policy."""
    url = redis_server("--appendonly", "yes", "--appendfsync", "always", "--save", "")
    found = persistence(redis.Redis.from_url(url))
    assert found.persists is True
    assert found.describe() == "persists: append-only file on (appendonly yes, appendfsync always)"


def test_a_redis_with_snapshots_only_persists_up_to_the_last_snapshot(
    redis_server: Server,
) -> None:
    """``save 60 1`` without AOF: it persists, and the description says what a crash loses."""
    url = redis_server("--appendonly", "no", "--save", "60 1")
    found = persistence(redis.Redis.from_url(url))
    assert found.persists is True
    assert "snapshots only" in found.describe()


def test_a_redis_with_config_disabled_is_read_from_info(redis_server: Server) -> None:
    """CONFIG renamed away (as on managed Redis): INFO tells AOF; without it, unknown, no error."""
    with_aof = redis_server("--appendonly", "yes", "--rename-command", "CONFIG", "")
    without = redis_server("--appendonly", "no", "--rename-command", "CONFIG", "")
    assert persistence(redis.Redis.from_url(with_aof)).persists is True
    unknown = persistence(redis.Redis.from_url(without))
    assert unknown.persists is None
    assert "CONFIG is disabled" in unknown.describe()


def test_the_warning_is_given_once_per_server_and_names_the_setting(
    redis_server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """Two checks of one forgetful server warn once; a persisting server gives no warning."""
    caplog.set_level(logging.INFO, logger="tidings.redis")
    forgetful = redis_server("--appendonly", "no", "--save", "")
    keeping = redis_server("--appendonly", "yes")
    warn_if_forgetful(redis.Redis.from_url(forgetful), "a test")
    warn_if_forgetful(redis.Redis.from_url(forgetful), "a test")
    warn_if_forgetful(redis.Redis.from_url(keeping), "a test")
    (warning,) = forgetful_warnings(caplog)
    assert "appendonly yes" in warning
    assert "a test" in warning


def test_an_unreachable_redis_is_checked_again_later_and_never_raises(
    redis_server: Server, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A check that cannot reach Redis returns ``None``, not raising, and is tried again later."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once the probe is closed
    client = redis.Redis(port=port, retry=Retry(NoBackoff(), 0), socket_connect_timeout=1)
    assert warn_if_forgetful(client, "a test") is None
    assert _redis_persistence._checked == set()
    # A forgetful server now listens there: not asked again before the retry delay; then it is.
    redis_server("--appendonly", "no", "--save", "", port=port)
    assert warn_if_forgetful(client, "a test") is None
    monkeypatch.setattr(_redis_persistence, "_RETRY_AFTER", 0.0)
    found = warn_if_forgetful(client, "a test")
    assert found is not None
    assert found.persists is False
    assert len(forgetful_warnings(caplog)) == 1


def test_the_streams_transport_warns_when_it_publishes_to_a_forgetful_redis(
    redis_server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """Publishing through Redis Streams to a Redis keeping nothing logs the warning once."""
    url = redis_server("--appendonly", "no", "--save", "")
    transport = RedisStreamsTransport(
        redis.Redis.from_url(url), service="persistence-test", dead_letters=MemoryDeadLetterStore()
    )
    bus = EventBus(transport=transport)
    bus.publish(Probe())
    bus.publish(Probe())
    (warning,) = forgetful_warnings(caplog)
    assert "Redis Streams transport" in warning


def test_the_celery_transport_warns_when_its_redis_broker_keeps_nothing(
    redis_server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """Publishing Celery messages to a Redis broker keeping nothing logs the warning once."""
    url = redis_server("--appendonly", "no", "--save", "")
    app = Celery("persistence-test", broker=url)
    transport = CeleryTransport(app, queue="persistence-test", dead_letters=MemoryDeadLetterStore())
    bus = EventBus(transport=transport)
    try:
        bus.publish(Probe())
        bus.publish(Probe())
    finally:
        transport.close()
    (warning,) = forgetful_warnings(caplog)
    assert "Celery broker" in warning


def test_the_relay_warns_at_start_and_outbox_status_shows_what_the_broker_keeps(
    redis_server: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``tidings relay`` warns of a forgetful Redis at start; ``outbox status`` says either."""
    forgetful = redis_server("--appendonly", "no", "--save", "")
    keeping = redis_server("--appendonly", "yes", "--appendfsync", "everysec")
    db = f"sqlite:///{tmp_path / 'outbox.db'}"
    engine = sa.create_engine(db)
    Outbox().create_tables(engine)
    engine.dispose()
    runner = CliRunner()
    relayed = runner.invoke(make_cli(), ["relay", "--db", db, "--transport", forgetful, "--once"])
    assert relayed.exit_code == 0, relayed.output
    (warning,) = forgetful_warnings(caplog)
    assert "relay" in warning

    status = runner.invoke(make_cli(), ["outbox", "status", "--db", db, "--transport", forgetful])
    assert status.exit_code == 0, status.output
    assert 'keeps nothing on disk (appendonly no, save "")' in status.output
    status = runner.invoke(
        make_cli(), ["outbox", "status", "--db", db, "--transport", f"celery+{keeping}"]
    )
    assert "persists: append-only file on (appendonly yes, appendfsync everysec)" in status.output
    plain = runner.invoke(make_cli(), ["outbox", "status", "--db", db])
    assert "broker" not in plain.output
    assert describe_url("memory://") is None
