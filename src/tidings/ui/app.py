"""The ops page's Starlette app: search, trace, outbox, dead letters and counters.

:func:`create_app` serves an :class:`OpsConfig`'s stores as server-rendered pages (Jinja2
templates shipped in this package, autoescaped: everything shown came from messages). No
script runs on any page; the counters refresh with ``<meta http-equiv="refresh">``. Replay and
purge are POST forms behind a confirmation page and a CSRF token, refused with 403 unless the
config allows them. Store failures become a page naming the error with every configured URL's
secrets redacted.
"""

from __future__ import annotations

import hmac
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl

try:
    import jinja2
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, RedirectResponse, Response
    from starlette.routing import Route
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    msg = f"the ops page needs the 'ui' extra ({exc.name} is missing): pip install 'tidings[ui]'"
    raise ImportError(msg) from exc

from tidings._untrusted import log_safe, redact_text
from tidings.audit import AuditRecord, AuditStore
from tidings.audit.tree import causal_tree
from tidings.deadletter import find, iter_matching
from tidings.ports import DeadLetter, DeadLetterFilter, DeadLetterStore, Replayer
from tidings.ui.graph import LEGEND, layout

__all__ = ["OpsConfig", "create_app"]

_AGO = re.compile(r"(\d{1,6})([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
_PAGE = 50
_TENANT_RECORDS = 500
_FIELD_CHARS = 400
_BLOCK_CHARS = 100_000
_COUNTERS_REFRESH = 5
_FORM_BYTES = 64 * 1024
_FORM_FIELDS = 20
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass
class OpsConfig:
    """What the ops page shows, and whether it may change anything.

    Attributes:
        audit: the audit store searched for traces (``None``: no search, no trace).
        dead_letters: the dead-letter store listed, shown, replayed and purged.
        outbox_engine: the database whose outbox table is reported (a SQLAlchemy ``Engine``).
        outbox_table: that table's name.
        replayer: what replays a letter (the ``--app`` bus's transport); ``None``: no replay.
        allow_replay: whether replay and purge are allowed at all (else every POST is 403).
        redact: URLs whose secrets are hidden from every error shown.
        csrf_token: the token every form carries; random per process unless given.
    """

    audit: AuditStore | None = None
    dead_letters: DeadLetterStore | None = None
    outbox_engine: Any = None
    outbox_table: str = "tidings_outbox"
    replayer: Replayer | None = None
    allow_replay: bool = False
    redact: Sequence[str] = ()
    csrf_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))


class _RefusedError(Exception):
    """A request the page will not serve: its status and the reason shown."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _safe(value: object, limit: int = _FIELD_CHARS) -> str:
    """``value`` as one line of text: control characters escaped, cut at ``limit``."""
    return "-" if value is None else log_safe(value, limit)


def _block(value: str | None) -> str:
    """``value`` as a block of text (LF and tab kept), for a body or a traceback."""
    return "(none)" if not value else log_safe(value, _BLOCK_CHARS, keep_newlines=True)


def _since(text: str) -> datetime | None:
    """An ISO-8601 time (UTC unless it has an offset) or an age like 30m, 2h, 7d."""
    text = text.strip()
    if not text:
        return None
    if match := _AGO.fullmatch(text):
        amount, unit = match.groups()
        return datetime.now(UTC) - timedelta(**{_UNITS[unit]: int(amount)})
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        reason = "since is neither an ISO-8601 time (2026-12-01T00:00) nor an age (30m, 2h, 7d)"
        raise _RefusedError(400, reason) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _filter(params: Any) -> DeadLetterFilter:
    def get(name: str) -> str | None:
        value = str(params.get(name, "")).strip()
        return value or None

    return DeadLetterFilter(
        handler=get("handler"),
        event_type=get("event_type"),
        since=_since(str(params.get("since", ""))),
        reason=get("reason"),
    )


def _filter_fields(params: Any) -> dict[str, str]:
    """The filter's fields as given (for links and hidden form fields)."""
    names = ("handler", "event_type", "since", "reason")
    return {name: str(params.get(name, "")) for name in names if params.get(name)}


