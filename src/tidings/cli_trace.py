"""``tidings trace CORRELATION_ID``: one request's causal tree, from the audit trail.

:func:`tidings.cli.make_cli` attaches the command; this module is imported only then, so click
and rich (the ``cli`` extra) are imported at the top. The store comes from ``--audit URL`` or
``TIDINGS_AUDIT_URL`` (see :func:`tidings.audit.open_audit_store`). Everything a record holds
came from a message, so it is printed as plain text with control characters escaped (rich
markup included), and ``--json`` writes it as JSON, whose encoder escapes it in turn.
"""

from __future__ import annotations

import json

import click
from rich.text import Text
from rich.tree import Tree

from tidings._untrusted import redact_text, redact_url
from tidings.audit import AuditRecord, open_audit_store
from tidings.audit.tree import EventNode, Trace, causal_tree
from tidings.cli_dlq import _console, _safe

__all__ = ["make_trace_command"]

_STYLE = {
    "published": "cyan",
    "relayed": "cyan",
    "handled": "green",
    "duplicate": "magenta",
    "retried": "yellow",
    "dead_lettered": "bold red",
    "rejected": "bold red",
}
_FAILED_STYLE = "red"


def _when(trace: Trace, at: float) -> Text:
    return Text(f"+{trace.offset_ms(at):9.1f} ms  ", style="dim")


def _took(record: AuditRecord) -> str:
    return "" if record.duration is None else f" ({record.duration * 1000:.1f} ms)"


def _record_label(trace: Trace, record: AuditRecord) -> Text:
    style = _STYLE[record.kind]
    if record.kind == "handled" and record.outcome != "ok":
        style = _FAILED_STYLE
    if record.handler is None:
        what = Text.assemble((record.kind, style))
    else:
        what = Text.assemble(
            _safe(record.handler), " ", (record.kind, style), f" (attempt {record.attempt})"
        )
        if record.kind == "handled" and record.outcome != "ok":
            what.append(": ", style=style).append_text(Text(_safe(record.outcome).plain, style))
    label = Text.assemble(_when(trace, record.at), what, _took(record))
    if record.detail:
        label.append("  ").append_text(_safe(record.detail))
    label.append("  ").append_text(Text.assemble(("on ", "dim"), _safe(record.worker)))
    return label


def _event_label(trace: Trace, node: EventNode) -> Text:
    label = Text.assemble(
        _when(trace, node.at),
        Text.assemble(_safe(node.event_type or "(unknown type)"), style="bold"),
        " ",
        _safe(node.event_id),
    )
    if node.tenant_id is not None:
        label.append("  tenant ", style="dim").append_text(_safe(node.tenant_id))
    return label


def _add(trace: Trace, parent: Tree, node: EventNode) -> None:
    branch = parent.add(_event_label(trace, node))
    lines: list[tuple[float, int, AuditRecord | EventNode]] = [
        (record.at, 0, record) for record in node.records
    ]
    lines += [(child.at, 1, child) for child in node.caused]
    for _, _, item in sorted(lines, key=lambda line: (line[0], line[1])):
        if isinstance(item, EventNode):
            _add(trace, branch, item)
        else:
            branch.add(_record_label(trace, item))


def render(trace: Trace) -> Tree:
    """The rich tree of ``trace``: its events, and under each its records and follow-ups."""
    tree = Tree(
        Text.assemble(
            ("trace of request ", "bold"),
            _safe(trace.correlation_id),
            (f"  {trace.count} record(s)", "dim"),
        )
    )
    for node in trace.roots:
        _add(trace, tree, node)
    if trace.unattached:
        apart = tree.add(Text("records without an event id", style="bold"))
        for record in trace.unattached:
            apart.add(_record_label(trace, record))
    return tree


def make_trace_command() -> click.Command:
    """Return the ``trace`` click command."""

    @click.command(name="trace")
    @click.argument("correlation_id", metavar="CORRELATION_ID")
    @click.option(
        "--audit",
        "audit_url",
        envvar="TIDINGS_AUDIT_URL",
        metavar="URL",
        help="The audit store: redis://..., sqlite:///path, postgresql+psycopg://..., "
        "mysql+pymysql://... Env: TIDINGS_AUDIT_URL.",
    )
    @click.option(
        "--name",
        envvar="TIDINGS_AUDIT_NAME",
        metavar="NAME",
        help="SQL table or Redis key prefix, if not the default (tidings_audit, "
        "tidings:audit). Env: TIDINGS_AUDIT_NAME.",
    )
    @click.option("--json", "as_json", is_flag=True, help="Print the tree as JSON.")
    def trace(correlation_id: str, audit_url: str | None, name: str | None, as_json: bool) -> None:
        """Print one request's causal tree from the audit trail.

        Every event of the correlation id, nested under the event whose handler raised it,
        with its publish, relay, handler runs, retries, duplicates and dead letters, timed
        from the request's first record. Exits 1 when the trail holds nothing for it.
        """
        if not audit_url:
            msg = (
                "no audit store given: pass --audit URL or set TIDINGS_AUDIT_URL, e.g. "
                "redis://localhost:6379/0 or postgresql+psycopg://user@host/db"
            )
            raise click.UsageError(msg)
        try:
            store = open_audit_store(audit_url, name=name, must_exist=True)
        except Exception as exc:  # a URL tidings cannot use, a missing extra or driver
            raise click.UsageError(redact_text(str(exc), audit_url)) from exc
        try:
            records = store.by_correlation(correlation_id)
        except Exception as exc:  # an operator needs the cause, not a traceback
            msg = f"the audit store at {redact_url(audit_url)} failed: {type(exc).__name__}: {exc}"
            raise click.ClickException(redact_text(msg, audit_url)) from exc
        finally:
            store.close()
        found = causal_tree(correlation_id, records)
        if as_json:
            click.echo(json.dumps(found.to_dict(), indent=2))
        elif found.count:
            _console().print(render(found))
        if not found.count:
            shown = _safe(correlation_id).plain
            click.echo(f"no audit records for correlation id {shown}", err=True)
            raise SystemExit(1)

    return trace
