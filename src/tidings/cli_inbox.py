"""``tidings inbox prune`` and ``migrate``: look after a SQL inbox's table.

``prune`` deletes done rows older than a retention; ``migrate`` gives a table of earlier
versions (keyed (handler, event id)) its ``source`` column (see :meth:`SqlInbox.migrate`).

:func:`tidings.cli.make_cli` attaches the group; this module is imported only then, so click
(the ``cli`` extra) is imported at the top, SQLAlchemy (the ``sql`` extra) when the command
runs. The database comes from ``--db URL`` or ``TIDINGS_INBOX_DB``; every message shows it
redacted (no password).
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import click

from tidings._untrusted import redact_url
from tidings.errors import TidingsError

__all__ = ["make_inbox_group", "parse_age"]

_AGE = re.compile(r"([0-9]{1,9})([smhdw]?)")
_UNITS = {"s": 1, "": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> timedelta:
    """Turn ``30s``, ``15m``, ``12h``, ``7d`` or ``2w`` (a bare number: seconds) into a timedelta.

    Raises:
        click.BadParameter: anything else.
    """
    found = _AGE.fullmatch(text.strip())
    if found is None:
        msg = f"{text!r} is not an age: use a number with s, m, h, d or w (like 7d)"
        raise click.BadParameter(msg)
    return timedelta(seconds=int(found[1]) * _UNITS[found[2]])


def _engine(db_url: str | None) -> tuple[Any, str]:
    """Open ``--db`` (the sql extra needed); return the engine and the URL as shown (redacted).

    Raises:
        click.UsageError: no URL, the extra or driver is missing, or the URL is malformed.
    """
    if not db_url:
        msg = "no inbox database given: pass --db URL or set TIDINGS_INBOX_DB"
        raise click.UsageError(msg)
    shown = redact_url(db_url)
    try:
        import sqlalchemy as sa  # noqa: PLC0415 - the sql extra, needed only here

        import tidings.inbox.sql  # noqa: F401, PLC0415 - its extra is there too

        return sa.create_engine(db_url), shown
    except ImportError as exc:
        msg = f"{exc}: pip install 'tidings[sql]' and the database's driver"
        raise click.UsageError(msg) from exc
    except Exception as exc:  # noqa: BLE001 - a malformed URL, an unknown dialect
        msg = f"cannot use --db {shown}: {type(exc).__name__}"
        raise click.UsageError(msg) from None


def make_inbox_group() -> click.Group:
    """Return the ``inbox`` click group: ``prune`` and ``migrate``."""

    @click.group(name="inbox")
    def inbox() -> None:
        """Look after a SQL inbox (the table of effects done once)."""

    @inbox.command()
    @click.option(
        "--db",
        "db_url",
        envvar="TIDINGS_INBOX_DB",
        metavar="URL",
        help="The database holding the inbox: sqlite:///path, postgresql+psycopg://..., "
        "mysql+pymysql://... Env: TIDINGS_INBOX_DB.",
    )
    @click.option("--table", default="tidings_inbox", show_default=True, help="The inbox table.")
    @click.option(
        "--older-than",
        "older_than",
        required=True,
        metavar="AGE",
        help="Delete rows processed longer ago than this: 30s, 15m, 12h, 7d, 2w. Keep rows "
        "longer than the broker may redeliver: a redelivery of a pruned pair runs again.",
    )
    @click.option(
        "--batch-size",
        type=click.IntRange(min=1),
        default=1000,
        show_default=True,
        help="Rows deleted per transaction.",
    )
    def prune(db_url: str | None, table: str, older_than: str, batch_size: int) -> None:
        """Delete done inbox rows older than --older-than, in short batches; print how many."""
        age = parse_age(older_than)
        engine, shown = _engine(db_url)
        from tidings.inbox.sql import SqlInbox  # noqa: PLC0415 - importable: _engine checked

        try:
            deleted = SqlInbox(engine, table_name=table).prune(age, batch_size=batch_size)
        except Exception as exc:  # noqa: BLE001 - an operator needs the cause, not a traceback
            # The driver's message may repeat the URL: only the error's type is shown with it.
            msg = f"pruning {table} in {shown} failed: {type(exc).__name__}"
            raise click.ClickException(msg) from None
        finally:
            engine.dispose()
        click.echo(f"Deleted {deleted} inbox rows older than {older_than} from {table} in {shown}.")

    @inbox.command()
    @click.option(
        "--db",
        "db_url",
        envvar="TIDINGS_INBOX_DB",
        metavar="URL",
        help="The database holding the inbox (as for prune). Env: TIDINGS_INBOX_DB.",
    )
    @click.option("--table", default="tidings_inbox", show_default=True, help="The inbox table.")
    def migrate(db_url: str | None, table: str) -> None:
        """Key the inbox by (handler, source, event id); existing rows stay done for every source.

        Adds the source column to a table made by an earlier version; a table that has it
        is left alone. Workers started before keep the old keys until they restart.
        """
        engine, shown = _engine(db_url)
        from tidings.inbox.sql import SqlInbox  # noqa: PLC0415 - importable: _engine checked

        try:
            changed = SqlInbox(engine, table_name=table).migrate()
        except TidingsError as exc:
            raise click.ClickException(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - an operator needs the cause, not a traceback
            msg = f"migrating {table} in {shown} failed: {type(exc).__name__}"
            raise click.ClickException(msg) from None
        finally:
            engine.dispose()
        if changed:
            click.echo(f"Migrated {table} in {shown}: keyed by (handler, source, event id).")
        else:
            click.echo(f"{table} in {shown} is already keyed by (handler, source, event id).")

    return inbox
