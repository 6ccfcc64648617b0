"""The end of the demo: where to look (metrics sample, the audit tree, the commands, --ui)."""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry
from rich.console import Console

from tidings.audit import open_audit_store
from tidings.cli import make_cli
from tidings.demo import DemoOptions, DemoResult, run_demo
from tidings.demo import look as demo_look
from tidings.demo.journal import CountingInbox, MemoryJournal
from tidings.demo.look import counted, run_ui, sample
from tidings.demo.modes import _free_port
from tidings.demo.trail import Trail
from tidings.errors import InboxBusyError

SCRAPE = """\
# HELP tidings_handled_total Handler runs returned, or skipped as duplicates
# TYPE tidings_handled_total counter
tidings_handled_total{handler="loyalty.award_points",outcome="done",service="shop"} 59.0
tidings_handled_total{handler="loyalty.award_points",outcome="duplicate",service="shop"} 3.0
tidings_handled_total{handler="reporting.project_sales",outcome="done",service="shop"} 60.0
# TYPE tidings_retries_total counter
tidings_retries_total{cause="error",handler="loyalty.award_points",service="shop"} 9.0
tidings_retries_total{cause="busy",handler="loyalty.award_points",service="shop"} 0.0
tidings_retries_total{cause="busy",handler="reporting.project_sales",service="shop"} 2.0
# TYPE tidings_dead_letters_total counter
tidings_dead_letters_total{reason="handler",service="shop"} 1.0
"""


@pytest.fixture(scope="module")
def embedded() -> DemoResult:
    return run_demo(DemoOptions(requests=60, seed=7))


def test_the_sample_shows_the_failing_handler_and_the_dead_letters_only():
    """The sample keeps the failing handler's runs done and retries and the dead letters."""
    assert sample(SCRAPE) == [
        'tidings_handled_total{handler="loyalty.award_points",outcome="done",service="shop"} 59.0',
        'tidings_retries_total{cause="error",handler="loyalty.award_points",service="shop"} 9.0',
        'tidings_dead_letters_total{reason="handler",service="shop"} 1.0',
    ]
    assert counted(SCRAPE) == {"handled": 119.0, "retried": 11.0, "dead_lettered": 1.0}


def test_the_embedded_run_s_metrics_and_audit_trail_agree_with_its_report(embedded):
    """Embedded, this process's metrics and the audit tree count what the demo reports."""
    assert embedded.look is not None
    metrics = counted(embedded.look.metrics)
    assert metrics == {
        "handled": embedded.handled,
        "retried": embedded.retries,
        "dead_lettered": len(embedded.dead_letters),
    }
    assert embedded.retries > 0
    trace = embedded.look.trace
    assert trace.correlation_id == embedded.traced_correlation_id
    kinds = Counter(r.kind for node in trace.roots for r in node.records)
    assert kinds["retried"] >= 1  # the traced request is one whose handler was retried
    assert kinds["handled"] == 4  # OrderPlaced's four handlers; StockReserved's is nested
    assert [child.event_type for child in trace.roots[0].caused] == ["shop.stock_reserved"]


def test_the_cli_demo_ends_with_where_to_look(monkeypatch):
    """`tidings demo` ends with a metrics sample, the trace command and tree, dlq list and ui."""
    monkeypatch.setattr(demo_look, "ui_available", lambda: False)
    outcome = CliRunner().invoke(make_cli(), ["demo", "--requests", "20"])
    assert outcome.exit_code == 0, outcome.output
    where = outcome.output[outcome.output.index("Where to look") :]
    for text in (
        "metrics (this process)",
        'tidings_handled_total{event_type="shop.order_placed",handler="loyalty.award_points"',
        "tidings trace ",
        " --audit sqlite:////",
        "record(s)",
        "loyalty.award_points handled (attempt",
        "tidings dlq list --store sqlite:////",
        "tidings ui --audit sqlite:////",
        "tidings demo --ui",
    ):
        assert text in where, text


def test_the_printed_commands_open_the_run_s_stores():
    """While the run's stores exist, its trace and dlq list commands find the run's records."""
    outputs: dict[str, str] = {}

    def run_them(result: DemoResult) -> None:
        assert result.look is not None
        trail, runner = result.look.trail, CliRunner()
        for name, arguments in (
            ("trace", trail.trace(result.traced_correlation_id)),
            ("dlq", [*trail.dlq_list(), "--json"]),
        ):
            outcome = runner.invoke(make_cli(), arguments)
            assert outcome.exit_code == 0, outcome.output
            outputs[name] = outcome.output

    result = run_demo(DemoOptions(requests=15), while_kept=run_them)
    assert "loyalty.award_points" in outputs["trace"]
    assert result.traced_correlation_id in outputs["trace"]
    letters = json.loads(outputs["dlq"])
    assert [letter["handler"] for letter in letters] == ["loyalty.award_points"] * len(
        result.dead_letters
    )
    assert len(letters) >= 1  # order 13 fails every attempt


