"""A demo run with a real Celery worker on Redis: every view counts its retries and dead letters.

The demo reports its retries and dead letters (from its journal and its dead-letter store).
The same must be seen, in equal numbers, by a real Celery event receiver (what
``celery events --dump`` and Flower read: ``task-retried`` and ``task-failed``), by the worker's
Prometheus metrics (scraped), by the audit trail (``tidings trace --json`` for every request of
the run) and by the ops page (``tidings ui``'s app on the run's stores: every request's trace
page, and the dead letters it counts).

Celery's events count messages, and one message may carry several (handler, event) pairs:
the relay sends batches, whose ``task-retried`` names each retried pair, and the demo has four
handlers of ``OrderPlaced``: ``loyalty.award_points`` fails, and any of them may find its claim
held elsewhere (a batch the relay sent twice) and be retried as busy. So every view is counted
per handler, the events by the pairs their ``exception`` text names (the first five, then
"and N more", whose handlers are unknown).
"""

from __future__ import annotations

import html
import json
import re
import warnings
from collections import Counter
from typing import Any

import pytest
from celery import Celery
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from tests.test_celery_visible import Monitor, monitoring
from tests.workers import wait_until

from tidings.audit import open_audit_store
from tidings.cli import make_cli
from tidings.deadletter import open_store
from tidings.demo import DemoOptions, DemoResult, run_demo
from tidings.demo.trail import Trail
from tidings.transports._defaults import dead_letter_prefix
from tidings.ui import OpsConfig, create_app

with warnings.catch_warnings():
    # Starlette >= 1.x prefers its httpx2 fork for the TestClient (see test_asgi_middleware).
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient

pytestmark = pytest.mark.integration

FAILING = "loyalty.award_points"
_RETRIED = re.compile(r"(?:^|; )(\S+) on <[^>]*> \(attempt \d+ next\)")
_DEAD = re.compile(r"(?:^|; )(\S+) on <[^>]*>: .*? \(dead letter [^)]*\)")
_RECORD_ROW = re.compile(  # a row of the trace page's records: +ms, kind, type, id, handler
    r'<tr><td class="num">[^<]*</td><td>([^<]*)</td><td>[^<]*</td><td class="mono">[^<]*</td>'
    r"<td>([^<]*)</td>"
)
_MORE = re.compile(r"; and (\d+) more$")


def _pairs(listing: str, entry: re.Pattern[str]) -> Counter[str]:
    """The (handler, event) pairs a listing names, per handler; ``...`` for "and N more"."""
    named = Counter(entry.findall(listing))
    more = _MORE.search(listing)
    if more:
        named["..."] += int(more.group(1))
    return named


def _text(event: dict[str, Any]) -> str:
    """The text of a task event's exception, shown as ``DeliveryRetried('...')`` or the like."""
    shown = re.fullmatch(r"\w+\((['\"])(.*)\1\)", str(event["exception"]), re.DOTALL)
    assert shown is not None, event["exception"]
    return shown.group(2)


def _named(monitor: Monitor) -> tuple[Counter[str], Counter[str]]:
    """Retries and dead letters named by the task events received so far, per handler."""
    retried: Counter[str] = Counter()
    dead: Counter[str] = Counter()
    for event in monitor.of("task-retried"):
        retried += _pairs(_text(event), _RETRIED)
    for event in monitor.of("task-failed"):
        body = _text(event).removeprefix("dead-lettered: ")
        dead_part, _, retried_part = body.partition("; retried: ")
        dead += _pairs(dead_part, _DEAD)
        if retried_part:
            retried += _pairs(retried_part, _RETRIED)
    return retried, dead


def _audited(node: dict[str, Any], found: Counter[tuple[str, str]]) -> None:
    """Count ``node``'s records and its follow-ups' by (kind, handler)."""
    for record in node["records"]:
        found[record["kind"], record["handler"] or "-"] += 1
    for child in node["caused"]:
        _audited(child, found)


def _of(counts: Counter[tuple[str, str]], kind: str) -> Counter[str]:
    return Counter({handler: n for (k, handler), n in counts.items() if k == kind})


def _reported(result: DemoResult) -> tuple[Counter[str], Counter[str]]:
    """The retries and dead letters the demo reports, per handler (its journal and its store)."""
    dead = Counter(handler for handler, _, _ in result.dead_letters)
    retried = Counter(e.name for e in result.entries if e.kind in {"failed", "busy"})
    retried.subtract(dead)
    assert sum(retried.values()) == result.retries
    return +retried, dead


def _scraped(text: str) -> tuple[Counter[str], float]:
    """The metrics' retries per handler, and dead letters (a series without a handler)."""
    retried: Counter[str] = Counter()
    dead = 0.0
    for family in text_string_to_metric_families(text):
        for item in family.samples:
            if item.name == "tidings_retries_total" and item.value:
                retried[item.labels["handler"]] += int(item.value)
            elif item.name == "tidings_dead_letters_total":
                dead += item.value
    return retried, dead


