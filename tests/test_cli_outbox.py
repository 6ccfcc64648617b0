import json
import queue

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from tidings import EventBus
from tidings.cli import make_cli
from tidings.memory import MemoryDeadLetterStore
from tidings.outbox import Outbox
from tidings.testing.outbox import Probe
from tidings.transports.memory import MemoryBroker, MemoryTransport

PUBLISHED: list[str] = []
BROKER = MemoryBroker()
TRANSPORT = MemoryTransport(dead_letters=MemoryDeadLetterStore(), queue="cli-outbox", broker=BROKER)
BUS = EventBus(transport=TRANSPORT)
PLAIN_BUS = EventBus()


def publish(events):
    """A plain function: what the relay must refuse (it is no transport)."""
    PUBLISHED.extend(event.event_id for event in events)


def _relayed_ids() -> list[str]:
    """The event ids of the envelopes waiting on the test broker's queue, drained."""
    ids = []
    waiting = BROKER.queue("cli-outbox")
    while True:
        try:
            message = waiting.get_nowait()
        except queue.Empty:
            return ids
        ids.append(json.loads(message.body)["id"])


def _outbox(tmp_path, *events):
    url = f"sqlite:///{tmp_path / 'outbox.db'}"
    engine = sa.create_engine(url)
    outbox = Outbox()
    outbox.create_tables(engine)
    with engine.begin() as connection:
        outbox.add(connection, *events)
    engine.dispose()
    return url


def test_status_shows_pending_oldest_and_partitions(tmp_path):
    """`outbox status` prints the pending count, the oldest age and each key's lag."""
    url = _outbox(
        tmp_path, Probe(aggregate_id="a"), Probe(aggregate_id="a"), Probe(aggregate_id="b")
    )
    result = CliRunner().invoke(make_cli(), ["outbox", "status", "--db", url])
    assert result.exit_code == 0, result.output
    assert "pending: 3" in result.output
    assert "oldest: " in result.output
    rows = {row[0]: row[1:] for row in map(str.split, result.output.splitlines()) if row}
    # key, pending count, lag in seconds (the rows were written just now)
    assert rows["a"][0] == "2"
    assert rows["b"][0] == "1"
    assert all(0 <= float(rows[key][1]) < 60 for key in ("a", "b"))


