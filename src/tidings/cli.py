"""The ``tidings`` command: ``demo``, ``dlq``, ``relay``, ``outbox status`` and ``worker``.

It needs the ``cli`` extra (click and rich). Without it, :func:`main` prints one line naming
the extra to install and exits with status 2. Importing this module only defines things; click,
rich and the demo's event types are imported when the command runs.
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
        "--orders",
        type=click.IntRange(min=1),
        default=200,
        show_default=True,
        help="Orders to place, one request each.",
    )
    @click.option(
        "--tenants",
        type=click.IntRange(min=1),
        default=2,
        show_default=True,
        help="Tenants the orders are spread over.",
    )
    @click.option(
        "--seed",
        type=int,
        default=0,
        show_default=True,
        help="Seed of the shop's data: the same seed places the same orders.",
    )
    @click.option("--quiet", is_flag=True, help="Print the summary only.")
    def demo(orders: int, tenants: int, seed: int, quiet: bool) -> None:
        """Run a small shop on the embedded default and trace one request through it.

        Orders and their events commit together in a SQLite outbox; the relay publishes them
        to the in-process event bus, whose handlers raise follow-up events.

        Exits 1 if the run does not reconcile (an order not confirmed exactly once, or an
        event whose causation chain does not lead back to its request).
        """
        from tidings.demo import print_report, run_demo  # noqa: PLC0415 - registers shop.*

        result = run_demo(orders=orders, tenants=tenants, seed=seed)
        print_report(result, rich.console.Console(), quiet=quiet)
        if result.problems:
            raise SystemExit(1)

    # The other commands live in modules of their own, which import click as this one does.
    from tidings.cli_dlq import make_dlq_group  # noqa: PLC0415
    from tidings.cli_outbox import make_outbox_group, make_relay_command  # noqa: PLC0415
    from tidings.cli_worker import make_worker_command  # noqa: PLC0415

    for command in (
        make_dlq_group(),
        make_relay_command(),
        make_outbox_group(),
        make_worker_command(),
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
