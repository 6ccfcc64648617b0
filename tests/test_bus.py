import asyncio
import threading
from dataclasses import dataclass
from typing import ClassVar

import pytest

from tidings import (
    DomainEvent,
    DuplicateHandlerError,
    EventBus,
    HandlerFailedError,
    PublishError,
    TidingsError,
    UsageError,
    current_context,
    event_context,
    register_event,
)


@register_event
@dataclass(frozen=True)
class ItemAdded(DomainEvent):
    event_type: ClassVar[str] = "bus_test.item_added"
    sku: str = ""


@register_event
@dataclass(frozen=True)
class PriorityItemAdded(ItemAdded):
    event_type: ClassVar[str] = "bus_test.priority_item_added"


@register_event
@dataclass(frozen=True)
class ItemShipped(DomainEvent):
    event_type: ClassVar[str] = "bus_test.item_shipped"
    sku: str = ""


def test_publish_runs_subscribed_handler_inline():
    """A handler subscribed to a class runs synchronously, in the publishing thread."""
    bus = EventBus()
    seen: list[tuple[str, int | None]] = []

    @bus.subscribe(ItemAdded)
    def record(event: ItemAdded) -> None:
        seen.append((event.sku, threading.get_ident()))

    bus.publish(ItemAdded(sku="a"))
    assert seen == [("a", threading.get_ident())]


def test_base_class_subscription_receives_subclasses_and_domain_event_receives_all():
    """Subscribing to a base class receives its subclasses; DomainEvent receives every event."""
    bus = EventBus()
    by_base: list[str] = []
    everything: list[str] = []
    bus.add_handler(lambda e: by_base.append(e.event_type), ItemAdded, name="t.base")
    bus.add_handler(lambda e: everything.append(e.event_type), DomainEvent, name="t.all")

    bus.publish(ItemAdded(), PriorityItemAdded(), ItemShipped())

    assert by_base == ["bus_test.item_added", "bus_test.priority_item_added"]
    assert everything == [
        "bus_test.item_added",
        "bus_test.priority_item_added",
        "bus_test.item_shipped",
    ]


def test_handlers_run_in_subscription_order_and_once_per_event():
    """Handlers of one event run in subscription order, each once even if subscribed twice over."""
    bus = EventBus()
    calls: list[str] = []
    bus.add_handler(lambda e: calls.append("first"), ItemAdded, name="t.first")
    bus.add_handler(lambda e: calls.append("both"), ItemAdded, PriorityItemAdded, name="t.both")
    bus.add_handler(lambda e: calls.append("last"), DomainEvent, name="t.last")

    bus.publish(PriorityItemAdded())

    assert calls == ["first", "both", "last"]


def test_handler_sees_event_context_and_follow_up_events_are_linked():
    """Inside a handler the context is the event's, so events it creates carry its ids."""
    bus = EventBus()
    follow_ups: list[ItemShipped] = []
    contexts = []

    @bus.subscribe(ItemAdded)
    def ship(event: ItemAdded) -> None:
        contexts.append(current_context())
        follow_ups.append(ItemShipped(sku=event.sku))

    with event_context(correlation_id="corr-1", tenant_id="tenant-a"):
        added = ItemAdded(sku="x")
    bus.publish(added)

    assert contexts[0].correlation_id == "corr-1"
    assert contexts[0].tenant_id == "tenant-a"
    assert contexts[0].causation_id == added.event_id
    shipped = follow_ups[0]
    assert (shipped.correlation_id, shipped.tenant_id, shipped.causation_id) == (
        "corr-1",
        "tenant-a",
        added.event_id,
    )
    assert current_context().correlation_id is None


def test_publish_restores_the_publishers_context_even_when_handlers_fail():
    """After publish returns or raises, the publisher's own context is in force again."""
    bus = EventBus()

    @bus.subscribe(ItemAdded)
    def boom(event: ItemAdded) -> None:
        raise ValueError("no")

    with event_context(correlation_id="outer", tenant_id="t"):
        with pytest.raises(HandlerFailedError):
            bus.publish(ItemAdded(correlation_id="inner", tenant_id="u"))
        assert current_context().correlation_id == "outer"
        assert current_context().tenant_id == "t"
        assert current_context().causation_id is None


