import itertools
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner
from tests.conftest import require_server

from tidings import EventBus
from tidings.cli import main, make_cli
from tidings.demo import DemoOptions, DemoResult, OrderPlaced, StockReserved, run_demo
from tidings.demo import summary as demo_summary
from tidings.demo.shop import ALWAYS, HANDLERS, RETRY, make_engine, planned_failures
from tidings.demo.web import Answer
from tidings.memory import MemoryDeadLetterStore, MemoryInbox
from tidings.ports import DeadLetter
from tidings.testing.workers import wait_until
from tidings.transports.memory import MemoryBroker, MemoryTransport

REQUESTS = 60
RUNS_PER_ORDER = 5


@pytest.fixture(scope="module")
def embedded() -> DemoResult:
    return run_demo(DemoOptions(requests=REQUESTS, seed=7))


def _assert_reconciled(result: DemoResult, requests: int) -> None:
    """The checks every mode must pass, on top of the demo's own reconciliation."""
    assert result.problems == ()
    assert (result.requests, result.accepted, result.committed) == (requests, requests, requests)
    doomed = [n for n in range(1, requests + 1) if n % 97 == 13]
    assert len({(h, e) for h, e, _ in result.dead_letters}) == len(doomed)
    assert result.handled == requests * RUNS_PER_ORDER - len(doomed)
    assert result.events_handled == 2 * requests
    runs = Counter((e.name, e.event_id) for e in result.entries if e.kind == "handled")
    assert set(runs.values()) == {1}


def test_embedded_demo_reconciles(embedded):
    """The embedded run handles every committed event once per handler, by its own check too."""
    _assert_reconciled(embedded, REQUESTS)
    assert embedded.mode.startswith("embedded")
    assert embedded.per_handler["loyalty.award_points"] == REQUESTS - 1
    assert {h: n for h, n in embedded.per_handler.items() if h != "loyalty.award_points"} == (
        dict.fromkeys(
            [h for hs in HANDLERS.values() for h in hs if h != "loyalty.award_points"], REQUESTS
        )
    )


def test_the_flaky_handler_is_retried_and_one_order_ends_as_a_dead_letter(embedded):
    """Failed attempts are retried; the planned order fails every attempt and is dead-lettered."""
    assert embedded.failures >= RETRY.max_attempts
    ((handler, event_id, reason),) = {
        (h, e, r.split(" (attempt")[0]) for h, e, r in embedded.dead_letters
    }
    assert handler == "loyalty.award_points"
    assert "no account" in reason
    committed = {e.event_id: e.detail for e in embedded.entries if e.kind == "committed"}
    assert committed[event_id] == "ord-00013"


def test_lost_relay_confirmations_are_sent_again_and_the_inbox_suppresses_them(embedded):
    """Batches whose confirmation the demo loses are published twice; duplicates are skipped."""
    follow_ups = REQUESTS
    assert embedded.published > REQUESTS + follow_ups
    assert embedded.duplicates >= 1
    skipped = [e for e in embedded.entries if e.kind == "duplicate"]
    assert {e.name for e in skipped} <= set(HANDLERS[OrderPlaced.event_type])


def test_every_request_has_its_own_correlation_id_and_tenant(embedded):
    """Each request's id is shared by exactly its two events, and its entries keep one tenant."""
    requests = [e for e in embedded.entries if e.kind == "request"]
    assert len({r.correlation_id for r in requests}) == REQUESTS
    events = {e.event_id: e for e in embedded.entries if e.kind in ("committed", "published")}
    per_request = Counter(e.correlation_id for e in events.values())
    assert set(per_request.values()) == {2}
    tenants: dict[str | None, set[str | None]] = {}
    for entry in embedded.entries:
        if entry.correlation_id is not None:
            tenants.setdefault(entry.correlation_id, set()).add(entry.tenant_id)
    assert all(len(t) == 1 for t in tenants.values())
    assert {t for ts in tenants.values() for t in ts} == {"acme", "globex"}


def test_follow_ups_name_their_cause(embedded):
    """Each StockReserved is caused by its order's OrderPlaced, in the same request."""
    committed = {e.event_id: e for e in embedded.entries if e.kind == "committed"}
    follow_ups = [
        e
        for e in embedded.entries
        if e.kind == "published" and e.event_type == StockReserved.event_type
    ]
    assert len(follow_ups) == REQUESTS
    for event in follow_ups:
        cause = committed[event.causation_id]
        assert (cause.correlation_id, cause.tenant_id, cause.detail) == (
            event.correlation_id,
            event.tenant_id,
            event.detail,
        )


