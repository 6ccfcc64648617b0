"""The transport conformance suite: every :class:`~tidings.ports.Transport` must pass it.

In the spirit of watermill's universal pub/sub tests: delivery, order where promised,
redelivery on failure, carry-on after errors, concurrent publishers, context preserved, close
semantics. A transport declares what it can do in :class:`Features`; a test of a capability it
declares it lacks is skipped, naming the feature, never by luck.

The two sides of a transport meet through a :class:`Journal`, storage both can reach:

- the worker side builds its consuming bus the way the transport is used in production and calls
  :func:`install_handlers` on it: the suite's own handlers, which write what they did (and the
  context they saw) into the journal;
- the test side subclasses :class:`TransportConformance`, declares the features and returns a
  :class:`TransportHarness` from :meth:`~TransportConformance.make_harness`::

    class TestMyTransport(TransportConformance):
        features = Features(ordered=True, batches=True)

        @classmethod
        def make_harness(cls, name: str) -> TransportHarness:
            return MyHarness(name)  # queues, keys, ... named after `name`

One harness serves a whole test class (so a worker process may be started once); each test
tags its events with its own ``scope`` and looks only at what happened in that scope, so tests
never see each other's effects. Waits are on conditions with deadlines, never fixed sleeps.
Importing this module registers the suite's event classes (``conformance.*``). Needs pytest.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import ClassVar, Protocol, TypeVar

import pytest

from tidings.bus import EventBus
from tidings.codec import default_codec
from tidings.context import event_context
from tidings.errors import EventEncodeError, PublishError
from tidings.events import DomainEvent
from tidings.ports import DeadLetter, Transport
from tidings.testing.transport_handlers import (
    ATTEMPTS,
    CHAINED,
    CRASHING,
    DEADLINE,
    DONE,
    FAILED,
    MAIN,
    MARKER,
    OTHER,
    RETRY,
    Chained,
    ConformanceEvent,
    CrashOnce,
    Effect,
    Flaky,
    HandlerError,
    Journal,
    MemoryJournal,
    Noted,
    Poisoned,
    Unencodable,
    install_handlers,
)
from tidings.testing.workers import wait_until

__all__ = [
    "ATTEMPTS",
    "CRASHING",
    "DEADLINE",
    "DONE",
    "FAILED",
    "MAIN",
    "OTHER",
    "RETRY",
    "Chained",
    "ConformanceEvent",
    "CrashOnce",
    "Effect",
    "Features",
    "Flaky",
    "HandlerError",
    "Journal",
    "MemoryJournal",
    "Noted",
    "Poisoned",
    "TransportConformance",
    "TransportHarness",
    "Unencodable",
    "install_handlers",
]


@dataclass(frozen=True)
class Features:
    """What a transport can do; the suite skips the tests of what is declared ``False``.

    Attributes:
        ordered: events published one at a time by one publisher are handled in publish order
            when one consumer handles them (no failures in between).
        redelivers_on_crash: when the process running a handler dies mid-handler, the event is
            delivered again (to the process the worker replaces it with) and then takes effect
            once. The harness's inbox lease should be short: the dead claim blocks until then.
        batches: a list of events published at once travels in fewer messages than events.
        fan_out_to_services: every service named to ``publisher_bus`` receives every event.
        encodes_before_sending: a list holding an event that cannot be encoded sends none of
            it (the contract allows the events before that one to be sent).
        broker_refuses: the harness can make the broker refuse what is published
            (:meth:`TransportHarness.refusing_bus`); ``send`` must then raise, never return
            as if the broker had accepted the events.
    """

    ordered: bool = False
    redelivers_on_crash: bool = False
    batches: bool = False
    fan_out_to_services: bool = False
    encodes_before_sending: bool = False
    broker_refuses: bool = False


class TransportHarness(Protocol):
    """A transport wired for the suite: publisher buses, workers, and what they left behind.

    One harness serves one test class; :meth:`close` ends it. Every name it creates (queues,
    streams, keys) derives from the name it was made with, and ``close`` deletes them.
    """

    @property
    def journal(self) -> Journal:
        """The journal the workers' handlers write into, read from the test process."""
        ...

    def publisher_bus(self, services: Sequence[str] = (MAIN,)) -> EventBus:
        """Return a new bus whose transport publishes to (at least) the consumers of ``services``.

        A transport whose every service reads every topic (Redis Streams consumer groups)
        cannot aim at fewer.

        The bus has no handlers of its own; it is closed by :meth:`close` at the latest.
        """
        ...

    def refusing_bus(self) -> EventBus:
        """Return a new bus whose broker refuses every message it is sent (a full queue, say).

        Needed only with ``Features(broker_refuses=True)``.
        """
        ...

    def worker(self, service: str = MAIN) -> AbstractContextManager[None]:
        """Have one consumer of ``service`` running for the block (a real process if need be).

        The consumer runs a bus built as in production, with the harness's inbox and
        dead-letter store, on which :func:`install_handlers` was called with ``service``; it
        handles one event at a time. It may outlive the block until :meth:`close`, so that
        one worker serves a whole test class.
        """
        ...

    def dead_letters(self) -> list[DeadLetter]:
        """Return every dead letter the harness's workers stored (the suite filters them)."""
        ...

    def messages_sent(self) -> int:
        """Return how many messages the publisher buses of this process handed to the broker."""
        ...

    def inject(self, body: bytes, service: str = MAIN) -> None:
        """Send ``body`` to ``service``'s consumers, framed as the transport frames envelopes."""
        ...

    def close(self) -> None:
        """Stop the workers, close the buses' transports, delete everything created."""
        ...


