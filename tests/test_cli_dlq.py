import base64
import json
import sys
import textwrap
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from types import ModuleType

import pytest
import redis
from click.testing import CliRunner, Result

from conftest import require_server
from tidings.cli import make_cli
from tidings.deadletter.redis import RedisDeadLetterStore
from tidings.deadletter.sql import SqlDeadLetterStore
from tidings.ports import DeadLetterStore
from tidings.testing.deadletter import sample_letter
from tidings.transports._defaults import redis_dead_letters

REPLAYERS = """
    from tidings.ports import DeadLetter


    class Recorder:
        def __init__(self, fail_for=()):
            self.replayed = []
            self.fail_for = fail_for

        def replay(self, letter: DeadLetter) -> None:
            if letter.event_id in self.fail_for:
                raise ConnectionError(f"broker refused {letter.event_id}")
            self.replayed.append(letter)


    recorder = Recorder()
    with_store = Recorder()  # the test sets with_store.dead_letters, as a transport has
    failing = Recorder(fail_for=("event-0", "event-1", "event-2"))
    picky = Recorder(fail_for=("event-1",))
    not_a_replayer = 42
"""


class Target:
    """A real store with the command-line options that reach it."""

    def __init__(self, store: DeadLetterStore, args: list[str]) -> None:
        self.store = store
        self.args = args


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("redis", marks=pytest.mark.integration),
        pytest.param("postgresql", marks=pytest.mark.integration),
    ]
)
def target(request, tmp_path, unique_name) -> Iterator[Target]:
    if request.param in ("sqlite", "postgresql"):
        if request.param == "sqlite":
            url, args = f"sqlite:///{tmp_path / 'dead.db'}", []
            sql_store = SqlDeadLetterStore.from_url(url)
        else:
            url, args = require_server("postgresql"), ["--name", unique_name]
            sql_store = SqlDeadLetterStore.from_url(url, table_name=unique_name)
        sql_store.create_tables()
        yield Target(sql_store, ["--store", url, *args])
        sql_store.table.drop(sql_store._engine, checkfirst=True)
        sql_store.close()
        return
    url = request.getfixturevalue("redis_url")
    redis_store = RedisDeadLetterStore.from_url(url, prefix=unique_name)
    yield Target(redis_store, ["--store", url, "--name", unique_name])
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"{unique_name}:*"))
    if keys:
        client.delete(*keys)
    client.close()
    redis_store.close()


@pytest.fixture
def replayers(tmp_path, monkeypatch) -> Iterator[ModuleType]:
    """A module of replayer objects, importable by its (unique) name."""
    name = f"replayers_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(REPLAYERS))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__(name)
    yield module
    sys.modules.pop(name, None)


@pytest.fixture(autouse=True)
def no_store_in_environment(monkeypatch):
    monkeypatch.delenv("TIDINGS_DLQ_URL", raising=False)
    monkeypatch.delenv("TIDINGS_DLQ_NAME", raising=False)


