"""The slot tracing plugs into; core code calls it, and nothing here imports a tracer.

``hooks`` is ``None`` until :func:`tidings.integrations.otel.install_tracing` fills it, so with
tracing not installed each call site costs one global lookup and one ``is None`` test. Core
calls the hooks at three places:

- **publish**: around ``EventBus.publish``/``apublish`` and ``Outbox.add`` (and the Django
  ``publish``); an event encoded inside it carries the publish span's ``traceparent``
  (:meth:`TracingHooks.traceparent`, asked by ``Codec.encode``).
- **relay**: around the relay's publish of a batch; each event gets its own relay span, a child
  of the ``traceparent`` stored in its outbox row, and is sent on with that span's.
- **handle**: around each handler run, in the in-process bus and in the worker's
  :class:`~tidings.delivery.Dispatcher`; its parent is the envelope's ``traceparent``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from tidings.events import DomainEvent

__all__ = ["NO_SPAN", "HandleSpan", "TracingHooks", "hooks", "publishing", "relayed"]


class HandleSpan(Protocol):
    """One handler run, started and made current by :meth:`TracingHooks.handle`.

    The worker reports how the run ended with one of :meth:`done`, :meth:`busy` or
    :meth:`failed`, each of which ends the span, in the thread that started it; :meth:`end`
    (idempotent) ends a span whose run was cut short by an error of the worker itself. Used as
    a context manager (the in-process bus), leaving the block reports the outcome and ends it.
    """

    def done(self, fresh: bool) -> None:
        """The handler returned (``fresh``) or the inbox skipped it as a duplicate (not)."""
        ...

    def busy(self, retry_in: float) -> None:
        """Another worker holds the inbox claim; the run is tried again in ``retry_in`` s."""
        ...

    def failed(
        self,
        error: BaseException,
        *,
        retry_in: float | None = None,
        dead_letter: str | None = None,
    ) -> None:
        """The handler raised ``error``; it is retried in ``retry_in`` s, or dead-lettered."""
        ...

    def end(self) -> None:
        """End the span and make the previous context current again."""
        ...

    def __enter__(self) -> HandleSpan: ...

    def __exit__(self, kind: object, error: BaseException | None, tb: object) -> None: ...


class TracingHooks(Protocol):
    """What a tracing integration implements; every method must be safe from any thread."""

    def publish(
        self, events: Sequence[DomainEvent], system: str, destination: str | None
    ) -> AbstractContextManager[object]:
        """A span around publishing ``events``, current for the block (records its error)."""
        ...

    def relay(
        self,
        events: Sequence[DomainEvent],
        traceparents: Sequence[str | None],
        destination: str,
    ) -> AbstractContextManager[object]:
        """Spans, one per event, around sending a relayed batch; each a child of its row's."""
        ...

    def handle(
        self,
        handler: str,
        event: DomainEvent,
        *,
        body: bytes | None,
        system: str,
        destination: str,
        attempt: int,
    ) -> HandleSpan:
        """Start the span of one handler run; ``body`` is the envelope (``None`` in-process)."""
        ...

    def traceparent(self, event: DomainEvent) -> str | None:
        """The W3C ``traceparent`` an envelope of ``event`` encoded now should carry."""
        ...


hooks: TracingHooks | None = None
"""The installed integration, or ``None`` (tracing off: the only cost is reading this)."""

_NOTHING: AbstractContextManager[object] = nullcontext()


class _NoSpan:
    """The span of a handler run when tracing is off: every report is dropped."""

    __slots__ = ()

    def done(self, fresh: bool) -> None:
        """Drop the report."""

    def busy(self, retry_in: float) -> None:
        """Drop the report."""

    def failed(
        self,
        error: BaseException,
        *,
        retry_in: float | None = None,
        dead_letter: str | None = None,
    ) -> None:
        """Drop the report."""

    def end(self) -> None:
        """Nothing to end."""

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        return None


NO_SPAN: HandleSpan = _NoSpan()
"""Stands in for a handler run's span when tracing is off, so callers need no ``if``."""


def publishing(
    events: Sequence[DomainEvent], system: str, destination: str | None
) -> AbstractContextManager[object]:
    """The publish span of ``events`` if tracing is installed, else a reusable no-op block."""
    installed = hooks
    if installed is None:
        return _NOTHING
    return installed.publish(events, system, destination)


def relayed(
    publish: Callable[[Sequence[DomainEvent]], None],
    events: Sequence[DomainEvent],
    traceparents: Sequence[str | None],
    destination: str,
) -> None:
    """Call ``publish(events)`` inside the relay spans of ``events`` (or plainly, untraced)."""
    installed = hooks
    if installed is None:
        publish(events)
        return
    with installed.relay(events, traceparents, destination):
        publish(events)
