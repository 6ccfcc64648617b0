"""Put the bound context on every log record: stdlib ``logging`` and structlog.

Both add four keys, read from :func:`tidings.current_context` when the record is made:

* ``correlation_id`` -- the correlation id of the request or job;
* ``causation_id`` -- the id of the event whose handling caused this work;
* ``tenant_id`` -- the tenant the work is done for;
* ``event_id`` -- the id of the event being handled. The bus binds the handled event's id as
  the causation id while a handler runs, so this is the context's ``causation_id`` under another
  name: the id a log line inside a handler is about (and of the event that any new one will
  name as its cause).

One line of configuration each::

    logging.getLogger().handlers[0].addFilter(ContextFilter())  # stdlib: on a handler
    structlog.configure(processors=[structlog_processor, *structlog.get_config()["processors"]])

With the stdlib, the fields are then available to the formatter, e.g.
``"%(asctime)s %(levelname)s [%(correlation_id)s %(tenant_id)s] %(message)s"``. Put the filter
on the *handler* (not on a logger) so records from every logger that reaches it get the ids.
Neither imports structlog: the processor is a plain function.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any, Final

from tidings._untrusted import log_safe
from tidings.context import current_context

__all__ = ["CONTEXT_KEYS", "ContextFilter", "structlog_processor"]

CONTEXT_KEYS: Final = ("correlation_id", "causation_id", "tenant_id", "event_id")
"""The keys both integrations add, in this order."""


_ID_LIMIT: Final = 256


def _fit(value: str | None) -> str | None:
    # Ids from envelopes and web headers are checked where they enter, but a caller may bind
    # anything: a value that is not a short printable ASCII id is escaped before it is logged.
    if value is None or (len(value) <= _ID_LIMIT and value.isascii() and value.isprintable()):
        return value
    return log_safe(value, _ID_LIMIT)


def _context_values() -> tuple[str | None, str | None, str | None, str | None]:
    context = current_context()
    causation_id = _fit(context.causation_id)
    return (
        _fit(context.correlation_id),
        causation_id,
        _fit(context.tenant_id),
        causation_id,  # event_id: the event being handled is the cause of what follows
    )


class ContextFilter(logging.Filter):
    """A logging filter that adds the context ids to each record and lets every record pass.

    Sets ``correlation_id``, ``causation_id``, ``tenant_id`` and ``event_id`` on the record;
    an id that is not bound becomes ``default`` (``"-"`` unless given), so a format string that
    names them never fails. An attribute the record already carries (for example passed with
    ``extra=``) is kept. A bound value that is not printable ASCII of at most 256 characters
    is escaped and cut as :func:`tidings._untrusted.log_safe` does, so no context value can
    forge a log line. It never raises: logging must not fail because of the context.
    Thread-safe; it reads the context of the thread or task that logs.
    """

    def __init__(self, name: str = "", *, default: str = "-") -> None:
        super().__init__(name)
        self.default = default

    def filter(self, record: logging.LogRecord) -> bool:
        """Add the ids to ``record`` and return ``True`` (subject to the ``name`` filter)."""
        try:
            for key, value in zip(CONTEXT_KEYS, _context_values(), strict=True):
                if not hasattr(record, key):
                    setattr(record, key, self.default if value is None else value)
        except Exception:  # noqa: BLE001, S110 - a log line must never fail on its context
            pass
        return super().filter(record)


def structlog_processor(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Add the context ids to ``event_dict`` and return it: a structlog processor.

    Adds ``correlation_id``, ``causation_id``, ``tenant_id`` and ``event_id`` where bound, and
    ``None`` where not, so the keys are always present; values are escaped as
    :class:`ContextFilter` does; a key the caller already set (by
    ``bind`` or as a keyword) is never overwritten. Never raises.
    """
    try:
        for key, value in zip(CONTEXT_KEYS, _context_values(), strict=True):
            event_dict.setdefault(key, value)
    except Exception:  # noqa: BLE001, S110 - a log line must never fail on its context
        pass
    return event_dict
