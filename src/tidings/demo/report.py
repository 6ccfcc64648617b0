"""The demo's report, printed with rich (the ``cli`` extra): summary, dead letters, one trace."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

    from tidings.demo.summary import DemoResult

_STYLE = {
    "request": "bold",
    "committed": "bold cyan",
    "published": "cyan",
    "handled": "green",
    "failed": "yellow",
    "duplicate": "magenta",
    "log": "dim",
}


def _dead(result: DemoResult) -> str:
    letters = len(result.dead_letters)
    pairs = len({(handler, event) for handler, event, _ in result.dead_letters})
    if pairs == letters:
        return str(letters)
    return f"{letters} for {pairs} event(s): a resent event failed again"


def print_report(result: DemoResult, console: Console) -> None:
    """Print the summary table, the dead letters, one request's trace and the verdict."""
    from rich.table import Table  # noqa: PLC0415 - rich is the optional `cli` extra
    from rich.text import Text  # noqa: PLC0415
    from rich.tree import Tree  # noqa: PLC0415

    summary = Table(title="Summary", show_header=False, title_justify="left")
    summary.add_column(style="bold")
    summary.add_column(justify="right")
    resent = (
        result.published - result.committed - result.per_handler.get("inventory.reserve_stock", 0)
    )
    rows = [
        ("HTTP requests (201 Created)", f"{result.requests} ({result.accepted})"),
        ("events committed to the outbox", str(result.committed)),
        ("events published", f"{result.published} ({resent} sent again by the relay)"),
        ("events handled (by every handler)", str(result.events_handled)),
        ("handler runs completed", str(result.handled)),
        ("handler attempts failed", str(result.failures)),
        ("retries (failed, or claimed elsewhere)", str(result.retries)),
        ("duplicates suppressed by the inbox", str(result.duplicates)),
        ("dead letters", _dead(result)),
        ("request → handler latency p50", f"{result.latency_p50_ms:.1f} ms"),
        ("request → handler latency p99", f"{result.latency_p99_ms:.1f} ms"),
        ("wall time", f"{result.seconds:.1f} s"),
    ]
    for name, value in rows:
        summary.add_row(name, value)
    summary.add_section()
    for handler, runs in result.per_handler.items():
        summary.add_row(f"  {handler}", str(runs))
    summary.add_section()
    for tenant, (orders, cents) in result.sales.items():
        summary.add_row(f"  sales read model: {tenant}", f"{orders} orders, {cents / 100:,.2f} EUR")
    console.print(summary)
    if result.dead_letters:
        letters = Table("handler", "event", "reason", title="Dead letters", title_justify="left")
        for handler, event_id, reason in result.dead_letters:
            letters.add_row(handler, event_id[:8], Text(reason))
        console.print(letters)
    tree = Tree(f"[bold]trace of request {result.traced_correlation_id}[/]")
    stack = [tree]  # stack[d]: the node of the line at depth d on the current path
    for line in result.trace:
        label = Text.assemble(
            (f"+{line.offset_ms:7.1f} ms  ", "dim"), (line.text, _STYLE.get(line.kind, ""))
        )
        if line.depth == 0:
            tree.label = Text.assemble(
                (f"trace of request {result.traced_correlation_id}: ", "bold"), line.text
            )
            continue
        del stack[line.depth :]
        stack.append(stack[-1].add(label))
    console.print(tree)
    if result.problems:
        console.print(f"[bold red]NOT reconciled[/]: {len(result.problems)} problem(s)")
        for problem in result.problems[:20]:
            console.print(Text(f"  {problem}"))
    else:
        console.print(
            f"[bold green]Reconciled[/]: every committed event was published and handled "
            f"exactly once by each of its handlers ({result.handled} runs), except the "
            "dead-lettered ones; the read model matches the orders."
        )