def test_every_handler_runs_when_one_fails_and_failures_are_grouped():
    """A failing handler does not stop the others; all failures are raised afterwards together."""
    bus = EventBus()
    ran: list[str] = []

    def fail_value(event: DomainEvent) -> None:
        ran.append("value")
        raise ValueError("bad value")

    def succeed(event: DomainEvent) -> None:
        ran.append("ok")

    def fail_key(event: DomainEvent) -> None:
        ran.append("key")
        raise KeyError("missing")

    bus.add_handler(fail_value, ItemAdded, name="t.fail_value")
    bus.add_handler(succeed, ItemAdded, name="t.succeed")
    bus.add_handler(fail_key, ItemAdded, name="t.fail_key")
    first, second = ItemAdded(), ItemAdded()

    with pytest.raises(HandlerFailedError) as caught:
        bus.publish(first, second)

    assert ran == ["value", "ok", "key"] * 2
    group = caught.value
    assert isinstance(group, ExceptionGroup)
    assert isinstance(group, TidingsError)
    assert [type(e) for e in group.exceptions] == [ValueError, KeyError] * 2
    notes = group.exceptions[0].__notes__
    assert any("t.fail_value" in n and first.event_id in n for n in notes)
    matched, rest = group.split(KeyError)
    assert matched is not None
    assert len(matched.exceptions) == 2
    assert rest is not None
    assert len(rest.exceptions) == 2


def test_except_star_catches_inner_exception_types():
    """Callers can handle grouped handler failures by type with except*."""
    bus = EventBus()

    @bus.subscribe(ItemAdded, name="t.lookup")
    def lookup(event: ItemAdded) -> None:
        raise LookupError(event.sku)

    caught: list[BaseException] = []
    try:
        bus.publish(ItemAdded(sku="z"))
    except* LookupError as group:
        caught.extend(group.exceptions)
    assert [e.args for e in caught] == [("z",)]


def test_duplicate_handler_names_are_refused():
    """Two handlers under one name are refused: the name is an idempotency key."""
    bus = EventBus()
    bus.add_handler(lambda e: None, ItemAdded, name="t.same")
    with pytest.raises(DuplicateHandlerError, match=r"t\.same"):
        bus.add_handler(lambda e: None, ItemShipped, name="t.same")


def test_default_handler_name_is_module_and_qualified_name():
    """Without name=, a handler is named module.qualname, stable across processes."""
    bus = EventBus()

    def on_item(event: ItemAdded) -> None:
        return None

    handler = bus.add_handler(on_item, ItemAdded)
    assert (
        handler.name
        == f"{__name__}.test_default_handler_name_is_module_and_qualified_name.<locals>.on_item"
    )
    with pytest.raises(DuplicateHandlerError):
        bus.add_handler(on_item, ItemShipped)
    assert [h.name for h in bus.handlers] == [handler.name]


def test_lambda_without_a_name_is_refused_with_the_fix():
    """A lambda has no stable name, so subscribing one without name= says to pass a name."""
    bus = EventBus()
    with pytest.raises(UsageError, match="name="):
        bus.add_handler(lambda e: None, ItemAdded)


def test_subscribe_refuses_missing_or_non_event_classes():
    """subscribe() needs at least one DomainEvent subclass."""
    bus = EventBus()
    with pytest.raises(UsageError):
        bus.subscribe()(lambda e: None)
    with pytest.raises(UsageError):
        bus.add_handler(lambda e: None, int, name="t.int")  # type: ignore[arg-type]


def test_publish_refuses_non_events():
    """publish() takes DomainEvent instances only, and runs nothing otherwise."""
    bus = EventBus()
    ran: list[object] = []
    bus.add_handler(ran.append, DomainEvent, name="t.all")
    with pytest.raises(UsageError):
        bus.publish(ItemAdded(), {"event_type": "x"})  # type: ignore[arg-type]
    assert ran == []


def test_publish_with_async_handler_points_to_apublish_before_running_anything():
    """Sync publish refuses events with async handlers, before any handler has run."""
    bus = EventBus()
    ran: list[str] = []
    bus.add_handler(lambda e: ran.append("sync"), ItemAdded, name="t.sync")

    @bus.subscribe(ItemAdded, name="t.async")
    async def later(event: ItemAdded) -> None:
        ran.append("async")

    with pytest.raises(UsageError, match="apublish"):
        bus.publish(ItemAdded())
    assert ran == []


