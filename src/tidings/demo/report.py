"""The demo's report, printed with rich (the ``cli`` extra)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

    from tidings.demo.shop import DemoResult


def print_report(result: DemoResult, console: Console, *, quiet: bool = False) -> None:
    """Print the run's summary: counts, tenants, one request's causation tree and its logs.

    Unless ``quiet``, first say what ran and show one event as it travels on the wire. Needs
    rich (the ``cli`` extra).
    """
    from rich.json import JSON  # noqa: PLC0415 - rich is the optional `cli` extra
    from rich.table import Table  # noqa: PLC0415
    from rich.text import Text  # noqa: PLC0415
    from rich.tree import Tree  # noqa: PLC0415

    if not quiet:
        console.print(
            f"[bold]tidings demo[/]: a shop on the embedded default, {result.requests} requests "
            f"over {len(result.placed)} tenants. Each request commits its order and its event "
            "together (SQLite outbox); the relay publishes them to the in-process EventBus, "
            "whose handlers raise follow-ups; every event is encoded and decoded once on its "
            "way.\n\nOne event on the wire (CloudEvents JSON):"
        )
        console.print(JSON(result.sample_wire.decode()))
    counts = Table(title="Counts", show_header=False)
    counts.add_row("requests (orders placed)", str(result.requests))
    counts.add_row("committed to the outbox with their orders", str(result.outbox_rows))
    counts.add_row("relayed from the outbox to the bus", str(result.relayed))
    counts.add_section()
    for event_type, n in result.published.items():
        counts.add_row(f"published {event_type}", str(n))
    counts.add_section()
    for handler, n in result.handler_runs.items():
        counts.add_row(f"ran {handler}", str(n))
    counts.add_section()
    counts.add_row("emails sent (fake mailer)", str(result.emails_sent))
    counts.add_row("bytes on the wire", f"{result.wire_bytes:,}")
    console.print(counts)
    tenants = Table("tenant", "orders placed", "orders confirmed", "revenue", title="Tenants")
    for tenant, n in result.placed.items():
        sold = result.sales[tenant]
        tenants.add_row(tenant, str(n), str(sold.orders), f"{sold.revenue:,} EUR")
    console.print(tenants)
    tree = Tree(f"[bold]correlation {result.traced_correlation_id}[/]")
    nodes: dict[str | None, Tree] = {}
    for event in result.traced:
        parent = nodes.get(event.causation_id, tree)
        label = Text.assemble(
            (event.event_type, "bold cyan"), f"  {event.event_id[:8]}  tenant={event.tenant_id}"
        )
        nodes[event.event_id] = parent.add(label)
    console.print(tree)
    logs = Table("while handling", "level", "logger", "message", title="Its log lines")
    for line in result.traced_log:
        cause = line.context.causation_id
        cause = cause[:8] if cause else "(request)"
        logs.add_row(cause, line.level, line.logger, Text(line.message))
    console.print(logs)
    if result.problems:
        console.print(f"[bold red]NOT reconciled[/]: {len(result.problems)} problem(s)")
        for problem in result.problems[:20]:
            console.print(Text(f"  {problem}"))
    else:
        events = sum(result.published.values())
        console.print(
            f"[bold green]Reconciled[/]: {result.requests} orders confirmed exactly once; "
            f"{events} events, each tracing back to its request "
            f"(in {result.seconds:.2f} s)"
        )
