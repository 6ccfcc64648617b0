import os
import shutil
import subprocess
import sys
import uuid
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pytest
from click.testing import CliRunner

from tidings import DomainEvent, decode, encode
from tidings.cli import main, make_cli
from tidings.demo import (
    DemoResult,
    EmailSent,
    OrderConfirmed,
    OrderPlaced,
    PaymentCaptured,
    StockReserved,
    causal_order,
    run_demo,
)

SHOP_TYPES = (OrderPlaced, StockReserved, PaymentCaptured, OrderConfirmed, EmailSent)


@pytest.fixture(scope="module")
def result() -> DemoResult:
    return run_demo(orders=60, tenants=3, seed=7)


def _root(event: DomainEvent, by_id: dict[str, DomainEvent]) -> DomainEvent:
    while event.causation_id is not None:
        event = by_id[event.causation_id]
    return event


def test_demo_reconciles_by_its_own_check(result: DemoResult) -> None:
    """A default-sized run finds no problems and publishes one event of each type per order."""
    assert result.problems == ()
    assert result.requests == 60
    assert sum(result.placed.values()) == 60
    assert result.published == {cls.event_type: 60 for cls in SHOP_TYPES}
    assert len(result.journal) == 5 * 60
    assert result.emails_sent == 60


def test_handler_runs_match_the_events_they_receive(result: DemoResult) -> None:
    """Each handler ran once per event of the classes it is subscribed to, no more."""
    assert result.handler_runs == {
        "audit.journal": 300,
        "checkout.open": 60,
        "inventory.reserve_stock": 60,
        "payments.capture": 60,
        "checkout.confirm": 120,
        "notifications.send_confirmation": 60,
        "reporting.project_sales": 60,
    }


def test_every_order_is_confirmed_exactly_once(result: DemoResult) -> None:
    """The set of confirmed orders equals the set of placed orders, each confirmed once."""
    placed = [e.order_id for e in result.journal if isinstance(e, OrderPlaced)]
    confirmed = Counter(e.order_id for e in result.journal if isinstance(e, OrderConfirmed))
    assert len(set(placed)) == len(placed) == 60
    assert confirmed == dict.fromkeys(placed, 1)


def test_every_causation_chain_leads_back_to_its_request(result: DemoResult) -> None:
    """Each event's chain ends at its request's OrderPlaced, with the same ids all along."""
    by_id = {e.event_id: e for e in result.journal}
    assert len(by_id) == len(result.journal)
    for event in result.journal:
        root = _root(event, by_id)
        assert isinstance(root, OrderPlaced)
        assert root.causation_id is None
        assert (root.correlation_id, root.tenant_id) == (event.correlation_id, event.tenant_id)
        assert root.order_id == event.order_id  # type: ignore[attr-defined]
        if event is not root:
            parent = by_id[event.causation_id]  # type: ignore[index]
            assert parent.correlation_id == event.correlation_id


def test_correlation_ids_never_cross_requests(result: DemoResult) -> None:
    """Every request has its own correlation id, shared by exactly its five events."""
    by_correlation = Counter(e.correlation_id for e in result.journal)
    roots = [e for e in result.journal if isinstance(e, OrderPlaced)]
    assert len({r.correlation_id for r in roots}) == len(roots)
    assert set(by_correlation.values()) == {5}


def test_tenants_never_cross(result: DemoResult) -> None:
    """Each tenant's read model holds exactly the orders and revenue of its own requests."""
    assert set(result.placed) == {"acme", "globex", "initech"}
    for tenant, count in result.placed.items():
        own = [e for e in result.journal if isinstance(e, OrderPlaced) and e.tenant_id == tenant]
        assert len(own) == count
        assert result.sales[tenant].orders == count
        assert result.sales[tenant].revenue == sum((e.total for e in own), Decimal(0))


def test_the_trace_follows_one_request_in_causal_order(result: DemoResult) -> None:
    """The traced events are one request's five events, each after its cause, with its logs."""
    traced = result.traced
    assert isinstance(traced[0], OrderPlaced)
    assert {type(e) for e in traced} == set(SHOP_TYPES)
    assert all(e.correlation_id == result.traced_correlation_id for e in traced)
    seen: set[str] = set()
    for event in traced:
        assert event.causation_id is None or event.causation_id in seen
        seen.add(event.event_id)
    assert result.traced_log
    contexts = [line.context for line in result.traced_log]
    assert {c.correlation_id for c in contexts} == {result.traced_correlation_id}
    assert {c.tenant_id for c in contexts} == {traced[0].tenant_id}
    assert {c.causation_id for c in contexts} - {None} <= seen