def test_apublish_awaits_async_handlers_in_order_with_context():
    """Awaiting apublish runs sync and async handlers in order, with the event context bound."""
    bus = EventBus()
    ran: list[tuple[str, str | None]] = []

    @bus.subscribe(ItemAdded, name="t.a1")
    async def first(event: ItemAdded) -> None:
        await asyncio.sleep(0)
        ran.append(("async", current_context().causation_id))

    bus.add_handler(
        lambda e: ran.append(("sync", current_context().causation_id)), ItemAdded, name="t.s"
    )

    @bus.subscribe(ItemAdded, name="t.a2")
    async def fails(event: ItemAdded) -> None:
        raise RuntimeError("async boom")

    event = ItemAdded()

    async def main() -> None:
        with pytest.raises(HandlerFailedError) as caught:
            await bus.apublish(event)
        assert [type(e) for e in caught.value.exceptions] == [RuntimeError]
        assert current_context().causation_id is None

    asyncio.run(main())
    assert ran == [("async", event.event_id), ("sync", event.event_id)]


def test_nested_publish_from_a_handler_runs_follow_ups_depth_first():
    """A handler publishing a follow-up runs its handlers inline, then the outer ones go on."""
    bus = EventBus()
    order: list[str] = []

    @bus.subscribe(ItemAdded, name="t.ship")
    def ship(event: ItemAdded) -> None:
        order.append("ship:start")
        bus.publish(ItemShipped(sku=event.sku))
        order.append("ship:end")

    @bus.subscribe(ItemShipped, name="t.notify")
    def notify(event: ItemShipped) -> None:
        order.append(f"notify:{current_context().causation_id == event.event_id}")

    bus.add_handler(lambda e: order.append("audit"), ItemAdded, name="t.audit")
    bus.publish(ItemAdded(sku="n"))
    assert order == ["ship:start", "notify:True", "ship:end", "audit"]


def test_subscribing_while_other_threads_publish_is_safe():
    """Handlers added while another thread publishes never break routing."""
    bus = EventBus()
    errors: list[BaseException] = []
    done = threading.Event()

    def publisher() -> None:
        try:
            while not done.is_set():
                bus.publish(ItemAdded())
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            errors.append(exc)

    thread = threading.Thread(target=publisher)
    thread.start()
    try:
        for index in range(2000):
            bus.add_handler(lambda e: None, DomainEvent, name=f"t.h{index}")
    finally:
        done.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert errors == []
    assert len(bus.handlers_for(ItemAdded)) == 2000


class HungTransport:
    """A transport whose broker accepts the send and never answers (until released)."""

    name = "hung"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.sending = threading.Event()

    def bind(self, bus: EventBus) -> None:
        pass

    def subscribed(self, handler: object) -> None:
        pass

    def send(self, events: object) -> None:
        self.sending.set()
        self.release.wait(30)

    def close(self) -> None:
        self.release.set()


def test_apublish_to_a_hung_broker_raises_within_the_timeout_and_never_blocks_the_loop():
    """``apublish`` raises PublishError after ``publish_timeout``; the loop keeps running."""
    transport = HungTransport()
    bus = EventBus(transport, publish_timeout=0.3)
    ticks = []

    async def scenario() -> None:
        async def heartbeat() -> None:
            while True:
                ticks.append(asyncio.get_running_loop().time())
                await asyncio.sleep(0.01)

        beating = asyncio.create_task(heartbeat())
        try:
            with pytest.raises(PublishError, match=r"within 0\.3 s"):
                await bus.apublish(ItemAdded(sku="a"))
        finally:
            beating.cancel()
            transport.close()  # lets the loop's executor shut down at the end of the run

    asyncio.run(scenario())
    assert transport.sending.is_set()
    assert len(ticks) >= 3, "the event loop waited on the broker"


def test_publish_timeout_must_be_positive():
    """A zero or negative timeout is a configuration error, said at once."""
    with pytest.raises(ValueError, match="publish_timeout"):
        EventBus(publish_timeout=0)
