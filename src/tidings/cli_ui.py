"""``tidings ui``: serve the ops page (traces, outbox lag, dead letters, counters) on localhost.

:func:`tidings.cli.make_cli` attaches the command; this module is imported only then. The page
itself (:mod:`tidings.ui`) and uvicorn are the ``ui`` extra, imported when the command runs.
The stores are opened as ``tidings trace``, ``tidings dlq`` and ``tidings outbox`` open them;
URLs are printed only redacted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

import click

from tidings._untrusted import redact_text, redact_url
from tidings.audit import AuditStore
from tidings.cli_dlq import _app_store, _load_app, _replayer
from tidings.ports import DeadLetterStore
from tidings.transports._defaults import dead_letter_prefix

if TYPE_CHECKING:
    import sqlalchemy as sa

__all__ = ["make_ui_command"]

_T = TypeVar("_T")


def _open(what: str, url: str, opener: Callable[[], _T]) -> _T:
    """``opener()``, its failure a one-line usage error with ``url``'s secrets redacted."""
    try:
        return opener()
    except Exception as exc:  # a URL tidings cannot use, a missing extra or driver
        msg = f"cannot open {what}: {type(exc).__name__}: {exc}"
        raise click.UsageError(redact_text(msg, url)) from exc


def _audit(url: str, name: str | None) -> AuditStore:
    from tidings.audit import open_audit_store  # noqa: PLC0415 - imported when asked for

    return _open("--audit", url, lambda: open_audit_store(url, name=name, must_exist=True))


def _dead_letters(url: str, name: str | None, service: str | None) -> DeadLetterStore:
    """The store at ``url``: ``--name``'s prefix or table, or ``--service``'s default."""
    from tidings.deadletter import open_store  # noqa: PLC0415 - imported when asked for

    if service is not None:
        if urlsplit(url).scheme.lower() not in ("redis", "rediss"):
            raise click.UsageError("--service picks a Redis store: pass --name TABLE")
        name = dead_letter_prefix(service)
    return _open("--store", url, lambda: open_store(url, name=name, must_exist=True))


def _outbox(url: str) -> sa.Engine:
    from tidings._sql import create_engine  # noqa: PLC0415 - the sql extra

    return _open("--db", url, lambda: create_engine(url, must_exist=True))


def make_ui_command() -> click.Command:
    """Return the ``ui`` click command."""

    @click.command(name="ui")
    @click.option(
        "--audit",
        "audit_url",
        envvar="TIDINGS_AUDIT_URL",
        metavar="URL",
        help="The audit store searched for traces. Env: TIDINGS_AUDIT_URL.",
    )
    @click.option(
        "--audit-name",
        envvar="TIDINGS_AUDIT_NAME",
        metavar="NAME",
        help="The audit store's SQL table or Redis key prefix, if not the default. "
        "Env: TIDINGS_AUDIT_NAME.",
    )
    @click.option(
        "--store",
        "store_url",
        envvar="TIDINGS_DLQ_URL",
        metavar="URL",
        help="The dead-letter store. Env: TIDINGS_DLQ_URL.",
    )
    @click.option(
        "--name",
        envvar="TIDINGS_DLQ_NAME",
        metavar="NAME",
        help="The dead-letter store's SQL table or Redis key prefix, if not the "
        "default. Env: TIDINGS_DLQ_NAME.",
    )
    @click.option(
        "--service",
        envvar="TIDINGS_SERVICE",
        metavar="NAME",
        help="Open the service's default Redis dead-letter store, tidings:dlq:NAME. "
        "Env: TIDINGS_SERVICE.",
    )
    @click.option(
        "--db",
        "db_url",
        envvar="TIDINGS_OUTBOX_DB",
        metavar="URL",
        help="The outbox database. Env: TIDINGS_OUTBOX_DB.",
    )
    @click.option(
        "--table",
        default="tidings_outbox",
        show_default=True,
        envvar="TIDINGS_OUTBOX_TABLE",
        help="The outbox table.",
    )
    @click.option(
        "--app",
        metavar="MODULE:ATTRIBUTE",
        help="Your EventBus (as for `tidings worker --app`): what replays letters; "
        "without --store, its transport's dead-letter store is shown.",
    )
    @click.option(
        "--allow-replay",
        is_flag=True,
        help="Allow replay and purge (behind a confirmation). Default: read-only.",
    )
    @click.option(
        "--host",
        default="127.0.0.1",
        show_default=True,
        help="The address to bind; the page has no login, keep it on localhost.",
    )
    @click.option("--port", type=click.IntRange(min=1, max=65535), default=8050,
                  show_default=True)  # fmt: skip
    def ui(  # noqa: PLR0917 - click passes every option
        audit_url: str | None,
        audit_name: str | None,
        store_url: str | None,
        name: str | None,
        service: str | None,
        db_url: str | None,
        table: str,
        app: str | None,
        allow_replay: bool,
        host: str,
        port: int,
    ) -> None:
        """Serve the ops page: traces, outbox lag, dead letters, counters.

        Search the audit trail by correlation id, event id or tenant and see the request as a
        causal timeline; the outbox's lag per partition and its quarantined rows; dead letters
        with filters, each shown in full, replayed or purged (with --allow-replay, after a
        confirmation); counters that refresh. Read-only unless started with --allow-replay.
        """
        try:
            import uvicorn  # noqa: PLC0415 - the ui extra

            from tidings.ui.app import OpsConfig, create_app  # noqa: PLC0415
        except ImportError as exc:
            raise click.UsageError(f"{exc}: pip install 'tidings[ui]'") from exc
        if not (audit_url or store_url or db_url or app):
            msg = "nothing to show: pass --audit URL, --store URL, --db URL or --app"
            raise click.UsageError(msg)
        if name is not None and service is not None:
            raise click.UsageError("pass --name or --service, not both")
        target = _load_app(app)
        dead_letters: DeadLetterStore | None = None
        if store_url:
            dead_letters = _dead_letters(store_url, name, service)
        elif target is not None:
            dead_letters = _app_store(target, app or "")
        config = OpsConfig(
            audit=_audit(audit_url, audit_name) if audit_url else None,
            dead_letters=dead_letters,
            outbox_engine=_outbox(db_url) if db_url else None,
            outbox_table=table,
            replayer=None if target is None or not allow_replay else _replayer(target, app or ""),
            allow_replay=allow_replay,
            redact=tuple(url for url in (audit_url, store_url, db_url) if url),
            hosts=tuple(dict.fromkeys(("127.0.0.1", "localhost", "::1", host))),
        )
        mode = "replay and purge allowed" if allow_replay else "read-only"
        shown = ", ".join(redact_url(url) for url in config.redact)
        click.echo(f"tidings ui on http://{host}:{port} ({mode}) over {shown or app}", err=True)
        if host not in ("127.0.0.1", "localhost", "::1"):
            click.echo(f"warning: the page has no login, and {host} is not localhost", err=True)
        uvicorn.run(create_app(config), host=host, port=port, log_level="warning", access_log=False)

    return ui
