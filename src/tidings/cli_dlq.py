"""``tidings dlq``: list, show, purge and replay dead letters.

:func:`tidings.cli.make_cli` attaches the group; this module is imported only then, so click and
rich (the ``cli`` extra) are imported at the top. The store comes from ``--store URL`` or
``TIDINGS_DLQ_URL`` (see :func:`tidings.deadletter.open_store`), its key prefix from ``--name``
or ``--service`` (a transport's default store, ``tidings:dlq:<service>``), or the whole store
from ``--app`` (the bus's transport's own). Everything a dead letter holds came from a message,
so it is printed as plain text with control characters escaped, or as ASCII-only JSON: no rich
markup, no terminal escape sequences, no import or lookup driven by it.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

import click
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tidings._cli_imports import load_attribute
from tidings._untrusted import log_safe, redact_text, redact_url
from tidings.deadletter import find, iter_matching, open_store, parse_since
from tidings.errors import TidingsError
from tidings.ports import DeadLetter, DeadLetterFilter, DeadLetterStore, Replayer
from tidings.transports._defaults import dead_letter_prefix

__all__ = ["make_dlq_group"]

_F = TypeVar("_F", bound=Callable[..., object])
_COLUMNS = ("id", "failed_at", "transport", "destination", "handler", "event_type")
_REASON_WIDTH = 60
_PAGE = 500
_SERVICE_HELP = (
    "A transport's default store is per service, tidings:dlq:<service>: pass --service (the "
    "Celery queue, or the Redis Streams service name) or --app; without either, the store is "
    "tidings:dlq, where letters of older releases and of stores made with the default prefix are."
)


def _safe(text: str | None) -> Text:
    """Plain text for the terminal: LF and tab kept, every other control character escaped."""
    if text is None:
        return Text("-", style="dim")
    return Text(log_safe(text, max(len(text), 1), keep_newlines=True))


def _console(*, stderr: bool = False) -> Console:
    console = Console(stderr=stderr)
    if not console.is_terminal:  # piped or captured: no wrapping at a made-up width of 80
        console.width = 1000
    return console


def _store_options(func: _F) -> _F:
    func = click.option(
        "--service",
        envvar="TIDINGS_SERVICE",
        metavar="NAME",
        help="The service whose default Redis store to open: tidings:dlq:NAME, as the Celery "
        "(NAME: its queue) and Redis Streams (NAME: its service) transports make it. "
        "Env: TIDINGS_SERVICE.",
    )(func)
    func = click.option(
        "--name",
        envvar="TIDINGS_DLQ_NAME",
        metavar="NAME",
        help="SQL table or Redis key prefix, if not the default "
        "(tidings_dead_letters, tidings:dlq). Env: TIDINGS_DLQ_NAME.",
    )(func)
    return click.option(
        "--store",
        "store_url",
        envvar="TIDINGS_DLQ_URL",
        metavar="URL",
        help="The dead-letter store: redis://..., sqlite:///path, postgresql+psycopg://..., "
        "mysql+pymysql://... Env: TIDINGS_DLQ_URL.",
    )(func)


def _app_option(*, required: bool, help_text: str) -> Callable[[_F], _F]:
    return click.option(
        "--app", "app", required=required, metavar="MODULE:ATTRIBUTE", help=help_text
    )


_APP_STORE_HELP = (
    "Your EventBus (the same module:attr as `tidings worker --app`): without --store, its "
    "transport's own dead-letter store is used."
)


class _Since(click.ParamType):  # type: ignore[type-arg]
    """``--since``: an ISO-8601 time (UTC unless it has an offset) or an age like 30m, 2h, 7d."""

    name = "TIME|AGE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, datetime):
            return value
        try:
            return parse_since(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _filter_options(func: _F) -> _F:
    for option in reversed(
        (
            click.option("--handler", metavar="NAME", help="Only letters of this handler."),
            click.option("--event-type", metavar="TYPE", help="Only letters of this event type."),
            click.option(
                "--since",
                type=_Since(),
                help="Only letters that failed at or after this time (2026-12-01T00:00, UTC "
                "unless an offset is given) or within this age (30m, 2h, 7d).",
            ),
            click.option(
                "--reason",
                metavar="TEXT",
                help="Only letters whose reason contains TEXT (case-sensitive).",
            ),
        )
    ):
        func = option(func)
    return func


def _filter(
    handler: str | None, event_type: str | None, since: datetime | None, reason: str | None
) -> DeadLetterFilter:
    return DeadLetterFilter(handler=handler, event_type=event_type, since=since, reason=reason)


def _describe(where: DeadLetterFilter) -> str:
    """The filter as the options that made it, for a title or a prompt."""
    parts = [
        f"{flag} {value!r}"
        for flag, value in (
            ("--handler", where.handler),
            ("--event-type", where.event_type),
            ("--reason", where.reason),
        )
        if value is not None
    ]
    if where.since is not None:
        parts.append(f"--since {where.since.astimezone(UTC):%Y-%m-%dT%H:%M:%S}Z")
    return " ".join(parts)


def _app_store(target: object, spec: str) -> DeadLetterStore:
    """The dead-letter store of the bus (or transport) ``--app`` names."""
    from tidings.bus import EventBus  # noqa: PLC0415 - keeps `tidings --help` light

    transport = target.transport if isinstance(target, EventBus) else target
    store = getattr(transport, "dead_letters", None)
    if not isinstance(store, DeadLetterStore):
        msg = (
            f"--app {spec} names a {type(transport).__name__}, which has no dead-letter store "
            "(no dead_letters attribute): pass --store URL, and --service or --name"
        )
        raise click.ClickException(msg)
    return store


@contextmanager
def _opened(
    url: str | None,
    name: str | None,
    service: str | None = None,
    app: object | None = None,
    app_spec: str = "",
) -> Iterator[DeadLetterStore]:
    """Open the store, close it after, and turn its failures into one-line messages.

    ``--store`` (with ``--name`` or ``--service``) wins; without it, ``--app``'s transport's
    own store is used as it is, and left open (it is the transport's).
    """
    name, service = _name_or_service(name, service)
    if not url and app is not None:
        if name is not None or service is not None:
            msg = (
                "--name and --service pick the store at --store URL; without --store, --app's "
                "transport's own store is used: drop them, or pass --store"
            )
            raise click.UsageError(msg)
        store = _app_store(app, app_spec)
        with _failures(f"of --app {app_spec}"):
            yield store
        return
    if not url:
        msg = (
            "no dead-letter store given: pass --store URL or set TIDINGS_DLQ_URL, e.g. "
            "redis://localhost:6379/0 or postgresql+psycopg://user@host/db (or pass --app)"
        )
        raise click.UsageError(msg)
    if service is not None:
        if urlsplit(url).scheme.lower() not in ("redis", "rediss"):
            msg = (
                "--service picks a transport's default store, which is in Redis; a SQL store "
                "is the table given to the transport: pass --name TABLE"
            )
            raise click.UsageError(msg)
        name = dead_letter_prefix(service)
    try:
        store = open_store(url, name=name, must_exist=True)
    except (TidingsError, ImportError) as exc:  # a URL tidings cannot use, a missing extra
        raise click.UsageError(redact_text(str(exc), url)) from exc
    try:
        with _failures(f"at {redact_url(url)}", url):
            yield store
    finally:
        close = getattr(store, "close", None)
        if callable(close):
            close()


def _name_or_service(name: str | None, service: str | None) -> tuple[str | None, str | None]:
    """Both given: the one on the command line wins over the other's environment variable."""
    if name is None or service is None:
        return name, service
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        env = click.core.ParameterSource.ENVIRONMENT
        name_from_env = ctx.get_parameter_source("name") == env
        service_from_env = ctx.get_parameter_source("service") == env
        if name_from_env != service_from_env:
            return (None, service) if name_from_env else (name, None)
    raise click.UsageError("pass --name or --service, not both")


@contextmanager
def _failures(where: str, secret: str = "") -> Iterator[None]:
    """Turn a store's failure into one line naming ``where`` (secrets of ``secret`` hidden)."""
    try:
        yield
    except (click.ClickException, click.exceptions.Exit, click.Abort):
        raise
    except Exception as exc:  # an operator needs the cause, not a traceback
        msg = f"the dead-letter store {where} failed: {type(exc).__name__}: {exc}"
        raise click.ClickException(redact_text(msg, secret) if secret else msg) from exc


def _is_shared_redis(url: str | None, name: str | None, service: str | None) -> bool:
    """Whether the store is Redis at the shared default prefix (no --name, --service)."""
    scheme = urlsplit(url or "").scheme.lower()
    return scheme in ("redis", "rediss") and name is None and service is None


def _summary(letter: DeadLetter) -> dict[str, object]:
    """The JSON of a letter without its body and traceback (``list --json``)."""
    return {
        "id": letter.id,
        "failed_at": letter.failed_at,
        "transport": letter.transport,
        "destination": letter.destination,
        "handler": letter.handler,
        "event_type": letter.event_type,
        "event_id": letter.event_id,
        "attempts": letter.attempts,
        "reason": letter.reason,
        "headers": letter.headers,
        "body_bytes": len(letter.body),
    }


def _full(letter: DeadLetter) -> dict[str, object]:
    """The JSON of a whole letter (``show --json``): the body exactly, in base64."""
    document = _summary(letter)
    document["traceback"] = letter.traceback
    document["body_base64"] = base64.b64encode(letter.body).decode("ascii")
    try:
        document["body_text"] = letter.body.decode("utf-8")
    except UnicodeDecodeError:
        document["body_text"] = None
    return document


def _echo_json(document: object) -> None:
    """Print ``document`` as JSON in ASCII: every control character from a message escaped."""
    click.echo(json.dumps(document, ensure_ascii=True, indent=2, default=str))


def _table(letters: list[DeadLetter], title: str) -> Table:
    """A row per letter; id and time never wrap, so the id can be copied into show or replay."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("id", no_wrap=True)
    table.add_column("failed_at (UTC)", no_wrap=True)
    for column in (*_COLUMNS[2:], "attempts", "reason"):
        table.add_column(
            column, overflow="fold", justify="right" if column == "attempts" else "left"
        )
    for letter in letters:
        cells = [_safe(getattr(letter, column)) for column in _COLUMNS]
        # The table shows seconds in UTC; `show` gives the exact value.
        cells[1] = _safe(letter.failed_at[:19].replace("T", " "))
        reason = letter.reason.strip().partition("\n")[0]
        if len(reason) > _REASON_WIDTH:
            reason = reason[: _REASON_WIDTH - 1] + "…"
        table.add_row(*cells, Text(str(letter.attempts)), _safe(reason))
    return table


def _print_letter(console: Console, letter: DeadLetter) -> None:
    fields = Table.grid(padding=(0, 2))
    for field in (*_COLUMNS, "event_id", "attempts", "reason"):
        value = getattr(letter, field)
        fields.add_row(Text(field, style="bold"), _safe(None if value is None else str(value)))
    headers = _safe(json.dumps(letter.headers, indent=2, ensure_ascii=False, default=str))
    try:
        body, kind = _safe(letter.body.decode("utf-8")), "UTF-8 text"
    except UnicodeDecodeError:
        rows = range(0, len(letter.body), 16)
        body = Text("\n".join(f"{i:08x}  {letter.body[i : i + 16].hex(' ')}" for i in rows))
        kind = "not UTF-8, in hex"
    console.print(fields)
    for title, text in (
        ("headers", headers),
        (f"body ({len(letter.body)} bytes, {kind})", body),
        ("traceback", _safe(letter.traceback or "(none)")),
    ):
        console.print(Text(f"\n{title}:", style="bold"), text, sep="\n")


def _load_app(spec: str | None) -> object | None:
    """Import ``module:attribute`` named on the operator's command line (``--app``)."""
    return None if spec is None else load_attribute(spec, "--app", "myproject.wiring:bus")


def _replayer(target: object, spec: str) -> Replayer:
    """The Replayer of the ``--app`` object.

    The same ``module:attr`` as ``tidings worker --app`` (the composition root's
    :class:`~tidings.EventBus`) names the bus's transport; a transport (any object with a
    ``replay(letter)`` method) is taken as it is, as before.
    """
    from tidings.bus import EventBus  # noqa: PLC0415 - keeps `tidings --help` light

    if isinstance(target, EventBus):
        transport = target.transport
        if not isinstance(transport, Replayer):
            msg = (
                f"--app {spec} is an EventBus whose transport, a {type(transport).__name__}, "
                "cannot replay dead letters: point --app at a bus on a Celery or Redis Streams "
                "transport"
            )
            raise click.ClickException(msg)
        return transport
    if not isinstance(target, Replayer):
        msg = (
            f"--app {spec} is a {type(target).__name__}, neither an EventBus nor a Replayer: "
            "point it at your bus (as for `tidings worker --app`) or at its transport"
        )
        raise click.ClickException(msg)
    return target


def _matching_ids(store: DeadLetterStore, where: DeadLetterFilter) -> list[str]:
    """Every matching letter's id, oldest first, read before acting (so re-dead-letters wait)."""
    ids = dict.fromkeys(letter.id for letter in iter_matching(store, where, page_size=_PAGE))
    return list(reversed(ids))


def _replay_one(store: DeadLetterStore, replayer: Replayer, letter_id: str) -> bool:
    """Replay one letter and remove it after the replay returned; say what happened."""
    console, errors = _console(), _console(stderr=True)
    letter = store.get(letter_id)
    if letter is None:
        errors.print(Text.assemble("no dead letter with id ", _safe(letter_id)))
        return False
    try:
        replayer.replay(letter)
    except Exception as exc:  # noqa: BLE001 - any failure keeps the letter, and is reported
        error = _safe(f"{type(exc).__name__}: {exc}")
        stays = " failed; the letter stays in the store: "
        errors.print(Text.assemble("replay of ", _safe(letter.id), stays, error))
        return False
    try:
        store.remove(letter.id)
    except Exception as exc:  # say the replay happened first
        msg = (
            f"replayed {letter.id}, but removing it from the store failed "
            f"({type(exc).__name__}: {exc}); a later replay sends it again (the inbox "
            "keeps its effect from repeating)"
        )
        raise click.ClickException(msg) from exc
    console.print(Text.assemble("replayed ", _safe(letter.id), " to ", _safe(letter.destination)))
    return True


def make_dlq_group() -> click.Group:
    """Return the ``dlq`` click group: ``list``, ``show``, ``purge`` and ``replay``."""

    @click.group(name="dlq", epilog=_SERVICE_HELP)
    def dlq() -> None:
        """Inspect, replay and purge dead letters (deliveries that failed for good)."""

    _add_reading_commands(dlq)
    _add_changing_commands(dlq)
    dlq.add_command(make_outbox_quarantine_group())
    return dlq


def _add_reading_commands(dlq: click.Group) -> None:
    """Attach ``list`` and ``show`` to ``dlq``."""

    @dlq.command(name="list", epilog=_SERVICE_HELP)
    @_store_options
    @_app_option(required=False, help_text=_APP_STORE_HELP)
    @_filter_options
    @click.option("--limit", type=click.IntRange(min=1), default=50, help="At most this many.")
    @click.option("--offset", type=click.IntRange(min=0), default=0, help="Skip this many.")
    @click.option("--json", "as_json", is_flag=True, help="Print a JSON array (without bodies).")
    def list_(  # noqa: PLR0917 - click passes every option
        store_url: str | None,
        name: str | None,
        service: str | None,
        app: str | None,
        handler: str | None,
        event_type: str | None,
        since: datetime | None,
        reason: str | None,
        limit: int,
        offset: int,
        as_json: bool,
    ) -> None:
        """List dead letters, newest first, a row each; the filters all must hold."""
        where = _filter(handler, event_type, since, reason)
        with _opened(store_url, name, service, _load_app(app), app or "") as store:
            total = store.count()
            letters = find(store, where, limit=limit, offset=offset)
        if as_json:
            _echo_json([_summary(letter) for letter in letters])
            return
        matching = "" if where.is_empty else f" matching {_describe(where)}"
        if not letters:
            click.echo(f"No dead letters here{matching} ({total} in the store).")
            if not total and _is_shared_redis(store_url, name, service):
                click.echo(_SERVICE_HELP)
            return
        span = f"{offset + 1}-{offset + len(letters)}"
        title = (
            f"Dead letters {span} of {total}, newest first"
            if where.is_empty
            else f"Dead letters {span}{matching}, newest first ({total} in the store)"
        )
        _console().print(_table(letters, _safe(title).plain))

    @dlq.command()
    @_store_options
    @_app_option(required=False, help_text=_APP_STORE_HELP)
    @click.option("--json", "as_json", is_flag=True, help="Print JSON: the body in base64.")
    @click.argument("letter_id", metavar="ID")
    def show(  # noqa: PLR0917 - click passes every option
        store_url: str | None,
        name: str | None,
        service: str | None,
        app: str | None,
        as_json: bool,
        letter_id: str,
    ) -> None:
        """Show every field of one dead letter: headers, body (text or hex), traceback."""
        with _opened(store_url, name, service, _load_app(app), app or "") as store:
            letter = store.get(letter_id)
        if letter is None:
            raise click.ClickException(f"no dead letter with id {letter_id!r}")
        if as_json:
            _echo_json(_full(letter))
            return
        _print_letter(_console(), letter)


def _add_changing_commands(dlq: click.Group) -> None:
    """Attach ``purge`` and ``replay`` to ``dlq``."""

    @dlq.command()
    @_store_options
    @_app_option(required=False, help_text=_APP_STORE_HELP)
    @_filter_options
    @click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
    def purge(  # noqa: PLR0917 - click passes every option
        store_url: str | None,
        name: str | None,
        service: str | None,
        app: str | None,
        handler: str | None,
        event_type: str | None,
        since: datetime | None,
        reason: str | None,
        yes: bool,
    ) -> None:
        """Delete dead letters (every one, or those the filters match), after confirmation.

        They cannot be replayed afterwards. With filters, the letters matching when the command
        starts are counted, shown in the prompt, and only they are deleted.
        """
        where = _filter(handler, event_type, since, reason)
        with _opened(store_url, name, service, _load_app(app), app or "") as store:
            if where.is_empty:
                count = store.count()
                if not count:
                    click.echo("No dead letters to purge.")
                    return
                if not yes:
                    click.confirm(f"Delete all {count} dead letters for good?", abort=True)
                click.echo(f"Purged {store.purge()} dead letters.")
                return
            ids = _matching_ids(store, where)
            matching = _safe(_describe(where)).plain
            if not ids:
                click.echo(f"No dead letters matching {matching} to purge.")
                return
            if not yes:
                prompt = f"Delete the {len(ids)} dead letters matching {matching} for good?"
                click.confirm(prompt, abort=True)
            purged = sum(store.remove(letter_id) for letter_id in ids)
        click.echo(f"Purged {purged} dead letters.")

    @dlq.command(epilog=_SERVICE_HELP)
    @_store_options
    @_filter_options
    @click.argument("letter_ids", metavar="[ID]...", nargs=-1)
    @click.option("--all", "all_", is_flag=True, help="Replay every dead letter, oldest first.")
    @_app_option(
        required=True,
        help_text="Your EventBus (the same module:attr as `tidings worker --app`), or its "
        "transport (any tidings.ports.Replayer), imported from this command line; the current "
        "directory is searched after installed packages. Without --store, the store is the "
        "transport's own.",
    )
    def replay(  # noqa: PLR0917 - click passes every option
        store_url: str | None,
        name: str | None,
        service: str | None,
        handler: str | None,
        event_type: str | None,
        since: datetime | None,
        reason: str | None,
        letter_ids: tuple[str, ...],
        all_: bool,
        app: str,
    ) -> None:
        """Send dead letters back to where they came from, then remove them from the store.

        Name them by ID, or pass --all or filters (--handler, --event-type, --since,
        --reason): the letters matching when the command starts are replayed, oldest first.

        A replay is a real retry: the letter's handler (or every handler, when none is named)
        gets a fresh attempt budget, its retry policy's max_attempts, as a first delivery.

        A letter is removed only after the replayer returned; a failed replay leaves it in
        place, and the command exits 1. The --app object is the only thing imported from
        input, and that input is this command line: nothing in a dead letter's data is ever
        imported or looked up.
        """
        where = _filter(handler, event_type, since, reason)
        by_filter = all_ or not where.is_empty
        if by_filter == bool(letter_ids):
            msg = "name the letters to replay by ID, or pass --all or filters (not both)"
            raise click.UsageError(msg)
        target = _load_app(app)
        replayer = _replayer(target, app)
        with _opened(store_url, name, service, target, app) as store:
            ids = _matching_ids(store, where) if by_filter else list(letter_ids)
            replayed = sum(_replay_one(store, replayer, letter_id) for letter_id in ids)
        if len(ids) != 1 or replayed != 1:
            click.echo(f"Replayed {replayed} of {len(ids)} dead letters.")
        if replayed < len(ids):
            click.echo(f"{len(ids) - replayed} not replayed (see above).", err=True)
            raise SystemExit(1)


# -- the outbox's quarantine: rows the relay gave up on ------------------------------------


def make_outbox_quarantine_group() -> click.Group:
    """Return ``dlq outbox``: ``list``, ``show``, ``requeue`` and ``purge`` quarantined rows."""
    from tidings.cli_outbox import _db_option, _engine  # noqa: PLC0415 - same extras

    @click.group(name="outbox")
    def outbox() -> None:
        """Outbox rows the relay quarantined (undecodable, or refused by the transport)."""

    @outbox.command(name="list")
    @_db_option
    @click.option("--limit", type=click.IntRange(min=1), default=50, help="At most this many.")
    @click.option("--offset", type=click.IntRange(min=0), default=0, help="Skip this many.")
    def list_rows(db_url: str | None, table: str, limit: int, offset: int) -> None:
        """List quarantined rows, oldest first, with their reason and age."""
        from tidings.outbox import Outbox  # noqa: PLC0415 - the sql extra

        with _engine(db_url) as engine:
            rows = Outbox(table_name=table).quarantined(engine, limit=limit, offset=offset)
        if not rows:
            click.echo("No quarantined outbox rows.")
            return
        view = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        for column in ("row", "event id", "event type", "key", "attempts", "age (s)", "reason"):
            view.add_column(column, overflow="fold")
        for row in rows:
            reason = row.reason[:_REASON_WIDTH]
            view.add_row(str(row.id), _safe(row.event_id), _safe(row.event_type),
                         _safe(row.partition_key), str(row.attempts), f"{row.age:.1f}",
                         _safe(reason))  # fmt: skip
        _console().print(view)

    @outbox.command(name="show")
    @_db_option
    @click.argument("row_id", type=int)
    def show_row(db_url: str | None, table: str, row_id: int) -> None:
        """Show one quarantined row in full: its reason and its envelope as stored."""
        from tidings.outbox import Outbox  # noqa: PLC0415 - the sql extra

        with _engine(db_url) as engine:
            found = Outbox(table_name=table).quarantined(engine, limit=1, ids=[row_id])
        if not found:
            raise click.ClickException(f"no quarantined outbox row {row_id}")
        row = found[0]
        console = _console()
        for label, value in (("row", str(row.id)), ("event id", row.event_id),
                             ("event type", row.event_type), ("partition key", row.partition_key),
                             ("attempts", str(row.attempts)), ("age", f"{row.age:.1f} s"),
                             ("quarantined", f"{row.quarantined_age:.1f} s ago"),
                             ("reason", row.reason)):  # fmt: skip
            console.print(Text(f"{label}: ").append(_safe(value)))
        console.print(Text("payload: ").append(_safe(row.payload)))

    @outbox.command(name="requeue")
    @_db_option
    @click.argument("row_ids", nargs=-1, type=int)
    @click.option("--all", "all_", is_flag=True, help="Re-queue every quarantined row.")
    def requeue(db_url: str | None, table: str, row_ids: tuple[int, ...], all_: bool) -> None:
        """Put quarantined rows back into the outbox (new pending rows) for the relay.

        Fix the cause first (a transport option, a producer bug): a row that fails again is
        quarantined again after the relay's bound of attempts.
        """
        if all_ == bool(row_ids):
            raise click.UsageError("name the rows to re-queue by ID, or pass --all")
        from tidings.outbox import Outbox  # noqa: PLC0415 - the sql extra

        with _engine(db_url) as engine:
            moved = Outbox(table_name=table).requeue(engine, None if all_ else row_ids)
        click.echo(f"Re-queued {moved} quarantined row(s) into {table}.")
        if not all_ and moved < len(row_ids):
            click.echo(f"{len(row_ids) - moved} not found in the quarantine.", err=True)
            raise SystemExit(1)

    @outbox.command(name="purge")
    @_db_option
    @click.argument("row_ids", nargs=-1, type=int)
    @click.option("--all", "all_", is_flag=True, help="Delete every quarantined row.")
    @click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
    def purge_rows(
        db_url: str | None, table: str, row_ids: tuple[int, ...], all_: bool, yes: bool
    ) -> None:
        """Delete quarantined rows for good (their events are then lost: this is final)."""
        if all_ == bool(row_ids):
            raise click.UsageError("name the rows to delete by ID, or pass --all")
        if not yes:
            click.confirm("Delete these quarantined outbox rows for good?", abort=True)
        from tidings.outbox import Outbox  # noqa: PLC0415 - the sql extra

        with _engine(db_url) as engine:
            gone = Outbox(table_name=table).discard_quarantined(engine, None if all_ else row_ids)
        click.echo(f"Deleted {gone} quarantined row(s).")

    return outbox
