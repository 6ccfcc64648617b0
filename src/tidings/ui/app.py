"""The ops page's Starlette app: search, trace, outbox, dead letters and counters.

:func:`create_app` serves an :class:`OpsConfig`'s stores as server-rendered pages (Jinja2
templates shipped in this package, autoescaped: everything shown came from messages). No
script runs on any page; the counters refresh with ``<meta http-equiv="refresh">``. Replay and
purge are POST forms behind a confirmation page and a CSRF token, refused with 403 unless the
config allows them (:mod:`tidings.ui.letters`). Store failures become a page naming the error
with every configured URL's secrets redacted.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from tidings.audit import AuditRecord, AuditStore
from tidings.audit.tree import causal_tree
from tidings.ui._base import OpsConfig, RefusedError, safe, when
from tidings.ui.graph import LEGEND, layout
from tidings.ui.letters import LetterPages

__all__ = ["OpsConfig", "create_app"]

_TENANT_RECORDS = 500
_COUNTERS_REFRESH = 5


def _record_row(start: float, record: AuditRecord) -> dict[str, str]:
    return {
        "offset": f"+{(record.at - start) * 1000:.1f}",
        "kind": record.kind,
        "event_type": safe(record.event_type),
        "event_id": safe(record.event_id),
        "handler": safe(record.handler),
        "outcome": safe(record.outcome),
        "attempt": str(record.attempt),
        "duration": "" if record.duration is None else f"{record.duration * 1000:.1f}",
        "worker": safe(record.worker),
        "detail": safe(record.detail, 300),
    }


def _trace_url(request: Request, correlation_id: str) -> str:
    return str(request.url_for("trace").include_query_params(id=correlation_id))


class _Pages(LetterPages):
    """Every route's handler over one config (sync: Starlette runs them in its thread pool)."""

    # -- search and trace --------------------------------------------------------------

    def _audit(self) -> AuditStore:
        if self.config.audit is None:
            raise RefusedError(404, "no audit store configured: start tidings ui with --audit URL")
        return self.config.audit

    def search(self, request: Request) -> Response:
        query = str(request.query_params.get("q", "")).strip()
        by = str(request.query_params.get("by", "any"))
        if by not in ("any", "correlation", "event", "tenant"):
            raise RefusedError(400, "by is one of any, correlation, event, tenant")
        if not query:
            return self.render("search.html", query="", by=by, results=None)
        audit = self._audit()
        if by in ("any", "correlation") and audit.by_correlation(query):
            return RedirectResponse(_trace_url(request, query), status_code=303)
        records: list[AuditRecord] = []
        if by in ("any", "event"):
            records = audit.by_event(query)
        if not records and by in ("any", "tenant"):
            records = audit.by_tenant(query, limit=_TENANT_RECORDS)
        found: dict[str, dict[str, Any]] = {}
        for record in records:
            if record.correlation_id is None:
                continue
            entry = found.setdefault(
                record.correlation_id,
                {"records": 0, "last": record.at, "types": set(), "tenant": record.tenant_id},
            )
            entry["records"] += 1
            entry["last"] = max(entry["last"], record.at)
            if record.event_type:
                entry["types"].add(record.event_type)
        results = [
            {
                "correlation_id": correlation_id,
                "label": safe(correlation_id),
                "url": _trace_url(request, correlation_id),
                "records": entry["records"],
                "last": when(entry["last"]),
                "tenant": safe(entry["tenant"]),
                "types": safe(", ".join(sorted(entry["types"]))),
            }
            for correlation_id, entry in sorted(found.items(), key=lambda item: -item[1]["last"])
        ]
        return self.render("search.html", query=safe(query), by=by, results=results)

    def trace(self, request: Request) -> Response:
        correlation_id = str(request.query_params.get("id", ""))
        if not correlation_id:
            raise RefusedError(400, "which trace? pass ?id=CORRELATION_ID")
        records = self._audit().by_correlation(correlation_id)
        found = causal_tree(correlation_id, records)
        if not found.count:
            raise RefusedError(404, f"no audit records for correlation id {safe(correlation_id)}")
        ordered = sorted(records, key=lambda record: record.at)
        return self.render(
            "trace.html",
            correlation_id=safe(correlation_id),
            trace=found,
            picture=layout(found),
            legend=LEGEND,
            records=[_record_row(found.start, record) for record in ordered],
            started=when(found.start),
        )

    # -- outbox ------------------------------------------------------------------------

    def outbox(self, request: Request) -> Response:
        if self.config.outbox_engine is None:
            raise RefusedError(404, "no outbox database configured: start tidings ui with --db URL")
        from tidings.outbox import Outbox  # noqa: PLC0415 - the sql extra, only when asked

        outbox = Outbox(table_name=self.config.outbox_table)
        status = outbox.status(self.config.outbox_engine, partitions=100, rows=50)
        rows = (
            outbox.quarantined(self.config.outbox_engine, limit=100) if status.quarantined else []
        )
        return self.render(
            "outbox.html",
            table=safe(self.config.outbox_table),
            status=status,
            partitions=[
                {"key": safe(p.partition_key), "pending": p.pending, "age": f"{p.oldest_age:.1f}"}
                for p in status.partitions
            ],
            stuck=[
                {
                    "id": s.id,
                    "key": safe(s.partition_key),
                    "type": safe(s.event_type),
                    "attempts": s.attempts,
                    "age": f"{s.age:.1f}",
                }
                for s in status.stuck
            ],
            quarantined=[
                {
                    "id": q.id,
                    "event_id": safe(q.event_id),
                    "type": safe(q.event_type),
                    "key": safe(q.partition_key),
                    "attempts": q.attempts,
                    "age": f"{q.age:.1f}",
                    "reason": safe(q.reason, 200),
                }
                for q in rows
            ],
        )

    # -- counters ------------------------------------------------------------------------

    def counters(self, request: Request) -> Response:
        counts: list[tuple[str, str]] = []
        if self.config.dead_letters is not None:
            counts.append(("dead letters", str(self.config.dead_letters.count())))
        if self.config.outbox_engine is not None:
            from tidings.outbox import Outbox  # noqa: PLC0415 - the sql extra

            status = Outbox(table_name=self.config.outbox_table).status(
                self.config.outbox_engine, partitions=0, rows=0
            )
            age = "-" if status.oldest_age is None else f"{status.oldest_age:.1f} s"
            quarantined = "-" if status.quarantined is None else str(status.quarantined)
            counts += [
                ("outbox pending", str(status.pending)),
                ("outbox oldest pending", age),
                ("outbox quarantined", quarantined),
            ]
        return self.render(
            "counters.html", counts=counts, refresh=_COUNTERS_REFRESH, now=when(time.time())
        )