def run(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(make_cli(), ["dlq", *args], input=input, env=env)


def test_list_prints_a_table_newest_first(target):
    """`dlq list` shows one row per letter, newest first, with the reason and the total."""
    letters = [sample_letter(n) for n in range(3)]
    for letter in letters:
        target.store.add(letter)
    result = run("list", *target.args)
    assert result.exit_code == 0, result.output
    positions = [result.output.index(letter.id) for letter in reversed(letters)]
    assert positions == sorted(positions)
    assert "1-3 of 3" in result.output
    assert "EventDecodeError: field 'amount'" in result.output
    assert "billing.charge" in result.output


def test_list_limit_and_offset_page_through(target):
    """--limit and --offset show one page of the newest-first order."""
    letters = [sample_letter(n) for n in range(3)]
    for letter in letters:
        target.store.add(letter)
    result = run("list", *target.args, "--limit", "1", "--offset", "1")
    assert result.exit_code == 0, result.output
    assert [letter.id in result.output for letter in letters] == [False, True, False]


def test_list_of_an_empty_store_says_so(target):
    """`dlq list` on an empty store prints that there are none and succeeds."""
    result = run("list", *target.args)
    assert (result.exit_code, result.output) == (0, "No dead letters here (0 in the store).\n")


def test_show_prints_every_field_and_a_binary_body_in_hex(target):
    """`dlq show` prints every field, headers as JSON, the traceback, a non-UTF-8 body as hex."""
    letter = sample_letter()
    target.store.add(letter)
    result = run("show", *target.args, letter.id)
    assert result.exit_code == 0, result.output
    for value in (letter.id, letter.failed_at, "redis_streams", "orders", "billing.charge"):
        assert value in result.output
    assert "orders.order_placed" in result.output
    assert "event-0" in result.output
    assert '"tenant_id": "Zürich"' in result.output
    assert 'File "worker.py", line 1' in result.output
    assert f"body ({len(letter.body)} bytes, not UTF-8, in hex)" in result.output
    assert "00000000  ff fe 20 6e 6f 74" in result.output


def test_show_prints_a_utf8_body_as_text(target):
    """A body that is UTF-8 is printed as text."""
    letter = sample_letter(body='{"city": "Zürich"}'.encode())
    target.store.add(letter)
    result = run("show", *target.args, letter.id)
    assert result.exit_code == 0, result.output
    assert "UTF-8 text" in result.output
    assert '{"city": "Zürich"}' in result.output


def test_show_escapes_terminal_controls_and_prints_markup_literally(target):
    """Escape sequences from message data are shown escaped and rich markup is not applied."""
    letter = sample_letter(reason="\x1b[2J[bold red]gone[/] \u202eevil", body=b"\x1b]0;t\x07")
    target.store.add(letter)
    result = run("show", *target.args, letter.id)
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output
    assert "\u202e" not in result.output
    assert r"\x1b[2J[bold red]gone[/] \u202eevil" in result.output
    assert r"\x1b]0;t\x07" in result.output


def test_show_of_an_unknown_id_exits_1(target):
    """`dlq show` of an id not in the store says so and exits 1."""
    result = run("show", *target.args, "no-such-id")
    assert result.exit_code == 1
    assert "no dead letter with id 'no-such-id'" in result.output


def test_purge_asks_then_deletes_everything(target):
    """`dlq purge` asks for confirmation, and on yes deletes every letter."""
    for n in range(3):
        target.store.add(sample_letter(n))
    result = run("purge", *target.args, input="y\n")
    assert result.exit_code == 0, result.output
    assert "Delete all 3 dead letters for good?" in result.output
    assert "Purged 3 dead letters." in result.output
    assert target.store.count() == 0


def test_purge_answered_no_keeps_every_letter(target):
    """Answering no to the purge prompt aborts with status 1 and deletes nothing."""
    target.store.add(sample_letter())
    result = run("purge", *target.args, input="n\n")
    assert result.exit_code == 1
    assert target.store.count() == 1


def test_purge_with_yes_does_not_ask(target):
    """`dlq purge --yes` deletes without a prompt."""
    target.store.add(sample_letter())
    result = run("purge", *target.args, "--yes")
    assert (result.exit_code, result.output) == (0, "Purged 1 dead letters.\n")
    assert target.store.count() == 0


def test_replay_hands_the_letter_to_the_app_then_removes_it(target, replayers):
    """`dlq replay ID` gives the stored letter to the --app replayer, then removes only it."""
    replayed, kept = sample_letter(0), sample_letter(1)
    target.store.add(replayed)
    target.store.add(kept)
    result = run("replay", *target.args, replayed.id, "--app", f"{replayers.__name__}:recorder")
    assert result.exit_code == 0, result.output
    assert replayers.recorder.replayed == [replayed]
    assert target.store.get(replayed.id) is None
    assert target.store.get(kept.id) == kept


def test_replay_all_replays_oldest_first_and_reports_the_count(target, replayers):
    """`dlq replay --all` replays every letter, oldest first, and empties the store."""
    letters = [sample_letter(n) for n in range(3)]
    for letter in letters:
        target.store.add(letter)
    result = run("replay", *target.args, "--all", "--app", f"{replayers.__name__}:recorder")
    assert result.exit_code == 0, result.output
    assert replayers.recorder.replayed == letters
    assert "Replayed 3 of 3 dead letters." in result.output
    assert target.store.count() == 0


def test_replay_failure_keeps_the_letter_and_exits_1(target, replayers):
    """A replayer that raises leaves the letter in the store, and the error is shown."""
    letter = sample_letter()
    target.store.add(letter)
    result = run("replay", *target.args, letter.id, "--app", f"{replayers.__name__}:failing")
    assert result.exit_code == 1
    assert "ConnectionError: broker refused event-0" in result.stderr
    assert "the letter stays in the store" in result.stderr
    assert target.store.get(letter.id) == letter


def test_replay_all_goes_on_after_a_failure_and_exits_1(target, replayers):
    """With --all, one failed replay keeps that letter, the others are replayed, exit is 1."""
    letters = [sample_letter(n) for n in range(3)]
    for letter in letters:
        target.store.add(letter)
    result = run("replay", *target.args, "--all", "--app", f"{replayers.__name__}:picky")
    assert result.exit_code == 1
    assert "Replayed 2 of 3 dead letters." in result.output
    assert replayers.picky.replayed == [letters[0], letters[2]]
    assert target.store.list() == [letters[1]]


def test_replay_of_an_unknown_id_exits_1(target, replayers):
    """Replaying an id the store does not hold says so and exits 1."""
    result = run("replay", *target.args, "no-such-id", "--app", f"{replayers.__name__}:recorder")
    assert result.exit_code == 1
    assert "no dead letter with id no-such-id" in result.stderr


def test_replay_refuses_an_app_that_is_not_a_replayer(target, replayers):
    """An --app object without replay() is refused before any letter is touched."""
    target.store.add(sample_letter())
    app = f"{replayers.__name__}:not_a_replayer"
    result = run("replay", *target.args, "--all", "--app", app)
    assert result.exit_code == 1
    assert "is a int, neither an EventBus nor a Replayer" in result.output
    assert target.store.count() == 1


@pytest.mark.parametrize(
    ("app", "code", "message"),
    [
        ("no_colon_here", 2, "--app takes module:attribute"),
        ("tidings_no_such_module_xyz:app", 1, "cannot import 'tidings_no_such_module_xyz'"),
        ("tidings.ports:NoSuchThing", 1, "AttributeError"),
    ],
)
def test_replay_explains_an_app_it_cannot_load(tmp_path, app, code, message):
    """A malformed, unimportable or missing --app target gets a message, not a traceback."""
    result = run("replay", "--store", "memory://", "--all", "--app", app)
    assert (result.exit_code, message in result.output) == (code, True), result.output


def test_replay_needs_ids_or_all_but_not_both():
    """Replay without ids or --all, or with both, is a usage error."""
    assert run("replay", "--store", "memory://", "--app", "m:a").exit_code == 2
    both = run("replay", "--store", "memory://", "x", "--all", "--app", "m:a")
    assert both.exit_code == 2
    assert "name the letters to replay by ID, or pass --all" in both.output


def test_replay_help_says_the_only_import_comes_from_the_command_line():
    """The replay help states that only --app is imported, and never message data."""
    result = run("replay", "--help")
    text = " ".join(result.output.split())
    assert result.exit_code == 0
    assert "The --app object is the only thing imported from input" in text
    assert "nothing in a dead letter's data is ever imported" in text


@pytest.mark.parametrize("command", [["list"], ["show", "x"], ["purge"]])
def test_a_missing_store_is_explained(command):
    """Without --store or TIDINGS_DLQ_URL the command says how to name the store."""
    result = run(*command)
    assert result.exit_code == 2
    assert "pass --store URL or set TIDINGS_DLQ_URL" in result.output


def test_the_store_can_come_from_the_environment(tmp_path):
    """TIDINGS_DLQ_URL names the store when --store is not given."""
    url = f"sqlite:///{tmp_path / 'dead.db'}"
    store = SqlDeadLetterStore.from_url(url)
    store.create_tables()
    store.add(sample_letter())
    result = run("list", env={"TIDINGS_DLQ_URL": url})
    assert result.exit_code == 0, result.output
    assert "1-1 of 1" in result.output
    store.close()


def test_a_mistyped_sqlite_path_is_refused_and_not_created(tmp_path):
    """A --store naming a SQLite file that does not exist is a usage error; no file appears."""
    missing = tmp_path / "typo.db"
    result = run("list", "--store", f"sqlite:///{missing}")
    assert result.exit_code == 2, result.output
    assert not missing.exists()


def test_an_unknown_store_scheme_is_a_usage_error():
    """A store URL with an unknown scheme gets a usage error listing URLs that work."""
    result = run("list", "--store", "amqp://guest@localhost//")
    assert result.exit_code == 2
    assert "sqlite:///" in result.output


def test_a_redis_url_asking_for_decoded_responses_is_a_usage_error():
    """A Redis URL with decode_responses=True is refused with the fix, not a traceback."""
    result = run("list", "--store", "redis://127.0.0.1:6379/0?decode_responses=True")
    assert result.exit_code == 2
    assert "decode_responses=False" in result.output


def test_an_unreachable_store_gives_one_line_without_the_password():
    """A store that cannot be reached gives a one-line error that hides the password."""
    result = run("list", "--store", "redis://:s3cret@127.0.0.1:9/0")
    assert result.exit_code == 1
    assert "the dead-letter store at redis://:***@127.0.0.1:9/0 failed" in result.output
    assert "s3cret" not in result.output


# -- filters, JSON and per-service stores ---------------------------------------------------


def _mixed(store: DeadLetterStore) -> list:
    """Add six letters of two handlers, two event types and two reasons, oldest first."""
    letters = [
        sample_letter(
            n,
            handler=("billing.charge", "mail.send")[n % 2],
            event_type=("orders.order_placed", "orders.order_paid")[n // 3],
            reason=("TimeoutError: gateway", "ValueError: amount < 0")[n % 3 == 0],
        )
        for n in range(6)
    ]
    for letter in letters:
        store.add(letter)
    return letters


def _listed_ids(result: Result) -> list[str]:
    assert result.exit_code == 0, result.output
    return [letter["id"] for letter in json.loads(result.output)]


def test_list_filters_must_all_hold(target):
    """--handler, --event-type, --reason and --since each narrow `dlq list`, newest first."""
    letters = _mixed(target.store)
    ids = [letter.id for letter in letters]
    assert _listed_ids(run("list", *target.args, "--json", "--handler", "mail.send")) == ids[5::-2]
    both = run("list", *target.args, "--json", "--handler", "mail.send", "--event-type",
               "orders.order_placed")  # fmt: skip
    assert _listed_ids(both) == [ids[1]]
    assert _listed_ids(run("list", *target.args, "--json", "--reason", "amount <")) == [
        ids[3],
        ids[0],
    ]
    since = letters[4].failed_at[:19]  # 2026-01-02T03:04:09, naive: UTC
    assert _listed_ids(run("list", *target.args, "--json", "--since", since)) == ids[:3:-1]
    table = run("list", *target.args, "--handler", "billing.charge", "--limit", "2")
    assert table.exit_code == 0, table.output
    assert "matching --handler 'billing.charge'" in table.output
    assert [letter_id in table.output for letter_id in ids] == [False] * 2 + [True, False] * 2


def test_list_since_takes_an_age(target):
    """--since 1h keeps the letters of the last hour and drops an older one."""
    now = datetime.now(UTC)
    old = sample_letter(0, failed_at=(now - timedelta(hours=2)).isoformat())
    new = sample_letter(1, failed_at=(now - timedelta(minutes=10)).isoformat())
    target.store.add(old)
    target.store.add(new)
    assert _listed_ids(run("list", *target.args, "--json", "--since", "1h")) == [new.id]
    assert _listed_ids(run("list", *target.args, "--json", "--since", "3h")) == [new.id, old.id]
    assert _listed_ids(run("list", *target.args, "--json", "--since", "5m")) == []


@pytest.mark.parametrize(
    "since", ["yesterday", "1w", "-1h", "2026-13-01", "999999999d", "999999d", "9" * 5000 + "d"]
)
def test_list_since_refuses_what_is_not_a_time_or_an_age(since):
    """A --since that is neither ISO-8601 nor an age like 30m is a usage error saying both."""
    result = run("list", "--store", "memory://", "--since", since)
    assert result.exit_code == 2
    assert "neither an ISO-8601 time" in result.output or "before the year 1" in result.output


def test_list_json_is_valid_escaped_ascii(target):
    """`list --json` prints a JSON array of letters, ASCII only, with no raw control character."""
    letter = sample_letter(reason="\x1b[2J\u202egone\x00", handler="h\x1b]0;t\x07")
    target.store.add(letter)
    result = run("list", *target.args, "--json")
    assert result.exit_code == 0, result.output
    assert result.output.isascii()
    assert "\x1b" not in result.output
    (got,) = json.loads(result.output)
    stored = target.store.get(letter.id)
    assert got["reason"] == stored.reason
    assert got["handler"] == "h\x1b]0;t\x07"
    assert (got["id"], got["attempts"], got["body_bytes"]) == (letter.id, 3, len(letter.body))
    assert got["headers"]["tenant_id"] == "Zürich"
    assert "body_base64" not in got


def test_list_json_of_nothing_is_an_empty_array(target):
    """`list --json` with no matching letter prints [] and succeeds."""
    target.store.add(sample_letter())
    assert _listed_ids(run("list", *target.args, "--json", "--handler", "nobody")) == []


def test_show_json_gives_the_body_exactly_in_base64(target):
    """`show --json` carries the body's bytes in base64, and its text only when it is UTF-8."""
    binary, text = sample_letter(0), sample_letter(1, body='{"x": "Zürich \x1b"}'.encode())
    target.store.add(binary)
    target.store.add(text)
    shown = run("show", *target.args, "--json", binary.id)
    assert shown.exit_code == 0, shown.output
    assert shown.output.isascii()
    document = json.loads(shown.output)
    assert base64.b64decode(document["body_base64"]) == binary.body
    assert document["body_text"] is None
    assert document["traceback"] == binary.traceback
    shown = run("show", *target.args, "--json", text.id)
    assert "\x1b" not in shown.output
    assert json.loads(shown.output)["body_text"] == '{"x": "Zürich \x1b"}'


def test_purge_by_filter_asks_with_the_count_and_deletes_only_matches(target):
    """`purge --handler H` names how many match in its prompt, then deletes those only."""
    letters = _mixed(target.store)
    result = run("purge", *target.args, "--handler", "mail.send", input="y\n")
    assert result.exit_code == 0, result.output
    assert "Delete the 3 dead letters matching --handler 'mail.send' for good?" in result.output
    assert "Purged 3 dead letters." in result.output
    assert sorted(letter.id for letter in target.store.list()) == sorted(
        letter.id for letter in letters[::2]
    )


def test_purge_by_filter_answered_no_or_matching_nothing_deletes_nothing(target):
    """A refused filtered purge exits 1, one matching nothing says so; both keep every letter."""
    _mixed(target.store)
    refused = run("purge", *target.args, "--reason", "Timeout", input="n\n")
    assert refused.exit_code == 1
    none = run("purge", *target.args, "--event-type", "nothing.such", "--yes")
    assert none.exit_code == 0
    assert "No dead letters matching --event-type 'nothing.such' to purge." in none.output
    assert target.store.count() == 6


def test_purge_by_filter_with_yes_does_not_ask(target):
    """`purge --since ... --yes` deletes the matching letters without a prompt."""
    letters = _mixed(target.store)
    since = letters[3].failed_at
    result = run("purge", *target.args, "--since", since, "--yes")
    assert (result.exit_code, result.output) == (0, "Purged 3 dead letters.\n")
    assert [letter.id for letter in target.store.list()] == [x.id for x in letters[2::-1]]


def test_replay_by_filter_goes_oldest_first_and_keeps_the_rest(target, replayers):
    """`replay --handler H` replays the matching letters oldest first and removes only them."""
    letters = _mixed(target.store)
    app = f"{replayers.__name__}:recorder"
    result = run("replay", *target.args, "--handler", "billing.charge", "--app", app)
    assert result.exit_code == 0, result.output
    assert replayers.recorder.replayed == letters[::2]
    assert "Replayed 3 of 3 dead letters." in result.output
    assert sorted(x.id for x in target.store.list()) == sorted(x.id for x in letters[1::2])


def test_replay_by_filter_reports_failures_and_exits_1(target, replayers):
    """A filtered replay goes on past a failure, counts it and exits 1; that letter stays."""
    letters = _mixed(target.store)
    app = f"{replayers.__name__}:picky"  # refuses event-1
    result = run("replay", *target.args, "--handler", "mail.send", "--app", app)
    assert result.exit_code == 1
    assert "Replayed 2 of 3 dead letters." in result.output
    assert "1 not replayed" in result.stderr
    assert replayers.picky.replayed == [letters[3], letters[5]]
    assert target.store.get(letters[1].id) == letters[1]


def test_replay_of_ids_and_a_filter_is_a_usage_error():
    """Replay by ID together with a filter is refused: it must be one or the other."""
    result = run("replay", "--store", "memory://", "x", "--handler", "h", "--app", "m:a")
    assert result.exit_code == 2
    assert "name the letters to replay by ID, or pass --all or filters" in result.output


@pytest.fixture
def service_store(redis_url, unique_name) -> Iterator[DeadLetterStore]:
    """The default dead-letter store the transports make for service ``unique_name``."""
    client = redis.Redis.from_url(redis_url)
    yield redis_dead_letters(client, unique_name)
    keys = list(client.scan_iter(match=f"tidings:dlq:{unique_name}:*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.mark.integration
def test_service_opens_the_transports_default_store(redis_url, unique_name, service_store):
    """--service NAME (or TIDINGS_SERVICE) reads tidings:dlq:NAME, the store a transport makes."""
    letter = sample_letter()
    service_store.add(letter)
    by_option = run("list", "--store", redis_url, "--service", unique_name, "--json")
    assert _listed_ids(by_option) == [letter.id]
    by_env = run("list", "--store", redis_url, "--json", env={"TIDINGS_SERVICE": unique_name})
    assert _listed_ids(by_env) == [letter.id]
    assert letter.id not in run("list", "--store", redis_url, "--json").output  # tidings:dlq
    purged = run("purge", "--store", redis_url, "--service", unique_name, "--yes")
    assert (purged.exit_code, service_store.count()) == (0, 0)


def test_service_with_a_sql_store_or_with_name_is_a_usage_error(tmp_path):
    """--service picks a Redis prefix: with a SQL store, or with --name too, it is refused."""
    url = f"sqlite:///{tmp_path / 'dead.db'}"
    SqlDeadLetterStore.from_url(url).create_tables()
    sql = run("list", "--store", url, "--service", "billing")
    assert sql.exit_code == 2
    assert "pass --name TABLE" in sql.output
    both = run("list", "--store", "redis://localhost:6379/0", "--service", "a", "--name", "b")
    assert both.exit_code == 2
    assert "pass --name or --service, not both" in both.output


@pytest.mark.integration
def test_a_service_option_wins_over_a_name_from_the_environment(
    redis_url, unique_name, service_store
):
    """--service on the command line wins over TIDINGS_DLQ_NAME, --name over TIDINGS_SERVICE."""
    letter = sample_letter()
    service_store.add(letter)
    args = ["list", "--store", redis_url, "--json"]
    by_service = run(*args, "--service", unique_name, env={"TIDINGS_DLQ_NAME": "elsewhere"})
    assert _listed_ids(by_service) == [letter.id]
    prefix = f"tidings:dlq:{unique_name}"
    by_name = run(*args, "--name", prefix, env={"TIDINGS_SERVICE": "elsewhere"})
    assert _listed_ids(by_name) == [letter.id]


@pytest.mark.integration
def test_app_without_store_uses_the_transports_own_store(
    redis_url, unique_name, service_store, replayers
):
    """--app without --store lists, shows and replays the letters of its transport's store."""
    letters = [sample_letter(n) for n in range(2)]
    for letter in letters:
        service_store.add(letter)
    replayers.with_store.dead_letters = service_store
    app = f"{replayers.__name__}:with_store"
    assert _listed_ids(run("list", "--app", app, "--json")) == [x.id for x in letters[::-1]]
    assert json.loads(run("show", "--app", app, "--json", letters[0].id).output)["id"] == (
        letters[0].id
    )
    result = run("replay", "--all", "--app", app)
    assert result.exit_code == 0, result.output
    assert replayers.with_store.replayed == letters
    assert service_store.count() == 0


def test_app_without_a_store_of_its_own_needs_store(replayers):
    """An --app object with no dead_letters store, and no --store, is refused with the fix."""
    result = run("list", "--app", f"{replayers.__name__}:recorder")
    assert result.exit_code == 1
    assert "has no dead-letter store" in result.output
    assert "pass --store URL" in result.output


def test_list_help_says_how_to_reach_a_services_store():
    """`dlq list --help` says that a transport's store is per service, and how to pick it."""
    text = " ".join(run("list", "--help").output.split())
    assert "tidings:dlq:<service>" in text
    assert "--service" in text
