"""The trace as a picture: a causal timeline laid out for an inline SVG, server-side.

:func:`layout` turns a :class:`~tidings.audit.tree.Trace` into rows (an event, or one of its
records), each with its place on a shared time axis, and the causal edges between events; the
trace template draws them. Every text comes from messages: it is made log-safe and cut here,
and the template escapes it (Jinja2 autoescape), so nothing reaches the page raw.
"""

from __future__ import annotations

from dataclasses import dataclass

from tidings._untrusted import log_safe
from tidings.audit import AuditRecord
from tidings.audit.tree import EventNode, Trace

__all__ = ["LEGEND", "MAX_ROWS", "Edge", "Picture", "Row", "Tick", "layout"]

MAX_ROWS = 1000
"""Most rows one picture draws; the rest are counted in :attr:`Picture.hidden`."""

WIDTH = 1200
ROW = 22
TOP = 30
LABEL_X = 8
INDENT = 16
AXIS_X0 = 520
AXIS_X1 = 1180
_LABEL_CHARS = 44
_TITLE_CHARS = 600
_TICKS = 5

_COLOUR = {
    "published": "#2b7bb9",
    "relayed": "#2b7bb9",
    "handled": "#2e8b57",
    "duplicate": "#8e44ad",
    "retried": "#d4a017",
    "dead_lettered": "#c0392b",
    "rejected": "#c0392b",
}
_FAILED = "#e67e22"
_EVENT = "#333333"

LEGEND = (
    ("event", _EVENT),
    ("published / relayed", _COLOUR["published"]),
    ("handled", _COLOUR["handled"]),
    ("handler failed", _FAILED),
    ("retried", _COLOUR["retried"]),
    ("duplicate", _COLOUR["duplicate"]),
    ("dead-lettered / rejected", _COLOUR["dead_lettered"]),
)
"""The picture's colours, as the trace page's legend lists them."""


@dataclass(frozen=True)
class Row:
    """One line of the picture: an event (``is_event``) or one of its records.

    Attributes:
        y: the row's baseline, in SVG units.
        label_x: where its label starts (nested events are indented).
        label: the short text drawn; ``title``: the full one, shown on hover.
        x, width: where its mark starts on the time axis and how wide (a run's duration).
        colour: the mark's colour (by kind, and outcome for a handler run).
        timing: the offset and duration, written beside the mark.
        is_event: whether the row is an event (a diamond) rather than a record (a bar).
        kind: the record's kind, or ``event``.
    """

    y: int
    label_x: int
    label: str
    title: str
    x: float
    width: float
    colour: str
    timing: str
    is_event: bool
    kind: str


@dataclass(frozen=True)
class Edge:
    """A causal link: from the event that raised another (x1, y1) to that event (x2, y2)."""

    x1: float
    y1: int
    x2: float
    y2: int


@dataclass(frozen=True)
class Tick:
    """A mark on the time axis at ``x``, labelled ``label`` (ms since the first record)."""

    x: float
    label: str


@dataclass(frozen=True)
class Picture:
    """Everything the trace template needs to draw the SVG.

    Attributes:
        width, height: the SVG's size.
        rows, edges, ticks: what to draw.
        span_ms: the time the trace covers, first record to the end of the last.
        hidden: rows beyond :data:`MAX_ROWS`, not drawn.
        axis_x0, axis_x1: the time axis' ends.
    """

    width: int
    height: int
    rows: tuple[Row, ...]
    edges: tuple[Edge, ...]
    ticks: tuple[Tick, ...]
    span_ms: float
    hidden: int
    axis_x0: int = AXIS_X0
    axis_x1: int = AXIS_X1


def _short(text: str) -> str:
    safe = log_safe(text, _LABEL_CHARS * 4)
    return safe if len(safe) <= _LABEL_CHARS else safe[: _LABEL_CHARS - 1] + "…"


def _end(record: AuditRecord) -> float:
    return record.at + (record.duration or 0.0)


def _last(node: EventNode) -> float:
    ends = [_end(record) for record in node.records]
    ends += [_last(child) for child in node.caused]
    return max(ends, default=node.at)


