"""The slot tracing, metrics and auditing plug into; core calls it, and nothing here imports them.

``hooks`` is ``None`` until an integration is installed with :func:`install` (as
:func:`tidings.integrations.otel.install_tracing` does), so with none installed each call site
costs one global lookup and one ``is None`` test. With one installed, ``hooks`` is that one;
with several (tracing and metrics, say), a fan-out that calls each in the order installed.
Core calls the hooks at these places:

- **publish**: around ``EventBus.publish``/``apublish`` and ``Outbox.add`` (and the Django
  ``publish``); an event encoded inside it carries the publish span's ``traceparent``
  (:meth:`TracingHooks.traceparent`, asked by ``Codec.encode``).
- **relay**: around the relay's publish of a batch; each event gets its own relay span, a child
  of the ``traceparent`` stored in its outbox row, and is sent on with that span's.
- **handle**: around each handler run, in the in-process bus and in the worker's
  :class:`~tidings.delivery.Dispatcher`; its parent is the envelope's ``traceparent``.
- **rejected**: a message the worker dead-lettered without running a handler (undecodable, or
  aimed at a handler that does not take it).
- **unrouted**: an event no handler subscribes to (a worker received it, or a publisher that
  routes by type found no subscriber and did not send it).

Every hook must be safe from any thread and must not raise: an error in an observer would
otherwise become the delivery's error.

**Runs reported per batch.** An integration that also implements :class:`BatchHooks` (the
metrics) is not asked for a span of each run in the worker's
:class:`~tidings.delivery.Dispatcher`: the dispatcher times each run itself and reports a
whole batch's outcomes to it in one call once the batch ended (:data:`batch_hooks`), which
costs a counted run a tuple instead of a span object and three calls. The other
integrations (tracing, the audit) still get their span of each run (:data:`span_hooks`), and
the in-process bus gives every integration its span.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from typing import TYPE_CHECKING, Protocol, TypeAlias

if TYPE_CHECKING:
    from tidings.events import DomainEvent
    from tidings.ports import DeadLetter

__all__ = [
    "BUSY",
    "DEAD",
    "DONE",
    "DUPLICATE",
    "NO_SPAN",
    "RETRIED",
    "BatchHooks",
    "HandleSpan",
    "RunReport",
    "TracingHooks",
    "batch_hooks",
    "hooks",
    "install",
    "installed",
    "publishing",
    "relayed",
    "span_hooks",
    "uninstall",
]

DONE, DUPLICATE, BUSY, RETRIED, DEAD = range(5)
"""How a reported run ended: returned, skipped as a duplicate, the inbox busy elsewhere, raised
and retried, raised and dead-lettered (a run cut short by the worker's own error is not
reported)."""

RunReport: TypeAlias = "tuple[str, DomainEvent, float, float, int]"
"""One handler run of a batch: handler name, event, its start (``time.perf_counter``), its
duration in seconds, and how it ended (:data:`DONE` ... :data:`DEAD`)."""


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

    def rejected(self, letter: DeadLetter, *, system: str) -> None:
        """``letter`` was dead-lettered (already stored) without a handler having run."""
        ...

    def unrouted(self, event_type: str, count: int, *, system: str) -> None:
        """``count`` events of ``event_type`` found no handler (received) or subscriber (sent)."""
        ...


class BatchHooks(Protocol):
    """What an integration implements, besides :class:`TracingHooks`, to take runs in batches."""

    def runs(self, runs: Sequence[RunReport], *, system: str) -> None:
        """The runs of one batch a worker of ``system`` handled, each reported once, in order.

        Called in the thread that ran them, right after the batch: ``time.time() -
        time.perf_counter()`` then puts each run's start on the wall clock. Must not raise.
        """
        ...


hooks: TracingHooks | None = None
"""The installed integration(s), or ``None`` (all off: the only cost is reading this)."""

span_hooks: TracingHooks | None = None
"""The installed integration(s) a worker asks for a span of each handler run (not the
:class:`BatchHooks`), or ``None``."""

batch_hooks: BatchHooks | None = None
"""The installed :class:`BatchHooks` a worker reports its batches' runs to, or ``None``."""

_installed: dict[str, TracingHooks] = {}
_lock = threading.Lock()


