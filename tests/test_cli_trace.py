import io
import json
import time
from collections.abc import Iterator

import pytest
from click.testing import CliRunner
from rich.console import Console
from tests.audit_run import STORES, OrderPlaced, PaymentTaken, audit_store, run_shop, store_url

from tidings.audit import AuditRecord, AuditStore
from tidings.audit.tree import MAX_DEPTH, causal_tree
from tidings.cli import make_cli
from tidings.cli_trace import render


@pytest.fixture(params=STORES)
def filled(request, unique_name, tmp_path) -> Iterator[tuple[AuditStore, list[str], OrderPlaced]]:
    """A store of each kind holding a real shop run; the CLI options that reach it; the order."""
    with audit_store(request.param, unique_name, tmp_path) as store:
        order, _ = run_shop(store, unique_name)
        options = ["--audit", store_url(request.param, tmp_path), "--name", unique_name]
        yield store, options, order


def trace(*args: str) -> tuple[int, str]:
    outcome = CliRunner().invoke(make_cli(), ["trace", *args])
    return outcome.exit_code, outcome.output


def depth(line: str) -> int:
    """How deep a line of a rich tree is: the column its label starts at."""
    return len(line) - len(line.lstrip("│├└─ "))


@pytest.mark.integration
def test_trace_prints_the_causal_tree_with_the_follow_up_under_its_cause(filled):
    """The follow-up event is nested under its cause's event, with every run, retry, dead letter."""
    _, options, order = filled
    code, output = trace(order.correlation_id, *options)
    assert code == 0, output
    lines = output.splitlines()
    assert lines[0].startswith(f"trace of request {order.correlation_id}  7 record(s)")
    (cause,) = [n for n, line in enumerate(lines) if OrderPlaced.event_type in line]
    (follow_up,) = [n for n, line in enumerate(lines) if PaymentTaken.event_type in line]
    assert order.event_id in lines[cause]
    assert depth(lines[follow_up]) > depth(lines[cause])
    under_cause = [line for line in lines[cause + 1 :] if depth(line) > depth(lines[cause])]
    text = "\n".join(under_cause)
    for expected in (
        "published",
        "billing.charge retried (attempt 1)",
        "billing.charge handled (attempt 2)",
        "mail.confirm retried (attempt 1)",
        "mail.confirm dead_lettered (attempt 2)",
        "MailDown: smtp down",
        PaymentTaken.event_type,
        "ledger.record handled (attempt 1)",
    ):
        assert expected in text, expected
    ledger = next(n for n, line in enumerate(lines) if "ledger.record" in line)
    assert depth(lines[ledger]) > depth(lines[follow_up])
    assert " ms  " in lines[ledger]


@pytest.mark.integration
def test_trace_escapes_what_came_from_messages(filled):
    """An escape sequence in a handler's error reaches the terminal escaped, never raw."""
    _, options, order = filled
    code, output = trace(order.correlation_id, *options)
    assert code == 0, output
    assert "\x1b" not in output
    assert "card declined\\x1b[2J, try again" in output


@pytest.mark.integration
def test_trace_json_is_the_same_tree_with_timings(filled):
    """--json gives the events nested by causation, each with its records and offsets in ms."""
    _, options, order = filled
    code, output = trace(order.correlation_id, *options, "--json")
    assert code == 0, output
    found = json.loads(output)
    assert found["correlation_id"] == order.correlation_id
    assert found["records"] == 7
    (root,) = found["events"]
    assert (root["event_id"], root["event_type"]) == (order.event_id, OrderPlaced.event_type)
    assert root["offset_ms"] == 0
    (follow_up,) = root["caused"]
    assert follow_up["event_type"] == PaymentTaken.event_type
    assert follow_up["causation_id"] == order.event_id
    assert follow_up["offset_ms"] > 0
    assert [(r["kind"], r["handler"]) for r in follow_up["records"]] == [
        ("published", None),
        ("handled", "ledger.record"),
    ]
    kinds = sorted((r["kind"], r["handler"] or "") for r in root["records"])
    assert kinds == [
        ("dead_lettered", "mail.confirm"),
        ("handled", "billing.charge"),
        ("published", ""),
        ("retried", "billing.charge"),
        ("retried", "mail.confirm"),
    ]
    offsets = [r["offset_ms"] for r in root["records"]]
    assert offsets == sorted(offsets)
    assert all(r["duration_ms"] >= 0 for r in root["records"])


@pytest.mark.integration
def test_trace_of_an_unknown_correlation_id_exits_1(filled):
    """A correlation id the trail does not hold is reported on stderr with exit status 1."""
    _, options, _ = filled
    code, output = trace("no-such-request", *options)
    assert code == 1
    assert "no audit records for correlation id no-such-request" in output


def test_trace_without_a_store_is_a_usage_error():
    """Without --audit or TIDINGS_AUDIT_URL the command says how to name the store (exit 2)."""
    outcome = CliRunner().invoke(make_cli(), ["trace", "c-1"], env={"TIDINGS_AUDIT_URL": ""})
    assert outcome.exit_code == 2
    assert "pass --audit URL or set TIDINGS_AUDIT_URL" in outcome.output


def test_trace_refuses_a_missing_sqlite_file_and_hides_passwords(tmp_path):
    """A mistyped SQLite path is refused, not created; a URL's password never reaches output."""
    code, output = trace("c-1", "--audit", f"sqlite:///{tmp_path / 'nope.db'}")
    assert code == 2
    assert "no SQLite database" in output
    assert not (tmp_path / "nope.db").exists()
    code, output = trace("c-1", "--audit", "postgresql+psycopg://u:s3cret@127.0.0.1:1/x")
    assert code == 1
    assert "s3cret" not in output
    assert "the audit store at" in output


def test_forged_markup_and_controls_in_records_print_as_plain_text():
    """Rich markup and control characters in ids and types are shown literally, escaped."""
    records = [
        AuditRecord(
            "published",
            "[bold red]e1[/]",
            event_type="evil\x1b]8;;http://x\x07type",
            correlation_id="c",
            at=1.0,
        )
    ]
    out = io.StringIO()
    Console(file=out, width=200).print(render(causal_tree("c", records)))
    text = out.getvalue()
    assert "[bold red]e1[/]" in text
    assert "\x1b" not in text
    assert "\x07" not in text
    assert "evil\\x1b]8;;http://x\\x07type" in text


def test_a_causation_cycle_and_a_deep_chain_keep_every_record_once():
    """Forged causation cycles and chains deeper than MAX_DEPTH never lose or repeat a record."""
    now = time.time()
    cycle = [
        AuditRecord("published", "a", correlation_id="c", causation_id="b", at=now),
        AuditRecord("published", "b", correlation_id="c", causation_id="a", at=now + 1),
    ]
    chain = [
        AuditRecord("published", f"n{i}", correlation_id="c", causation_id=f"n{i - 1}", at=now + i)
        for i in range(2, 2 * MAX_DEPTH + 10)
    ]
    found = causal_tree("c", [*cycle, *chain])

    def ids(nodes, seen):
        for node in nodes:
            seen.append(node.event_id)
            ids(node.caused, seen)
        return seen

    every = ids(found.roots, [])
    assert sorted(every) == sorted(r.event_id for r in [*cycle, *chain])
    assert found.count == len(cycle) + len(chain)
    out = io.StringIO()
    Console(file=out, width=4000).print(render(found))
    assert out.getvalue().count(" ms  ") == 2 * found.count  # each event: its line, its record
    assert len(json.dumps(found.to_dict())) > 0
