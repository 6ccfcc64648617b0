"""``tidings worker``: run a service's Redis Streams consumers until SIGTERM or SIGINT.

:func:`tidings.cli.make_cli` attaches the command; this module is imported only then, so click
(the ``cli`` extra) is imported at the top. ``--app module:attribute`` names the composition
root's :class:`~tidings.EventBus` (or its transport) in the operator's code: the only thing
imported, and it comes from the command line, never from a message.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import click

from tidings._cli_imports import configure_logging, load_attribute
from tidings._cli_metrics import metrics_options, serve
from tidings._untrusted import redact_text, redact_url
from tidings.bus import EventBus
from tidings.errors import TidingsError

__all__ = ["make_worker_command"]


def _load_bus(spec: str) -> EventBus:
    """Import ``module:attribute`` and return the EventBus it names."""
    target = load_attribute(spec, "--app", "myproject.wiring:bus")
    if not isinstance(target, EventBus):
        msg = f"--app {spec} is a {type(target).__name__}, not an EventBus: point it at your bus"
        raise click.ClickException(msg)
    return target


def make_worker_command() -> click.Command:
    """Return the ``worker`` click command."""

    @click.command(name="worker")
    @click.option(
        "--app",
        "app",
        required=True,
        metavar="MODULE:ATTRIBUTE",
        help="Your EventBus, whose transport is a RedisStreamsTransport with the handlers "
        "subscribed; the current directory is searched after installed packages.",
    )
    @click.option(
        "--transport",
        "transport_url",
        envvar="TIDINGS_TRANSPORT_URL",
        metavar="URL",
        help="redis://HOST:PORT/DB to consume from, replacing the client the bus's transport "
        "was built with (default: that client). Env: TIDINGS_TRANSPORT_URL.",
    )
    @click.option(
        "--concurrency",
        type=click.IntRange(min=1),
        default=1,
        show_default=True,
        help="Consumers (threads) handling batches at the same time.",
    )
    @click.option(
        "--loglevel",
        type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
        default="INFO",
        show_default=True,
    )
    @metrics_options
    def worker(  # noqa: PLR0917 - click passes every option
        app: str,
        transport_url: str | None,
        concurrency: int,
        loglevel: str,
        metrics_port: int | None,
        metrics_host: str,
    ) -> None:
        """Consume the bus's streams until SIGTERM or SIGINT, then finish what it holds and exit.

        Each consumer reads batches, runs the handlers (inbox, retries, dead letters), and
        acknowledges each batch after; on a stop signal every consumer reads no more, handles
        and acknowledges the batches it holds, then exits. Redis being down is waited out with
        bounded backoff. With --metrics-port, Prometheus metrics (label service: the
        transport's service) are served for as long as it runs.
        """
        from tidings.outbox._common import secret_urls  # noqa: PLC0415
        from tidings.transports.redis_streams import (  # noqa: PLC0415 - needs redis-py
            RedisStreamsTransport,
        )

        configure_logging(loglevel, transport_url)
        bus = _load_bus(app)
        transport = bus.transport
        # A traceback that echoes the broker's password (a driver's error) prints *** instead.
        for url in secret_urls(transport):
            configure_logging(loglevel, url)
        if not isinstance(transport, RedisStreamsTransport):
            msg = (
                f"the bus of --app {app} has transport {type(transport).__name__}, not a "
                "RedisStreamsTransport; Celery transports run under `celery worker`"
            )
            raise click.ClickException(msg)
        if transport_url is not None:
            if urlsplit(transport_url).scheme not in ("redis", "rediss", "unix"):
                shown = redact_url(transport_url)
                msg = f"--transport takes a redis:// or rediss:// URL, not {shown!r}"
                raise click.UsageError(msg)
            import redis  # noqa: PLC0415 - present: the transport module imported it

            transport.client = redis.Redis.from_url(transport_url)
        serve(metrics_port, metrics_host, service=transport.service)
        click.echo(
            f"tidings worker: service {transport.service}, {concurrency} consumer(s), "
            f"streams {', '.join(transport.streams().read)}",
            err=True,
        )
        try:
            transport.run_forever(concurrency=concurrency)
        except TidingsError as exc:  # no handlers, not bound: a fix the operator can make
            raise click.ClickException(redact_text(str(exc), transport_url)) from exc
        click.echo("tidings worker: stopped", err=True)

    return worker
