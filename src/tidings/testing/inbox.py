"""The inbox conformance suite: every :class:`~tidings.ports.Inbox` store must pass it.

Subclass :class:`InboxConformance` in a test module, declare the store's :class:`Features`, and
implement :meth:`~InboxConformance.make_inbox` plus the hook each declared feature names::

    class TestMyInbox(InboxConformance):
        features = Features(busy_error_while_claimed=True)

        def make_inbox(self) -> Inbox:
            return MyInbox(...)

A test of a capability the store declares it lacks is skipped, naming the feature: skipped by
what the store says, never by luck. Waits are on conditions with deadlines, never fixed sleeps.
Needs pytest.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

from tidings.errors import InboxBusyError
from tidings.ports import Inbox

__all__ = ["Features", "HandlerError", "InboxConformance", "attempt"]

DEADLINE = 20.0  # seconds any single wait may take before the test fails
BUSY = "busy"
Outcomes = list[tuple[str, bool | str]]


@dataclass(frozen=True)
class Features:
    """What an inbox store can do; the suite skips the tests of what is declared ``False``.

    Attributes:
        busy_error_while_claimed: a guard of a claimed pair raises ``InboxBusyError`` at once.
        waits_for_holder: a guard of a claimed pair waits until the holder finishes (hook:
            ``wait_for_blocked_claimer``).
        gives_up_waiting: such a waiting guard raises ``InboxBusyError`` when the store's wait
            limit passes (hook: ``make_impatient_inbox``).
        claim_expires: a claim lapses after a lease, so a dead worker's claim can be taken
            over (hook: ``make_expiring_inbox``).
        rollback_discards_effects: effects written inside the guard commit with the done mark
            and vanish with it on an exception (hooks: ``record_effect``, ``committed_effects``).
        shared_between_processes: inboxes built in other processes see the same claims
            (hook: ``inbox_factory``).
    """

    busy_error_while_claimed: bool = False
    waits_for_holder: bool = False
    gives_up_waiting: bool = False
    claim_expires: bool = False
    rollback_discards_effects: bool = False
    shared_between_processes: bool = False


class HandlerError(Exception):
    """The failure a test handler raises."""


def attempt(inbox: Inbox, handler: str, event_id: str) -> bool | str:
    """Run one guarded no-op; return the guard's value, or ``"busy"`` on ``InboxBusyError``."""
    try:
        with inbox.guard(handler, event_id) as fresh:
            return fresh
    except InboxBusyError:
        return BUSY


def _race(inbox: Inbox, barrier: Any, handler: str, events: list[str]) -> Outcomes:
    outcomes: Outcomes = []
    for event_id in events:
        barrier.wait(DEADLINE)
        outcomes.append((event_id, attempt(inbox, handler, event_id)))
    return outcomes


def race_in_process(
    factory: Callable[[], Inbox], barrier: Any, results: Any, handler: str, events: list[str]
) -> None:
    """Child process body: race the other processes on each event, report the outcomes."""
    results.put(_race(factory(), barrier, handler, events))


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


class _Attempt(threading.Thread):
    """One guard in another thread; ``outcome`` holds its value or the exception it raised."""

    def __init__(self, inbox: Inbox, handler: str, event_id: str) -> None:
        super().__init__(daemon=True)
        self.key, self.inbox, self.outcome = (handler, event_id), inbox, list[Any]()
        self.start()

    def run(self) -> None:
        try:
            with self.inbox.guard(*self.key) as fresh:
                self.outcome.append(fresh)
        except Exception as exc:  # noqa: BLE001 - the outcome under test
            self.outcome.append(exc)

    def result(self) -> Any:
        self.join(DEADLINE)
        _expect(len(self.outcome) == 1, f"the other guard hung or failed: {self.outcome}")
        return self.outcome[0]