def create_app(config: OpsConfig) -> Starlette:
    """The ops page over ``config``: a Starlette app to serve with any ASGI server.

    Routes: ``/`` search (``q``, ``by``: any, correlation, event, tenant), ``/trace?id=``,
    ``/outbox``, ``/letters`` (filters ``handler``, ``event_type``, ``since``, ``reason``),
    ``/letters/{id}``, ``/letters/confirm`` and POST ``/letters/replay`` / ``/letters/purge``
    (403 unless ``config.allow_replay``, and without the form's CSRF token), ``/counters``.
    A request addressed to a host not in ``config.hosts`` is refused (400).
    """
    pages = _Pages(config)
    hosts = [*config.hosts, *(f"[{host}]" for host in config.hosts if ":" in host)]
    return Starlette(
        middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts)],
        routes=[
            Route("/", pages.guarded(pages.search), name="search"),
            Route("/trace", pages.guarded(pages.trace), name="trace"),
            Route("/outbox", pages.guarded(pages.outbox), name="outbox"),
            Route("/letters", pages.guarded(pages.letters), name="letters"),
            Route("/letters/confirm", pages.guarded(pages.confirm), name="confirm"),
            Route(
                "/letters/{action:str}",
                pages.act,
                methods=["POST"],
                name="act",
            ),
            Route("/letters/{letter_id:path}", pages.guarded(pages.letter), name="letter"),
            Route("/counters", pages.guarded(pages.counters), name="counters"),
        ],
    )