def test_sample_wire_is_the_traced_order_as_cloudevents_json(result: DemoResult) -> None:
    """The sample payload decodes to the traced OrderPlaced and re-encodes to the same bytes."""
    event = decode(result.sample_wire, OrderPlaced)
    assert event == result.traced[0]
    assert encode(event) == result.sample_wire


def test_same_seed_places_the_same_orders() -> None:
    """Two runs with one seed place identical orders and totals, under fresh event ids."""
    first, second = run_demo(orders=5, seed=3), run_demo(orders=5, seed=3)

    def orders(r: DemoResult) -> list[tuple[object, ...]]:
        return [
            (e.order_id, e.tenant_id, e.customer_id, e.lines, e.total)
            for e in r.journal
            if isinstance(e, OrderPlaced)
        ]

    assert orders(first) == orders(second)
    assert {e.event_id for e in first.journal}.isdisjoint(e.event_id for e in second.journal)


def test_causal_order_puts_parents_before_children_and_keeps_sibling_order() -> None:
    """causal_order returns a depth-first pre-order with siblings in their given order."""
    root = OrderPlaced("o", uuid.UUID(int=1), "x@y", (), Decimal("0.00"), causation_id=None)
    a = EmailSent("o", "x@y", "a", root.customer_id, causation_id=root.event_id)
    b = EmailSent("o", "x@y", "b", root.customer_id, causation_id=root.event_id)
    c = EmailSent("o", "x@y", "c", root.customer_id, causation_id=a.event_id)
    assert causal_order([c, b, root, a]) == [(0, root), (1, b), (1, a), (2, c)]


def test_run_demo_refuses_an_empty_shop() -> None:
    """Zero orders or zero tenants is a ValueError that names both numbers."""
    with pytest.raises(ValueError, match="at least one order"):
        run_demo(orders=0)
    with pytest.raises(ValueError, match="at least one order"):
        run_demo(tenants=0)


def test_cli_demo_quiet_prints_the_summary() -> None:
    """`tidings demo --orders 20 --quiet` exits 0 and prints counts, tenants, trace and logs."""
    outcome = CliRunner().invoke(make_cli(), ["demo", "--orders", "20", "--quiet"])
    assert outcome.exit_code == 0, outcome.output
    for text in ("Counts", "published shop.order_placed", "Tenants", "Reconciled", "POST"):
        assert text in outcome.output
    assert "correlation " in outcome.output
    assert '"specversion"' not in outcome.output  # the wire sample is for the verbose report


def test_cli_demo_verbose_shows_an_event_on_the_wire() -> None:
    """Without --quiet, the report also shows one CloudEvents envelope."""
    outcome = CliRunner().invoke(make_cli(), ["demo", "--orders", "3", "--tenants", "1"])
    assert outcome.exit_code == 0, outcome.output
    assert '"specversion": "1.0"' in outcome.output


def test_cli_refuses_zero_orders() -> None:
    """`--orders 0` is a usage error (exit 2), not a crash."""
    outcome = CliRunner().invoke(make_cli(), ["demo", "--orders", "0"])
    assert outcome.exit_code == 2


def test_main_without_the_cli_extra_names_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With click missing, main prints one line naming tidings[cli] and exits 2."""
    monkeypatch.setitem(sys.modules, "click", None)
    with pytest.raises(SystemExit) as exited:
        main(["demo"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "pip install 'tidings[cli]'" in err


def test_console_script_runs_the_demo() -> None:
    """The installed `tidings` script runs `demo --orders 10` and exits 0 with the summary."""
    script = Path(sys.executable).parent / "tidings"
    found = str(script) if script.exists() else shutil.which("tidings")
    assert found, "the tidings console script is not installed: pip install -e '.[cli]'"
    env = {**os.environ, "COLUMNS": "120"}
    done = subprocess.run(  # noqa: S603 - our own console script
        [found, "demo", "--orders", "10"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Reconciled" in done.stdout
    assert "shop.email_sent" in done.stdout


def test_every_order_event_goes_through_the_outbox_and_the_relay():
    """Each request commits its event to the outbox, and the relay publishes each one once."""
    result = run_demo(orders=30, tenants=2, seed=3)
    assert result.outbox_rows == result.relayed == 30
    assert result.published["shop.order_placed"] == 30
    assert result.problems == ()
