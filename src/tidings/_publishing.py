"""What a failed send means: a module missing at send time is a deployment to fix, not a retry.

Transports import parts of their libraries only when they first send (kombu picks its Redis or
AMQP transport then, and kombu's Redis transport imports ``packaging``), and wrap what went
wrong in ``PublishError``, whose advice is to send again. :func:`naming_the_extra` turns an
``ImportError`` found in such an error's chain into a
:class:`~tidings.errors.MissingDependencyError` naming the extra to install.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from tidings.errors import MissingDependencyError

__all__ = ["EXTRAS", "naming_the_extra"]

EXTRAS = {"celery": "celery", "redis-streams": "redis"}
"""The extra that installs what each of tidings' transports (by ``name``) imports to send."""


@contextlib.contextmanager
def naming_the_extra(transport: Any) -> Iterator[None]:
    """Turn a transport's ImportError (or an error it caused) into one naming the extra.

    A module missing at send time (kombu's Redis transport imports ``packaging`` then, say) is
    a deployment to fix, not a failure to send again.
    """
    try:
        yield
    except MissingDependencyError:
        raise
    except Exception as exc:
        missing = _import_error_in(exc)
        if missing is None:
            raise
        name = str(getattr(transport, "name", type(transport).__name__))
        extra = EXTRAS.get(name)
        module = f"module {missing.name!r}" if missing.name else "a module it imports"
        fix = f"pip install 'tidings[{extra}]'" if extra else "install the package providing it"
        msg = (
            f"the {name} transport could not send: {module} is not installed ({missing}); "
            f"{fix}. Sending again fails the same way until then"
        )
        raise MissingDependencyError(msg, name=missing.name) from exc


def _import_error_in(exc: BaseException) -> ImportError | None:
    """The ImportError ``exc`` is or was caused by (explicitly, or raised while handling it)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ImportError):
            return current
        seen.add(id(current))
        current = current.__cause__ or (
            None if current.__suppress_context__ else current.__context__
        )
    return None