def test_status_of_an_empty_outbox(tmp_path):
    """An empty outbox reports zero pending and no age."""
    result = CliRunner().invoke(make_cli(), ["outbox", "status", "--db", _outbox(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "pending: 0  oldest: -"


@pytest.mark.parametrize("spec", ["test_cli_outbox:BUS", "test_cli_outbox:TRANSPORT"])
def test_relay_once_forwards_through_the_named_bus_or_transport(tmp_path, spec):
    """`relay --once` drains the outbox through --transport module:attribute, then exits."""
    events = [Probe(aggregate_id="a", seq=n) for n in range(3)]
    url = _outbox(tmp_path, *events)
    _relayed_ids()
    args = ["relay", "--db", url, "--transport", spec, "--once"]
    result = CliRunner().invoke(make_cli(), args)
    assert result.exit_code == 0, result.output
    assert "Relayed 3 events." in result.output
    assert [event.event_id for event in events] == _relayed_ids()
    status = CliRunner().invoke(make_cli(), ["outbox", "status", "--db", url])
    assert "pending: 0" in status.output


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("test_cli_outbox:publish", "a function"),
        ("tidings.testing.outbox:Probe", "the class Probe"),
        ("test_cli_outbox:PLAIN_BUS", "without a transport"),
    ],
)
def test_relay_refuses_what_is_not_a_transport_or_bus_and_deletes_nothing(tmp_path, spec, says):
    """A function, an event class or a bus without transport is refused at start; rows stay."""
    url = _outbox(tmp_path, Probe(aggregate_id="a"), Probe(aggregate_id="b"))
    PUBLISHED.clear()
    result = CliRunner().invoke(make_cli(), ["relay", "--db", url, "--transport", spec, "--once"])
    assert result.exit_code == 2, result.output
    assert says in result.output
    assert "EventBus or a Transport" in result.output or "EventBus(transport=" in result.output
    assert PUBLISHED == []
    status = CliRunner().invoke(make_cli(), ["outbox", "status", "--db", url])
    assert "pending: 2" in status.output


def test_relay_help_says_a_celery_url_routes_by_type(tmp_path):
    """`relay --help` says a celery+ URL routes by event type, ?queues= being the fan-out."""
    result = CliRunner().invoke(make_cli(), ["relay", "--help"])
    assert result.exit_code == 0, result.output
    assert "routed by event type" in result.output
    assert "legacy fan-out" in result.output


def test_relay_help_documents_every_transport_form_and_loglevel():
    """`relay --help` names each URL form, the refusal of route functions and --loglevel."""
    result = CliRunner().invoke(make_cli(), ["relay", "--help"])
    assert result.exit_code == 0, result.output
    for form in ("redis://", "rediss://", "celery+redis://", "celery+amqp://", "memory://",
                 "module:attribute", "queues", "partition_key", "prefix", "--loglevel",
                 "--max-attempts", "refused at start-up"):  # fmt: skip
        assert form in result.output, form


def test_relay_memory_transport_drains(tmp_path):
    """`--transport memory://` relays into an in-process bus (no handlers)."""
    url = _outbox(tmp_path, Probe())
    result = CliRunner().invoke(
        make_cli(), ["relay", "--db", url, "--transport", "memory://", "--once"]
    )
    assert result.exit_code == 0, result.output
    assert "Relayed 1 events." in result.output


def test_relay_and_status_explain_missing_or_bad_options(tmp_path):
    """No --db, an unknown --transport, or a missing table: one-line errors, no traceback."""
    runner = CliRunner()
    no_db = runner.invoke(make_cli(), ["outbox", "status"], env={"TIDINGS_OUTBOX_DB": ""})
    assert no_db.exit_code == 2
    assert "--db URL" in no_db.output
    bad = runner.invoke(make_cli(), ["relay", "--db", "sqlite://", "--transport", "kafka://x"])
    assert bad.exit_code == 2
    assert "module:attribute" in bad.output
    missing = runner.invoke(
        make_cli(), ["outbox", "status", "--db", f"sqlite:///{tmp_path / 'none.db'}"]
    )
    assert missing.exit_code == 2
    assert "no SQLite database" in missing.output
    assert "Traceback" not in missing.output
    assert not (tmp_path / "none.db").exists()
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    sa.create_engine(empty).connect().close()
    no_table = runner.invoke(make_cli(), ["outbox", "status", "--db", empty])
    assert no_table.exit_code == 1
    assert "the outbox database failed" in no_table.output
    assert "Traceback" not in no_table.output


@pytest.mark.integration
def test_relay_publishes_to_redis_streams_given_a_broker_url(
    tmp_path, redis_url, redis_client, unique_name
):
    """`--transport redis://...?prefix=P` relays rows onto the streams workers read."""
    url = _outbox(tmp_path, Probe(aggregate_id="a"), Probe(aggregate_id="b"))
    transport = f"{redis_url}?prefix={unique_name}"  # the test server, whatever its database
    try:
        result = CliRunner().invoke(
            make_cli(), ["relay", "--db", url, "--transport", transport, "--once"]
        )
        assert result.exit_code == 0, result.output
        streams = list(redis_client.scan_iter(f"{unique_name}:*"))
        assert len(streams) == 1
        assert redis_client.xlen(streams[0]) == 2
    finally:
        for key in redis_client.scan_iter(f"{unique_name}*"):
            redis_client.delete(key)


@pytest.mark.integration
def test_relay_publishes_celery_messages_given_a_celery_broker_url(
    tmp_path, redis_url, redis_client, unique_name
):
    """`--transport celery+redis://...?queues=Q` relays rows as tidings task messages on Q."""
    url = _outbox(tmp_path, Probe(aggregate_id="a"))
    transport = f"celery+{redis_url}?queues={unique_name}"
    try:
        result = CliRunner().invoke(
            make_cli(), ["relay", "--db", url, "--transport", transport, "--once"]
        )
        assert result.exit_code == 0, result.output
        assert redis_client.llen(unique_name) == 1
        assert b"tidings.deliver" in redis_client.lindex(unique_name, 0)
    finally:
        for key in redis_client.scan_iter(f"*{unique_name}*"):
            redis_client.delete(key)