def test_ui_starts_on_the_run_s_stores_while_they_exist(monkeypatch):
    """With --ui and the ops page installed, it runs on the run's audit trail before clean-up."""
    seen: list[int] = []

    def fake_ui(trail: Trail, console: Console) -> int:
        store = open_audit_store(trail.audit_url, name=trail.audit_name, must_exist=True)
        try:
            seen.append(len(store.by_tenant("acme", limit=1000)))
        finally:
            store.close()
        return 0

    monkeypatch.setattr(demo_look, "ui_available", lambda: True)
    monkeypatch.setattr(demo_look, "run_ui", fake_ui)
    outcome = CliRunner().invoke(make_cli(), ["demo", "--requests", "10", "--ui"])
    assert outcome.exit_code == 0, outcome.output
    assert len(seen) == 1
    assert seen[0] > 0
    assert "tidings demo --ui" not in outcome.output  # no hint to ask for what was asked


def test_ui_without_the_ops_page_prints_the_command(monkeypatch):
    """With --ui and no ui extra installed, the demo prints the command and says what to install."""
    monkeypatch.setattr(demo_look, "ui_available", lambda: False)
    outcome = CliRunner().invoke(make_cli(), ["demo", "--requests", "5", "--ui"])
    assert outcome.exit_code == 0, outcome.output
    assert "tidings ui --audit" in outcome.output
    assert "pip install 'tidings[ui]'" in outcome.output


def test_run_ui_runs_the_tidings_ui_command_line(tmp_path):
    """run_ui runs `tidings ui` with the trail's arguments in a child and returns its status."""
    db = f"sqlite:///{tmp_path}/gone.db"  # no such file: tidings ui refuses it and exits 2
    trail = Trail(db, "t_audit", db, ("--name", "t_letters"), db, "t_outbox")
    shown = io.StringIO()
    status = run_ui(trail, Console(file=shown))
    assert "starting tidings ui --audit sqlite:///" in shown.getvalue()
    assert status == 2  # click's usage error, from the real command


def test_the_commands_hide_passwords_and_keep_urls_intact():
    """Shown command lines replace a URL's password and leave password-less URLs as they are."""
    redis, sqlite = "redis://:s3cret@cache:6379/0", "sqlite:////tmp/x.db"
    trail = Trail(redis, "p:audit", sqlite, ("--name", "d"), "postgresql://shop:pw@db/x", "o")
    assert "s3cret" not in trail.shown(trail.trace("abc"))
    assert "redis://:***@cache:6379/0" in trail.shown(trail.ui())
    assert trail.shown(trail.dlq_list()) == "tidings dlq list --store sqlite:////tmp/x.db --name d"
    assert trail.shown(trail.ui()) == (
        "tidings ui --audit 'redis://:***@cache:6379/0' --audit-name p:audit --store "
        "sqlite:////tmp/x.db --name d --db 'postgresql://shop:***@db/x' --table o"
    )


def test_a_claim_found_busy_is_journaled_and_still_raised():
    """CountingInbox journals a busy claim (a retry the demo reports) and lets the worker see it."""

    class Held:
        @contextmanager
        def guard(self, handler: str, event_id: str) -> Iterator[bool]:
            raise InboxBusyError("claimed elsewhere", retry_after=1.0)
            yield True  # pragma: no cover - a generator, as an inbox's guard is

    journal = MemoryJournal()
    inbox = CountingInbox(Held(), journal)
    with pytest.raises(InboxBusyError), inbox.guard("reporting.project_sales", "e-1"):
        pass  # pragma: no cover - the claim is refused before the block
    [entry] = journal.entries()
    assert (entry.kind, entry.name, entry.event_id) == ("busy", "reporting.project_sales", "e-1")


def test_a_run_s_prefix_must_be_a_plain_name():
    """A prefix that could not name tables, keys and a queue as it is is refused."""
    for bad in ("", "1abc", "a-b", "a b", "x" * 41, "a;drop"):
        with pytest.raises(ValueError, match="prefix"):
            DemoOptions(prefix=bad)
    assert DemoOptions(prefix="t_ok_1").prefix == "t_ok_1"


def test_a_worker_that_serves_no_metrics_does_not_fail_the_run():
    """Scraping a port nobody listens on returns nothing once the deadline passes."""
    url = f"http://127.0.0.1:{_free_port()}/metrics"
    assert demo_look.scrape(url, CollectorRegistry(), {"handled": 1}, timeout=0.5) == ""
