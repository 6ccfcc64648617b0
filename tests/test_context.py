"""Behaviour of event_context and current_context: scopes, nesting, threads and asyncio."""

import asyncio
import contextvars
import functools
import inspect
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import pytest

from tidings import DomainEvent, EventContext, current_context, event_context, register_event

WAIT = 10.0
EMPTY = EventContext()
T = TypeVar("T")


@register_event
@dataclass(frozen=True)
class Pinged(DomainEvent):
    event_type: ClassVar[str] = "test_context.pinged"
    n: int = 0


@pytest.fixture(autouse=True)
def context_left_as_found() -> Iterator[None]:
    """Every test must leave the context exactly as it found it."""
    before = current_context()
    yield
    assert current_context() == before


def ids(context: EventContext | None = None) -> tuple[str | None, str | None, str | None]:
    """(correlation_id, tenant_id, causation_id) of a context, the current one by default."""
    context = current_context() if context is None else context
    return context.correlation_id, context.tenant_id, context.causation_id


def in_thread(func: Callable[[], T]) -> T:
    """Run func in a new thread and return its result, re-raising what it raised."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(("ok", func()))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            outcome.append(("error", exc))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(WAIT)
    assert not thread.is_alive(), "thread did not finish in time"
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value  # type: ignore[no-any-return]


# -- current_context ------------------------------------------------------------------------


def test_current_context_outside_any_scope_is_all_none() -> None:
    """In a fresh context current_context() has all three ids None."""
    context = contextvars.Context().run(current_context)
    assert context.correlation_id is None
    assert context.tenant_id is None
    assert context.causation_id is None
    assert context == EMPTY


def test_current_context_reports_what_is_bound() -> None:
    """current_context() has the bound ids and None for the ones nobody bound."""
    with event_context(correlation_id="c-1"):
        context = current_context()
        assert isinstance(context, EventContext)
        assert ids(context) == ("c-1", None, None)
    with event_context(correlation_id="c-2", tenant_id="t-2", causation_id="e-2"):
        assert ids() == ("c-2", "t-2", "e-2")


def test_current_context_is_immutable() -> None:
    """The object current_context() returns cannot be changed in place."""
    with event_context(tenant_id="t"):
        context = current_context()
        with pytest.raises(AttributeError):
            context.tenant_id = "other"  # type: ignore[misc]
        assert current_context().tenant_id == "t"


# -- as a context manager -------------------------------------------------------------------


def test_context_manager_binds_and_restores() -> None:
    """Inside `with event_context(...)` the ids are bound; after it the outer ones are back."""
    before = ids()
    with event_context(correlation_id="corr", tenant_id="tenant", causation_id="cause") as ctx:
        assert ids() == ("corr", "tenant", "cause")
        assert ctx == current_context()
    assert ids() == before


def test_context_manager_does_not_swallow_exceptions() -> None:
    """An exception raised inside the block propagates and the context is still restored."""
    before = current_context()
    seen: list[EventContext] = []

    class Boom(Exception):
        pass

    def block() -> None:
        with event_context(correlation_id="doomed"):
            seen.append(current_context())
            raise Boom

    with pytest.raises(Boom):
        block()
    assert seen[0].correlation_id == "doomed"
    assert current_context() == before


def test_empty_event_context_keeps_everything() -> None:
    """event_context() with no arguments keeps every outer value."""
    with event_context(correlation_id="c", tenant_id="t", causation_id="e"):
        with event_context() as inner:
            assert ids(inner) == ("c", "t", "e")
        assert ids() == ("c", "t", "e")


def test_left_out_arguments_keep_the_outer_values() -> None:
    """An argument not given keeps its outer value while the given ones change."""
    with event_context(correlation_id="c", tenant_id="t", causation_id="e"):
        with event_context(tenant_id="t2"):
            assert ids() == ("c", "t2", "e")
        with event_context(causation_id="e2"):
            assert ids() == ("c", "t", "e2")
        with event_context(correlation_id="c2"):
            assert ids() == ("c2", "t", "e")


def test_none_clears_a_value_inside_the_scope() -> None:
    """An argument given as None clears that id inside the scope and it returns afterwards."""
    with event_context(correlation_id="c", tenant_id="t", causation_id="e"):
        with event_context(tenant_id=None, causation_id=None):
            assert ids() == ("c", None, None)
            assert Pinged().tenant_id is None
        with event_context(correlation_id=None):
            assert current_context().correlation_id is None
            event = Pinged()
            assert event.correlation_id not in (None, "c")
        assert ids() == ("c", "t", "e")


def test_nesting_restores_outer_values_exactly() -> None:
    """Leaving each nested scope restores exactly the values bound before it."""
    outermost = current_context()
    with event_context(correlation_id="c1", tenant_id="t1") as first:
        with event_context(causation_id="e2", tenant_id="t2") as second:
            with event_context(correlation_id="c3", tenant_id=None) as third:
                assert ids(third) == ("c3", None, "e2")
                assert current_context() == third
            assert current_context() == second
            assert ids(second) == ("c1", "t2", "e2")
        assert current_context() == first
        assert ids(first) == ("c1", "t1", outermost.causation_id)
    assert current_context() == outermost


def test_nesting_restores_outer_values_when_blocks_raise() -> None:
    """An exception escaping several nested scopes restores each outer context on the way out."""
    seen: list[EventContext] = []

    def blocks() -> None:
        with event_context(tenant_id="t-middle"):
            seen.append(current_context())
            try:
                with event_context(correlation_id="inner", causation_id="e-inner"):
                    seen.append(current_context())
                    raise KeyError("boom")
            finally:
                seen.append(current_context())

    with event_context(correlation_id="outer", tenant_id="t-outer"):
        outer = current_context()
        with pytest.raises(KeyError):
            blocks()
        middle, inner, after_inner = seen
        assert ids(middle) == ("outer", "t-middle", outer.causation_id)
        assert ids(inner) == ("inner", "t-middle", "e-inner")
        assert after_inner == middle
        assert current_context() == outer


def test_one_instance_can_be_reused_sequentially() -> None:
    """The same event_context object can be entered again after it was left."""
    before = current_context()
    scope = event_context(tenant_id="reused")
    for _ in range(3):
        with scope:
            assert current_context().tenant_id == "reused"
        assert current_context() == before
    with scope, event_context(correlation_id="x"):
        assert ids()[:2] == ("x", "reused")


def test_events_created_in_scope_take_its_ids() -> None:
    """A DomainEvent built inside the scope gets its correlation, tenant and causation ids."""
    with event_context(correlation_id="c", tenant_id="t", causation_id="e"):
        event = Pinged(n=1)
    assert (event.correlation_id, event.tenant_id, event.causation_id) == ("c", "t", "e")


@pytest.mark.parametrize("name", ["correlation_id", "tenant_id", "causation_id"])
@pytest.mark.parametrize(
    "value", [123, 1.5, b"bytes", uuid.UUID(int=1), ["list"], object()], ids=repr
)
def test_non_string_values_raise_type_error(name: str, value: object) -> None:
    """Giving event_context a value that is neither str nor None raises TypeError naming it."""
    with pytest.raises(TypeError) as info:
        event_context(**{name: value})  # type: ignore[arg-type]
    assert name in str(info.value)


def test_positional_arguments_are_refused() -> None:
    """event_context takes keyword arguments only, so ids cannot be swapped by position."""
    with pytest.raises(TypeError):
        event_context("c", "t")  # type: ignore[misc]


# -- as an async context manager ------------------------------------------------------------


def test_async_context_manager_binds_and_restores() -> None:
    """`async with event_context(...)` binds the ids across awaits and restores them after."""

    async def main() -> tuple[Any, ...]:
        before = current_context()
        async with event_context(correlation_id="ac", tenant_id="at") as ctx:
            await asyncio.sleep(0)
            inside = ids()
            entered = ctx
        return before, inside, entered, current_context()

    before, inside, entered, after = asyncio.run(main())
    assert inside == ("ac", "at", None)
    assert ids(entered) == ("ac", "at", None)
    assert after == before


def test_async_context_manager_restores_when_the_block_raises() -> None:
    """An exception inside `async with event_context(...)` propagates and the context returns."""

    async def failing_block() -> None:
        async with event_context(correlation_id="inner", tenant_id="t"):
            await asyncio.sleep(0)
            raise ValueError("async boom")

    async def main() -> EventContext:
        async with event_context(correlation_id="outer"):
            with pytest.raises(ValueError, match="async boom"):
                await failing_block()
            return current_context()

    assert ids(asyncio.run(main())) == ("outer", None, None)


# -- as a decorator -------------------------------------------------------------------------


def test_decorator_on_a_sync_function() -> None:
    """A decorated function runs inside the scope; the caller's context is unchanged after."""

    @event_context(correlation_id="dc", tenant_id="dt")
    def work(x: int) -> tuple[int, EventContext]:
        """Do the work."""
        return x * 2, current_context()

    before = current_context()
    result, inside = work(21)
    assert result == 42
    assert ids(inside) == ("dc", "dt", before.causation_id)
    assert current_context() == before
    assert work.__name__ == "work"
    assert work.__doc__ == "Do the work."