def test_handler_log_lines_carry_the_context_of_their_event(embedded):
    """Log lines written in handlers name the request, the tenant and the event handled."""
    handler_logs = [
        e
        for e in embedded.entries
        if e.kind == "log" and e.name.startswith("tidings.demo.") and e.name != "tidings.demo.web"
    ]
    assert len(handler_logs) >= REQUESTS * RUNS_PER_ORDER - 1
    events = {e.event_id: e for e in embedded.entries if e.kind in ("committed", "published")}
    for line in handler_logs:
        event = events[line.event_id]
        assert (line.correlation_id, line.tenant_id) == (event.correlation_id, event.tenant_id)


def test_the_read_model_matches_the_orders(embedded):
    """Both tenants' sales rows count their own 30 orders."""
    assert {t: n for t, (n, _) in embedded.sales.items()} == {"acme": 30, "globex": 30}


def test_latencies_are_measured_from_request_to_handler(embedded):
    """p50 and p99 are positive and ordered."""
    assert 0 < embedded.latency_p50_ms <= embedded.latency_p99_ms


def test_the_trace_follows_one_request_in_causal_order(embedded):
    """The trace starts at the request and puts every line under its cause, one level at a time."""
    trace = embedded.trace
    assert trace[0].kind == "request"
    assert all(line.depth >= 1 for line in trace[1:])
    for before, line in itertools.pairwise(trace):
        assert line.depth <= before.depth + 1
    kinds = Counter(line.kind for line in trace)
    assert kinds["committed"] == 1
    assert kinds["handled"] == RUNS_PER_ORDER
    assert kinds["failed"] >= 1  # the traced request is one whose handler was retried
    texts = [line.text for line in trace]
    stock = next(i for i, t in enumerate(texts) if t.startswith("shop.stock_reserved"))
    assert trace[stock + 1].depth == trace[stock].depth + 1
    assert any("shipping.book_pickup done" in t for t in texts[stock:])
    mine = {
        e.event_id for e in embedded.entries if e.correlation_id == embedded.traced_correlation_id
    }
    assert len(mine) >= 3


def test_reconcile_reports_a_missing_handler_run(embedded):
    """Dropping one journaled handler run from a reconciled run makes reconcile name it."""
    entries = list(embedded.entries)
    dropped = next(e for e in entries if e.kind == "handled" and e.name == "shipping.book_pickup")
    entries.remove(dropped)
    doomed = {"ord-00013"}
    answers = [
        Answer(201, e.correlation_id, e.correlation_id)
        for e in embedded.entries
        if e.kind == "request"
    ]
    problems = demo_summary.reconcile(
        answers,
        entries=entries,
        letters=_letters(embedded),
        sales=embedded.sales,
        orders=embedded.sales,
        doomed=doomed,
    )
    assert problems == [
        f"shipping.book_pickup ran 0 times on shop.stock_reserved {dropped.event_id}"
    ]


def _letters(result: DemoResult) -> list:
    return [DeadLetter(b"", r, handler=h, event_id=e) for h, e, r in result.dead_letters]


def test_planned_failures_are_drawn_from_the_seed():
    """The same seed plans the same failures; orders 13, 110, 207 never get through."""
    plan = [planned_failures(3, f"ord-{n:05d}") for n in range(1, 300)]
    assert plan == [planned_failures(3, f"ord-{n:05d}") for n in range(1, 300)]
    assert [n for n, p in enumerate(plan, 1) if p == ALWAYS] == [13, 110, 207]
    assert set(plan) - {ALWAYS} <= {0, 1, 2}


def test_postgresql_urls_use_psycopg():
    """A plain postgresql:// URL is given the psycopg 3 driver (no connection is made)."""
    engine = make_engine("postgresql://user:secret@db.example/shop")
    assert (engine.dialect.name, engine.dialect.driver) == ("postgresql", "psycopg")


def test_memory_transport_retries_then_dead_letters_and_goes_idle():
    """A handler that always fails runs max_attempts times, is dead-lettered; the pool idles."""
    letters = MemoryDeadLetterStore()
    transport = MemoryTransport(
        dead_letters=letters, inbox=MemoryInbox(), retry=RETRY, workers=2, broker=MemoryBroker()
    )
    bus = EventBus(transport=transport)
    attempts: list[str] = []

    @bus.subscribe(StockReserved, name="always.fails")
    def fails(event: StockReserved) -> None:
        attempts.append(event.event_id)
        raise RuntimeError("no")

    transport.start()
    try:
        event = StockReserved("ord-1", "north", 2)
        bus.publish(event)
        wait_until(lambda: letters.count() == 1 and transport.idle(), what="a dead letter")
    finally:
        transport.close()
    assert attempts == [event.event_id] * RETRY.max_attempts


