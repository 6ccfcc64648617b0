"""The end of a demo run: where to look. A metrics sample, one request's tree, the commands.

:func:`scrape` reads the handlers' metrics (the Celery worker's endpoint, or this process's
registry) once they count every run the journal saw; :func:`wait_for_audit` waits for the
audit trail to hold every handler run, and :func:`audit_trace` reads one request's causal
tree. :func:`print_look` prints them with the ``tidings trace``, ``tidings dlq list`` and
``tidings ui`` command lines that open the run's stores; :func:`run_ui` starts the ops page.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from tidings.audit import AuditStore, flush_audit
from tidings.audit.tree import Trace, causal_tree
from tidings.demo.trail import Trail

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from rich.console import Console

__all__ = [
    "COUNTED",
    "Look",
    "audit_trace",
    "audited",
    "counted",
    "print_look",
    "run_ui",
    "sample",
    "scrape",
    "ui_available",
    "wait_for_audit",
]

COUNTED: Final = {
    "handled": "tidings_handled_total",
    "retried": "tidings_retries_total",
    "dead_lettered": "tidings_dead_letters_total",
}
"""The counters the sample shows, by what they count."""
_ALL: Final = 1_000_000  # more records than a demo run writes
_UI_EXTRA: Final = ("starlette", "jinja2", "uvicorn")
_SHOWN: Final = "loyalty.award_points"  # the handler that fails, in the demo


@dataclass(frozen=True)
class Look:
    """Where to look after a run, and what was there before the run's stores were removed.

    Attributes:
        trail: the run's audit and dead-letter stores.
        metrics_source: where the handlers' metrics were scraped, in words.
        metrics: the whole scrape (Prometheus text format).
        trace: the traced request's causal tree, from the audit trail.
    """

    trail: Trail
    metrics_source: str
    metrics: str
    trace: Trace


def counted(scraped: str) -> dict[str, float]:
    """The sums of :data:`COUNTED` in a scrape: handler runs done, retries, dead letters."""
    from prometheus_client.parser import (  # noqa: PLC0415 - the prometheus extra
        text_string_to_metric_families,
    )

    sums = dict.fromkeys(COUNTED, 0.0)
    names = {name: what for what, name in COUNTED.items()}
    for family in text_string_to_metric_families(scraped):
        for item in family.samples:
            what = names.get(item.name)
            if what == "handled" and item.labels.get("outcome") != "done":
                continue
            if what is not None:
                sums[what] += item.value
    return sums


def sample(scraped: str, limit: int = 5) -> list[str]:
    """A few lines of the scrape: the failing handler's runs done and retries, the dead letters.

    Series at zero are left out.
    """
    from prometheus_client.parser import (  # noqa: PLC0415 - the prometheus extra
        text_string_to_metric_families,
    )

    shown: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for family in text_string_to_metric_families(scraped):
        for item in family.samples:
            if item.name not in COUNTED.values() or not item.value:
                continue
            if item.name == COUNTED["handled"] and item.labels.get("outcome") != "done":
                continue
            if item.name != COUNTED["dead_lettered"] and item.labels.get("handler") != _SHOWN:
                continue
            shown.add((item.name, tuple(sorted(item.labels.items()))))
    lines = [line for line in scraped.splitlines() if _series(line) in shown]
    return lines[:limit]


def _series(line: str) -> tuple[str, tuple[tuple[str, str], ...]] | None:
    """The name and labels of a scrape's sample line (``None`` for comments and the like)."""
    from prometheus_client.parser import (  # noqa: PLC0415 - the prometheus extra
        text_string_to_metric_families,
    )

    if line.startswith("#") or not line.strip():
        return None
    try:
        for family in text_string_to_metric_families(line + "\n"):
            for item in family.samples:
                return item.name, tuple(sorted(item.labels.items()))
    except ValueError:
        return None
    return None


def _reached(found: Mapping[str, float], expected: Mapping[str, int]) -> bool:
    return all(found.get(what, 0) >= count for what, count in expected.items())


