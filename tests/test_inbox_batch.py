from dataclasses import dataclass
from typing import ClassVar

import pytest

from tidings import DomainEvent, EventBus, encode, register_event
from tidings.delivery import Dispatcher, Received
from tidings.inbox.redis import RedisInbox
from tidings.memory import MemoryDeadLetterStore
from tidings.ports import BatchInbox

pytestmark = pytest.mark.integration


@register_event
@dataclass(frozen=True)
class CrateLoaded(DomainEvent):
    event_type: ClassVar[str] = "inbox_batch_test.crate_loaded"
    crate: int = 0


@pytest.fixture
def inbox(redis_client, unique_name):
    """A Redis inbox under a key prefix of its own, emptied after the test."""
    store = RedisInbox(redis_client, prefix=unique_name, lease=5)
    yield store
    for key in redis_client.scan_iter(f"{unique_name}*"):
        redis_client.delete(key)


def test_redis_inbox_has_the_batch_capability(inbox):
    """RedisInbox claims and settles many pairs at once."""
    assert isinstance(inbox, BatchInbox)


def test_claim_many_answers_fresh_done_and_busy_per_pair(inbox):
    """Each pair is fresh, already done, or busy with the holder's remaining lease."""
    with inbox.guard("h", "done-1"):
        pass
    held = inbox.claim_many([("h", "held-1")])
    claims = inbox.claim_many([("h", "new-1"), ("h", "done-1"), ("h", "held-1")])
    assert [c.fresh for c in claims] == [True, False, False]
    assert claims[1].retry_after is None
    assert 0 < claims[2].retry_after <= 5
    inbox.settle(held, [])


def test_settle_marks_done_and_releases_failures(inbox):
    """Settled successes are done for everyone; failures can be claimed again."""
    ok, bad = inbox.claim_many([("h", "ok"), ("h", "bad")])
    inbox.settle([ok], [bad])
    assert inbox.is_done("h", "ok")
    again = inbox.claim_many([("h", "ok"), ("h", "bad")])
    assert [c.fresh for c in again] == [False, True]


def test_settle_does_not_overwrite_a_claim_that_lapsed_to_another_worker(redis_client, inbox):
    """A done mark never lands on someone else's live claim."""
    (mine,) = inbox.claim_many([("h", "e")])
    redis_client.set(inbox.key("h", "e"), "someone-else", px=5000)
    inbox.settle([mine], [])
    assert redis_client.get(inbox.key("h", "e")) == b"someone-else"


def test_dispatch_many_runs_each_pair_once_across_batches(inbox):
    """A batch and a redelivered batch run every handler once per event, in two round trips."""
    bus = EventBus()
    effects: list[tuple[str, int]] = []
    bus.add_handler(lambda e: effects.append(("a", e.crate)), CrateLoaded, name="t.a")
    bus.add_handler(lambda e: effects.append(("b", e.crate)), CrateLoaded, name="t.b")
    dispatcher = Dispatcher(bus, inbox=inbox, dead_letters=MemoryDeadLetterStore())
    messages = [Received(encode(CrateLoaded(crate=i))) for i in range(20)]
    first = dispatcher.dispatch_many(messages)
    second = dispatcher.dispatch_many(messages)
    assert all(o.handled == ("t.a", "t.b") for o in first)
    assert all(o.duplicates == ("t.a", "t.b") for o in second)
    assert sorted(effects) == sorted([("a", i) for i in range(20)] + [("b", i) for i in range(20)])


def test_dispatch_many_releases_failed_pairs_for_their_retry(inbox):
    """A handler failing inside a batch is released, so its retry runs; others stay done."""
    bus = EventBus()
    calls: list[int] = []

    @bus.subscribe(CrateLoaded, name="t.fragile")
    def fragile(event: CrateLoaded) -> None:
        calls.append(event.crate)
        if event.crate == 3 and calls.count(3) == 1:
            raise RuntimeError("crate 3 slipped")

    dispatcher = Dispatcher(bus, inbox=inbox, dead_letters=MemoryDeadLetterStore())
    events = [CrateLoaded(crate=i) for i in range(5)]
    outcomes = dispatcher.dispatch_many([Received(encode(e)) for e in events])
    (retry,) = [r for o in outcomes for r in o.retries]
    assert retry.handler == "t.fragile"
    again = dispatcher.dispatch(Received(retry.body, handler=retry.handler, attempt=retry.attempt))
    assert again.handled == ("t.fragile",)
    assert sorted(calls) == [0, 1, 2, 3, 3, 4]


def test_undecodable_messages_in_a_batch_are_dead_lettered_and_the_rest_handled(inbox):
    """One bad message in a batch is dead-lettered; its neighbours are handled normally."""
    bus = EventBus()
    seen: list[int] = []
    bus.add_handler(lambda e: seen.append(e.crate), CrateLoaded, name="t.seen")
    letters = MemoryDeadLetterStore()
    dispatcher = Dispatcher(bus, inbox=inbox, dead_letters=letters)
    outcomes = dispatcher.dispatch_many(
        [
            Received(encode(CrateLoaded(crate=1))),
            Received(b"garbage"),
            Received(encode(CrateLoaded(crate=2))),
        ]
    )
    assert [o.event is None for o in outcomes] == [False, True, False]
    assert seen == [1, 2]
    assert letters.count() == 1
