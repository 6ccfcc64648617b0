"""What every page of the ops page shares: its config, rendering, and refusals.

:class:`OpsConfig` says what the page shows and whether it may change anything;
:class:`Pages` renders the package's Jinja2 templates (autoescaped: everything shown came from
messages) with the security headers every page carries, and turns a refusal or a store's
failure into an error page with every configured URL's secrets redacted.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

try:
    import jinja2
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, Response
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    msg = f"the ops page needs the 'ui' extra ({exc.name} is missing): pip install 'tidings[ui]'"
    raise ImportError(msg) from exc

from tidings._untrusted import log_safe, redact_text
from tidings.audit import AuditStore
from tidings.ports import DeadLetterStore, Replayer

if TYPE_CHECKING:
    import sqlalchemy as sa

__all__ = ["OpsConfig", "Pages", "RefusedError", "block", "safe", "when"]

_FIELD_CHARS = 400
_BLOCK_CHARS = 100_000
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # the browser still names this page as Origin of a POST
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
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
        hosts: the host names a request may be addressed to (its ``Host`` header, and the
            ``Origin`` of a POST when the browser sends one); any other gets 400 (``Host``) or
            403 (``Origin``), so that a web page whose name was rebound to this machine's
            address can neither read these pages nor post their forms.
    """

    audit: AuditStore | None = None
    dead_letters: DeadLetterStore | None = None
    outbox_engine: sa.Engine | None = None
    outbox_table: str = "tidings_outbox"
    replayer: Replayer | None = None
    allow_replay: bool = False
    redact: Sequence[str] = ()
    csrf_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    hosts: Sequence[str] = ("127.0.0.1", "localhost", "::1")


class RefusedError(Exception):
    """A request the page will not serve: its status and the reason shown."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def safe(value: object, limit: int = _FIELD_CHARS) -> str:
    """``value`` as one line of text: control characters escaped, cut at ``limit``."""
    return "-" if value is None else log_safe(value, limit)


def block(value: str | None) -> str:
    """``value`` as a block of text (LF and tab kept), for a body or a traceback."""
    return "(none)" if not value else log_safe(value, _BLOCK_CHARS, keep_newlines=True)


def when(at: float) -> str:
    """Unix time ``at`` as a UTC timestamp to the millisecond."""
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


class Pages:
    """The routes' handlers over one config (sync: Starlette runs them in its thread pool)."""

    def __init__(self, config: OpsConfig) -> None:
        self.config = config
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("tidings.ui", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )

    def render(self, name: str, code: int = 200, **context: Any) -> HTMLResponse:
        """The template ``name`` rendered with ``context``, as a response with ``code``."""
        page = self.env.get_template(name).render(
            config=self.config, read_only=not self.config.allow_replay, **context
        )
        return HTMLResponse(page, status_code=code, headers=_HEADERS)

    def guarded(self, handler: Callable[[Request], Response]) -> Callable[[Request], Response]:
        """``handler`` with refusals and store failures shown as a page, secrets redacted."""

        def run(request: Request) -> Response:
            try:
                return handler(request)
            except RefusedError as refused:
                return self.render("error.html", refused.status, reason=refused.reason)
            except Exception as exc:  # noqa: BLE001 - an operator needs the cause on the page
                reason = redact_text(f"{type(exc).__name__}: {exc}", *self.config.redact)
                return self.render("error.html", 500, reason=safe(reason, 2000))

        return run