def _read_the_ops_page(trail: Trail, requests: list[str], found: Counter[tuple[str, str]]) -> None:
    """Count, by (kind, handler), the records on each request's trace page of the ops page."""
    audit = open_audit_store(trail.audit_url, name=trail.audit_name, must_exist=True)
    service = trail.dlq_options[trail.dlq_options.index("--service") + 1]
    letters = open_store(trail.dlq_url, name=dead_letter_prefix(service), must_exist=True)
    try:
        web = TestClient(
            create_app(OpsConfig(audit=audit, dead_letters=letters)), base_url="http://127.0.0.1"
        )
        for correlation_id in requests:
            page = web.get("/trace", params={"id": correlation_id})
            assert page.status_code == 200, page.text
            table = page.text[page.text.index('<table id="records">') :]
            for kind, handler in _RECORD_ROW.findall(table):
                found[html.unescape(kind), html.unescape(handler) or "-"] += 1
        counters = web.get("/counters").text
        shown = re.search(r'<div>dead letters</div><div class="value">(\d+)</div>', counters)
        assert shown is not None, counters
        found["counter", "dead letters"] = int(shown.group(1))
    finally:
        audit.close()
        letters.close()


def test_celery_events_metrics_the_audit_trail_and_the_ops_page_count_the_demo_s_failures(
    redis_url: str, unique_name: str
) -> None:
    """Retries and dead letters are equal in the demo, celery events, metrics, trail, ops page."""
    prefix = f"t_reconcile_{unique_name[-8:]}"  # unique_name ends in 8 random hex digits
    audited: Counter[tuple[str, str]] = Counter()
    traced: list[str] = []
    letters: list[str] = []
    paged: Counter[tuple[str, str]] = Counter()

    def trace_every_request(result: DemoResult) -> None:
        # While the run's stores still exist: `tidings trace --json` for each request.
        assert result.look is not None
        trail = result.look.trail
        runner = CliRunner()
        for correlation_id in {e.correlation_id for e in result.entries if e.kind == "request"}:
            assert correlation_id is not None
            outcome = runner.invoke(make_cli(), [*trail.trace(correlation_id), "--json"])
            assert outcome.exit_code == 0, outcome.output
            for node in json.loads(outcome.output)["events"]:
                _audited(node, audited)
            traced.append(correlation_id)
        listed = runner.invoke(make_cli(), [*trail.dlq_list(), "--json", "--limit", "1000"])
        assert listed.exit_code == 0, listed.output
        letters.extend(letter["id"] for letter in json.loads(listed.output))
        _read_the_ops_page(trail, traced, paged)

    monitor_app = Celery(f"monitor-{prefix}", broker=redis_url)
    with monitoring(monitor_app, f"{prefix}@") as monitor:
        result = run_demo(
            DemoOptions(requests=150, broker=redis_url, workers=2, timeout=120, prefix=prefix),
            while_kept=trace_every_request,
        )
        retries, dead_letters = result.retries, len(result.dead_letters)

        def named() -> tuple[int, int]:
            retried, dead = _named(monitor)
            return sum(retried.values()), sum(dead.values())

        wait_until(
            lambda: named() >= (retries, dead_letters),
            timeout=30,
            what=f"the task events of {retries} retries and {dead_letters} dead letters",
        )
    assert result.problems == ()
    assert retries > 0
    assert dead_letters > 0
    assert len(traced) == result.accepted == 150
    reported_retries, reported_dead = _reported(result)
    assert reported_dead == Counter({FAILING: dead_letters})

    # celery events: the pairs task-retried and task-failed name, per handler.
    retried, dead = _named(monitor)
    assert named() == (retries, dead_letters)
    unknown = retried.pop("...", 0)
    assert all(retried[handler] <= n for handler, n in reported_retries.items())
    assert sum((reported_retries - retried).values()) == unknown
    assert dead == reported_dead

    # The worker's metrics, scraped: retries (errors, and claims found busy) and dead letters.
    assert result.look is not None
    assert _scraped(result.look.metrics) == (reported_retries, dead_letters)

    # The audit trail, through `tidings trace --json` for every request of the run.
    assert _of(audited, "retried") == reported_retries
    assert _of(audited, "dead_lettered") == reported_dead

    # And `tidings dlq list --service QUEUE`, the command the demo prints, lists them all.
    assert len(letters) == dead_letters

    # The ops page: the records of every request's trace page, and its dead-letter counter.
    assert _of(paged, "retried") == reported_retries
    assert _of(paged, "dead_lettered") == reported_dead
    assert paged["counter", "dead letters"] == dead_letters
    assert sum(_of(audited, "handled").values()) == result.handled
