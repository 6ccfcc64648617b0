"""``tidings relay`` and ``tidings outbox status``: run the outbox relay, see what waits.

:func:`tidings.cli.make_cli` attaches both; this module is imported only then, so click and
rich (the ``cli`` extra) are imported at the top, SQLAlchemy (the ``sql`` extra) when a
command runs. The database comes from ``--db URL`` or ``TIDINGS_OUTBOX_DB``.

``--transport`` says where rows go (see :data:`TRANSPORT_HELP`). The relay is a pipe: it
forwards each row's envelope as stored, so it needs none of the event classes, and it accepts
only a transport or a bus: a function or a class named by ``module:attribute`` is refused at
start-up, before any row is touched.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from datetime import timedelta
from types import FrameType
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import click
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tidings._cli_imports import configure_logging, import_module, load_attribute
from tidings._cli_metrics import metrics_options, serve
from tidings._redis_persistence import describe_url, warn_url_if_forgetful
from tidings._untrusted import log_safe, redact_text, redact_url
from tidings.bus import EventBus
from tidings.errors import TidingsError, UsageError
from tidings.ports import Transport

if TYPE_CHECKING:
    import sqlalchemy as sa

__all__ = ["TRANSPORT_HELP", "make_outbox_group", "make_relay_command"]

TRANSPORT_HELP = """\b
Where rows go (env TIDINGS_RELAY_TRANSPORT):
  redis://[:PASSWORD@]HOST:PORT/DB  (or rediss://) Redis Streams, one stream per event type,
      as RedisStreamsTransport workers read them. Options, which must match the workers':
      ?prefix=P (stream prefix, default tidings:stream), &partitions=N with
      &partition_key=ATTR (an attribute of the events' data, e.g. aggregate_id).
  celery+redis://HOST:PORT/DB  or  celery+amqp://USER:PASSWORD@HOST//
      Celery task messages for CeleryTransport workers, routed by event type: each event
      goes to the queues of the services subscribed to its type (the Redis subscription
      registry, or RabbitMQ's exchange bindings), as the workers' own publishers send them.
      ?exchange=NAME if the services set exchange= (default tidings.events);
      ?queues=A,B instead sends every event to every queue named (the legacy fan-out).
  memory://  an in-process queue no worker reads: rows are drained and dropped (trying out).
  module:attribute  your EventBus (with its transport) or a Transport object. A transport
      that routes with a function of the event (a custom route, or a partition_key given as
      a function) needs the event classes: it is refused at start-up; give partition_key as
      an attribute name, or run Relay(..., decode=True) in your own process.
\b
The relay forwards each envelope as stored and needs no event class (no --import)."""

_DB_HELP = (
    "The database holding the outbox: sqlite:///path, postgresql+psycopg://..., "
    "mysql+pymysql://... Env: TIDINGS_OUTBOX_DB."
)


def _target(spec: str) -> EventBus | Transport:
    """Turn ``--transport`` into the bus or transport the relay forwards envelopes through."""
    if spec == "memory://":
        from tidings.memory import MemoryDeadLetterStore  # noqa: PLC0415
        from tidings.transports.memory import MemoryBroker, MemoryTransport  # noqa: PLC0415

        memory = MemoryTransport(dead_letters=MemoryDeadLetterStore(), broker=MemoryBroker())
        return EventBus(transport=memory)
    if spec.startswith(("redis://", "rediss://", "celery+")):
        return EventBus(transport=_broker_transport(spec))
    if "/" in spec:
        msg = (
            "--transport takes redis://..., celery+redis://..., celery+amqp://..., memory:// "
            "or module:attribute (your EventBus or Transport), not "
            f"{redact_url(spec)!r}"
        )
        raise click.UsageError(msg)
    target: Any = load_attribute(spec, "--transport", "myproject.wiring:bus")
    if isinstance(target, EventBus) and target.transport is not None:
        return target
    if isinstance(target, Transport) and not isinstance(target, type):
        return target
    if isinstance(target, EventBus):
        msg = (
            f"--transport {spec} is an EventBus without a transport: the relay forwards rows to "
            "a broker; name a bus created with EventBus(transport=...), or its transport"
        )
        raise click.UsageError(msg)
    what = f"the class {target.__name__}" if isinstance(target, type) else (
        f"a {type(target).__name__}"
    )  # fmt: skip
    msg = (
        f"--transport {spec} is {what}, not an EventBus or a Transport: the relay forwards "
        "rows only through a bus (with its transport) or a transport; nothing was relayed"
    )
    raise click.UsageError(msg)


def _broker_transport(spec: str) -> Transport:
    """A publish-only transport for a broker URL (see the module docstring for the options)."""
    from tidings.memory import MemoryDeadLetterStore  # noqa: PLC0415

    parts = urlsplit(spec)
    options = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    url = urlunsplit((parts.scheme.removeprefix("celery+"), parts.netloc, parts.path, "", ""))
    # A relay only publishes: what a worker would dead-letter never reaches it.
    letters = MemoryDeadLetterStore()
    transport: Transport
    try:
        if parts.scheme.startswith("celery+"):
            from celery import Celery  # noqa: PLC0415 - the celery extra

            from tidings.transports._celery_routing import DEFAULT_EXCHANGE  # noqa: PLC0415
            from tidings.transports.celery import CeleryTransport  # noqa: PLC0415

            queues = [q for q in options.get("queues", "").split(",") if q]
            app = Celery("tidings-relay", broker=url)
            # The relay only publishes: no handler runs here, so no inbox (explicitly). Without
            # ?queues= it routes by type, to the queues the services' workers subscribed.
            transport = CeleryTransport(
                app,
                queue=queues[0] if queues else "tidings-relay",
                publish_to=queues or None,
                dead_letters=letters,
                inbox=None,
                exchange=options.get("exchange") or DEFAULT_EXCHANGE,
            )
        else:
            import redis  # noqa: PLC0415 - the redis extra

            from tidings.transports.redis_streams import (  # noqa: PLC0415
                RedisStreamsTransport,
            )

            partitions = options.get("partitions")
            transport = RedisStreamsTransport(
                redis.Redis.from_url(url),
                service="tidings-relay",
                dead_letters=letters,
                inbox=None,  # the relay only publishes: no handler runs here
                stream_prefix=options.get("prefix", "tidings:stream"),
                partitions=int(partitions) if partitions else None,
                partition_key=options.get("partition_key"),
            )
    except ImportError as exc:
        raise click.ClickException(redact_text(f"--transport {spec}: {exc}", spec)) from exc
    except (TidingsError, ValueError) as exc:
        raise click.UsageError(redact_text(f"--transport {spec}: {exc}", spec)) from exc
    return transport


@contextmanager
def _engine(url: str | None) -> Iterator[sa.Engine]:
    if not url:
        msg = "no outbox database given: pass --db URL or set TIDINGS_OUTBOX_DB"
        raise click.UsageError(msg)
    try:
        from tidings._sql import create_engine  # noqa: PLC0415 - the sql extra, needed only here

        engine = create_engine(url, must_exist=True)
    except ImportError as exc:
        msg = f"{exc}: pip install 'tidings[sql]' and the database's driver"
        raise click.UsageError(redact_text(msg, url)) from exc
    except UsageError as exc:  # a SQLite file that does not exist
        raise click.UsageError(redact_text(str(exc), url)) from exc
    except Exception as exc:  # a malformed URL, an unknown dialect
        msg = f"cannot use --db: {type(exc).__name__}: {exc}"
        raise click.UsageError(redact_text(msg, url)) from exc
    try:
        yield engine
    except (click.ClickException, click.exceptions.Exit, click.Abort):
        raise
    except (TidingsError, Exception) as exc:  # an operator needs the cause, not a traceback
        msg = f"the outbox database failed: {type(exc).__name__}: {exc}"
        raise click.ClickException(redact_text(msg, url)) from exc
    finally:
        engine.dispose()


def _db_option(func: Any) -> Any:
    func = click.option(
        "--table",
        default="tidings_outbox",
        show_default=True,
        envvar="TIDINGS_OUTBOX_TABLE",
        help="The outbox table. Env: TIDINGS_OUTBOX_TABLE.",
    )(func)
    return click.option("--db", "db_url", envvar="TIDINGS_OUTBOX_DB", metavar="URL", help=_DB_HELP)(
        func
    )


def make_relay_command() -> click.Command:
    """Return the ``relay`` command: run a relay until SIGINT/SIGTERM (or drain with --once)."""

    @click.command(name="relay", epilog=TRANSPORT_HELP)
    @_db_option
    @click.option(
        "--transport",
        "transport_spec",
        envvar="TIDINGS_RELAY_TRANSPORT",
        required=True,
        metavar="SPEC",
        help="redis://..., celery+redis://..., celery+amqp://..., "
        "memory:// or module:attribute (your EventBus or Transport); see below. "
        "Env: TIDINGS_RELAY_TRANSPORT.",
    )
    @click.option(
        "--import",
        "imports",
        multiple=True,
        metavar="MODULE",
        help="Import this module first (your own set-up code); repeatable. Event classes are "
        "not needed.",
    )
    @click.option("--batch-size", type=click.IntRange(min=1), default=500, show_default=True)
    @click.option(
        "--poll-interval",
        type=click.FloatRange(min=0.01),
        default=1.0,
        show_default=True,
        help="Seconds between polls when idle.",
    )
    @click.option("--no-listen", is_flag=True, help="Do not LISTEN (PostgreSQL); only poll.")
    @click.option(
        "--keep-published",
        type=click.FloatRange(min=0),
        default=None,
        metavar="SECONDS",
        help="Keep published rows this long (default: delete them at once).",
    )
    @click.option(
        "--max-attempts",
        type=click.IntRange(min=1),
        default=5,
        show_default=True,
        help="Failures of a row of its own (undecodable, refused by the transport) before it "
        "moves to the quarantine table and its key goes on.",
    )
    @click.option(
        "--once",
        is_flag=True,
        help="Relay what is pending, then exit: status 0 when every row was relayed, 1 when "
        "a row could not be (quarantined, or still pending).",
    )
    @click.option(
        "--loglevel",
        type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
        default="INFO",
        show_default=True,
    )
    @metrics_options
    def relay(  # noqa: PLR0917 - click passes every option
        db_url: str | None,
        table: str,
        transport_spec: str,
        imports: Sequence[str],
        batch_size: int,
        poll_interval: float,
        no_listen: bool,
        keep_published: float | None,
        max_attempts: int,
        once: bool,
        loglevel: str,
        metrics_port: int | None,
        metrics_host: str,
    ) -> None:
        """Forward committed outbox rows to the broker, in order per partition key.

        Each row's envelope is sent as stored (no event class needed). Rows are deleted (or
        marked) only after the broker confirmed. A row that cannot be relayed holds its key
        for up to --max-attempts tries, then moves to the quarantine table (`tidings outbox
        status`, `tidings dlq outbox`). Several relays may run against PostgreSQL or MariaDB;
        SQLite takes one. Stops cleanly on SIGINT/SIGTERM. With --metrics-port, Prometheus
        metrics (relayed events, batch sizes, lag, the table's backlog) are served.
        """
        configure_logging(loglevel, db_url, transport_spec)
        for module in imports:
            import_module(module, "--import")
        target = _target(transport_spec)
        warn_url_if_forgetful(transport_spec, "the relay's broker")  # a Redis keeping nothing
        with ExitStack() as cleanup:
            transport = target.transport if isinstance(target, EventBus) else target
            if transport is not None:
                cleanup.callback(transport.close)
            from tidings.outbox import Outbox, Relay  # noqa: PLC0415 - the sql extra

            keep = None if keep_published is None else timedelta(seconds=keep_published)
            with _engine(db_url) as engine:
                outbox = Outbox(table_name=table)
                try:
                    runner = Relay(
                        engine,
                        outbox,
                        target,
                        batch_size=batch_size,
                        poll_interval=poll_interval,
                        listen=not no_listen,
                        keep_published=keep,
                        max_attempts=max_attempts,
                        decode=False,
                        redact=[transport_spec],
                    )
                except UsageError as exc:
                    shown = redact_text(str(exc), transport_spec, db_url)
                    msg = f"--transport {redact_url(transport_spec)}: {shown}"
                    raise click.UsageError(msg) from exc
                if serve(metrics_port, metrics_host, service=None):
                    from tidings.integrations.prometheus import watch_outbox  # noqa: PLC0415

                    watch_outbox(engine, outbox)
                if once:
                    _create_quarantine(engine, outbox)
                    _drain(runner, transport_spec, db_url, *runner.secrets)
                    return
                stop = threading.Event()

                def on_signal(signum: int, frame: FrameType | None) -> None:
                    stop.set()

                previous = {
                    sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
                }
                try:
                    _start_when_reachable(
                        stop, lambda: _create_quarantine(engine, outbox), db_url, transport_spec
                    )
                    click.echo(
                        f"Relaying {table} to {redact_url(transport_spec)}; Ctrl-C to stop.",
                        err=True,
                    )
                    runner.run(stop)
                finally:
                    for sig, handler in previous.items():
                        signal.signal(sig, handler)

    return relay


def _broker_option(func: Any) -> Any:
    return click.option(
        "--transport",
        "transport_spec",
        envvar="TIDINGS_RELAY_TRANSPORT",
        default=None,
        metavar="SPEC",
        help="The relay's --transport: for redis://... or celery+redis://..., also show what "
        "that Redis keeps on disk. Env: TIDINGS_RELAY_TRANSPORT.",
    )(func)


def _echo_broker(transport_spec: str | None) -> None:
    """Print what the relay's Redis keeps on disk (nothing for other transports)."""
    line = None if not transport_spec else describe_url(transport_spec)
    if line is not None:
        click.echo(line)


_START_RETRY = (0.5, 5.0)
"""The first and the longest wait (s) between tries of a relay's start-up query."""


def _start_when_reachable(
    stop: threading.Event, start: Callable[[], None], *secrets: str | None
) -> None:
    """Run ``start`` (the relay's start-up query) until it succeeds or ``stop`` is set.

    A long-running relay that finds its database unreachable as it starts (restarted during a
    failover, or while connections are being terminated) waits and tries again, with a warning
    each time, as its loop does after a failure, rather than exiting; ``--once`` fails at once.
    ``secrets`` (the URLs) are redacted from the warning.
    """
    wait, longest = _START_RETRY
    while not stop.is_set():
        try:
            start()
        except Exception as exc:  # noqa: BLE001 - any database error: tried again
            logging.getLogger("tidings.outbox.relay").warning(
                "the outbox database cannot be reached (%s); trying again in %.1f s",
                log_safe(redact_text(f"{type(exc).__name__}: {exc}", *secrets), 300),
                wait,
            )
            stop.wait(wait)
            wait = min(wait * 2, longest)
        else:
            return


def _create_quarantine(engine: sa.Engine, outbox: Any) -> None:
    """Create the quarantine table next to an existing outbox table, when it is missing."""
    import sqlalchemy as sa  # noqa: PLC0415 - the sql extra

    inspector = sa.inspect(engine)
    if not inspector.has_table(outbox.table.name) or inspector.has_table(outbox.quarantine.name):
        return
    try:
        outbox.quarantine.create(engine, checkfirst=True)
    except Exception:  # a relay without CREATE rights: it warns and holds poison rows instead
        logging.getLogger("tidings.outbox.relay").warning(
            "cannot create the quarantine table %s", outbox.quarantine.name, exc_info=True
        )
    else:
        logging.getLogger("tidings.outbox.relay").info(
            "created the outbox quarantine table %s", outbox.quarantine.name
        )


def _drain(runner: Any, transport_spec: str, db_url: str | None, *secrets: str) -> None:
    """``--once``: relay until nothing moves; exit 1 if a row could not be relayed."""
    from tidings.outbox._common import Drained, drain  # noqa: PLC0415

    done = Drained()
    try:
        drain(runner, done)
    except (click.ClickException, click.exceptions.Exit, click.Abort):
        raise
    except Exception as exc:  # an operator needs the cause, not a traceback
        msg = (
            f"relaying failed after {done.relayed} events: {type(exc).__name__}: {exc}; the "
            "unpublished rows stay pending for the next run"
        )
        raise click.ClickException(redact_text(msg, transport_spec, db_url, *secrets)) from exc
    click.echo(f"Relayed {done.relayed} events.")
    problem = done.problem()
    if problem is not None:
        click.echo(problem, err=True)
        sys.exit(1)


def make_outbox_group() -> click.Group:
    """Return the ``outbox`` click group: ``status``."""

    @click.group(name="outbox")
    def outbox() -> None:
        """Inspect the transactional outbox."""

    @outbox.command()
    @_db_option
    @click.option(
        "--partitions",
        type=click.IntRange(min=0),
        default=20,
        show_default=True,
        help="Show this many partitions, furthest behind first.",
    )
    @_broker_option
    def status(db_url: str | None, table: str, partitions: int, transport_spec: str | None) -> None:
        """Show pending rows, the oldest one's age, each key's lag, stuck and quarantined rows.

        Stuck rows are pending rows that failed at least once; quarantined rows are those the
        relay gave up on (`tidings dlq outbox` shows and re-queues them). With --transport, a
        Redis broker's persistence is shown too.
        """
        from tidings.outbox import Outbox  # noqa: PLC0415 - the sql extra

        with _engine(db_url) as engine:
            report = Outbox(table_name=table).status(engine, partitions=partitions)
        oldest = "-" if report.oldest_age is None else f"{report.oldest_age:.1f} s"
        line = f"pending: {report.pending}  oldest: {oldest}"
        if report.stuck:
            line += f"  stuck: {len(report.stuck)}"
        if report.quarantined:
            line += f"  quarantined: {report.quarantined}"
        click.echo(line)
        _echo_broker(transport_spec)
        console = Console()
        if not console.is_terminal:
            console.width = 1000
        if report.partitions:
            lags = Table(box=box.SIMPLE_HEAD, pad_edge=False, title="furthest behind")
            lags.add_column("partition key", overflow="fold")
            lags.add_column("pending", justify="right")
            lags.add_column("oldest (s)", justify="right")
            for lag in report.partitions:
                lags.add_row(
                    Text(log_safe(lag.partition_key)), str(lag.pending), f"{lag.oldest_age:.1f}"
                )
            console.print(lags)
        if report.stuck:
            stuck = Table(box=box.SIMPLE_HEAD, pad_edge=False, title="stuck (failed, pending)")
            for column in ("row", "partition key", "event type", "attempts", "age (s)"):
                stuck.add_column(column, overflow="fold")
            for row in report.stuck:
                stuck.add_row(str(row.id), Text(log_safe(row.partition_key)),
                              Text(log_safe(row.event_type)), str(row.attempts),
                              f"{row.age:.1f}")  # fmt: skip
            console.print(stuck)
        if report.quarantined_rows:
            held = Table(box=box.SIMPLE_HEAD, pad_edge=False, title="quarantined")
            for column in ("row", "partition key", "event type", "attempts", "age (s)", "reason"):
                held.add_column(column, overflow="fold")
            for q in report.quarantined_rows:
                held.add_row(str(q.id), Text(log_safe(q.partition_key)),
                             Text(log_safe(q.event_type)), str(q.attempts), f"{q.age:.1f}",
                             Text(log_safe(q.reason, 120)))  # fmt: skip
            console.print(held)

    return outbox
