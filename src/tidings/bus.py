"""``EventBus``: subscribe handlers to event classes, publish events to them.

This version runs handlers in-process, inline, in the publishing thread: the embedded default.
Each handler runs with the event's context bound (correlation and tenant from the event,
causation = the event's id), so any event it creates is linked to the one it handles.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import importlib
import importlib.util
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from tidings import _tracing
from tidings._publishing import naming_the_extra
from tidings.context import EventContext, _current
from tidings.errors import DuplicateHandlerError, HandlerFailedError, PublishError, UsageError
from tidings.events import DomainEvent
from tidings.retry import RetryPolicy

if TYPE_CHECKING:
    from tidings.ports import Transport

__all__ = ["EventBus", "Handler"]

F = TypeVar("F", bound=Callable[..., Any])

log = logging.getLogger("tidings.bus")


@dataclass(frozen=True, slots=True)
class Handler:
    """A function subscribed to one or more event classes under a stable name.

    Attributes:
        name: unique on its bus and stable across deploys: with the ``event_id`` it is the
            idempotency key of an effect, so renaming a handler makes old events look new.
        func: the callable, sync or ``async``, taking the event as its only argument.
        event_types: the classes it receives; each also brings its subclasses.
        is_async: whether ``func`` is a coroutine function.
        retry: how a worker retries it when it fails; ``None`` means the worker's default.
            (The in-process ``publish`` never retries: it raises.)
    """

    name: str
    func: Callable[[Any], Any]
    event_types: tuple[type[DomainEvent], ...]
    is_async: bool
    retry: RetryPolicy | None = None


def _default_name(func: Callable[..., Any]) -> str:
    qualname = getattr(func, "__qualname__", None)
    module = getattr(func, "__module__", None)
    if not qualname or not module or "<lambda>" in qualname:
        msg = (
            f"cannot derive a stable name for handler {func!r}: pass name='context.handler' "
            "to subscribe()"
        )
        raise UsageError(msg)
    return f"{module}.{qualname}"


def _context_of(event: DomainEvent) -> EventContext:
    return EventContext(event.correlation_id, event.event_id, event.tenant_id)


class EventBus:
    """Routes published events to the handlers subscribed to their class or a base class.

    Subscribing is thread-safe; publishing from many threads at once is safe, and each
    publisher runs the handlers in its own thread. Handlers of one event run in subscription
    order; a handler subscribed to ``DomainEvent`` receives every event.
    """

    def __init__(
        self,
        transport: Transport | None = None,
        *,
        publish_timeout: float | None = 10.0,
        publish_threads: int = 8,
    ) -> None:
        if publish_timeout is not None and publish_timeout <= 0:
            msg = "publish_timeout must be a positive number of seconds, or None for no limit"
            raise ValueError(msg)
        if publish_threads < 1:
            msg = "publish_threads must be >= 1"
            raise ValueError(msg)
        self.publish_timeout = publish_timeout
        """How long :meth:`apublish` waits for the transport before raising ``PublishError``."""
        self.publish_threads = publish_threads
        """Most sends :meth:`apublish` runs at once in threads (transports without ``asend``)."""
        self._executor: ThreadPoolExecutor | None = None
        self._warned_loop = False
        self._handlers: dict[str, Handler] = {}
        self._routes: dict[type[DomainEvent], tuple[Handler, ...]] = {}
        self._lock = threading.Lock()
        self.transport = transport
        """Where ``publish`` sends events; ``None`` runs handlers inline in this process."""
        if transport is not None:
            transport.bind(self)

    @property
    def handlers(self) -> tuple[Handler, ...]:
        """Every subscribed handler, in subscription order."""
        return tuple(self._handlers.values())

    def subscribe(
        self,
        *event_types: type[DomainEvent],
        name: str | None = None,
        retry: RetryPolicy | None = None,
    ) -> Callable[[F], F]:
        """Decorator: subscribe the function to ``event_types`` and return it unchanged.

        ``name`` defaults to ``module.qualname`` of the function; ``retry`` is the handler's
        retry policy in workers (see :class:`~tidings.retry.RetryPolicy`).

        Raises:
            UsageError: no event class given, a non-event class given, or no stable name.
            DuplicateHandlerError: the name is taken on this bus.
        """

        def decorator(func: F) -> F:
            self.add_handler(func, *event_types, name=name, retry=retry)
            return func

        return decorator

    def add_handler(
        self,
        func: Callable[[Any], Any],
        *event_types: type[DomainEvent],
        name: str | None = None,
        retry: RetryPolicy | None = None,
    ) -> Handler:
        """Subscribe ``func`` to ``event_types`` (the non-decorator form) and return its Handler."""
        if not event_types:
            msg = "subscribe() needs at least one event class, e.g. @bus.subscribe(OrderPlaced)"
            raise UsageError(msg)
        for event_type in event_types:
            if not (isinstance(event_type, type) and issubclass(event_type, DomainEvent)):
                msg = f"subscribe() takes DomainEvent subclasses, not {event_type!r}"
                raise UsageError(msg)
        if not callable(func):
            msg = f"a handler must be callable, not {func!r}"
            raise UsageError(msg)
        handler = Handler(
            name=name if name is not None else _default_name(func),
            func=func,
            event_types=tuple(event_types),
            is_async=inspect.iscoroutinefunction(func),
            retry=retry,
        )
        with self._lock:
            taken = self._handlers.get(handler.name)
            if taken is not None:
                msg = (
                    f"a handler named {handler.name!r} is already subscribed: pass a distinct "
                    "name=, or subscribe one function to several classes in one call"
                )
                raise DuplicateHandlerError(msg)
            if self.transport is not None:
                self.transport.subscribed(handler)
            # Copy on write: publishers iterate the old dict and route caches undisturbed.
            self._handlers = {**self._handlers, handler.name: handler}
            self._routes = {}
        return handler

    def autodiscover(self, *packages: str, module: str = "handlers") -> tuple[str, ...]:
        """Import the modules that subscribe this bus's handlers, so none is forgotten.

        For each name in ``packages``: a package's ``module`` submodule (``shop.handlers``
        for ``"shop"``) is imported if it exists, and a plain module (or a package without
        one) is imported itself. The names come from your code, never from a message. A
        worker that forgot to import the module subscribing a handler would dead-letter
        that handler's events as having no handler here: call this in the composition root
        that the web process and the workers both import.

        Returns:
            The modules imported, in order.

        Raises:
            ImportError: a name in ``packages`` cannot be imported, or the module found
                raises while it is imported (the error is the module's own).
        """
        imported = []
        for name in packages:
            found = importlib.import_module(name)
            if hasattr(found, "__path__"):  # a package: look for its handlers module
                target = f"{name}.{module}"
                if importlib.util.find_spec(target) is not None:
                    importlib.import_module(target)
                    imported.append(target)
                    continue
            imported.append(name)
        return tuple(imported)

    def describe(self) -> str:
        """The handler table, one line per handler: its name, then the classes it receives.

        Workers log it once at start-up (as Celery lists its tasks), so an operator sees what
        a process serves.
        """
        if not self._handlers:
            return "no handlers subscribed"
        rows = [
            f"  {h.name} <- {', '.join(t.event_type for t in h.event_types)}"
            + (" (async)" if h.is_async else "")
            for h in self._handlers.values()
        ]
        return "handlers:\n" + "\n".join(rows)

    def handler(self, name: str) -> Handler | None:
        """Return the handler subscribed under ``name``, or ``None``."""
        return self._handlers.get(name)

    def handlers_for(self, event_class: type[DomainEvent]) -> tuple[Handler, ...]:
        """Return the handlers an event of ``event_class`` is delivered to, in order."""
        routes = self._routes  # read before the handlers: a stale route lands in a stale cache
        found = routes.get(event_class)
        if found is None:
            mro = event_class.__mro__
            handlers = self._handlers
            found = tuple(h for h in handlers.values() if any(t in mro for t in h.event_types))
            routes[event_class] = found
        return found

    def publish(self, *events: DomainEvent) -> None:
        """Send the events through the transport, or with none run their handlers now.

        With a transport, returns once the broker accepted every event (see
        :class:`~tidings.ports.Transport`); workers run the handlers. Without one, every
        handler of every event runs now, in this thread, in order, each with the event's
        context bound; a failing handler does not stop the others, nor the following events.
        With tracing installed (:mod:`tidings.integrations.otel`) this runs in a publish span.
        Called with a broker transport on a thread running an event loop (in an ``async def``
        view), it blocks that loop, every request of the process, while the broker answers:
        it still sends, and logs a warning once per bus naming :meth:`apublish`.

        Raises:
            HandlerFailedError: (inline) after all handlers ran, grouping their exceptions.
            UsageError: (inline) an event has an ``async`` handler; use :meth:`apublish`
                (checked before any handler runs).
            PublishError: the transport failed (see :class:`~tidings.ports.Transport`).
            MissingDependencyError: the transport could not import a module it needs to
                send; the message names the extra to install.
        """
        hooks = _tracing.hooks
        if hooks is None:
            self._publish(events, None)
            return
        with hooks.publish(events, self._system(), None):
            self._publish(events, hooks)

    def _system(self) -> str:
        """The ``messaging.system`` of this bus's spans: its transport's name, or ``tidings``."""
        return "tidings" if self.transport is None else self.transport.name

    def _publish(
        self, events: tuple[DomainEvent, ...], hooks: _tracing.TracingHooks | None
    ) -> None:
        if self.transport is not None:
            if not self._warned_loop:
                self._warn_if_on_a_loop(self.transport)
            with naming_the_extra(self.transport):
                self.transport.send(self._checked(events))
            return
        routed = self._route(events)
        for _, handlers in routed:
            for handler in handlers:
                if handler.is_async:
                    msg = (
                        f"handler {handler.name!r} is async: publish with `await bus.apublish(...)`"
                    )
                    raise UsageError(msg)
        failures: list[Exception] = []
        for event, handlers in routed:
            token = _current.set(_context_of(event))
            try:
                for handler in handlers:
                    try:
                        if hooks is None:
                            handler.func(event)
                        else:
                            with _handle_span(hooks, handler, event):
                                handler.func(event)
                    except Exception as exc:  # noqa: BLE001 - collected, raised as a group
                        failures.append(_noted(exc, handler, event))
            finally:
                _current.reset(token)
        if failures:
            raise _group(failures)

    async def apublish(self, *events: DomainEvent) -> None:
        """Like :meth:`publish`, awaiting ``async`` handlers; sync ones run inline.

        Handlers run one after another in subscription order, never concurrently, so their
        effects keep the order of the events. With a transport, the event loop (every other
        request of an async web app) never waits on the broker: a transport with an ``asend``
        coroutine (Redis Streams) sends on the loop itself; any other sends in one of the
        bus's own ``publish_threads`` threads (not the loop's default executor, which DNS
        look-ups need), with the caller's context. If the broker has not accepted the events
        within ``publish_timeout`` seconds (10 by default) this raises; a send still waiting
        for a thread then never starts, one under way may still complete (the transports'
        connections time out by themselves, so no thread waits for ever): send again, the
        handlers' inboxes make a duplicate harmless.

        Raises:
            HandlerFailedError: after all handlers ran, grouping every exception they raised.
            PublishError: the transport failed, or did not finish within ``publish_timeout``.
            MissingDependencyError: as :meth:`publish`.
        """
        hooks = _tracing.hooks
        if hooks is None:
            await self._apublish(events, None)
            return
        with hooks.publish(events, self._system(), None):
            await self._apublish(events, hooks)

    async def _apublish(
        self, events: tuple[DomainEvent, ...], hooks: _tracing.TracingHooks | None
    ) -> None:
        if self.transport is not None:
            await self._asend(self.transport, self._checked(events))
            return
        failures: list[Exception] = []
        for event, handlers in self._route(events):
            token = _current.set(_context_of(event))
            try:
                for handler in handlers:
                    try:
                        if hooks is None:
                            result = handler.func(event)
                            if handler.is_async:
                                await _awaited(result)
                        else:
                            with _handle_span(hooks, handler, event):
                                result = handler.func(event)
                                if handler.is_async:
                                    await _awaited(result)
                    except Exception as exc:  # noqa: BLE001 - collected, raised as a group
                        failures.append(_noted(exc, handler, event))
            finally:
                _current.reset(token)
        if failures:
            raise _group(failures)

    def _warn_if_on_a_loop(self, transport: Transport) -> None:
        if transport.name == "memory":  # queues in this process: it never waits on a broker
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no loop in this thread: a sync view, a worker, the relay
            return
        self._warned_loop = True
        log.warning(
            "EventBus.publish() ran on an event loop: the loop, and every request it serves, "
            "waits while the %s broker answers; in async code use `await bus.apublish(...)`",
            transport.name,
        )

    async def _asend(self, transport: Transport, events: tuple[DomainEvent, ...]) -> None:
        asend = getattr(transport, "asend", None)
        if asend is not None:
            sending: Awaitable[None] = asend(events)
        else:
            context = contextvars.copy_context()
            call = functools.partial(context.run, transport.send, events)
            sending = asyncio.get_running_loop().run_in_executor(self._threads(), call)
        with naming_the_extra(transport):
            try:
                await asyncio.wait_for(sending, self.publish_timeout)
            except TimeoutError as exc:
                msg = (
                    f"the broker did not accept {len(events)} event(s) within "
                    f"{self.publish_timeout} s (EventBus(publish_timeout=...)); send them again: "
                    "handlers' inboxes make the ones that arrive twice harmless"
                )
                raise PublishError(msg) from exc

    def _threads(self) -> ThreadPoolExecutor:
        executor = self._executor
        if executor is None:
            with self._lock:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(
                        self.publish_threads, thread_name_prefix="tidings-publish"
                    )
                executor = self._executor
        return executor

    def close(self) -> None:
        """Close the transport's connections and stop the bus's publishing threads.

        Sends under way finish first. Publishing afterwards works again: connections and
        threads are made anew. Idempotent.
        """
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        if self.transport is not None:
            self.transport.close()

    async def aclose(self) -> None:
        """Like :meth:`close`, from an event loop: also closes the loop's async connections.

        Waits for the transport's ``aclose`` coroutine if it has one; the rest runs in a
        thread, so the loop never waits on it.
        """
        aclose = getattr(self.transport, "aclose", None)
        if aclose is not None:
            await aclose()
        await asyncio.to_thread(self.close)

    def _route(
        self, events: Iterable[DomainEvent]
    ) -> list[tuple[DomainEvent, tuple[Handler, ...]]]:
        return [(event, self.handlers_for(type(event))) for event in self._checked(events)]

    @staticmethod
    def _checked(events: Iterable[DomainEvent]) -> tuple[DomainEvent, ...]:
        checked = tuple(events)
        for event in checked:
            if not isinstance(event, DomainEvent):
                msg = f"publish() takes DomainEvent instances, not {type(event).__name__}"
                raise UsageError(msg)
        return checked


async def _awaited(result: Awaitable[Any]) -> None:
    await result


def _handle_span(
    hooks: _tracing.TracingHooks, handler: Handler, event: DomainEvent
) -> _tracing.HandleSpan:
    """The span of an inline handler run: a child of the publish (or relay) span."""
    return hooks.handle(
        handler.name,
        event,
        body=None,
        system="tidings",
        destination=type(event).event_type,
        attempt=1,
    )


def _noted(exc: Exception, handler: Handler, event: DomainEvent) -> Exception:
    exc.add_note(
        f"in handler {handler.name!r} for {type(event).event_type!r} event {event.event_id}"
    )
    return exc


def _group(failures: list[Exception]) -> HandlerFailedError:
    count = len(failures)
    return HandlerFailedError(f"{count} handler{'s' if count > 1 else ''} failed", failures)
