"""``manage.py tidings_relay --bus module:attr``: run the outbox relay until SIGTERM/SIGINT."""

from __future__ import annotations

import importlib
import signal
import threading
from datetime import timedelta
from types import FrameType
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from tidings._untrusted import log_safe, redact_text
from tidings.bus import EventBus
from tidings.errors import UsageError
from tidings.outbox._common import Drained, drain
from tidings.ports import Transport

__all__ = ["Command"]


def _target(spec: str) -> Any:
    """Resolve ``module:attr`` (dotted attributes allowed), named by the operator."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        msg = (
            "--bus takes module:attribute naming your EventBus or Transport, not "
            f"{log_safe(spec)!r}"
        )
        raise CommandError(msg)
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        msg = f"cannot import {module_name!r} for --bus ({exc}): is it on PYTHONPATH?"
        raise CommandError(msg) from exc
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as exc:
            raise CommandError(f"--bus {spec}: {exc}") from exc
    if isinstance(target, EventBus) or (
        isinstance(target, Transport) and not isinstance(target, type)
    ):
        return target
    what = f"the class {target.__name__}" if isinstance(target, type) else (
        f"a {type(target).__name__}"
    )  # fmt: skip
    msg = (
        f"--bus {spec} is {what}, not an EventBus or a Transport: the relay publishes only "
        "through your bus (with its transport) or a transport; nothing was relayed"
    )
    raise CommandError(msg)


class Command(BaseCommand):  # type: ignore[misc]  # Django ships no type information
    """Publish committed outbox rows through an EventBus, in order per partition key.

    Rows are deleted (or, with ``--keep-published``, marked) only after the bus returned.
    Several relays may run against PostgreSQL or MySQL; SQLite takes one. On PostgreSQL it
    wakes on the ``NOTIFY`` of each ``publish`` (``--no-listen``: only poll), polling every
    ``--poll-interval`` seconds as the fallback. Stops cleanly on SIGINT/SIGTERM; ``--once``
    relays what is pending and exits.
    """

    help = (
        "Publish committed tidings outbox rows through --bus (module:attr naming your "
        "EventBus or Transport), in order per partition key. With a transport that forwards "
        "stored envelopes (memory, Redis Streams, Celery) each row is sent as stored, no "
        "event class needed; a transport routing with a function of the event (a custom "
        "route, a partition_key function) decodes rows, so the event classes must be "
        "imported. Functions and classes are refused at start."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        """Declare ``--bus``, ``--once``, ``--batch-size``, ``--poll-interval`` and more."""
        parser.add_argument(
            "--bus",
            required=True,
            metavar="MODULE:ATTR",
            help="Your EventBus (with its transport) or Transport.",
        )
        parser.add_argument("--once", action="store_true", help="Relay what is pending, exit.")
        parser.add_argument(
            "--batch-size", type=int, default=500, help="Most rows per claim (default 500)."
        )
        parser.add_argument(
            "--poll-interval",
            type=float,
            default=1.0,
            help="Seconds between polls when idle (default 1).",
        )
        parser.add_argument(
            "--keep-published",
            type=float,
            default=None,
            metavar="SECONDS",
            help="Keep published rows this long (default: delete them at once).",
        )
        parser.add_argument("--database", default=None, help="The outbox's database alias.")
        parser.add_argument(
            "--no-listen", action="store_true", help="Do not LISTEN (PostgreSQL); only poll."
        )
        parser.add_argument(
            "--max-attempts",
            type=int,
            default=5,
            help="Failures of a row of its own before it is quarantined (default 5).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        """Run the relay (see the class docstring)."""
        from tidings.integrations.django.relay import Relay  # noqa: PLC0415 - apps are ready now

        if (
            options["batch_size"] < 1
            or options["poll_interval"] <= 0
            or options["max_attempts"] < 1
        ):
            msg = "--batch-size and --max-attempts must be >= 1 and --poll-interval > 0"
            raise CommandError(msg)
        keep = options["keep_published"]
        try:
            runner = Relay(
                _target(options["bus"]),
                using=options["database"],
                batch_size=options["batch_size"],
                poll_interval=options["poll_interval"],
                keep_published=None if keep is None else timedelta(seconds=keep),
                max_attempts=options["max_attempts"],
                listen=not options["no_listen"],
            )
        except UsageError as exc:
            raise CommandError(f"--bus {options['bus']}: {exc}") from exc
        secrets = runner.secrets
        if options["once"]:
            done = Drained()
            try:
                drain(runner, done)
            except Exception as exc:  # an operator needs the cause, not a traceback
                msg = (
                    f"relaying failed after {done.relayed} events: {type(exc).__name__}: {exc}; "
                    "the unpublished rows stay pending for the next run"
                )
                raise CommandError(redact_text(msg, *secrets)) from exc
            self.stdout.write(f"Relayed {done.relayed} events.")
            problem = done.problem()
            if problem is not None:
                raise CommandError(problem)
            return
        stop = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            stop.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.stderr.write(f"Relaying the outbox to {options['bus']}; Ctrl-C to stop.")
            runner.run(stop)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
