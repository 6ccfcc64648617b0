"""``--metrics-port`` and ``--metrics-host`` of ``tidings worker`` and ``tidings relay``.

Imported only by those commands (click, the ``cli`` extra, at the top); prometheus_client (the
``prometheus`` extra) only when a port is given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

__all__ = ["metrics_options", "serve"]


def metrics_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--metrics-port`` (default: no metrics) and ``--metrics-host`` to a command."""
    func = click.option(
        "--metrics-host",
        default="127.0.0.1",
        show_default=True,
        envvar="TIDINGS_METRICS_HOST",
        help="The address --metrics-port listens on (0.0.0.0: every interface). "
        "Env: TIDINGS_METRICS_HOST.",
    )(func)
    return click.option(
        "--metrics-port",
        type=click.IntRange(min=1, max=65535),
        default=None,
        envvar="TIDINGS_METRICS_PORT",
        help="Serve Prometheus metrics on this port (/metrics); needs the 'prometheus' extra. "
        "Env: TIDINGS_METRICS_PORT.",
    )(func)


def serve(port: int | None, host: str, *, service: str | None) -> bool:
    """Serve the metrics on ``host:port`` and install them, if a port was given.

    Returns whether they are served. A missing extra or a port that cannot be bound is a
    click error saying so, raised before the command does anything else.
    """
    if port is None:
        return False
    try:
        from tidings.integrations.prometheus import serve_metrics  # noqa: PLC0415
    except ImportError as exc:
        raise click.ClickException(f"--metrics-port: {exc}") from exc
    try:
        serve_metrics(port, host, service=service)
    except OSError as exc:
        msg = f"--metrics-port: cannot listen on {host}:{port}: {exc.strerror or exc}"
        raise click.ClickException(msg) from exc
    click.echo(f"tidings: metrics on http://{host}:{port}/metrics", err=True)
    return True
