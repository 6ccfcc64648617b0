import asyncio
import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import pytest

from tidings import DomainEvent, EventBus, current_context, encode, event_context, register_event
from tidings.delivery import Dispatcher, Received
from tidings.errors import InboxBusyError
from tidings.memory import MemoryDeadLetterStore, MemoryInbox
from tidings.ports import DeadLetter
from tidings.retry import RetryPolicy


@register_event
@dataclass(frozen=True)
class ParcelSent(DomainEvent):
    event_type: ClassVar[str] = "delivery_test.parcel_sent"
    parcel_id: str = ""


class Flaky(Exception):
    pass


def make(bus: EventBus, **kwargs) -> tuple[Dispatcher, MemoryInbox, MemoryDeadLetterStore]:
    inbox = MemoryInbox()
    letters = MemoryDeadLetterStore()
    return (
        Dispatcher(bus, inbox=inbox, dead_letters=letters, transport="test", **kwargs),
        inbox,
        letters,
    )


def received(event: DomainEvent, **kwargs) -> Received:
    return Received(encode(event), headers={"x": "1"}, destination="q", **kwargs)


def test_handlers_run_with_the_events_context_bound():
    """Each handler runs once with correlation and tenant of the event and causation = its id."""
    bus = EventBus()
    seen = []
    bus.add_handler(lambda e: seen.append(current_context()), ParcelSent, name="t.ctx")
    dispatcher, _, _ = make(bus)
    with event_context(correlation_id="c-1", tenant_id="acme"):
        event = ParcelSent(parcel_id="p")
    outcome = dispatcher.dispatch(received(event))
    assert outcome.handled == ("t.ctx",)
    assert (seen[0].correlation_id, seen[0].tenant_id, seen[0].causation_id) == (
        "c-1",
        "acme",
        event.event_id,
    )
    assert current_context().correlation_id is None


def test_redelivered_event_does_not_repeat_an_effect():
    """A second delivery of the same event is skipped by the inbox and reported as duplicate."""
    bus = EventBus()
    effects = []
    bus.add_handler(effects.append, ParcelSent, name="t.effect")
    dispatcher, _, _ = make(bus)
    message = received(ParcelSent())
    assert dispatcher.dispatch(message).handled == ("t.effect",)
    outcome = dispatcher.dispatch(message)
    assert outcome.duplicates == ("t.effect",)
    assert len(effects) == 1


def test_failing_handler_is_retried_then_dead_lettered_and_others_are_unaffected():
    """A poison handler is retried up to its limit, then dead-lettered; its siblings run once."""
    bus = EventBus()
    ok = []
    policy = RetryPolicy(max_attempts=3, initial_delay=0.5, multiplier=2, jitter=0)

    @bus.subscribe(ParcelSent, name="t.poison", retry=policy)
    def poison(event: ParcelSent) -> None:
        raise Flaky("always")

    bus.add_handler(ok.append, ParcelSent, name="t.ok")
    dispatcher, _, letters = make(bus)
    event = ParcelSent(parcel_id="p-9")

    first = dispatcher.dispatch(received(event))
    assert first.handled == ("t.ok",)
    assert [(r.handler, r.attempt, r.delay) for r in first.retries] == [("t.poison", 2, 0.5)]

    second = dispatcher.dispatch(received(event, handler="t.poison", attempt=2))
    assert [(r.attempt, r.delay) for r in second.retries] == [(3, 1.0)]
    assert second.handled == ()

    third = dispatcher.dispatch(received(event, handler="t.poison", attempt=3))
    assert third.retries == ()
    (letter,) = third.dead
    assert letters.get(letter.id) == letter
    assert (letter.handler, letter.attempts, letter.event_id, letter.event_type) == (
        "t.poison",
        3,
        event.event_id,
        "delivery_test.parcel_sent",
    )
    assert letter.reason == "Flaky: always"
    assert "raise Flaky" in letter.traceback
    assert letter.headers == {"x": "1"}
    assert (letter.transport, letter.destination) == ("test", "q")
    assert len(ok) == 1


def test_exception_outside_retry_on_is_dead_lettered_at_once():
    """An error the policy does not retry goes to the dead-letter store on the first attempt."""
    bus = EventBus()

    @bus.subscribe(ParcelSent, name="t.strict", retry=RetryPolicy(retry_on=(Flaky,)))
    def strict(event: ParcelSent) -> None:
        raise ValueError("bad data")

    dispatcher, _, letters = make(bus)
    outcome = dispatcher.dispatch(received(ParcelSent()))
    assert outcome.retries == ()
    assert letters.count() == 1
    assert outcome.dead[0].attempts == 1


def test_failed_attempt_releases_the_inbox_so_a_retry_runs():
    """After a failure the inbox claim is released, so the retry attempt runs the effect."""
    bus = EventBus()
    calls = []

    @bus.subscribe(ParcelSent, name="t.second_time_lucky")
    def lucky(event: ParcelSent) -> None:
        calls.append(event.event_id)
        if len(calls) == 1:
            raise Flaky("first")

    dispatcher, inbox, _ = make(bus)
    event = ParcelSent()
    retry = dispatcher.dispatch(received(event)).retries[0]
    outcome = dispatcher.dispatch(received(event, handler=retry.handler, attempt=retry.attempt))
    assert outcome.handled == ("t.second_time_lucky",)
    assert inbox.is_done("t.second_time_lucky", event.event_id, source="/tidings")
    assert len(calls) == 2


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"\x00\xffgarbage", "not valid JSON"),
        (b'{"type":"delivery_test.nobody","specversion":"1.0","id":"1"}', "unknown event type"),
        (pickle.dumps({"type": "delivery_test.parcel_sent"}), "not valid JSON"),
        (
            b'{"type":"delivery_test.parcel_sent","specversion":"1.0","id":"1",'
            b'"datacontenttype":"application/python-pickle","data":{}}',
            "JSON only",
        ),
    ],
)
def test_undecodable_messages_are_dead_lettered_at_once(body: bytes, why: str):
    """Bad input is dead-lettered on first sight with the reason, and dispatch does not raise."""
    bus = EventBus()
    bus.add_handler(lambda e: None, ParcelSent, name="t.never")
    dispatcher, _, letters = make(bus)
    outcome = dispatcher.dispatch(Received(body, destination="q"))
    assert outcome.event is None
    (letter,) = letters.list()
    assert letter.body == body
    assert why in letter.reason
    assert (letter.handler, letter.attempts) == (None, 0)


