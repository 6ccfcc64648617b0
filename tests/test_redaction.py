"""No command prints a password from a broker or database URL, on success or failure."""

import logging

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from tidings._untrusted import redact_text
from tidings.cli import make_cli
from tidings.outbox import Outbox
from tidings.testing.outbox import Probe

SECRET = "s3cret-pw"  # noqa: S105 - the test looks for it in the output
DEAD_REDIS = f"redis://:{SECRET}@127.0.0.1:1/0"
DEAD_PG = f"postgresql+psycopg://u:{SECRET}@127.0.0.1:1/x"
QUERY_PG = f"postgresql+psycopg://u@127.0.0.1:1/x?password={SECRET}"
LIVE_REDIS_WRONG_PW = f"redis://:{SECRET}@127.0.0.1:6379/0"  # accepted: no requirepass here
LIVE_REDIS_REFUSED = f"redis://nosuchuser:{SECRET}@127.0.0.1:6379/0"  # WRONGPASS from Redis


def _outbox(tmp_path):
    url = f"sqlite:///{tmp_path / 'outbox.db'}"
    engine = sa.create_engine(url)
    Outbox().create_tables(engine)
    with engine.begin() as connection:
        Outbox().add(connection, Probe(aggregate_id="a"))
    engine.dispose()
    return url


def _run(args, caplog):
    with caplog.at_level(logging.DEBUG):
        result = CliRunner().invoke(make_cli(), args)
    seen = result.output + str(result.exception or "") + caplog.text
    return result, seen


def test_redact_text_scrubs_the_url_and_its_password_wherever_it_appears():
    """redact_text replaces the URL and every bare copy of its password or secret parameter."""
    text = f"failed on {DEAD_REDIS}: AUTH {SECRET} rejected; {QUERY_PG}"
    scrubbed = redact_text(text, DEAD_REDIS, QUERY_PG)
    assert SECRET not in scrubbed
    assert "redis://:***@127.0.0.1:1/0" in scrubbed
    assert "password=***" in scrubbed


@pytest.mark.parametrize("db", [DEAD_PG, QUERY_PG])
def test_outbox_status_failure_hides_the_database_password(db, caplog):
    """`outbox status` against an unreachable database fails without printing its password."""
    result, seen = _run(["outbox", "status", "--db", db], caplog)
    assert result.exit_code != 0
    assert SECRET not in seen


@pytest.mark.parametrize("db", [DEAD_PG, QUERY_PG])
def test_relay_database_failure_hides_the_password(db, caplog):
    """`relay --once` against an unreachable database fails without printing its password."""
    result, seen = _run(["relay", "--db", db, "--transport", "memory://", "--once"], caplog)
    assert result.exit_code != 0
    assert SECRET not in seen


@pytest.mark.parametrize(
    "transport",
    [
        DEAD_REDIS,
        LIVE_REDIS_WRONG_PW,
        LIVE_REDIS_REFUSED,
        "redis://127.0.0.1:1/0?password=s3cret-pw",
    ],
)
def test_relay_broker_failure_hides_the_broker_password(tmp_path, transport, caplog):
    """`relay --once` to an unreachable or a live Redis never prints the broker's password."""
    db = _outbox(tmp_path)
    result, seen = _run(["relay", "--db", db, "--transport", transport, "--once"], caplog)
    assert (result.exit_code == 0) == (transport == LIVE_REDIS_WRONG_PW), seen
    assert SECRET not in seen


def test_relay_bad_transport_spec_hides_the_password(tmp_path, caplog):
    """A --transport tidings cannot use is quoted back with its password redacted."""
    db = _outbox(tmp_path)
    spec = f"kafka://u:{SECRET}@127.0.0.1:1/x"
    result, seen = _run(["relay", "--db", db, "--transport", spec, "--once"], caplog)
    assert result.exit_code != 0
    assert "***" in seen
    assert SECRET not in seen


@pytest.mark.parametrize("store", [DEAD_REDIS, LIVE_REDIS_REFUSED, DEAD_PG, QUERY_PG])
def test_dlq_list_failure_hides_the_store_password(store, caplog):
    """`dlq list` against an unreachable or refusing store fails without printing its password."""
    result, seen = _run(["dlq", "list", "--store", store], caplog)
    assert result.exit_code != 0
    assert SECRET not in seen


def test_dlq_list_unknown_scheme_hides_the_password(caplog):
    """A store URL with an unknown scheme is quoted back with its password redacted."""
    result, seen = _run(["dlq", "list", "--store", f"kafka://u:{SECRET}@h/x"], caplog)
    assert result.exit_code != 0
    assert SECRET not in seen


def test_worker_non_redis_transport_hides_the_password(caplog):
    """`worker --transport` with a non-Redis URL is refused with its password redacted."""
    args = [
        "worker",
        "--app",
        "tests.apps.redaction_app:bus",
        "--transport",
        f"amqp://u:{SECRET}@h//",
    ]
    result, seen = _run(args, caplog)
    assert result.exit_code != 0
    assert SECRET not in seen


def test_dlq_list_success_on_live_redis_hides_the_password(caplog):
    """`dlq list` on a live Redis succeeds and prints nothing of the URL's password."""
    result, seen = _run(
        ["dlq", "list", "--store", LIVE_REDIS_WRONG_PW, "--name", "redact:x"], caplog
    )
    assert result.exit_code == 0, seen
    assert SECRET not in seen