def test_decorator_binds_on_top_of_the_callers_context_at_call_time() -> None:
    """Arguments the decorator leaves out come from the context of each call, not of decoration."""

    @event_context(tenant_id="decorated-tenant")
    def work() -> EventContext:
        return current_context()

    with event_context(correlation_id="call-1", causation_id="cause-1"):
        first = work()
    with event_context(correlation_id="call-2"):
        second = work()
    assert ids(first) == ("call-1", "decorated-tenant", "cause-1")
    assert second.correlation_id == "call-2"
    assert second.tenant_id == "decorated-tenant"


def test_decorator_restores_when_the_function_raises() -> None:
    """When a decorated function raises, the exception propagates and the context returns."""

    @event_context(correlation_id="failing")
    def fail() -> None:
        assert current_context().correlation_id == "failing"
        raise RuntimeError("decorated failure")

    with event_context(correlation_id="caller"):
        with pytest.raises(RuntimeError, match="decorated failure"):
            fail()
        assert current_context().correlation_id == "caller"


def test_decorated_function_is_reentrant() -> None:
    """A decorated function that calls itself gets a scope per call and unwinds cleanly."""
    depths: list[tuple[int, EventContext]] = []

    @event_context(correlation_id="recursive")
    def recurse(n: int) -> None:
        with event_context(tenant_id=f"depth-{n}"):
            if n:
                recurse(n - 1)
            depths.append((n, current_context()))

    recurse(5)
    assert [n for n, _ in depths] == [0, 1, 2, 3, 4, 5]
    for n, context in depths:
        assert context.correlation_id == "recursive"
        assert context.tenant_id == f"depth-{n}"


