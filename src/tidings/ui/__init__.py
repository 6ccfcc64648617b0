"""The ops page: traces, outbox lag, dead letters and counters in a browser (``tidings ui``).

:func:`~tidings.ui.app.create_app` makes a small server-rendered Starlette app over an
:class:`~tidings.ui.app.OpsConfig` (the audit, dead-letter and outbox stores, and what may
replay); ``tidings ui`` serves it with uvicorn on 127.0.0.1. It needs the ``ui`` extra
(Starlette, Jinja2, uvicorn). Importing this package imports none of them and starts nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tidings.ui.app import OpsConfig, create_app

__all__ = ["OpsConfig", "create_app"]


def __getattr__(name: str) -> Any:
    """Import the app module (and Starlette) on first use of one of its names."""
    if name in __all__:
        from tidings.ui import app  # noqa: PLC0415 - the ui extra, imported when used

        return getattr(app, name)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