_T = TypeVar("_T")


def _wait(condition: Callable[[], _T], what: str) -> _T:
    return wait_until(condition, timeout=DEADLINE, what=what)


def _transport(bus: EventBus) -> Transport:
    assert bus.transport is not None, "publisher_bus() must return a bus with a transport"
    return bus.transport


# -- the suite -----------------------------------------------------------------------------------


class TransportConformance:
    """The behaviour every transport promises; subclass it once per transport and broker.

    Implement the class method :meth:`make_harness`, or override the class-scoped ``harness``
    fixture when the harness needs other fixtures. Declare :attr:`features`.
    """

    features: ClassVar[Features] = Features()

    @classmethod
    def make_harness(cls, name: str) -> TransportHarness:
        """Return a harness whose names all derive from ``name`` (unique to this class run)."""
        raise NotImplementedError

    @pytest.fixture(scope="class")
    @classmethod
    def harness(cls) -> Iterator[TransportHarness]:
        """The class's harness, closed after its last test."""
        harness = cls.make_harness(f"conformance_{uuid.uuid4().hex[:12]}")
        try:
            yield harness
        finally:
            harness.close()

    @pytest.fixture
    def scope(self, request: pytest.FixtureRequest) -> str:
        """This test's scope: its events carry it, its effects are journaled under it."""
        return f"{request.node.name[:60]}-{uuid.uuid4().hex[:8]}"

    def require(self, feature: str) -> None:
        """Skip the calling test unless the transport declares ``feature``."""
        if not getattr(self.features, feature):
            pytest.skip(f"{type(self).__name__} declares Features({feature}=False)")

    # -- helpers ------------------------------------------------------------------------------

    @staticmethod
    def effects(harness: TransportHarness, scope: str, handler: str | None = None) -> list[Effect]:
        """Return the effects journaled in ``scope``, of ``handler`` only if given."""
        effects = [Effect.from_json(entry) for entry in harness.journal.entries(scope)]
        return [e for e in effects if handler is None or e.handler == handler]

    def wait_handled(
        self,
        harness: TransportHarness,
        scope: str,
        events: Sequence[DomainEvent],
        handler: str = f"{MAIN}.record",
    ) -> list[Effect]:
        """Wait until ``handler`` completed every one of ``events``; return its done effects."""
        wanted = {event.event_id for event in events}

        def done() -> list[Effect]:
            effects = [e for e in self.effects(harness, scope, handler) if e.outcome == DONE]
            return effects if wanted <= {e.event_id for e in effects} else []

        return _wait(done, f"{handler} to handle {len(wanted)} event(s) in {scope}")

    def settle(self, harness: TransportHarness, bus: EventBus, scope: str) -> None:
        """Publish a marker and wait until it is handled.

        With one consumer of an ordered transport, everything published before it was handled
        by then, so a duplicate would have shown up; elsewhere it gives duplicates a fair chance.
        """
        marker = Noted(scope=scope, publisher=MARKER)
        bus.publish(marker)
        self.wait_handled(harness, scope, [marker])

    @staticmethod
    def done_counts(effects: Sequence[Effect]) -> Counter[str]:
        """Return how many done effects each event id has."""
        return Counter(e.event_id for e in effects if e.outcome == DONE)

    # -- delivery -----------------------------------------------------------------------------

    def test_published_event_is_handled_once(self, harness: TransportHarness, scope: str) -> None:
        """An event published on one side is handled once by a worker on the other."""
        bus = harness.publisher_bus()
        event = Noted(scope=scope)
        with harness.worker():
            bus.publish(event)
            (effect,) = self.wait_handled(harness, scope, [event])
            self.settle(harness, bus, scope)
        assert (effect.event_id, effect.event_type) == (event.event_id, "conformance.noted")
        assert self.done_counts(self.effects(harness, scope, f"{MAIN}.record"))[event.event_id] == 1

    def test_same_event_published_twice_takes_effect_once(
        self, harness: TransportHarness, scope: str
    ) -> None:
        """A duplicate delivery of an event (the same event id) does not repeat its effect."""
        bus = harness.publisher_bus()
        event = Noted(scope=scope)
        with harness.worker():
            bus.publish(event)
            bus.publish(event)
            self.wait_handled(harness, scope, [event])
            self.settle(harness, bus, scope)
        assert self.done_counts(self.effects(harness, scope, f"{MAIN}.record"))[event.event_id] == 1

    def test_events_from_concurrent_publishers_are_each_handled_once(
        self, harness: TransportHarness, scope: str
    ) -> None:
        """Events published from several threads at once on one bus each take effect once."""
        threads, per_thread = 4, 25
        bus = harness.publisher_bus()
        start = threading.Barrier(threads)
        failures: list[BaseException] = []

        def publish(publisher: str) -> None:
            try:
                start.wait(DEADLINE)
                for seq in range(per_thread):
                    bus.publish(Noted(scope=scope, publisher=publisher, seq=seq))
            except BaseException as exc:  # noqa: BLE001 - reported by the test thread
                failures.append(exc)

        with harness.worker():
            workers = [
                threading.Thread(target=publish, args=(f"p{i}",), daemon=True)
                for i in range(threads)
            ]
            for thread in workers:
                thread.start()
            for thread in workers:
                thread.join(DEADLINE)
            assert not failures, f"publishing failed: {failures!r}"
            total = threads * per_thread
            _wait(
                lambda: len(self.effects(harness, scope, f"{MAIN}.record")) >= total,
                f"{total} events",
            )
            self.settle(harness, bus, scope)
        record = self.effects(harness, scope, f"{MAIN}.record")
        effects = [e for e in record if e.publisher != MARKER]
        counts = self.done_counts(effects)
        assert len(counts) == threads * per_thread, f"{len(counts)} distinct events handled"
        assert set(counts.values()) == {1}, f"some events took effect twice: {counts}"
        if self.features.ordered:
            for i in range(threads):
                seqs = [e.seq for e in effects if e.publisher == f"p{i}"]
                assert seqs == sorted(seqs), f"publisher p{i}'s events out of order: {seqs}"

    def test_single_publishes_keep_their_order_with_one_consumer(
        self, harness: TransportHarness, scope: str
    ) -> None:
        """Events published one at a time by one publisher are handled in that order."""
        self.require("ordered")
        bus = harness.publisher_bus()
        events = [Noted(scope=scope, publisher="p", seq=seq) for seq in range(30)]
        with harness.worker():
            for event in events:
                bus.publish(event)
            effects = self.wait_handled(harness, scope, events)
        assert [e.seq for e in effects] == list(range(30))

    def test_published_list_is_handled_once_each(
        self, harness: TransportHarness, scope: str
    ) -> None:
        """Every event of a list published in one call takes effect once."""
        bus = harness.publisher_bus()
        events = [Noted(scope=scope, publisher="list", seq=seq) for seq in range(60)]
        with harness.worker():
            bus.publish(*events)
            self.wait_handled(harness, scope, events)
            self.settle(harness, bus, scope)
        counts = self.done_counts(self.effects(harness, scope, f"{MAIN}.record"))
        assert all(counts[event.event_id] == 1 for event in events), counts

    def test_published_list_travels_in_batches(self, harness: TransportHarness, scope: str) -> None:
        """A list published in one call travels in fewer messages than it has events."""
        self.require("batches")
        bus = harness.publisher_bus()
        events = [Noted(scope=scope, publisher="batch", seq=seq) for seq in range(60)]
        with harness.worker():
            before = harness.messages_sent()
            bus.publish(*events)
            sent = harness.messages_sent() - before
            self.wait_handled(harness, scope, events)
        assert 0 < sent < len(events), f"{len(events)} events took {sent} messages"

    def test_publishing_nothing_sends_nothing(self, harness: TransportHarness) -> None:
        """Publishing no events returns at once and sends no message."""
        bus = harness.publisher_bus()
        before = harness.messages_sent()
        bus.publish()
        assert harness.messages_sent() == before

    def test_each_service_receives_every_event(self, harness: TransportHarness, scope: str) -> None:
        """Every event published to two services is handled once by each of them."""
        self.require("fan_out_to_services")
        bus = harness.publisher_bus(services=(MAIN, OTHER))
        events = [Noted(scope=scope, publisher="fan", seq=seq) for seq in range(5)]
        with harness.worker(), harness.worker(OTHER):
            bus.publish(*events[:2])
            for event in events[2:]:
                bus.publish(event)
            self.wait_handled(harness, scope, events)
            self.wait_handled(harness, scope, events, handler=f"{OTHER}.record")
            self.settle(harness, bus, scope)
        for service in (MAIN, OTHER):
            counts = self.done_counts(self.effects(harness, scope, f"{service}.record"))
            assert all(counts[event.event_id] == 1 for event in events), (service, counts)

    # -- failures -----------------------------------------------------------------------------

    def test_failing_handler_is_retried_until_it_succeeds(
        self, harness: TransportHarness, scope: str
    ) -> None:
        """A handler that fails, then succeeds, is retried alone and takes effect once."""
        bus = harness.publisher_bus()
        event = Flaky(scope=scope, failures=ATTEMPTS - 1)
        with harness.worker():
            bus.publish(event)
            self.wait_handled(harness, scope, [event], handler=f"{MAIN}.flaky")
            self.settle(harness, bus, scope)
        flaky = self.effects(harness, scope, f"{MAIN}.flaky")
        assert [e.outcome for e in flaky] == [FAILED] * (ATTEMPTS - 1) + [DONE]
        counts = self.done_counts(self.effects(harness, scope, f"{MAIN}.record"))
        assert counts[event.event_id] == 1, "another handler ran again when the failing one did"
        assert not [d for d in harness.dead_letters() if d.event_id == event.event_id]

    def test_poison_handler_is_dead_lettered_while_others_carry_on(
        self, harness: TransportHarness, scope: str
    ) -> None:
        """A handler failing every attempt ends in dead letters; other handlers and events go on."""
        bus = harness.publisher_bus()
        poisoned, after = Poisoned(scope=scope), Noted(scope=scope, seq=1)
        with harness.worker():
            bus.publish(poisoned)
            bus.publish(after)
            (letter,) = _wait(
                lambda: [d for d in harness.dead_letters() if d.event_id == poisoned.event_id],
                "the poisoned event's dead letter",
            )
            self.wait_handled(harness, scope, [poisoned, after])
            self.settle(harness, bus, scope)
        assert (letter.handler, letter.event_type) == (f"{MAIN}.poison", "conformance.poisoned")
        assert letter.attempts == ATTEMPTS
        assert letter.reason.startswith("HandlerError: poison handler always fails")
        assert len(self.effects(harness, scope, f"{MAIN}.poison")) == ATTEMPTS
        counts = self.done_counts(self.effects(harness, scope, f"{MAIN}.record"))
        assert (counts[poisoned.event_id], counts[after.event_id]) == (1, 1)

    def test_undecodable_messages_are_dead_lettered_and_the_worker_goes_on(
        self, harness: TransportHarness, scope: str
    ) -> None:
        """Garbage and an unknown event type are dead-lettered with the reason; work goes on."""
        bus = harness.publisher_bus()
        garbage = f"not an envelope {scope}".encode()
        envelope = default_codec.to_envelope(Noted(scope=scope))
        unknown = json.dumps({**envelope, "type": "conformance.nobody_knows_me"}).encode()
        after = Noted(scope=scope, seq=1)
        with harness.worker():
            harness.inject(garbage)
            harness.inject(unknown)
            bus.publish(after)

            def both_letters() -> list[DeadLetter]:
                found = [d for d in harness.dead_letters() if d.body in (garbage, unknown)]
                return found if len(found) == 2 else []

            letters = _wait(both_letters, "both messages' dead letters")
            self.wait_handled(harness, scope, [after])
        by_body = {letter.body: letter for letter in letters}
        assert by_body[unknown].reason.startswith("UnknownEventTypeError")
        assert all(letter.handler is None for letter in letters)
        assert all(letter.attempts == 0 for letter in letters)
        assert all(letter.reason for letter in letters)

    def test_crashed_handler_is_redelivered_and_takes_effect_once(
        self, harness: TransportHarness, scope: str
    ) -> None:
        """When the process running a handler dies, the event is delivered again and completes.

        The other handler of the event took effect before the crash: it may run again (at least
        once), because an inbox in a store apart from the effect cannot mark it atomically.
        """
        self.require("redelivers_on_crash")
        bus = harness.publisher_bus()
        event = CrashOnce(scope=scope)
        with harness.worker():
            bus.publish(event)
            self.wait_handled(harness, scope, [event], handler=f"{MAIN}.crash")
            self.settle(harness, bus, scope)
        crash = self.effects(harness, scope, f"{MAIN}.crash")
        assert [e.outcome for e in crash] == [CRASHING, DONE]
        record = self.done_counts(self.effects(harness, scope, f"{MAIN}.record"))[event.event_id]
        assert record >= 1, "the other handler's effect was lost in the crash"

    # -- context ------------------------------------------------------------------------------

    def test_context_is_preserved_and_causation_is_the_event_id(
        self, harness: TransportHarness, scope: str
    ) -> None:
        """A handler sees the event's correlation and tenant and, as causation, the event's id."""
        bus = harness.publisher_bus()
        with event_context(correlation_id=f"corr-{scope}", tenant_id="tenant-a"):
            tenanted = Noted(scope=scope, seq=0)
        plain = Noted(scope=scope, seq=1)  # no context: a fresh correlation id, no tenant
        with harness.worker():
            bus.publish(tenanted)
            bus.publish(plain)
            effects = {e.event_id: e for e in self.wait_handled(harness, scope, [tenanted, plain])}
        seen = effects[tenanted.event_id]
        assert (seen.correlation_id, seen.tenant_id) == (f"corr-{scope}", "tenant-a")
        assert (seen.causation_id, seen.caused_by) == (tenanted.event_id, None)
        seen = effects[plain.event_id]
        assert (seen.correlation_id, seen.tenant_id) == (plain.correlation_id, None)
        assert seen.causation_id == plain.event_id

    def test_event_raised_in_a_handler_carries_the_context_on(
        self, harness: TransportHarness, scope: str
    ) -> None:
        """An event a handler publishes keeps correlation and tenant and is caused by its event."""
        bus = harness.publisher_bus()
        with event_context(correlation_id=f"corr-{scope}", tenant_id="tenant-b"):
            cause = Chained(scope=scope)
        with harness.worker():
            bus.publish(cause)
            (follow_up,) = _wait(
                lambda: [
                    e
                    for e in self.effects(harness, scope, f"{MAIN}.record")
                    if e.publisher == CHAINED
                ],
                "the follow-up event",
            )
        assert (follow_up.correlation_id, follow_up.tenant_id) == (f"corr-{scope}", "tenant-b")
        assert follow_up.caused_by == cause.event_id
        assert follow_up.causation_id == follow_up.event_id != cause.event_id

    # -- publishing and closing ---------------------------------------------------------------

    def test_unencodable_event_is_never_sent(self, harness: TransportHarness, scope: str) -> None:
        """An event that cannot be encoded raises EventEncodeError and is sent nowhere."""
        bus = harness.publisher_bus()
        before = harness.messages_sent()
        with pytest.raises(EventEncodeError):
            bus.publish(Unencodable(scope=scope, value=object()))
        assert harness.messages_sent() == before, "a message was sent for an unencodable event"

    def test_list_stops_at_an_unencodable_event(
        self, harness: TransportHarness, scope: str
    ) -> None:
        """Publishing a list stops at an unencodable event: it and those after it are not sent."""
        bus = harness.publisher_bus()
        first, after = Noted(scope=scope, seq=0), Noted(scope=scope, seq=2)
        bad = Unencodable(scope=scope, seq=1, value=object())
        with harness.worker():
            with pytest.raises(EventEncodeError):
                bus.publish(first, bad, after)
            self.settle(harness, bus, scope)
        counts = self.done_counts(self.effects(harness, scope, f"{MAIN}.record"))
        assert counts[after.event_id] == 0, "an event after the unencodable one was sent"
        assert counts[first.event_id] <= 1

    def test_list_with_unencodable_event_sends_nothing(
        self, harness: TransportHarness, scope: str
    ) -> None:
        """A transport that encodes before sending sends no event of a list with a bad one."""
        self.require("encodes_before_sending")
        bus = harness.publisher_bus()
        before = harness.messages_sent()
        with pytest.raises(EventEncodeError):
            bus.publish(Noted(scope=scope), Unencodable(scope=scope, value=object()))
        assert harness.messages_sent() == before

    def test_send_refused_by_the_broker_raises(self, harness: TransportHarness, scope: str) -> None:
        """When the broker refuses a message, send raises instead of returning as if sent."""
        self.require("broker_refuses")
        bus = harness.refusing_bus()
        with pytest.raises(PublishError):
            bus.publish(Noted(scope=scope))

    def test_send_after_close_reconnects(self, harness: TransportHarness, scope: str) -> None:
        """close() releases the transport's connections and a later send opens them again."""
        bus = harness.publisher_bus()
        transport = _transport(bus)
        events = [Noted(scope=scope, seq=seq) for seq in range(3)]
        with harness.worker():
            transport.close()  # before any send: nothing to release, and no harm done
            bus.publish(events[0])
            bus.publish(events[1])
            transport.close()
            bus.publish(events[2])
            self.wait_handled(harness, scope, events)
            self.settle(harness, bus, scope)
        counts = self.done_counts(self.effects(harness, scope, f"{MAIN}.record"))
        assert all(counts[event.event_id] == 1 for event in events), counts
