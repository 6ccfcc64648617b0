"""The conformance suite every :class:`~tidings.ports.DeadLetterStore` must pass (needs pytest).

Subclass it once per store, in a module pytest collects, and provide a fresh, empty store: either
implement :meth:`DeadLetterStoreConformance.make_store`, or override the ``store`` fixture when
the store needs other fixtures or cleaning up::

    class TestMyStore(DeadLetterStoreConformance):
        @pytest.fixture
        def store(self, tmp_path):
            store = MyStore(tmp_path / "dead.db")
            yield store
            store.close()

Every test is independent and leaves what it added in the store; the fixture cleans up.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest

from tidings.deadletter import find, iter_matching
from tidings.ports import (
    DeadLetter,
    DeadLetterFilter,
    DeadLetterStore,
    FilteringDeadLetterStore,
)

__all__ = ["DeadLetterStoreConformance", "sample_letter"]

_THREADS = 8
_ADDS_PER_THREAD = 25
_BASE_TIME = datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)


def sample_letter(n: int = 0, **changes: object) -> DeadLetter:
    """Return a dead letter with every field set; ``n`` orders ``failed_at`` (a second apart)."""
    letter = DeadLetter(
        body=b"\xff\xfe not UTF-8 \x00\x80 " + str(n).encode(),
        reason="EventDecodeError: field 'amount': expected int, got str",
        traceback='Traceback (most recent call last):\n  File "worker.py", line 1\n',
        attempts=3,
        handler="billing.charge",
        event_type="orders.order_placed",
        event_id=f"event-{n}",
        headers={"correlation_id": "c-1", "tenant_id": "Zürich", "note": "日本語 🎉"},
        transport="redis_streams",
        destination="orders",
        failed_at=(_BASE_TIME + timedelta(seconds=n)).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00"),
    )
    return replace(letter, **changes)  # type: ignore[arg-type]  # test data, any field


class DeadLetterStoreConformance:
    """Tests of the :class:`~tidings.ports.DeadLetterStore` contract, shared by every store."""

    def make_store(self) -> DeadLetterStore:
        """Return a fresh, empty store; implement this or override the ``store`` fixture."""
        msg = f"{type(self).__name__} must implement make_store() or override the store fixture"
        raise NotImplementedError(msg)

    @pytest.fixture
    def store(self) -> DeadLetterStore:
        """The store under test, from :meth:`make_store`."""
        return self.make_store()

    def test_store_implements_the_protocol(self, store: DeadLetterStore) -> None:
        """The store is a DeadLetterStore by the runtime-checkable protocol."""
        assert isinstance(store, DeadLetterStore)

    def test_add_then_get_returns_every_field(self, store: DeadLetterStore) -> None:
        """A stored letter comes back equal, field by field: raw body bytes and unicode headers."""
        letter = sample_letter()
        store.add(letter)
        assert store.get(letter.id) == letter

    def test_missing_optional_fields_come_back_as_none(self, store: DeadLetterStore) -> None:
        """A letter refused before decoding (no handler, type or id; empty body) round-trips."""
        letter = DeadLetter(body=b"", reason="PayloadTooLargeError: too big")
        store.add(letter)
        assert store.get(letter.id) == letter

    def test_large_binary_body_round_trips(self, store: DeadLetterStore) -> None:
        """A 1 MiB body (the stores' default bound) of every byte value comes back byte for byte."""
        letter = sample_letter(body=bytes(range(256)) * 4096)
        store.add(letter)
        got = store.get(letter.id)
        assert got is not None
        assert got.body == letter.body

    def test_awkward_text_is_stored_not_refused(self, store: DeadLetterStore) -> None:
        """Text with NUL, a lone surrogate and markup is stored (possibly escaped), not refused."""
        letter = sample_letter(reason="ValueError: \x00 \udcff [bold]x[/]", event_type="a\x00b")
        store.add(letter)
        got = store.get(letter.id)
        assert got is not None
        assert (got.body, got.headers) == (letter.body, letter.headers)

    def test_get_of_an_unknown_id_returns_none(self, store: DeadLetterStore) -> None:
        """Getting an id never stored returns None."""
        store.add(sample_letter())
        assert store.get("00000000-0000-4000-8000-000000000000") is None

    def test_adding_the_same_id_again_replaces_the_letter(self, store: DeadLetterStore) -> None:
        """A second add with a stored id replaces that letter instead of keeping two."""
        letter = sample_letter()
        store.add(letter)
        again = replace(letter, attempts=4, reason="RuntimeError: again")
        store.add(again)
        assert (store.get(letter.id), store.count()) == (again, 1)

    def test_adding_the_same_letter_twice_keeps_one(self, store: DeadLetterStore) -> None:
        """Adding an identical letter again (a redelivered message) leaves one copy."""
        letter = sample_letter()
        store.add(letter)
        store.add(letter)
        assert (store.list(), store.count()) == ([letter], 1)

    def test_list_is_newest_first(self, store: DeadLetterStore) -> None:
        """Letters added in order of failure are listed newest first."""
        letters = [sample_letter(n) for n in range(5)]
        for letter in letters:
            store.add(letter)
        assert store.list() == letters[::-1]

    def test_list_pages_with_limit_and_offset(self, store: DeadLetterStore) -> None:
        """Limit and offset cut consecutive pages out of the newest-first order."""
        letters = [sample_letter(n) for n in range(7)]
        for letter in letters:
            store.add(letter)
        newest_first = letters[::-1]
        assert store.list(limit=3) == newest_first[:3]
        assert store.list(limit=3, offset=3) == newest_first[3:6]
        assert store.list(limit=3, offset=6) == newest_first[6:]
        assert store.list(limit=3, offset=7) == []
        assert store.list(limit=0) == []

    def test_remove_deletes_one_letter_and_says_whether_it_existed(
        self, store: DeadLetterStore
    ) -> None:
        """Removing returns True and deletes only that letter; removing it again returns False."""
        kept, removed = sample_letter(0), sample_letter(1)
        store.add(kept)
        store.add(removed)
        assert store.remove(removed.id) is True
        assert store.remove(removed.id) is False
        assert (store.get(removed.id), store.list()) == (None, [kept])

    def test_purge_deletes_everything_and_returns_the_count(self, store: DeadLetterStore) -> None:
        """Purging returns how many letters there were and leaves none; purging again returns 0."""
        for n in range(3):
            store.add(sample_letter(n))
        assert store.purge() == 3
        assert (store.count(), store.list(), store.purge()) == (0, [], 0)

    def test_count_follows_adds_and_removes(self, store: DeadLetterStore) -> None:
        """The count is 0 for an empty store and follows every add and remove."""
        assert store.count() == 0
        letters = [sample_letter(n) for n in range(3)]
        for letter in letters:
            store.add(letter)
        assert store.count() == 3
        store.remove(letters[0].id)
        assert store.count() == 2

    def test_concurrent_adds_from_threads_are_all_kept(self, store: DeadLetterStore) -> None:
        """Letters added at once from several threads are all stored, none lost or merged."""
        start = threading.Barrier(_THREADS)
        errors: list[BaseException] = []
        added: list[str] = []

        def add_many(thread: int) -> None:
            try:
                start.wait(timeout=10)
                for n in range(_ADDS_PER_THREAD):
                    letter = sample_letter(n, event_id=f"{thread}-{n}")
                    store.add(letter)
                    added.append(letter.id)
            except BaseException as exc:  # noqa: BLE001 - reported by the assert below
                errors.append(exc)

        threads = [threading.Thread(target=add_many, args=(t,)) for t in range(_THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert errors == []
        assert store.count() == _THREADS * _ADDS_PER_THREAD
        listed = store.list(limit=_THREADS * _ADDS_PER_THREAD + 1)
        assert sorted(letter.id for letter in listed) == sorted(added)

    def _mixed(self, store: DeadLetterStore) -> list[DeadLetter]:
        """Add eight letters of two handlers, two types and two reasons; return them in order."""
        letters = [
            sample_letter(
                n,
                handler=("billing.charge", "mail.send")[n % 2],
                event_type=("orders.order_placed", "orders.order_paid")[n // 4],
                reason=("TimeoutError: gateway took 30 s", "ValueError: amount < 0")[n % 3 == 0],
            )
            for n in range(8)
        ]
        for letter in letters:
            store.add(letter)
        return letters

    def test_find_without_a_filter_is_list(self, store: DeadLetterStore) -> None:
        """An empty filter finds every letter, newest first, as list does."""
        self._mixed(store)
        assert find(store, DeadLetterFilter(), limit=100) == store.list()

    def test_find_filters_by_handler_event_type_and_reason(self, store: DeadLetterStore) -> None:
        """Each field of a filter must hold: handler and type exactly, reason as a substring."""
        letters = self._mixed(store)
        where = DeadLetterFilter(handler="mail.send", event_type="orders.order_placed")
        assert find(store, where) == [letters[3], letters[1]]
        assert find(store, DeadLetterFilter(reason="amount <")) == letters[6::-3]
        assert find(store, DeadLetterFilter(reason="timeouterror")) == []  # case-sensitive
        assert find(store, DeadLetterFilter(handler="billing")) == []  # exact, not a prefix

    def test_find_filters_by_since(self, store: DeadLetterStore) -> None:
        """``since`` keeps the letters that failed at that instant or later (naive means UTC)."""
        letters = self._mixed(store)
        since = datetime.fromisoformat(letters[5].failed_at)
        assert find(store, DeadLetterFilter(since=since)) == letters[:4:-1]
        naive = since.replace(tzinfo=None)
        assert find(store, DeadLetterFilter(since=naive, handler="billing.charge")) == [letters[6]]
        later = since.astimezone(timezone(timedelta(hours=5)))
        assert find(store, DeadLetterFilter(since=later)) == letters[:4:-1]

    def test_find_pages_the_matching_letters(self, store: DeadLetterStore) -> None:
        """Limit and offset count matching letters only, newest first."""
        letters = self._mixed(store)
        billing = letters[6::-2]  # n = 6, 4, 2, 0
        where = DeadLetterFilter(handler="billing.charge")
        assert find(store, where, limit=3) == billing[:3]
        assert find(store, where, limit=3, offset=3) == billing[3:]
        assert find(store, where, limit=0) == []

    def test_iter_matching_skips_nothing_when_letters_go_meanwhile(
        self, store: DeadLetterStore
    ) -> None:
        """Removing each letter as it is yielded, pages of two still reach every match once."""
        if not isinstance(store, FilteringDeadLetterStore):
            pytest.skip("a store without iter_matching is paged by offset (collect ids first)")
        letters = self._mixed(store)
        seen = []
        for letter in iter_matching(store, DeadLetterFilter(), page_size=2):
            seen.append(letter.id)
            store.remove(letter.id)
        assert sorted(seen) == sorted(letter.id for letter in letters)