def _letter_row(letter: DeadLetter) -> dict[str, str]:
    reason = letter.reason.strip().partition("\n")[0]
    return {
        "id": _safe(letter.id),
        "failed_at": _safe(letter.failed_at[:19].replace("T", " ")),
        "transport": _safe(letter.transport),
        "destination": _safe(letter.destination),
        "handler": _safe(letter.handler),
        "event_type": _safe(letter.event_type),
        "attempts": str(letter.attempts),
        "reason": _safe(reason, 120),
    }


def _record_row(start: float, record: AuditRecord) -> dict[str, str]:
    return {
        "offset": f"+{(record.at - start) * 1000:.1f}",
        "kind": record.kind,
        "event_type": _safe(record.event_type),
        "event_id": _safe(record.event_id),
        "handler": _safe(record.handler),
        "outcome": _safe(record.outcome),
        "attempt": str(record.attempt),
        "duration": "" if record.duration is None else f"{record.duration * 1000:.1f}",
        "worker": _safe(record.worker),
        "detail": _safe(record.detail, 300),
    }


class _Pages:
    """The routes' handlers over one config (sync: Starlette runs them in its thread pool)."""

    def __init__(self, config: OpsConfig) -> None:
        self.config = config
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("tidings.ui", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )

    def render(self, name: str, code: int = 200, **context: Any) -> HTMLResponse:
        page = self.env.get_template(name).render(
            config=self.config, read_only=not self.config.allow_replay, **context
        )
        return HTMLResponse(page, status_code=code, headers=_HEADERS)

    def guarded(self, handler: Callable[[Request], Response]) -> Callable[[Request], Response]:
        """``handler`` with refusals and store failures shown as a page, secrets redacted."""

        def run(request: Request) -> Response:
            try:
                return handler(request)
            except _RefusedError as refused:
                return self.render("error.html", refused.status, reason=refused.reason)
            except Exception as exc:  # noqa: BLE001 - an operator needs the cause on the page
                reason = redact_text(f"{type(exc).__name__}: {exc}", *self.config.redact)
                return self.render("error.html", 500, reason=_safe(reason, 2000))

        return run

    # -- search and trace --------------------------------------------------------------

    def _audit(self) -> AuditStore:
        if self.config.audit is None:
            raise _RefusedError(404, "no audit store configured: start tidings ui with --audit URL")
        return self.config.audit

    def search(self, request: Request) -> Response:
        query = str(request.query_params.get("q", "")).strip()
        by = str(request.query_params.get("by", "any"))
        if by not in ("any", "correlation", "event", "tenant"):
            raise _RefusedError(400, "by is one of any, correlation, event, tenant")
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
                "label": _safe(correlation_id),
                "url": _trace_url(request, correlation_id),
                "records": entry["records"],
                "last": _when(entry["last"]),
                "tenant": _safe(entry["tenant"]),
                "types": _safe(", ".join(sorted(entry["types"]))),
            }
            for correlation_id, entry in sorted(found.items(), key=lambda item: -item[1]["last"])
        ]
        return self.render("search.html", query=_safe(query), by=by, results=results)

    def trace(self, request: Request) -> Response:
        correlation_id = str(request.query_params.get("id", ""))
        if not correlation_id:
            raise _RefusedError(400, "which trace? pass ?id=CORRELATION_ID")
        records = self._audit().by_correlation(correlation_id)
        found = causal_tree(correlation_id, records)
        if not found.count:
            raise _RefusedError(404, f"no audit records for correlation id {_safe(correlation_id)}")
        ordered = sorted(records, key=lambda record: record.at)
        return self.render(
            "trace.html",
            correlation_id=_safe(correlation_id),
            trace=found,
            picture=layout(found),
            legend=LEGEND,
            records=[_record_row(found.start, record) for record in ordered],
            started=_when(found.start),
        )

    # -- outbox ------------------------------------------------------------------------

    def outbox(self, request: Request) -> Response:
        if self.config.outbox_engine is None:
            raise _RefusedError(
                404, "no outbox database configured: start tidings ui with --db URL"
            )
        from tidings.outbox import Outbox  # noqa: PLC0415 - the sql extra, only when asked

        outbox = Outbox(table_name=self.config.outbox_table)
        status = outbox.status(self.config.outbox_engine, partitions=100, rows=50)
        rows = (
            outbox.quarantined(self.config.outbox_engine, limit=100) if status.quarantined else []
        )
        return self.render(
            "outbox.html",
            table=_safe(self.config.outbox_table),
            status=status,
            partitions=[
                {"key": _safe(p.partition_key), "pending": p.pending, "age": f"{p.oldest_age:.1f}"}
                for p in status.partitions
            ],
            stuck=[
                {
                    "id": s.id,
                    "key": _safe(s.partition_key),
                    "type": _safe(s.event_type),
                    "attempts": s.attempts,
                    "age": f"{s.age:.1f}",
                }
                for s in status.stuck
            ],
            quarantined=[
                {
                    "id": q.id,
                    "event_id": _safe(q.event_id),
                    "type": _safe(q.event_type),
                    "key": _safe(q.partition_key),
                    "attempts": q.attempts,
                    "age": f"{q.age:.1f}",
                    "reason": _safe(q.reason, 200),
                }
                for q in rows
            ],
        )

    # -- dead letters --------------------------------------------------------------------

    def _letters(self) -> DeadLetterStore:
        if self.config.dead_letters is None:
            raise _RefusedError(
                404, "no dead-letter store configured: start tidings ui with --store"
            )
        return self.config.dead_letters

    def letters(self, request: Request) -> Response:
        store = self._letters()
        where = _filter(request.query_params)
        try:
            offset = max(int(request.query_params.get("offset", "0")), 0)
        except ValueError:
            raise _RefusedError(400, "offset is a whole number") from None
        page = find(store, where, limit=_PAGE + 1, offset=offset)
        return self.render(
            "letters.html",
            total=store.count(),
            filters=_filter_fields(request.query_params),
            letters=[_letter_row(letter) for letter in page[:_PAGE]],
            offset=offset,
            more=len(page) > _PAGE,
            page=_PAGE,
        )

    def letter(self, request: Request) -> Response:
        letter_id = str(request.path_params["letter_id"])
        letter = self._letters().get(letter_id)
        if letter is None:
            raise _RefusedError(404, f"no dead letter with id {_safe(letter_id)}")
        try:
            body, body_kind = _block(letter.body.decode("utf-8")), "UTF-8 text"
        except UnicodeDecodeError:
            rows = range(0, len(letter.body), 16)
            body = "\n".join(f"{i:08x}  {letter.body[i : i + 16].hex(' ')}" for i in rows)
            body_kind = "not UTF-8, in hex"
        headers = {_safe(key, 200): _safe(value, 1000) for key, value in letter.headers.items()}
        return self.render(
            "letter.html",
            letter=_letter_row(letter),
            letter_id=letter.id,
            event_id=_safe(letter.event_id),
            reason=_block(letter.reason),
            headers=headers,
            body=body,
            body_kind=body_kind,
            body_bytes=len(letter.body),
            traceback=_block(letter.traceback),
        )

    def confirm(self, request: Request) -> Response:
        action = str(request.query_params.get("action", ""))
        if action not in ("replay", "purge"):
            raise _RefusedError(400, "action is replay or purge")
        store = self._letters()
        ids = self._chosen(store, request.query_params)
        return self.render(
            "confirm.html",
            action=action,
            ids=ids,
            shown=[_safe(letter_id) for letter_id in ids[:_PAGE]],
            filters=_filter_fields(request.query_params),
            letter_id=str(request.query_params.get("id", "")),
            can_replay=self.config.replayer is not None,
            csrf=self.config.csrf_token,
        )

    def _chosen(self, store: DeadLetterStore, params: Any) -> list[str]:
        """The letters an action means: one ``id``, or every one matching the filters."""
        letter_id = str(params.get("id", ""))
        if letter_id:
            return [letter_id] if store.get(letter_id) is not None else []
        where = _filter(params)
        ids = dict.fromkeys(letter.id for letter in iter_matching(store, where))
        return list(reversed(ids))  # oldest first

    async def act(self, request: Request) -> Response:
        """POST /letters/replay or /letters/purge: checked, then done in the thread pool."""
        from starlette.concurrency import run_in_threadpool  # noqa: PLC0415

        body = await request.body()
        kind = request.headers.get("content-type", "").partition(";")[0].strip()
        if kind != "application/x-www-form-urlencoded" or len(body) > _FORM_BYTES:
            return self.render("error.html", 400, reason="a small url-encoded form is expected")
        pairs = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        fields = dict(pairs[:_FORM_FIELDS])
        return await run_in_threadpool(self.guarded(lambda r: self._act(r, fields)), request)

    def _act(self, request: Request, form: dict[str, str]) -> Response:
        if not self.config.allow_replay:
            raise _RefusedError(403, "read-only: start tidings ui with --allow-replay to change it")
        if not hmac.compare_digest(form.get("csrf", ""), self.config.csrf_token):
            raise _RefusedError(403, "the form's token is missing or stale: reload the page")
        if form.get("confirm") != "yes":
            raise _RefusedError(400, "not confirmed")
        action = str(request.path_params["action"])
        if action not in ("replay", "purge"):
            raise _RefusedError(404, "POST /letters/replay or /letters/purge")
        store = self._letters()
        ids = self._chosen(store, form)
        outcomes: list[dict[str, str]] = []
        if action == "purge":
            for letter_id in ids:
                gone = store.remove(letter_id)
                outcomes.append({"id": _safe(letter_id), "done": "purged" if gone else "gone"})
        else:
            replayer = self.config.replayer
            if replayer is None:
                raise _RefusedError(400, "no replayer: start tidings ui with --app module:bus")
            outcomes = [_replay(store, replayer, letter_id) for letter_id in ids]
        return self.render("done.html", action=action, outcomes=outcomes)

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
            "counters.html", counts=counts, refresh=_COUNTERS_REFRESH, now=_when(time.time())
        )