class InboxConformance:
    """The behaviour every inbox store promises; subclass it once per store.

    Each call of :meth:`make_inbox` within one test returns an inbox over the same storage (as
    two workers would share it); different tests must not share storage. The other hooks are
    needed only for the features declared.
    """

    features: ClassVar[Features] = Features()
    handler: ClassVar[str] = "conformance.handler"

    def make_inbox(self) -> Inbox:
        """Return an inbox over this test's storage."""
        raise NotImplementedError

    def make_expiring_inbox(self, lease: float) -> Inbox:
        """Return an inbox over the same storage whose claims lapse after ``lease`` seconds."""
        raise NotImplementedError

    def make_impatient_inbox(self) -> Inbox:
        """Return an inbox over the same storage that stops waiting for a claim within ~1 s."""
        raise NotImplementedError

    def wait_for_blocked_claimer(self) -> None:
        """Return once a guard of this test's storage is waiting for another one's claim."""
        raise NotImplementedError

    def record_effect(self, value: str) -> None:
        """Write ``value`` as a handler would, inside the guard that is open in this thread."""
        raise NotImplementedError

    def committed_effects(self) -> list[str]:
        """Return the effects that are committed, as seen from outside any guard."""
        raise NotImplementedError

    def inbox_factory(self) -> Callable[[], Inbox]:
        """Return a picklable callable that builds an inbox over this test's storage."""
        raise NotImplementedError

    def require(self, feature: str) -> None:
        """Skip the calling test unless the store declares ``feature``."""
        if not getattr(self.features, feature):
            pytest.skip(f"{type(self).__name__} declares Features({feature}=False)")

    def _attempt(self, event_id: str, inbox: Inbox | None = None) -> bool | str:
        return attempt(self.make_inbox() if inbox is None else inbox, self.handler, event_id)

    def test_first_guard_is_fresh(self) -> None:
        """The first guard of a pair says the effect should run."""
        _expect(self._attempt(uuid.uuid4().hex) is True, "first guard not fresh")

    def test_success_marks_done_so_duplicate_is_not_fresh(self) -> None:
        """After a guard left normally, the pair is done: later guards, anywhere, say False."""
        event_id = uuid.uuid4().hex
        _expect(self._attempt(event_id) is True, "first guard not fresh")
        _expect(self._attempt(event_id) is False, "a duplicate ran again")
        _expect(self._attempt(event_id) is False, "a second duplicate ran again")

    def test_exception_releases_claim_so_retry_is_fresh(self) -> None:
        """A guard left by an exception re-raises it unchanged and lets a retry run the effect."""
        event_id, error = uuid.uuid4().hex, HandlerError("handler failed")
        with pytest.raises(HandlerError) as raised, self.make_inbox().guard(self.handler, event_id):
            raise error
        _expect(raised.value is error, "the guard replaced the handler's exception")
        _expect(self._attempt(event_id) is True, "retry not fresh")

    def test_exception_in_duplicate_guard_keeps_pair_done(self) -> None:
        """An exception inside a duplicate's guard propagates and leaves the pair done."""
        event_id = uuid.uuid4().hex
        self._attempt(event_id)
        with pytest.raises(HandlerError), self.make_inbox().guard(self.handler, event_id):
            raise HandlerError
        _expect(self._attempt(event_id) is False, "pair no longer done")

    def test_handlers_and_events_are_independent(self) -> None:
        """A pair's mark says nothing of another handler's or another event's pairs."""
        inbox, event_id, other_event = self.make_inbox(), uuid.uuid4().hex, uuid.uuid4().hex
        _expect(attempt(inbox, "conformance.a", event_id) is True, "a not fresh")
        _expect(attempt(inbox, "conformance.b", event_id) is True, "b not fresh")
        _expect(attempt(inbox, "conformance.a", other_event) is True, "other event not fresh")
        _expect(attempt(inbox, "conformance.a", event_id) is False, "a ran twice")

    def test_concurrent_threads_see_exactly_one_fresh(self) -> None:
        """Threads racing on the same pairs see exactly one True per pair, never an error."""
        threads, events = 6, [uuid.uuid4().hex for _ in range(8)]
        barrier = threading.Barrier(threads)
        with ThreadPoolExecutor(threads) as pool:
            args = (barrier, self.handler, events)
            racing = [pool.submit(_race, self.make_inbox(), *args) for _ in range(threads)]
            outcomes = [outcome for race in racing for outcome in race.result(DEADLINE)]
        self._check_race(events, outcomes)

    def test_concurrent_processes_see_exactly_one_fresh(self) -> None:
        """Processes racing on the same pairs see exactly one True per pair."""
        self.require("shared_between_processes")
        processes, events = 3, [uuid.uuid4().hex for _ in range(4)]
        context = multiprocessing.get_context("spawn")  # fork is unsafe with threads around
        barrier, results = context.Barrier(processes), context.Queue()
        args = (self.inbox_factory(), barrier, results, self.handler, events)
        children = [context.Process(target=race_in_process, args=args) for _ in range(processes)]
        for child in children:
            child.start()
        try:
            outcomes = [outcome for _ in children for outcome in results.get(timeout=DEADLINE)]
        finally:
            for child in children:
                child.join(DEADLINE)
                if child.is_alive():  # pragma: no cover - only when the test already failed
                    child.kill()
        self._check_race(events, outcomes)

    def _check_race(self, events: list[str], outcomes: Outcomes) -> None:
        for event_id in events:
            seen = [outcome for key, outcome in outcomes if key == event_id]
            _expect(seen.count(True) == 1, f"event {event_id}: outcomes {seen}, one True wanted")
            _expect(set(seen) <= {True, False, BUSY}, f"event {event_id}: outcomes {seen}")
            _expect(self._attempt(event_id) is False, f"event {event_id} not done")

    def test_busy_error_while_claimed_carries_retry_after(self) -> None:
        """A guard of a claimed pair raises InboxBusyError with a positive retry_after."""
        self.require("busy_error_while_claimed")
        event_id = uuid.uuid4().hex
        with self.make_inbox().guard(self.handler, event_id):
            busy = _Attempt(self.make_inbox(), self.handler, event_id).result()
        _expect(isinstance(busy, InboxBusyError), f"got {busy!r}, expected InboxBusyError")
        _expect(busy.retry_after > 0, f"retry_after={busy.retry_after}, expected > 0")

    def test_expired_claim_is_taken_over_and_left_to_its_new_holder(self) -> None:
        """A lapsed claim can be taken over; the late first holder does not mark over it."""
        self.require("claim_expires")
        event_id = uuid.uuid4().hex
        # Only the first claim is short: the taker's must outlast the checks below.
        first, second = self.make_expiring_inbox(0.2), self.make_expiring_inbox(DEADLINE)
        with first.guard(self.handler, event_id):
            takeover = self._claim_when_free(second, event_id)
            _expect(next(takeover) is True, "the expired claim was not taken over as fresh")
        _expect(self._attempt(event_id) == BUSY, "the late holder overwrote the new claim")
        next(takeover, None)
        _expect(self._attempt(event_id) is False, "not done after the new holder finished")

    def _claim_when_free(self, inbox: Inbox, event_id: str) -> Iterator[bool]:
        deadline = time.monotonic() + DEADLINE
        while True:
            try:
                with inbox.guard(self.handler, event_id) as fresh:
                    yield fresh
                    return
            except InboxBusyError as busy:
                remaining = deadline - time.monotonic()
                _expect(remaining > 0, "the claim never expired")
                threading.Event().wait(min(busy.retry_after, remaining))

    @pytest.mark.parametrize("fail", [False, True], ids=["holder_commits", "holder_fails"])
    def test_waiter_follows_the_holder(self, fail: bool) -> None:
        """A guard waiting on a held claim says False if the holder succeeds, True if it fails."""
        self.require("waits_for_holder")
        event_id = uuid.uuid4().hex
        try:
            with self.make_inbox().guard(self.handler, event_id):
                waiter = _Attempt(self.make_inbox(), self.handler, event_id)
                self.wait_for_blocked_claimer()
                _expect(not waiter.outcome, f"waiter did not wait: {waiter.outcome}")
                if fail:
                    raise HandlerError
        except HandlerError:
            pass
        _expect(waiter.result() is fail, f"waiter gave {waiter.outcome}, expected {fail}")

    def test_waiter_gives_up_with_busy_error(self) -> None:
        """A guard that waited too long on a held claim raises InboxBusyError, then may retry."""
        self.require("gives_up_waiting")
        event_id, impatient = uuid.uuid4().hex, self.make_impatient_inbox()
        with self.make_inbox().guard(self.handler, event_id):
            busy = _Attempt(impatient, self.handler, event_id).result()
        _expect(isinstance(busy, InboxBusyError), f"got {busy!r}, expected InboxBusyError")
        _expect(self._attempt(event_id, impatient) is False, "the holder's mark was lost")

    def test_effects_commit_together_with_done_mark(self) -> None:
        """Effects written inside a successful guard are committed along with the mark."""
        self.require("rollback_discards_effects")
        event_id = uuid.uuid4().hex
        with self.make_inbox().guard(self.handler, event_id):
            self.record_effect(event_id)
            _expect(event_id not in self.committed_effects(), "effect visible before commit")
        _expect(self.committed_effects().count(event_id) == 1, "effect not committed")
        _expect(self._attempt(event_id) is False, "not done")

    def test_effects_vanish_with_the_claim_on_exception(self) -> None:
        """Effects written inside a failing guard roll back, and a retry is fresh."""
        self.require("rollback_discards_effects")
        event_id = uuid.uuid4().hex
        with pytest.raises(HandlerError), self.make_inbox().guard(self.handler, event_id):
            self._fail_after_effect(event_id)
        _expect(event_id not in self.committed_effects(), "effect of a failed handler kept")
        _expect(self._attempt(event_id) is True, "retry not fresh")

    def _fail_after_effect(self, value: str) -> None:
        self.record_effect(value)
        raise HandlerError(value)