def test_decorated_sync_function_is_safe_concurrently() -> None:
    """Threads inside one decorated function at the same time each see their own scope."""
    threads = 8
    barrier = threading.Barrier(threads, timeout=WAIT)

    @event_context(correlation_id="shared-decorator")
    def work(i: int) -> tuple[EventContext, EventContext, EventContext]:
        entered = current_context()
        with event_context(tenant_id=f"t-{i}"):
            barrier.wait()  # every thread is inside its own nested scope now
            nested = current_context()
            barrier.wait()
        return entered, nested, current_context()

    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(pool.map(work, range(threads)))
    for i, (entered, nested, left) in enumerate(results):
        assert ids(entered) == ("shared-decorator", None, None)
        assert ids(nested) == ("shared-decorator", f"t-{i}", None)
        assert left == entered


def test_decorator_on_an_async_function() -> None:
    """A decorated coroutine function stays one, and its body runs inside the scope."""

    @event_context(correlation_id="adc", causation_id="ade")
    async def handle(x: int) -> tuple[int, EventContext]:
        await asyncio.sleep(0)
        return x + 1, current_context()

    assert inspect.iscoroutinefunction(handle)
    assert handle.__name__ == "handle"

    async def main() -> tuple[int, EventContext, EventContext, EventContext]:
        before = current_context()
        result, inside = await handle(1)
        return result, inside, before, current_context()

    result, inside, before, after = asyncio.run(main())
    assert result == 2
    assert (inside.correlation_id, inside.causation_id) == ("adc", "ade")
    assert after == before