def _replay(store: DeadLetterStore, replayer: Replayer, letter_id: str) -> dict[str, str]:
    """Replay one letter, removing it once the replay returned; say what happened."""
    shown = _safe(letter_id)
    letter = store.get(letter_id)
    if letter is None:
        return {"id": shown, "done": "gone (no such letter)"}
    try:
        replayer.replay(letter)
    except Exception as exc:  # noqa: BLE001 - a failure keeps the letter, and is reported
        return {
            "id": shown,
            "done": f"replay failed, kept: {_safe(type(exc).__name__)}: {_safe(exc)}",
        }
    store.remove(letter.id)
    return {"id": shown, "done": f"replayed to {_safe(letter.destination)}"}


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def _trace_url(request: Request, correlation_id: str) -> str:
    return str(request.url_for("trace").include_query_params(id=correlation_id))


def create_app(config: OpsConfig) -> Starlette:
    """The ops page over ``config``: a Starlette app to serve with any ASGI server.

    Routes: ``/`` search (``q``, ``by``: any, correlation, event, tenant), ``/trace?id=``,
    ``/outbox``, ``/letters`` (filters ``handler``, ``event_type``, ``since``, ``reason``),
    ``/letters/{id}``, ``/letters/confirm`` and POST ``/letters/replay`` / ``/letters/purge``
    (403 unless ``config.allow_replay``, and without the form's CSRF token), ``/counters``.
    """
    pages = _Pages(config)
    return Starlette(
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
        ]
    )