def test_targeted_redelivery_to_an_unknown_handler_is_dead_lettered():
    """A retry naming a handler this worker does not have is kept as a dead letter, not lost."""
    dispatcher, _, letters = make(EventBus())
    outcome = dispatcher.dispatch(received(ParcelSent(), handler="t.gone", attempt=2))
    assert outcome.dead[0].handler == "t.gone"
    assert letters.count() == 1


@register_event
@dataclass(frozen=True)
class RefundIssued(DomainEvent):
    event_type: ClassVar[str] = "delivery_test.refund_issued"
    refund_id: str = ""


def test_a_targeted_delivery_with_another_events_class_is_dead_lettered():
    """A forged retry aiming an event at a handler of another class never runs that handler."""
    bus = EventBus()
    ran = []
    bus.add_handler(ran.append, RefundIssued, name="t.refund")
    dispatcher, _, letters = make(bus)
    outcome = dispatcher.dispatch(received(ParcelSent(), handler="t.refund", attempt=2))
    assert ran == []
    assert outcome.handled == ()
    (letter,) = letters.list()
    assert letter.handler == "t.refund"
    assert "does not subscribe" in letter.reason
    retry = dispatcher.dispatch(received(RefundIssued(), handler="t.refund", attempt=2))
    assert retry.handled == ("t.refund",)


def test_a_dead_letter_store_failure_propagates_so_nothing_is_acknowledged():
    """If the dead letter cannot be stored, dispatch raises rather than drop the message."""

    class Down(MemoryDeadLetterStore):
        def add(self, letter: DeadLetter) -> None:
            raise ConnectionError("store down")

    dispatcher = Dispatcher(EventBus(), dead_letters=Down())
    with pytest.raises(ConnectionError):
        dispatcher.dispatch(Received(b"garbage"))


def test_busy_inbox_asks_for_a_later_look_without_counting_an_attempt():
    """A claim held elsewhere yields a redelivery after retry_after at the same attempt."""

    class Busy:
        @contextmanager
        def guard(self, handler: str, event_id: str):
            raise InboxBusyError("held", retry_after=7.5)
            yield True  # pragma: no cover

    bus = EventBus()
    bus.add_handler(lambda e: None, ParcelSent, name="t.busy")
    dispatcher = Dispatcher(bus, inbox=Busy(), dead_letters=MemoryDeadLetterStore())
    outcome = dispatcher.dispatch(received(ParcelSent()))
    assert [(r.handler, r.attempt, r.delay) for r in outcome.retries] == [("t.busy", 1, 7.5)]


def test_async_handlers_run_in_workers():
    """An async handler is awaited by the dispatcher and its effect counted once."""
    bus = EventBus()
    done = []

    @bus.subscribe(ParcelSent, name="t.async")
    async def later(event: ParcelSent) -> None:
        await asyncio.sleep(0)
        done.append(current_context().causation_id)

    dispatcher, _, _ = make(bus)
    event = ParcelSent()
    assert dispatcher.dispatch(received(event)).handled == ("t.async",)
    assert done == [event.event_id]


def test_without_an_inbox_handlers_run_on_every_delivery():
    """With no inbox configured, effects are at-least-once: each delivery runs the handler."""
    bus = EventBus()
    effects = []
    bus.add_handler(effects.append, ParcelSent, name="t.plain")
    dispatcher = Dispatcher(bus, dead_letters=MemoryDeadLetterStore())
    message = received(ParcelSent())
    dispatcher.dispatch(message)
    dispatcher.dispatch(message)
    assert len(effects) == 2


def test_a_huge_undecodable_message_is_dead_lettered_cut_to_the_size_limit():
    """A message over the size limit is kept up to the limit, and the reason says it was cut."""
    dispatcher, _, letters = make(EventBus())
    body = b"x" * (2 * 1024 * 1024)
    dispatcher.dispatch(Received(body))
    (letter,) = letters.list()
    assert len(letter.body) == 1024 * 1024
    assert "cut from 2097152" in letter.reason


def test_each_async_handler_call_sees_its_own_events_context():
    """Async handlers run in the context of the event being dispatched, call after call."""
    bus = EventBus()
    seen = []

    @bus.subscribe(ParcelSent, name="t.async_ctx")
    async def later(event: ParcelSent) -> None:
        seen.append((current_context().causation_id, current_context().tenant_id))

    dispatcher, _, _ = make(bus)
    first, second = ParcelSent(tenant_id="a"), ParcelSent(tenant_id="b")
    dispatcher.dispatch(received(first))
    dispatcher.dispatch(received(second))
    assert seen == [(first.event_id, "a"), (second.event_id, "b")]