def test_options_refuse_nonsense():
    """Zero requests or workers is a ValueError."""
    with pytest.raises(ValueError, match="requests, workers"):
        DemoOptions(requests=0)
    with pytest.raises(ValueError, match="requests, workers"):
        DemoOptions(workers=0)


def test_cli_demo_prints_the_summary_and_the_trace():
    """`tidings demo --requests 20` exits 0 with the summary table, a trace and the verdict."""
    outcome = CliRunner().invoke(make_cli(), ["demo", "--requests", "20"])
    assert outcome.exit_code == 0, outcome.output
    for text in (
        "events committed to the outbox",
        "duplicates suppressed by the inbox",
        "dead letters",
        "latency p99",
        "trace of request",
        "shop.order_placed",
        "Reconciled",
    ):
        assert text in outcome.output


def test_cli_demo_exits_1_when_the_run_does_not_reconcile(monkeypatch):
    """A run with a problem prints NOT reconciled and exits 1."""
    real = demo_summary.reconcile
    monkeypatch.setattr(
        demo_summary, "reconcile", lambda *a, **k: [*real(*a, **k), "an injected problem"]
    )
    outcome = CliRunner().invoke(make_cli(), ["demo", "--requests", "5"])
    assert outcome.exit_code == 1
    assert "NOT reconciled" in outcome.output
    assert "an injected problem" in outcome.output


def test_cli_refuses_zero_requests():
    """`--requests 0` is a usage error (exit 2), not a crash."""
    outcome = CliRunner().invoke(make_cli(), ["demo", "--requests", "0"])
    assert outcome.exit_code == 2


def test_main_without_the_cli_extra_names_it(monkeypatch, capsys):
    """With click missing, main prints one line naming tidings[cli] and exits 2."""
    monkeypatch.setitem(sys.modules, "click", None)
    with pytest.raises(SystemExit) as exited:
        main(["demo"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "pip install 'tidings[cli]'" in err


def test_console_script_runs_the_demo():
    """The installed `tidings` script runs `demo --requests 10` and exits 0, reconciled."""
    script = Path(sys.executable).parent / "tidings"
    found = str(script) if script.exists() else shutil.which("tidings")
    assert found, "the tidings console script is not installed: pip install -e '.[demo]'"
    done = subprocess.run(  # noqa: S603 - our own console script
        [found, "demo", "--requests", "10"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "120"},
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Reconciled" in done.stdout


@pytest.mark.integration
def test_demo_with_celery_workers_on_redis_reconciles(redis_url):
    """With --broker redis://, real Celery worker processes handle every event once per handler."""
    result = run_demo(DemoOptions(requests=30, broker=redis_url, workers=2, timeout=90))
    _assert_reconciled(result, 30)
    assert result.mode.startswith("Celery")
    assert result.trace[0].kind == "request"
    assert any(line.kind == "log" for line in result.trace)


@pytest.mark.integration
def test_demo_with_rabbitmq_and_postgresql_reconciles():
    """With --broker amqp:// and --db postgresql://, the SQL inbox and dead letters reconcile."""
    amqp = require_server("rabbitmq")
    postgres = require_server("postgresql")
    result = run_demo(DemoOptions(requests=30, broker=amqp, db=postgres, workers=2, timeout=120))
    _assert_reconciled(result, 30)
    assert "SQL inbox" in result.mode


def test_reconcile_reports_a_correlation_id_the_view_did_not_keep(embedded):
    """An answer echoing another id than the request sent is a reconciliation problem."""
    requests = [e for e in embedded.entries if e.kind == "request"]
    answers = [Answer(201, e.correlation_id, e.correlation_id) for e in requests]
    answers[0] = Answer(201, answers[0].sent_id, "minted-anew")
    problems = demo_summary.reconcile(
        answers,
        entries=embedded.entries,
        letters=_letters(embedded),
        sales=embedded.sales,
        orders=embedded.sales,
        doomed={"ord-00013"},
    )
    assert problems == ["a response did not echo the request's X-Correlation-ID"]