def scrape(
    url: str | None,
    registry: CollectorRegistry,
    expected: Mapping[str, int],
    timeout: float = 10.0,
) -> str:
    """The handlers' metrics from ``url`` (else ``registry``), once they count ``expected``.

    ``expected`` is what the journal and the dead-letter store hold, by :data:`COUNTED`'s
    keys. A Celery worker's prefork children report about once a second: wait for them, up
    to ``timeout`` seconds, then return the last scrape as it is ("" if ``url`` never
    answered: the worker logs why it serves no metrics, and runs on).
    """
    from prometheus_client import generate_latest  # noqa: PLC0415 - the prometheus extra

    def read() -> str:
        if url is None:
            return generate_latest(registry).decode()
        try:
            with urllib.request.urlopen(url, timeout=2.0) as answer:  # noqa: S310 - our worker
                return bytes(answer.read()).decode()
        except OSError:  # not listening (yet): the metrics are a view, not the run
            return ""

    deadline = time.monotonic() + timeout
    scraped = read()
    while not _reached(counted(scraped), expected) and time.monotonic() < deadline:
        time.sleep(0.2)
        scraped = read() or scraped
    return scraped


def audited(store: AuditStore, tenants: Sequence[str]) -> Counter[str]:
    """The run's audit records by kind (``handled`` only those that returned), every tenant's."""
    kinds: Counter[str] = Counter()
    for tenant in tenants:
        for record in store.by_tenant(tenant, limit=_ALL):
            if record.kind != "handled" or record.outcome == "ok":
                kinds[record.kind] += 1
    return kinds


def wait_for_audit(
    store: AuditStore, tenants: Sequence[str], expected: Mapping[str, int], timeout: float = 10.0
) -> None:
    """Return once ``store`` holds the ``expected`` records by kind, or after ``timeout`` s.

    This process's records are written at once; a worker's, a moment after they happen.
    """
    flush_audit()
    deadline = time.monotonic() + timeout
    while not _reached(audited(store, tenants), expected) and time.monotonic() < deadline:
        time.sleep(0.1)


def audit_trace(store: AuditStore, correlation_id: str) -> Trace:
    """``correlation_id``'s causal tree from ``store``."""
    return causal_tree(correlation_id, store.by_correlation(correlation_id))


def ui_available() -> bool:
    """Whether ``tidings ui`` can serve here: the ``ui`` extra (Starlette, Jinja2, uvicorn)."""
    return all(importlib.util.find_spec(name) is not None for name in _UI_EXTRA)


def print_look(look: Look, console: Console, *, ui: bool) -> None:
    """Print where to look: the metrics sample, the tree and the commands; ``ui``: asked for."""
    from rich.text import Text  # noqa: PLC0415 - rich is the `cli` extra

    from tidings.cli_trace import render  # noqa: PLC0415 - needs click and rich too

    trail = look.trail

    def line(text: str, style: str) -> None:  # as it is: a command is copied, not wrapped
        console.print(Text(f"    {text}", style=style), soft_wrap=True)

    console.print("[bold]Where to look[/]")
    console.print(f"  metrics ({look.metrics_source}):", highlight=False)
    for scraped in sample(look.metrics):
        line(scraped, "dim")
    if not look.metrics:
        line("(nothing could be scraped: see the worker's log)", "dim")
    console.print("  one request, from the audit trail:")
    line(trail.shown(trail.trace(look.trace.correlation_id)), "bold")
    console.print(render(look.trace))
    console.print("  the dead letters:")
    line(trail.shown(trail.dlq_list()), "bold")
    console.print("  the ops page:")
    line(trail.shown(trail.ui()), "bold")
    if not ui:
        console.print(
            "  The run's stores are removed when the demo ends: `tidings demo --ui` keeps them "
            "open on the ops page until Ctrl-C.",
            highlight=False,
        )
    elif not ui_available():
        console.print(
            Text(
                "  The ops page needs the ui extra: pip install 'tidings[ui]', then run "
                "`tidings demo --ui` again."
            )
        )


def run_ui(trail: Trail, console: Console) -> int:
    """Run ``tidings ui`` on the run's stores, in a child process, until Ctrl-C; its status."""
    from rich.text import Text  # noqa: PLC0415 - rich is the `cli` extra

    arguments = trail.ui()
    command = [sys.executable, "-c", "import sys; from tidings.cli import main; main(sys.argv[1:])"]
    console.print(
        Text(f"starting {trail.shown(arguments)}  (Ctrl-C stops it and ends the demo)"),
        soft_wrap=True,
    )
    process = subprocess.Popen([*command, *arguments])  # noqa: S603 - our own command line
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        try:
            return process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()
