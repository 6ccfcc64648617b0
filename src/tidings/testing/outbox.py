"""The outbox conformance suite: every SQL outbox database must pass it.

Subclass :class:`OutboxConformance` in a test module, declare the database's
:class:`Features`, and provide a fixture ``outbox_engine`` returning the engine (disposed by
the fixture afterwards)::

    class TestPostgresOutbox(OutboxConformance):
        features = Features(skip_locked=True, concurrent_writers=True, listen_notify=True)

        @pytest.fixture
        def outbox_engine(self) -> Iterator[sa.Engine]:
            engine = sa.create_engine(url)
            yield engine
            engine.dispose()

Each test gets its own outbox table, dropped afterwards. A test of a capability the database
declares it lacks is skipped, naming the feature. Waits are on conditions with deadlines,
never fixed sleeps. Needs pytest and SQLAlchemy.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa

from tidings.bus import EventBus
from tidings.events import DomainEvent
from tidings.outbox import Backoff, Outbox, Relay
from tidings.registry import register_event
from tidings.testing.workers import wait_until

__all__ = ["Features", "OutboxConformance", "Probe", "Recorder", "running"]

DEADLINE = 20.0  # seconds any single wait may take before the test fails
FAST = Backoff(initial=0.02, maximum=0.2)


@register_event
@dataclass(frozen=True)
class Probe(DomainEvent):
    """The event the suite writes: ``seq`` counts up within each ``aggregate_id``."""

    event_type: ClassVar[str] = "tidings.testing.outbox_probe"
    aggregate_id: str = ""
    seq: int = 0


@dataclass(frozen=True)
class Features:
    """What the database can do; the suite skips the tests of what is declared ``False``.

    Attributes:
        skip_locked: several relays may run at once (``FOR UPDATE SKIP LOCKED``).
        concurrent_writers: two transactions may insert outbox rows at the same time (so a
            lower id can commit after a higher one: the gap case).
        listen_notify: a commit wakes an idle relay at once (PostgreSQL LISTEN/NOTIFY).
    """

    skip_locked: bool = False
    concurrent_writers: bool = False
    listen_notify: bool = False


class Recorder:
    """A thread-safe ``publish`` that records events; ``failing`` makes it raise instead."""

    def __init__(self) -> None:
        self.events: list[Probe] = []
        self.calls = 0
        self.failing = False
        self._lock = threading.Lock()

    def __call__(self, events: Sequence[DomainEvent]) -> None:
        """Record ``events`` (or raise ``ConnectionError`` while ``failing``)."""
        with self._lock:
            self.calls += 1
            if self.failing:
                msg = "the broker is down (test)"
                raise ConnectionError(msg)
            self.events.extend(e for e in events if isinstance(e, Probe))

    def ids(self) -> list[str]:
        """Return the event ids published so far, in publish order."""
        with self._lock:
            return [event.event_id for event in self.events]


@contextmanager
def running(*relays: Relay) -> Iterator[threading.Event]:
    """Run each relay's loop in its own thread for the block; stop and join them after."""
    stop = threading.Event()
    threads = [threading.Thread(target=relay.run, args=(stop,), daemon=True) for relay in relays]
    for thread in threads:
        thread.start()
    try:
        yield stop
    finally:
        stop.set()
        for thread in threads:
            thread.join(DEADLINE)
        assert not any(thread.is_alive() for thread in threads), "a relay did not stop"


