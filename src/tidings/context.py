"""The context that follows every hop: correlation, causation and tenant ids.

One :class:`~contextvars.ContextVar` holds an immutable :class:`EventContext`, so a read is one
lookup and a scope is one token. Values follow threads and asyncio tasks exactly as contextvars
do: a new task copies the context of the code that created it, a new thread starts empty (use
``contextvars.copy_context().run`` or an executor that copies it to carry the values over).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from contextvars import ContextVar, Token
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, TypeVar, cast

__all__ = ["EventContext", "current_context", "event_context"]

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class EventContext:
    """The ids bound for the code running now; each is ``None`` where nothing bound it.

    Attributes:
        correlation_id: ties together everything one request (or job) caused.
        causation_id: the ``event_id`` of the event whose handling is running now.
        tenant_id: the tenant the work is done for.
    """

    correlation_id: str | None = None
    causation_id: str | None = None
    tenant_id: str | None = None


EMPTY: Final = EventContext()
_current: ContextVar[EventContext] = ContextVar("tidings_context", default=EMPTY)


def current_context() -> EventContext:
    """Return the context bound for the running code (all ``None`` outside any scope)."""
    return _current.get()


class _Unset:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<unset>"


_UNSET: Final = _Unset()


class event_context:  # noqa: N801 - used like a function: `with event_context(...)`
    """Bind correlation, causation and tenant ids for a block, a function or a coroutine.

    Use as ``with event_context(correlation_id=cid, tenant_id=t):``, ``async with ...``, or as a
    decorator on a sync or async function (each call gets its own scope). An argument left out
    keeps the outer value; an argument given as ``None`` clears it inside the scope. Scopes nest,
    and leaving one restores exactly the values that were bound before it, through the token,
    even when the block raised. One instance must not be entered twice at the same time; the
    decorator form makes a fresh scope per call, so it is safe for concurrent calls.

    Entering returns the :class:`EventContext` now in force.
    """

    __slots__ = ("_causation_id", "_correlation_id", "_tenant_id", "_tokens")

    def __init__(
        self,
        *,
        correlation_id: str | _Unset | None = _UNSET,
        causation_id: str | _Unset | None = _UNSET,
        tenant_id: str | _Unset | None = _UNSET,
    ) -> None:
        for name, value in (
            ("correlation_id", correlation_id),
            ("causation_id", causation_id),
            ("tenant_id", tenant_id),
        ):
            if not (value is None or isinstance(value, str | _Unset)):
                msg = f"event_context({name}=...) takes a str or None, not {type(value).__name__}"
                raise TypeError(msg)
        self._correlation_id = correlation_id
        self._causation_id = causation_id
        self._tenant_id = tenant_id
        self._tokens: list[Token[EventContext]] = []

    def _bound(self, outer: EventContext) -> EventContext:
        return EventContext(
            correlation_id=outer.correlation_id
            if isinstance(self._correlation_id, _Unset)
            else self._correlation_id,
            causation_id=outer.causation_id
            if isinstance(self._causation_id, _Unset)
            else self._causation_id,
            tenant_id=outer.tenant_id if isinstance(self._tenant_id, _Unset) else self._tenant_id,
        )

    def __enter__(self) -> EventContext:
        bound = self._bound(_current.get())
        self._tokens.append(_current.set(bound))
        return bound

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _current.reset(self._tokens.pop())

    async def __aenter__(self) -> EventContext:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    def _fresh(self) -> event_context:
        return event_context(
            correlation_id=self._correlation_id,
            causation_id=self._causation_id,
            tenant_id=self._tenant_id,
        )

    def __call__(self, func: F) -> F:
        """Decorate ``func`` so that every call runs inside its own copy of this scope.

        Raises:
            TypeError: ``func`` is a generator function; its body runs after the call returns,
                outside any scope the decorator could hold open. Use ``with`` inside it.
        """
        if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
            msg = (
                f"@event_context cannot scope the generator {func.__qualname__}: its body runs "
                "after the call returns; use `with event_context(...)` inside it instead"
            )
            raise TypeError(msg)
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with self._fresh():
                    return await func(*args, **kwargs)

            return cast(F, async_wrapper)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self._fresh():
                return func(*args, **kwargs)

        return cast(F, wrapper)


def bind(context: EventContext) -> Token[EventContext]:
    """Make ``context`` current and return the token that restores the previous one.

    For transports and the bus, which bind a whole received context at once; pair every call
    with :func:`reset` in a ``finally``.
    """
    return _current.set(context)


def reset(token: Token[EventContext]) -> None:
    """Restore the context that was current before the :func:`bind` that returned ``token``."""
    _current.reset(token)
