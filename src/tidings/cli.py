"""The ``tidings`` command: demo, dlq, relay, outbox, inbox, worker, trace and ui.

It needs the ``cli`` extra (click and rich). Without it, :func:`main` prints one line naming
the extra to install and exits with status 2; ``demo`` also needs the ``demo`` extra (FastAPI,
uvicorn, httpx) and says so. Importing this module only defines things; click, rich and the
demo's event types are imported when the command runs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import click

__all__ = ["main", "make_cli"]

MISSING_EXTRA_EXIT = 2


def make_cli() -> click.Group:
    """Return the ``tidings`` click group with its commands.

    Raises:
        ImportError: click or rich is not installed (the ``cli`` extra).
    """
    import click  # noqa: PLC0415 - optional extra, imported when the command runs
    import rich.console  # noqa: PLC0415

    from tidings import __version__  # noqa: PLC0415

    @click.group(name="tidings", context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(__version__, prog_name="tidings")
    def tidings() -> None:
        """Domain events that must not get lost."""

    @tidings.command()
    @click.option(
        "--requests",
        type=click.IntRange(min=1),
        default=300,
        show_default=True,
        help="Orders to place, one HTTP request each.",
    )
    @click.option(
        "--broker",
        metavar="URL",
        help="Run the handlers in Celery worker processes on this broker "
        "(redis://host:6379/0 or amqp://user:pass@host//). Default: worker threads.",
    )
    @click.option(
        "--db",
        metavar="URL",
        help="The shop's database (postgresql://user@host/db, or any SQLAlchemy URL). "
        "Default: a SQLite file in a temporary directory.",
    )
    @click.option(
        "--workers",
        type=click.IntRange(min=1),
        help="Worker threads, or Celery worker processes with --broker.  [default: 4 or 2]",
    )
    @click.option(
        "--concurrency",
        type=click.IntRange(min=1),
        default=16,
        show_default=True,
        help="Requests in flight at once.",
    )
    @click.option(
        "--seed",
        type=int,
        default=0,
        show_default=True,
        help="Same seed, same orders and the same handler failures.",
    )
    @click.option(
        "--timeout",
        type=click.FloatRange(min=1),
        default=120.0,
        show_default=True,
        help="Seconds to wait for every event to be handled before giving up.",
    )
    @click.option(
        "--ui",
        is_flag=True,
        help="At the end, start `tidings ui` (the ops page) on the run's audit trail and keep "
        "the run's stores until Ctrl-C.",
    )
    def demo(  # noqa: PLR0917 - click passes every option
        requests: int,
        broker: str | None,
        db: str | None,
        workers: int | None,
        concurrency: int,
        seed: int,
        timeout: float,
        ui: bool,
    ) -> None:
        """Run a small shop end to end and trace one request through it.

        A FastAPI app takes concurrent orders for two tenants, each request with its own
        correlation id; orders and their events commit together (outbox); the relay publishes
        them; handlers send a fake email, update a read model, raise a follow-up event, and
        one fails now and then (retries, a dead letter). Ends with a summary, one request's
        trace, and a reconciliation: exits 1 if an event was not handled once per handler.
        Then where to look: a sample of the metrics, the `tidings trace` command for that
        request and its tree from the audit trail, `tidings dlq list` and `tidings ui`.
        """
        from tidings.demo import DemoOptions, DemoResult, print_report, run_demo  # noqa: PLC0415
        from tidings.demo.look import print_look, run_ui, ui_available  # noqa: PLC0415

        console = rich.console.Console()
        options = DemoOptions(
            requests=requests,
            seed=seed,
            broker=broker,
            db=db,
            workers=workers or (2 if broker else 4),
            concurrency=concurrency,
            timeout=timeout,
        )

        def show(result: DemoResult) -> None:
            print_report(result, console)
            if result.look is not None:
                print_look(result.look, console, ui=ui)
                if ui and ui_available():
                    run_ui(result.look.trail, console)

        try:
            result = run_demo(options, console=console, while_kept=show)
        except (ImportError, RuntimeError, TimeoutError) as exc:
            from tidings._untrusted import redact_text  # noqa: PLC0415

            reason = redact_text(str(exc), broker, db)
            console.print(f"[bold red]tidings demo failed[/]: {reason}", highlight=False)
            raise SystemExit(1) from None
        if result.problems:
            raise SystemExit(1)

    # The other commands live in modules of their own, which import click as this one does.
    from tidings.cli_dlq import make_dlq_group  # noqa: PLC0415
    from tidings.cli_inbox import make_inbox_group  # noqa: PLC0415
    from tidings.cli_outbox import make_outbox_group, make_relay_command  # noqa: PLC0415
    from tidings.cli_trace import make_trace_command  # noqa: PLC0415
    from tidings.cli_ui import make_ui_command  # noqa: PLC0415
    from tidings.cli_worker import make_worker_command  # noqa: PLC0415

    for command in (
        make_dlq_group(),
        make_relay_command(),
        make_outbox_group(),
        make_inbox_group(),
        make_worker_command(),
        make_trace_command(),
        make_ui_command(),
    ):
        tidings.add_command(command)
    return tidings


def main(argv: Sequence[str] | None = None) -> None:
    """Run the ``tidings`` command with ``argv`` (default: ``sys.argv[1:]``); always exits.

    Exits 2 with a one-line message naming ``tidings[cli]`` when click or rich is missing.
    """
    try:
        cli = make_cli()
    except ImportError as exc:
        sys.stderr.write(
            f"tidings: the command line needs the 'cli' extra ({exc.name or exc} is missing): "
            "pip install 'tidings[cli]'\n"
        )
        raise SystemExit(MISSING_EXTRA_EXIT) from None
    cli.main(args=list(argv) if argv is not None else None, prog_name="tidings")
