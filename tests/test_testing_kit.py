import threading
from dataclasses import dataclass
from typing import ClassVar

import pytest

from tidings import DomainEvent, EventBus, register_event
from tidings.retry import RetryPolicy
from tidings.testing.kit import capture, deterministic, use_memory_transport


@register_event
@dataclass(frozen=True)
class KitOrderPlaced(DomainEvent):
    event_type: ClassVar[str] = "kit_test.order_placed"
    order_id: str = ""
    total: int = 0


@register_event
@dataclass(frozen=True)
class KitReceiptSent(DomainEvent):
    event_type: ClassVar[str] = "kit_test.receipt_sent"
    order_id: str = ""


class Exploding:
    """A transport that fails if anything touches the broker."""

    name = "exploding"
    retry = RetryPolicy(max_attempts=3, initial_delay=60)

    def bind(self, bus):
        pass

    def subscribed(self, handler):
        pass

    def send(self, events):
        raise AssertionError("the broker was contacted")

    def close(self):
        pass


def test_capture_records_instead_of_sending_and_restores_the_transport():
    """While captured, publish records events in order and never calls the transport."""
    transport = Exploding()
    bus = EventBus(transport=transport)
    with capture(bus) as captured:
        bus.publish(KitOrderPlaced(order_id="o-1"), KitOrderPlaced(order_id="o-2"))
    assert [e.order_id for e in captured.of(KitOrderPlaced)] == ["o-1", "o-2"]
    assert bus.transport is transport


def test_assert_published_matches_given_fields_and_diffs_the_closest():
    """assert_published matches class and fields; a miss lists candidates with a field diff."""
    bus = EventBus()
    with capture(bus) as captured:
        bus.publish(KitOrderPlaced(order_id="o-1", total=5), KitOrderPlaced(order_id="o-2"))
    assert captured.assert_published(KitOrderPlaced, order_id="o-1").total == 5
    with pytest.raises(AssertionError) as failed:
        captured.assert_published(KitOrderPlaced, order_id="o-1", total=7)
    text = str(failed.value)
    assert "2 KitOrderPlaced published" in text
    assert "- total: expected 7" in text
    assert "+ total: published 5" in text
    assert "    order_id: 'o-1'" in text
    with pytest.raises(AssertionError, match="published: KitOrderPlaced, KitOrderPlaced"):
        captured.assert_published(KitReceiptSent)
    with pytest.raises(TypeError, match="no field colour"):
        captured.assert_published(KitOrderPlaced, colour="red")


def test_assert_published_once_and_not_published():
    """assert_published_once refuses two matches; assert_not_published refuses one."""
    bus = EventBus()
    with capture(bus) as captured:
        bus.publish(KitOrderPlaced(order_id="o-1"), KitOrderPlaced(order_id="o-1"))
    with pytest.raises(AssertionError, match="expected one KitOrderPlaced"):
        captured.assert_published_once(KitOrderPlaced, order_id="o-1")
    captured.assert_not_published(KitOrderPlaced, order_id="o-9")
    with pytest.raises(AssertionError, match="expected no KitOrderPlaced"):
        captured.assert_not_published(KitOrderPlaced)


def test_deliver_runs_handlers_and_the_events_they_publish():
    """deliver() runs subscribed handlers now, and delivers the events they publish in turn."""
    bus = EventBus(transport=Exploding())
    receipts: list[str] = []

    @bus.subscribe(KitOrderPlaced, name="kit.send_receipt")
    def send_receipt(event):
        bus.publish(KitReceiptSent(order_id=event.order_id))

    @bus.subscribe(KitReceiptSent, name="kit.file_receipt")
    def file_receipt(event):
        receipts.append(event.order_id)

    with capture(bus) as captured:
        placed = KitOrderPlaced(order_id="o-1")
        bus.publish(placed)
        outcomes = captured.deliver()
    assert [o.handled for o in outcomes] == [("kit.send_receipt",), ("kit.file_receipt",)]
    assert receipts == ["o-1"]
    assert captured.assert_published(KitReceiptSent).causation_id == placed.event_id


def test_deliver_retries_at_once_then_dead_letters():
    """A failing handler is retried without delay up to the transport's policy, then dead."""
    bus = EventBus(transport=Exploding())  # max_attempts=3, 60 s delays
    calls: list[int] = []

    @bus.subscribe(KitOrderPlaced, name="kit.always_fails")
    def always_fails(event):
        calls.append(1)
        raise RuntimeError("down")

    with capture(bus) as captured:
        bus.publish(KitOrderPlaced(order_id="o-1"))
        captured.deliver()
    assert len(calls) == 3
    [letter] = captured.dead_letters
    assert letter.handler == "kit.always_fails"
    assert letter.attempts == 3
    assert letter.reason == "RuntimeError: down"


def test_deliver_twice_bypasses_the_inbox_and_the_inbox_suppresses_otherwise():
    """twice=True hands each event to each handler twice; a plain redelivery is a duplicate."""
    bus = EventBus()
    seen: list[str] = []
    bus.add_handler(lambda e: seen.append(e.order_id), KitOrderPlaced, name="kit.count")
    with capture(bus) as captured:
        bus.publish(KitOrderPlaced(order_id="o-1"))
        captured.deliver(twice=True)
    assert seen == ["o-1", "o-1"]
    with capture(bus) as captured:
        bus.publish(KitOrderPlaced(order_id="o-2"))
        captured.deliver()
        captured._delivered = 0  # deliver the same event again: the inbox remembers it
        [again] = captured.deliver()
    assert again.duplicates == ("kit.count",)
    assert seen == ["o-1", "o-1", "o-2"]


def test_deliver_stops_a_publishing_loop():
    """Handlers publishing each other's events for ever end in an AssertionError."""
    bus = EventBus()
    bus.add_handler(lambda e: bus.publish(KitOrderPlaced()), KitOrderPlaced, name="kit.loop")
    with capture(bus) as captured:
        bus.publish(KitOrderPlaced())
        with pytest.raises(AssertionError, match="stopped after 20 events"):
            captured.deliver(max_events=20)


def test_deterministic_repeats_ids_and_clock_and_restores_them():
    """The same seed gives the same ids; occurred_at is frozen; random ids return on exit."""
    with deterministic(seed=7):
        first = [KitOrderPlaced() for _ in range(3)]
    with deterministic(seed=7):
        second = [KitOrderPlaced() for _ in range(3)]
    assert [e.event_id for e in first] == [e.event_id for e in second]
    assert len({e.event_id for e in first}) == 3
    assert {e.occurred_at for e in first} == {"2026-01-01T00:00:00.000000+00:00"}
    assert KitOrderPlaced().event_id not in {e.event_id for e in first}
    assert not KitOrderPlaced().occurred_at.startswith("2026-01-01T00:00:00.000000")


def test_use_memory_transport_runs_handlers_in_workers_without_the_broker():
    """A bus wired to a broker transport publishes to an in-memory one inside the block."""
    transport = Exploding()
    bus = EventBus(transport=transport)
    done = threading.Event()
    bus.add_handler(lambda e: done.set(), KitOrderPlaced, name="kit.worker")
    with use_memory_transport(bus) as memory:
        bus.publish(KitOrderPlaced(order_id="o-1"))
        assert done.wait(5)
        assert memory.dead_letters.count() == 0
    assert bus.transport is transport