def _record_text(record: AuditRecord) -> str:
    if record.handler is None:
        return record.kind
    text = f"{record.handler} {record.kind} (attempt {record.attempt})"
    if record.kind == "handled" and record.outcome != "ok":
        text += f": {record.outcome}"
    return text


def _ticks(span_ms: float) -> tuple[Tick, ...]:
    return tuple(
        Tick(
            round(AXIS_X0 + (AXIS_X1 - AXIS_X0) * step / (_TICKS - 1), 2),
            f"{span_ms * step / (_TICKS - 1):.1f} ms",
        )
        for step in range(_TICKS)
    )


def layout(trace: Trace) -> Picture:
    """Lay ``trace`` out: a row per event and per record, in causal then time order."""
    end = max(
        [_last(node) for node in trace.roots] + [_end(r) for r in trace.unattached],
        default=trace.start,
    )
    span = max(end - trace.start, 0.0)
    scale = (AXIS_X1 - AXIS_X0) / span if span > 0 else 0.0
    rows: list[Row] = []
    edges: list[Edge] = []
    hidden = 0

    def x_of(at: float) -> float:
        return round(AXIS_X0 + (at - trace.start) * scale, 2)

    def next_y() -> int | None:
        """The next row's baseline, or ``None`` (counted as hidden) when the picture is full."""
        nonlocal hidden
        if len(rows) >= MAX_ROWS:
            hidden += 1
            return None
        return TOP + ROW * (len(rows) + 1)

    def record_row(record: AuditRecord, depth: int) -> Row | None:
        colour = _COLOUR[record.kind]
        if record.kind == "handled" and record.outcome != "ok":
            colour = _FAILED
        took = "" if record.duration is None else f", {record.duration * 1000:.1f} ms"
        text = _record_text(record)
        title = f"{text}{took} on {record.worker}"
        if record.detail:
            title += f"\n{record.detail}"
        y = next_y()
        if y is None:
            return None
        row = Row(
            y=y,
            label_x=LABEL_X + INDENT * depth,
            label=_short(text),
            title=log_safe(title, _TITLE_CHARS, keep_newlines=True),
            x=x_of(record.at),
            width=round(max((record.duration or 0.0) * scale, 3.0), 2),
            colour=colour,
            timing=f"+{trace.offset_ms(record.at):.1f} ms{took}",
            is_event=False,
            kind=record.kind,
        )
        rows.append(row)
        return row

    def event_row(node: EventNode, depth: int, cause: tuple[float, int] | None) -> None:
        kind = node.event_type or "(unknown type)"
        title = f"{kind} {node.event_id}"
        if node.tenant_id is not None:
            title += f" tenant {node.tenant_id}"
        y = next_y()
        row = None
        if y is not None:
            row = Row(
                y=y,
                label_x=LABEL_X + INDENT * depth,
                label=_short(f"{kind} {node.event_id}"),
                title=log_safe(title, _TITLE_CHARS),
                x=x_of(node.at),
                width=0.0,
                colour=_EVENT,
                timing=f"+{trace.offset_ms(node.at):.1f} ms",
                is_event=True,
                kind="event",
            )
            rows.append(row)
            if cause is not None:
                edges.append(Edge(cause[0], cause[1], row.x, row.y))
        items: list[tuple[float, int, AuditRecord | EventNode]] = [
            (record.at, 0, record) for record in node.records
        ]
        items += [(child.at, 1, child) for child in node.caused]
        # A follow-up's arrow starts at the end of the handler run it came from (the last run
        # to start before it), or at this event when no run did.
        source = None if row is None else (row.x, row.y)
        for _, _, item in sorted(items, key=lambda entry: (entry[0], entry[1])):
            if isinstance(item, EventNode):
                event_row(item, depth + 1, source)
            else:
                drawn = record_row(item, depth + 1)
                if drawn is not None and item.handler is not None:
                    source = (drawn.x + drawn.width, drawn.y)

    for node in trace.roots:
        event_row(node, 0, None)
    for record in trace.unattached:
        record_row(record, 0)
    span_ms = round(span * 1000, 3)
    return Picture(
        width=WIDTH,
        height=TOP + ROW * (len(rows) + 2),
        rows=tuple(rows),
        edges=tuple(edges),
        ticks=_ticks(span_ms),
        span_ms=span_ms,
        hidden=hidden,
    )