def test_decorated_async_function_is_safe_concurrently() -> None:
    """Concurrent calls of one decorated coroutine, interleaved, each see only their own scope."""
    calls = 10

    @event_context(correlation_id="async-shared")
    async def handle(i: int, barrier: asyncio.Barrier) -> tuple[EventContext, EventContext]:
        with event_context(tenant_id=f"t-{i}"):
            await asyncio.wait_for(barrier.wait(), WAIT)  # all calls are suspended in scope
            for _ in range(3):
                await asyncio.sleep(0)
            nested = current_context()
        return nested, current_context()

    async def main() -> tuple[list[tuple[EventContext, EventContext]], EventContext]:
        barrier = asyncio.Barrier(calls)
        results = await asyncio.gather(*(handle(i, barrier) for i in range(calls)))
        return list(results), current_context()

    outside = current_context()
    results, after = asyncio.run(main())
    assert after == outside
    for i, (nested, left) in enumerate(results):
        assert ids(nested) == ("async-shared", f"t-{i}", None)
        assert ids(left) == ("async-shared", None, None)


def test_decorated_async_function_awaited_sequentially_in_one_task() -> None:
    """Awaiting a decorated coroutine several times in one task restores the context each time."""

    @event_context(tenant_id="per-call")
    async def handle() -> str | None:
        await asyncio.sleep(0)
        return current_context().tenant_id

    async def main() -> list[Any]:
        seen: list[Any] = []
        async with event_context(tenant_id="caller"):
            for _ in range(3):
                seen.append(await handle())
                seen.append(current_context().tenant_id)
        return seen

    assert asyncio.run(main()) == ["per-call", "caller"] * 3


# -- threads --------------------------------------------------------------------------------


def test_a_new_thread_starts_empty() -> None:
    """A thread started inside a scope does not see the ids bound in the starting thread."""
    with event_context(correlation_id="main", tenant_id="main-tenant", causation_id="main-e"):
        seen = in_thread(current_context)
        event = in_thread(Pinged)
    assert seen == EMPTY
    assert event.correlation_id != "main"
    assert event.tenant_id is None
    assert event.causation_id is None


def test_a_threads_scope_does_not_leak_into_other_threads() -> None:
    """While another thread is inside a scope, this thread's context is unchanged."""
    entered = threading.Event()
    release = threading.Event()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with event_context(correlation_id="worker", tenant_id="worker-tenant"):
                entered.set()
                assert release.wait(WAIT)
                assert ids() == ("worker", "worker-tenant", None)
        except BaseException as exc:  # noqa: BLE001 - reported to the main thread below
            errors.append(exc)
            entered.set()

    with event_context(correlation_id="main"):
        thread = threading.Thread(target=worker)
        thread.start()
        try:
            assert entered.wait(WAIT)
            assert ids() == ("main", None, None)
        finally:
            release.set()
            thread.join(WAIT)
    assert not thread.is_alive()
    assert errors == []


def test_copy_context_carries_ids_into_a_thread() -> None:
    """contextvars.copy_context().run carries the bound ids into another thread."""
    with event_context(correlation_id="copied", tenant_id="copied-tenant"):
        snapshot = contextvars.copy_context()
    seen = in_thread(lambda: snapshot.run(current_context))
    assert ids(seen) == ("copied", "copied-tenant", None)


def test_concurrent_threads_keep_their_own_scopes() -> None:
    """Threads each inside their own scope at the same moment never see each other's ids."""
    threads = 8
    barrier = threading.Barrier(threads, timeout=WAIT)

    def work(i: int) -> list[tuple[str | None, str | None, str | None]]:
        seen = []
        with event_context(correlation_id=f"c-{i}", tenant_id=f"t-{i}", causation_id=f"e-{i}"):
            for _ in range(3):
                barrier.wait()
                seen.append(ids())
                event = Pinged()
                seen.append((event.correlation_id, event.tenant_id, event.causation_id))
        seen.append(ids())
        return seen

    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(pool.map(work, range(threads)))
    for i, seen in enumerate(results):
        assert seen[:-1] == [(f"c-{i}", f"t-{i}", f"e-{i}")] * 6
        assert seen[-1] == (None, None, None)


# -- asyncio tasks --------------------------------------------------------------------------


