"""From the journal to the run's result: counts, latencies, one request's trace, reconciliation."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tidings.demo.events import OrderPlaced, StockReserved
from tidings.demo.journal import Entry
from tidings.demo.shop import HANDLERS
from tidings.demo.web import Answer
from tidings.ports import DeadLetter

if TYPE_CHECKING:
    from tidings.demo.look import Look

__all__ = ["DemoResult", "TraceLine", "reconcile", "summarise", "trace"]


@dataclass(frozen=True)
class TraceLine:
    """One line of a request's trace: what happened, how deep in the causal tree, and when.

    Attributes:
        depth: 0 for the request, 1 for what it did and its event, and so on down the causes.
        kind: the journal entry's kind (``request``, ``committed``, ``handled``, ``log``...).
        offset_ms: milliseconds since the request arrived.
        text: what to show.
    """

    depth: int
    kind: str
    offset_ms: float
    text: str


@dataclass(frozen=True)
class DemoResult:
    """What one demo run did, for the report and for tests.

    Attributes:
        mode: how it ran, in words.
        requests: requests sent; ``accepted`` of them were answered 201.
        committed: events written to the outbox with their orders.
        published: events handed to the transport (relay and handlers, resends included).
        events_handled: events whose every handler completed (or was dead-lettered).
        handled: handler runs that completed.
        failures: handler attempts that raised (each was retried or dead-lettered).
        retries: handler runs sent again: the failed attempts that were not dead-lettered, and
            the deliveries the inbox found claimed elsewhere (``busy``).
        duplicates: deliveries the inbox suppressed because their effect had taken place.
        dead_letters: (handler, event id, reason) of each dead letter.
        per_handler: completed runs per handler.
        latency_p50_ms: median time from a request's arrival to a handler's completion.
        latency_p99_ms: its 99th percentile.
        sales: the read model: tenant -> (orders, revenue in cents).
        traced_correlation_id: the request the trace follows.
        trace: its events, handler runs and log lines in causal order.
        problems: what reconciliation found wrong; empty when the run reconciles.
        seconds: wall-clock time of the run.
        entries: the whole journal.
        look: where to look after the run (metrics, the audit trail's tree, the commands).
    """

    mode: str
    requests: int
    accepted: int
    committed: int
    published: int
    events_handled: int
    handled: int
    failures: int
    retries: int
    duplicates: int
    dead_letters: tuple[tuple[str, str, str], ...]
    per_handler: Mapping[str, int]
    latency_p50_ms: float
    latency_p99_ms: float
    sales: Mapping[str, tuple[int, int]]
    traced_correlation_id: str
    trace: tuple[TraceLine, ...]
    problems: tuple[str, ...]
    seconds: float
    entries: tuple[Entry, ...]
    look: Look | None = None


def _percentile(values: Sequence[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def summarise(
    *,
    mode: str,
    answers: Sequence[Answer],
    entries: Sequence[Entry],
    letters: Sequence[DeadLetter],
    sales: Mapping[str, tuple[int, int]],
    orders: Mapping[str, tuple[int, int]],
    doomed: set[str],
    seconds: float,
) -> DemoResult:
    """Build the result from the journal, the dead letters and the database's tables.

    ``orders`` is what the orders table holds per tenant (count, cents), against which the
    ``sales`` read model is reconciled; ``doomed`` are the orders the loyalty handler was
    planned never to succeed on.
    """
    kinds = Counter(e.kind for e in entries)
    requested = {e.correlation_id: e.at for e in entries if e.kind == "request"}
    latencies = [
        (e.at - requested[e.correlation_id]) * 1000
        for e in entries
        if e.kind == "handled" and e.correlation_id in requested
    ]
    traced = _pick_traced(entries)
    dead = tuple((d.handler or "-", d.event_id or "-", d.reason) for d in letters)
    return DemoResult(
        mode=mode,
        requests=len(answers),
        accepted=sum(1 for a in answers if a.status == 201),
        committed=kinds["committed"],
        published=kinds["published"],
        events_handled=_events_handled(entries, letters),
        handled=kinds["handled"],
        failures=kinds["failed"],
        retries=kinds["failed"] - sum(1 for d in letters if d.handler) + kinds["busy"],
        duplicates=kinds["duplicate"],
        dead_letters=dead,
        per_handler=dict(sorted(Counter(e.name for e in entries if e.kind == "handled").items())),
        latency_p50_ms=_percentile(latencies, 0.50),
        latency_p99_ms=_percentile(latencies, 0.99),
        sales=dict(sales),
        traced_correlation_id=traced,
        trace=tuple(trace(entries, traced)),
        problems=tuple(
            reconcile(
                answers,
                entries=entries,
                letters=letters,
                sales=sales,
                orders=orders,
                doomed=doomed,
            )
        ),
        seconds=seconds,
        entries=tuple(entries),
    )


def _events_handled(entries: Sequence[Entry], letters: Sequence[DeadLetter]) -> int:
    settled: set[tuple[str | None, str | None]] = {
        (e.name, e.event_id) for e in entries if e.kind == "handled"
    }
    settled |= {(d.handler, d.event_id) for d in letters}
    types = {e.event_id: e.event_type for e in entries if e.kind in ("committed", "published")}
    return sum(
        1
        for event_id, event_type in types.items()
        if all((h, event_id) in settled for h in HANDLERS.get(event_type or "", ()))
    )


def _pick_traced(entries: Sequence[Entry]) -> str:
    """The first request whose handling saw a retry that then succeeded, else the first."""
    failed = {e.correlation_id for e in entries if e.kind == "failed"}
    dead_ends = {e.correlation_id for e in entries if e.kind == "log" and "dead-letter" in e.detail}
    requests = [e.correlation_id for e in entries if e.kind == "request" and e.correlation_id]
    for correlation_id in requests:
        if correlation_id in failed and correlation_id not in dead_ends:
            return correlation_id
    return requests[0] if requests else ""


def trace(entries: Sequence[Entry], correlation_id: str) -> list[TraceLine]:
    """Return everything journaled under ``correlation_id``, in causal order.

    The request comes first; under it, its log lines and the event it committed; under each
    event, in time order, its publication, its handlers' runs, failures and suppressed
    duplicates, their log lines, and the events they raised, each followed in the same way.
    """
    mine = [e for e in entries if e.correlation_id == correlation_id]
    if not mine:
        return []
    request = next((e for e in mine if e.kind == "request"), None)
    start = mine[0].at if request is None else request.at
    # An event's own line is where it was written: the outbox for a request's, the publish of
    # the handler that raised it for a follow-up (the relay's publish then comes under it).
    events: dict[str, Entry] = {e.event_id or "": e for e in mine if e.kind == "committed"}
    for entry in mine:
        if entry.kind == "published" and entry.event_id not in events:
            events[entry.event_id or ""] = entry
    under: dict[str | None, list[Entry]] = {}
    for entry in mine:
        if entry.kind == "request":
            continue
        if entry.event_id in events and events[entry.event_id or ""] is entry:
            parent = entry.causation_id if entry.causation_id in events else None
        else:
            parent = entry.event_id if entry.event_id in events else None
        under.setdefault(parent, []).append(entry)
    lines: list[TraceLine] = []
    if request is not None:
        text = f"{request.name} {request.detail} tenant={request.tenant_id}"
        lines.append(TraceLine(0, "request", 0.0, text))

    def walk(parent: str | None, depth: int) -> None:
        for entry in sorted(under.get(parent, []), key=lambda e: e.at):
            offset = (entry.at - start) * 1000
            is_event = entry.event_id in events and events[entry.event_id or ""] is entry
            lines.append(TraceLine(depth, entry.kind, offset, _describe(entry, is_event)))
            if is_event:
                walk(entry.event_id, depth + 1)

    walk(None, 1)
    return lines


def _describe(entry: Entry, is_event: bool) -> str:
    short = (entry.event_id or "")[:8]
    if is_event:
        how = "written to the outbox" if entry.kind == "committed" else "published"
        return f"{entry.event_type} {short} {how}"
    texts = {
        "published": f"published by the relay ({entry.event_type} {short})",
        "handled": f"{entry.name} done",
        "failed": f"{entry.name} failed: {entry.detail}",
        "duplicate": f"{entry.name} skipped: the inbox saw it done (a duplicate delivery)",
        "log": f"[{entry.name}] {entry.detail}",
    }
    return texts.get(entry.kind, f"{entry.kind} {entry.name} {entry.detail}")


def _request_problems(answers: Sequence[Answer], entries: Sequence[Entry]) -> list[str]:
    problems = []
    refused = sum(1 for a in answers if a.status != 201)
    if refused:
        problems.append(f"{refused} request(s) were not answered 201")
    if any(a.echoed_id != a.sent_id for a in answers):
        problems.append("a response did not echo the request's X-Correlation-ID")
    sent = {a.sent_id for a in answers if a.status == 201}
    if sent != {e.correlation_id for e in entries if e.kind == "request"}:
        problems.append("the views did not run under the correlation ids the requests sent")
    committed = sum(1 for e in entries if e.kind == "committed")
    if committed != len(answers) - refused:
        problems.append(f"{committed} events committed for {len(answers)} requests")
    return problems


def reconcile(
    answers: Sequence[Answer],
    *,
    entries: Sequence[Entry],
    letters: Sequence[DeadLetter],
    sales: Mapping[str, tuple[int, int]],
    orders: Mapping[str, tuple[int, int]],
    doomed: set[str],
) -> list[str]:
    """Return every way the run went wrong (an empty list: it reconciles).

    Every request answered 201, echoing the correlation id it was sent, which the view ran
    under, and committed one event; every committed event was published;
    every event (committed, or raised by a handler) was handled exactly once by each of its
    handlers, or, for a (handler, event) that was dead-lettered, not at all; the dead letters
    are exactly the planned ones; each follow-up names a known cause with the same correlation
    and tenant; and the sales read model equals the orders table, tenant by tenant.
    """
    problems = _request_problems(answers, entries)
    committed = {e.event_id: e for e in entries if e.kind == "committed"}
    published = {e.event_id: e for e in entries if e.kind == "published"}
    problems.extend(
        f"event {i} committed but never published" for i in committed.keys() - published.keys()
    )
    events = {**published, **committed}
    runs = Counter((e.name, e.event_id) for e in entries if e.kind == "handled")
    dead = Counter((d.handler, d.event_id) for d in letters)
    for event_id, event in events.items():
        for handler in HANDLERS.get(event.event_type or "", ()):
            n = runs.pop((handler, event_id), 0)
            if n == 0 and (handler, event_id) in dead:
                continue
            if n != 1:
                problems.append(f"{handler} ran {n} times on {event.event_type} {event_id}")
    problems.extend(f"{h} ran on unknown event {i}" for (h, i) in runs)
    dead_orders = {events[i].detail for (_, i) in dead if i in events}
    if dead_orders != doomed:
        problems.append(f"dead letters for {sorted(dead_orders)}, planned for {sorted(doomed)}")
    follow_ups = Counter(
        e.detail for e in published.values() if e.event_type == StockReserved.event_type
    )
    roots = {e.detail for e in committed.values() if e.event_type == OrderPlaced.event_type}
    if set(follow_ups) != roots or any(n != 1 for n in follow_ups.values()):
        problems.append("not every order raised exactly one StockReserved")
    for event in published.values():
        cause = events.get(event.causation_id) if event.causation_id else None
        if event.causation_id and (
            cause is None
            or (cause.correlation_id, cause.tenant_id) != (event.correlation_id, event.tenant_id)
        ):
            problems.append(f"event {event.event_id} lost its cause's correlation or tenant")
    if dict(sales) != {t: orders.get(t, (0, 0)) for t in sales}:
        problems.append(
            f"the sales read model {dict(sales)} differs from the orders {dict(orders)}"
        )
    return problems
