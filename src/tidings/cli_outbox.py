"""``tidings relay`` and ``tidings outbox status``: run the outbox relay, see what waits.

:func:`tidings.cli.make_cli` attaches both; this module is imported only then, so click and
rich (the ``cli`` extra) are imported at the top, SQLAlchemy (the ``sql`` extra) when a
command runs. The database comes from ``--db URL`` or ``TIDINGS_OUTBOX_DB``.

``--transport`` says where events go:

- ``redis://HOST:PORT/DB`` publishes to Redis Streams, as ``RedisStreamsTransport`` workers read
  them; query options ``prefix`` (the stream prefix), ``partitions`` and ``partition_key``
  must match the workers';
- ``celery+redis://...`` or ``celery+amqp://...`` publishes Celery messages for
  ``CeleryTransport`` workers to the queues of ``?queues=a,b`` (default ``tidings``);
- ``memory://`` is an in-process bus with no handlers (rows are drained and dropped, for trying
  things out);
- ``module:attribute`` names your :class:`~tidings.EventBus` (with its transport), a
  :class:`~tidings.ports.Transport`, or a callable taking a sequence of events.

The relay decodes rows, so the event classes must be registered in its process: importing that
module does it, or name more with ``--import``.
"""

from __future__ import annotations

import signal
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

from tidings._cli_imports import import_module, load_attribute
from tidings._redis_persistence import describe_url, warn_url_if_forgetful
from tidings._untrusted import redact_text, redact_url
from tidings.bus import EventBus
from tidings.errors import TidingsError
from tidings.events import DomainEvent
from tidings.ports import Transport

if TYPE_CHECKING:
    import sqlalchemy as sa

    from tidings.outbox import Publish

__all__ = ["make_outbox_group", "make_relay_command"]

_DB_HELP = (
    "The database holding the outbox: sqlite:///path, postgresql+psycopg://..., "
    "mysql+pymysql://... Env: TIDINGS_OUTBOX_DB."
)


def _publisher(spec: str) -> Publish:
    """Turn ``--transport`` into the relay's publish callable."""
    if spec == "memory://":
        bus = EventBus()
        return lambda events: bus.publish(*events)
    if spec.startswith(("redis://", "rediss://", "celery+")):
        transport = _broker_transport(spec)
        bus = EventBus(transport=transport)
        return _Closing(lambda events: bus.publish(*events), transport.close)
    if "/" in spec:
        msg = (
            "--transport takes redis://..., celery+redis://..., celery+amqp://..., memory:// "
            "or module:attribute (your EventBus, Transport or publish function), not "
            f"{redact_url(spec)!r}"
        )
        raise click.UsageError(msg)
    target: Any = load_attribute(spec, "--transport", "myproject.wiring:bus")
    if isinstance(target, EventBus):
        bus = target
        return lambda events: bus.publish(*events)
    if isinstance(target, Transport):
        return target.send
    if callable(target):
        publish: Publish = target
        return publish
    msg = (
        f"--transport {spec} is a {type(target).__name__}: name an EventBus, Transport or function"
    )
    raise click.UsageError(msg)


class _Closing:
    """A publish callable that also releases its transport's connections when the relay ends."""

    def __init__(self, publish: Publish, close: Callable[[], None]) -> None:
        self._publish = publish
        self.close = close

    def __call__(self, events: Sequence[DomainEvent]) -> None:
        self._publish(events)


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

            from tidings.transports.celery import CeleryTransport  # noqa: PLC0415

            queues = [q for q in options.get("queues", "tidings").split(",") if q]
            app = Celery("tidings-relay", broker=url)
            # The relay only publishes: no handler runs here, so no inbox (explicitly).
            transport = CeleryTransport(
                app, queue=queues[0], publish_to=queues, dead_letters=letters, inbox=None
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
        import sqlalchemy as sa  # noqa: PLC0415 - the sql extra, needed only here

        engine = sa.create_engine(url)
    except ImportError as exc:
        msg = f"{exc}: pip install 'tidings[sql]' and the database's driver"
        raise click.UsageError(redact_text(msg, url)) from exc
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

    @click.command(name="relay")
    @_db_option
    @click.option(
        "--transport",
        "transport_spec",
        envvar="TIDINGS_RELAY_TRANSPORT",
        required=True,
        metavar="SPEC",
        help="memory:// or module:attribute (an EventBus, Transport or publish function). "
        "Env: TIDINGS_RELAY_TRANSPORT.",
    )
    @click.option(
        "--import",
        "imports",
        multiple=True,
        metavar="MODULE",
        help="Import this module first (it registers event classes); repeatable.",
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
    @click.option("--once", is_flag=True, help="Relay what is pending, then exit.")
    def relay(  # noqa: PLR0917 - click passes every option
        db_url: str | None,
        table: str,
        transport_spec: str,
        imports: Sequence[str],
        batch_size: int,
        poll_interval: float,
        no_listen: bool,
        keep_published: float | None,
        once: bool,
    ) -> None:
        """Publish committed outbox rows through the transport, in order per partition key.

        Rows are marked (or deleted) only after the transport confirmed. Several relays may
        run against PostgreSQL or MariaDB; SQLite takes one. Stops cleanly on SIGINT/SIGTERM.
        """
        for module in imports:
            import_module(module, "--import")
        publish = _publisher(transport_spec)
        warn_url_if_forgetful(transport_spec, "the relay's broker")  # a Redis keeping nothing
        with ExitStack() as cleanup:
            if isinstance(publish, _Closing):
                cleanup.callback(publish.close)
            from tidings.outbox import Outbox, Relay  # noqa: PLC0415 - the sql extra

            keep = None if keep_published is None else timedelta(seconds=keep_published)
            with _engine(db_url) as engine:
                runner = Relay(
                    engine,
                    Outbox(table_name=table),
                    publish,
                    batch_size=batch_size,
                    poll_interval=poll_interval,
                    listen=not no_listen,
                    keep_published=keep,
                )
                if once:
                    total = 0
                    while count := runner.run_once():
                        total += count
                    click.echo(f"Relayed {total} events.")
                    return
                stop = threading.Event()

                def on_signal(signum: int, frame: FrameType | None) -> None:
                    stop.set()

                previous = {
                    sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
                }
                try:
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
        """Show pending rows, the oldest one's age, and the lag of each partition key."""
        from tidings.outbox import Outbox  # noqa: PLC0415 - the sql extra

        with _engine(db_url) as engine:
            report = Outbox(table_name=table).status(engine, partitions=partitions)
        oldest = "-" if report.oldest_age is None else f"{report.oldest_age:.1f} s"
        click.echo(f"pending: {report.pending}  oldest: {oldest}")
        _echo_broker(transport_spec)
        if not report.partitions:
            return
        lags = Table(box=box.SIMPLE_HEAD, pad_edge=False, title="furthest behind")
        lags.add_column("partition key", overflow="fold")
        lags.add_column("pending", justify="right")
        lags.add_column("oldest (s)", justify="right")
        for lag in report.partitions:
            lags.add_row(Text(lag.partition_key), str(lag.pending), f"{lag.oldest_age:.1f}")
        console = Console()
        if not console.is_terminal:
            console.width = 1000
        console.print(lags)

    return outbox