def test_tasks_copy_the_context_at_creation() -> None:
    """A task sees the ids bound where it was created; later changes on either side stay put."""

    async def main() -> dict[str, Any]:
        child_inside = asyncio.Event()
        parent_changed = asyncio.Event()
        seen: dict[str, Any] = {}

        async def child() -> None:
            seen["child_start"] = current_context()
            with event_context(tenant_id="child-tenant"):
                child_inside.set()
                await asyncio.wait_for(parent_changed.wait(), WAIT)
                seen["child_after_parent_changed"] = current_context()
            seen["child_end"] = current_context()

        with event_context(correlation_id="parent", tenant_id="parent-tenant"):
            task = asyncio.create_task(child())
            await asyncio.wait_for(child_inside.wait(), WAIT)
            seen["parent_while_child_inside"] = current_context()
            with event_context(correlation_id="parent-changed"):
                parent_changed.set()
                await asyncio.wait_for(task, WAIT)
        seen["parent_end"] = current_context()
        return seen

    outside = current_context()
    seen = asyncio.run(main())
    assert ids(seen["child_start"]) == ("parent", "parent-tenant", None)
    assert ids(seen["parent_while_child_inside"]) == ("parent", "parent-tenant", None)
    assert ids(seen["child_after_parent_changed"]) == ("parent", "child-tenant", None)
    assert ids(seen["child_end"]) == ("parent", "parent-tenant", None)
    assert seen["parent_end"] == outside


def test_concurrent_tasks_never_see_each_others_ids() -> None:
    """Many tasks, each in its own scope and interleaving at awaits, see only their own ids."""
    tasks = 20

    async def work(i: int, barrier: asyncio.Barrier) -> list[Any]:
        seen: list[Any] = []
        async with event_context(correlation_id=f"c-{i}", tenant_id=f"t-{i}"):
            for round_ in range(3):
                async with event_context(causation_id=f"e-{i}-{round_}"):
                    await asyncio.wait_for(barrier.wait(), WAIT)
                    seen.append(ids())
                    event = Pinged(n=i)
                    seen.append((event.correlation_id, event.tenant_id, event.causation_id))
        seen.append(ids())
        return seen

    async def main() -> list[list[Any]]:
        barrier = asyncio.Barrier(tasks)
        return list(await asyncio.gather(*(work(i, barrier) for i in range(tasks))))

    outside = current_context()
    for i, seen in enumerate(asyncio.run(main())):
        expected = []
        for round_ in range(3):
            expected += [(f"c-{i}", f"t-{i}", f"e-{i}-{round_}")] * 2
        assert seen[:-1] == expected
        assert seen[-1] == ids(outside)


def test_to_thread_carries_the_context() -> None:
    """asyncio.to_thread copies the context into the worker thread, as contextvars do."""

    async def main() -> EventContext:
        async with event_context(correlation_id="to-thread", tenant_id="tt"):
            return await asyncio.to_thread(current_context)

    assert ids(asyncio.run(main())) == ("to-thread", "tt", None)


def test_asyncio_run_starts_from_the_callers_context() -> None:
    """asyncio.run copies the calling thread's context into the main task."""

    async def main() -> EventContext:
        return current_context()

    with event_context(correlation_id="run-caller"):
        seen = asyncio.run(main())
    assert seen.correlation_id == "run-caller"


def test_decorator_preserves_function_metadata() -> None:
    """The decorator keeps the wrapped function reachable through __wrapped__."""

    def plain(a: int, b: int = 2) -> int:
        return a + b

    wrapped = event_context(tenant_id="meta")(plain)
    assert wrapped.__wrapped__ is plain  # type: ignore[attr-defined]
    assert inspect.signature(wrapped) == inspect.signature(plain)
    assert wrapped(1) == 3
    partial = functools.partial(wrapped, 5)
    assert partial(b=5) == 10


def test_decorating_a_generator_function_is_refused_with_the_fix():
    """The decorator refuses generator functions, whose bodies would run outside its scope."""

    def numbers():
        yield 1

    async def stream():
        yield 1

    for func in (numbers, stream):
        with pytest.raises(TypeError, match="inside it"):
            event_context(tenant_id="t")(func)