def install(name: str, integration: TracingHooks) -> None:
    """Install ``integration`` under ``name``, replacing one installed under it before.

    An ``integration`` with a ``runs`` method is taken as a :class:`BatchHooks` too.
    """
    with _lock:
        _installed[name] = integration
        _combine()


def uninstall(name: str) -> None:
    """Remove the integration installed under ``name``; harmless when there is none."""
    with _lock:
        _installed.pop(name, None)
        _combine()


def installed(name: str) -> TracingHooks | None:
    """The integration installed under ``name``, or ``None``."""
    return _installed.get(name)


def _combine() -> None:
    """Set the three slots from what is installed (under ``_lock``)."""
    global hooks, span_hooks, batch_hooks  # noqa: PLW0603 - the slots every call site reads
    found = list(_installed.values())
    batched: list[BatchHooks] = [one for one in found if hasattr(one, "runs")]  # type: ignore[misc]
    hooks = _combined(found)
    span_hooks = _combined([one for one in found if not hasattr(one, "runs")])
    batch_hooks = None if not batched else batched[0] if len(batched) == 1 else _Batches(batched)


def _combined(found: list[TracingHooks]) -> TracingHooks | None:
    if not found:
        return None
    return found[0] if len(found) == 1 else _Fanout(tuple(found))


class _Batches:
    """Several :class:`BatchHooks` as one, each told of every batch in the order installed."""

    __slots__ = ("each",)

    def __init__(self, each: list[BatchHooks]) -> None:
        self.each = tuple(each)

    def runs(self, runs: Sequence[RunReport], *, system: str) -> None:
        for one in self.each:
            one.runs(runs, system=system)


class _Fanout:
    """Several integrations as one: each hook calls every one, in the order installed."""

    __slots__ = ("each",)

    def __init__(self, each: tuple[TracingHooks, ...]) -> None:
        self.each = each

    def publish(
        self, events: Sequence[DomainEvent], system: str, destination: str | None
    ) -> AbstractContextManager[object]:
        return self._all(lambda one: one.publish(events, system, destination))

    def relay(
        self,
        events: Sequence[DomainEvent],
        traceparents: Sequence[str | None],
        destination: str,
    ) -> AbstractContextManager[object]:
        return self._all(lambda one: one.relay(events, traceparents, destination))

    @contextmanager
    def _all(
        self, enter: Callable[[TracingHooks], AbstractContextManager[object]]
    ) -> Iterator[object]:
        with ExitStack() as stack:
            for one in self.each:
                stack.enter_context(enter(one))
            yield None

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
        return _FanoutSpan(
            tuple(
                one.handle(
                    handler,
                    event,
                    body=body,
                    system=system,
                    destination=destination,
                    attempt=attempt,
                )
                for one in self.each
            )
        )

    def traceparent(self, event: DomainEvent) -> str | None:
        for one in self.each:
            found = one.traceparent(event)
            if found is not None:
                return found
        return None

    def rejected(self, letter: DeadLetter, *, system: str) -> None:
        for one in self.each:
            one.rejected(letter, system=system)

    def unrouted(self, event_type: str, count: int, *, system: str) -> None:
        for one in self.each:
            one.unrouted(event_type, count, system=system)


class _FanoutSpan:
    """The spans of one handler run, one per integration; reports reach each, last first."""

    __slots__ = ("spans",)

    def __init__(self, spans: tuple[HandleSpan, ...]) -> None:
        self.spans = spans[::-1]  # the first installed started first: it ends last

    def done(self, fresh: bool) -> None:
        for span in self.spans:
            span.done(fresh)

    def busy(self, retry_in: float) -> None:
        for span in self.spans:
            span.busy(retry_in)

    def failed(
        self,
        error: BaseException,
        *,
        retry_in: float | None = None,
        dead_letter: str | None = None,
    ) -> None:
        for span in self.spans:
            span.failed(error, retry_in=retry_in, dead_letter=dead_letter)

    def end(self) -> None:
        for span in self.spans:
            span.end()

    def __enter__(self) -> _FanoutSpan:
        for span in self.spans[::-1]:
            span.__enter__()
        return self

    def __exit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        for span in self.spans:
            span.__exit__(kind, error, tb)


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