class OutboxConformance:
    """The behaviour every SQL outbox database promises; subclass it once per database."""

    features: ClassVar[Features] = Features()
    engine: sa.Engine
    outbox: Outbox

    @pytest.fixture(autouse=True)
    def _outbox_table(self, outbox_engine: sa.Engine) -> Iterator[None]:
        self.engine = outbox_engine
        self.outbox = Outbox(table_name=f"tob_{uuid.uuid4().hex[:12]}")
        self.outbox.create_tables(outbox_engine)
        try:
            yield
        finally:
            self.outbox.drop_tables(outbox_engine)

    def require(self, feature: str) -> None:
        """Skip the calling test unless the database declares ``feature``."""
        if not getattr(self.features, feature):
            pytest.skip(f"{type(self).__name__} declares Features({feature}=False)")

    def relay(self, publish: Any, **options: Any) -> Relay:
        """Return a relay over this test's outbox (fast backoff, short polls by default)."""
        options = {"backoff": FAST, "poll_interval": 0.05, "listen": False, **options}
        return Relay(self.engine, self.outbox, publish, **options)

    def write(self, *events: DomainEvent) -> None:
        """Commit ``events`` to the outbox in one transaction."""
        with self.engine.begin() as connection:
            self.outbox.add(connection, *events)

    def pending(self) -> int:
        """Return how many rows wait to be published."""
        return self.outbox.status(self.engine).pending

    def test_rollback_leaves_nothing(self) -> None:
        """Events added in a transaction that rolls back leave no row."""
        with self.engine.connect() as connection, connection.begin() as transaction:
            self.outbox.add(connection, Probe(aggregate_id="a"), Probe(aggregate_id="b"))
            transaction.rollback()
        assert self.pending() == 0
        assert self.relay(Recorder()).run_once() == 0

    def test_commit_then_relay_publishes_once_through_a_bus(self) -> None:
        """Committed events reach an in-process bus's handlers once; the outbox is then empty."""
        bus, seen = EventBus(), list[str]()
        bus.add_handler(lambda event: seen.append(event.event_id), Probe, name="probe.seen")
        events = [Probe(aggregate_id="a", seq=n) for n in range(3)]
        self.write(*events)
        relay = self.relay(bus)
        assert relay.run_once() == 3
        assert relay.run_once() == 0
        assert seen == [event.event_id for event in events]
        assert self.pending() == 0

    def test_rows_wait_for_a_relay(self) -> None:
        """Rows committed while no relay runs (it crashed) are published when one starts."""
        events = [Probe(aggregate_id=str(n % 3), seq=n) for n in range(10)]
        self.write(*events)
        assert self.pending() == 10
        recorder = Recorder()
        with running(self.relay(recorder)):
            wait_until(lambda: len(recorder.events) == 10, timeout=DEADLINE, what="the backlog")
        assert sorted(recorder.ids()) == sorted(event.event_id for event in events)

    def test_failing_broker_keeps_rows_backs_off_then_drains(self) -> None:
        """While publish fails rows stay, attempts are counted, retries back off; then drained."""
        recorder = Recorder()
        recorder.failing = True
        self.write(*(Probe(aggregate_id="k", seq=n) for n in range(5)))
        with pytest.raises(ConnectionError):
            self.relay(recorder).run_once()
        table = self.outbox.table
        with self.engine.connect() as connection:
            attempts = connection.execute(sa.select(table.c.attempts)).scalars().all()
        assert attempts == [1] * 5
        relay = self.relay(recorder, backoff=Backoff(initial=0.05, maximum=0.2, jitter=0))
        with running(relay):
            started = time.monotonic()
            wait_until(lambda: recorder.calls >= 6, timeout=DEADLINE, what="retries")
            elapsed = time.monotonic() - started
            # The 4 retries after the loop's first failure wait 0.05 + 0.1 + 0.2 + 0.2 s.
            assert elapsed >= 0.5, f"{recorder.calls} calls in {elapsed:.2f} s: no backoff"
            assert self.pending() == 5
            recorder.failing = False
            wait_until(lambda: self.pending() == 0, timeout=DEADLINE, what="the drain")
        assert [event.seq for event in recorder.events] == list(range(5))

    def test_keep_published_marks_then_purge_deletes(self) -> None:
        """With keep_published rows are marked, not deleted, and purge removes old ones."""
        self.write(Probe(aggregate_id="a"), Probe(aggregate_id="b"))
        assert self.relay(Recorder(), keep_published=timedelta(days=1)).run_once() == 2
        table = self.outbox.table
        with self.engine.connect() as connection:
            marked = connection.execute(
                sa.select(sa.func.count()).where(table.c.published_at.is_not(None))
            ).scalar_one()
        assert marked == 2
        assert self.pending() == 0
        assert self.outbox.purge(self.engine, published_before=datetime.now(UTC)) == 2

    def test_order_per_key_with_interleaved_keys(self) -> None:
        """Small batches publish each key's events in the order they were added."""
        events = [Probe(aggregate_id=str(n % 4), seq=n) for n in range(40)]
        self.write(*events)
        recorder = Recorder()
        relay = self.relay(recorder, batch_size=7)
        while relay.run_once():
            pass
        self._check_order(recorder, events)

    def test_undecodable_row_holds_back_only_its_key(self) -> None:
        """A row whose payload cannot be decoded stays, with its key's later rows; others go."""
        self.write(Probe(aggregate_id="bad", seq=0))
        with self.engine.begin() as connection:
            connection.execute(sa.update(self.outbox.table).values(payload="{not json"))
        self.write(Probe(aggregate_id="bad", seq=1), Probe(aggregate_id="good", seq=2))
        recorder = Recorder()
        assert self.relay(recorder).run_once() == 1
        assert [event.seq for event in recorder.events] == [2]
        status = self.outbox.status(self.engine)
        assert status.pending == 2
        assert [(lag.partition_key, lag.pending) for lag in status.partitions] == [("bad", 2)]

    def test_status_reports_pending_age_and_partitions(self) -> None:
        """Status counts pending rows, ages the oldest, and lists keys oldest first."""
        empty = self.outbox.status(self.engine)
        assert (empty.pending, empty.oldest_age, empty.partitions) == (0, None, ())
        self.write(Probe(aggregate_id="x"), Probe(aggregate_id="y"), Probe(aggregate_id="x"))
        status = self.outbox.status(self.engine)
        assert status.pending == 3
        assert status.oldest_age is not None
        assert 0 <= status.oldest_age < 60
        assert [(lag.partition_key, lag.pending) for lag in status.partitions] == [
            ("x", 2),
            ("y", 1),
        ]

    def test_several_relays_lose_nothing_repeat_nothing_keep_key_order(self) -> None:
        """Three relays over a few thousand rows written meanwhile: all once, in key order."""
        self.require("skip_locked")
        events = [Probe(aggregate_id=f"k{n % 37}", seq=n) for n in range(3000)]
        recorder = Recorder()
        relays = [self.relay(recorder, batch_size=50) for _ in range(3)]
        with running(*relays):
            for start in range(0, len(events), 100):
                self.write(*events[start : start + 100])
            wait_until(lambda: len(recorder.events) >= 3000, timeout=60, what="all events")
        self._check_order(recorder, events)
        assert self.pending() == 0

    def test_late_commit_of_lower_id_is_still_delivered(self) -> None:
        """The gap: id N commits after N+1 was relayed, and N is delivered all the same."""
        self.require("concurrent_writers")
        recorder = Recorder()
        relay = self.relay(recorder)
        late, early = Probe(aggregate_id="late"), Probe(aggregate_id="early")
        table = self.outbox.table
        with self.engine.connect() as slow, slow.begin():
            self.outbox.add(slow, late)  # takes id N, commits last
            self.write(early)  # takes N+1, commits now
            assert relay.run_once() == 1
            assert recorder.ids() == [early.event_id]
            late_id = slow.execute(sa.select(table.c.id)).scalar_one()
        assert relay.run_once() == 1
        assert recorder.ids() == [early.event_id, late.event_id]
        assert late_id == 1, "the late row did not take the lower id"

    def test_notify_wakes_an_idle_relay_long_before_the_poll(self) -> None:
        """A commit wakes a LISTENing relay at once, though its poll interval is a minute."""
        self.require("listen_notify")
        recorder = Recorder()
        with running(self.relay(recorder, poll_interval=60.0, listen=True)):
            wait_until(self._listeners, timeout=DEADLINE, what="the relay to LISTEN")
            started = time.monotonic()
            self.write(Probe(aggregate_id="n"))
            wait_until(lambda: recorder.events, timeout=DEADLINE, what="the woken relay")
            assert time.monotonic() - started < 5.0

    def test_killed_listener_is_caught_up_by_polling(self) -> None:
        """After the listener's connection is killed, polling still delivers, and it re-listens."""
        self.require("listen_notify")
        recorder = Recorder()
        with running(self.relay(recorder, poll_interval=0.5, listen=True)):
            pids = wait_until(self._listeners, timeout=DEADLINE, what="the relay to LISTEN")
            with self.engine.connect() as connection:
                for pid in pids:
                    connection.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            self.write(Probe(aggregate_id="p"))
            wait_until(lambda: recorder.events, timeout=DEADLINE, what="polling")
            wait_until(
                lambda: set(self._listeners()) - set(pids), timeout=DEADLINE, what="re-LISTEN"
            )

    def _listeners(self) -> list[int]:
        query = sa.text(
            "SELECT pid FROM pg_stat_activity WHERE query = :listen AND pid <> pg_backend_pid()"
        )
        quoted = self.engine.dialect.identifier_preparer.quote_identifier(self.outbox.channel)
        with self.engine.connect() as connection:
            return list(connection.execute(query, {"listen": f"LISTEN {quoted}"}).scalars())

    @staticmethod
    def _check_order(recorder: Recorder, events: Sequence[Probe]) -> None:
        published = recorder.ids()
        assert len(published) == len(set(published)), "an event was published twice"
        assert set(published) == {event.event_id for event in events}, "events were lost"
        by_key: dict[str, list[int]] = {}
        for event in recorder.events:
            by_key.setdefault(event.aggregate_id, []).append(event.seq)
        for key, seqs in by_key.items():
            assert seqs == sorted(seqs), f"key {key}: published out of order"
