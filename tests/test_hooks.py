"""The hook slot several integrations share (tracing, metrics, audit): each sees every report."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import ClassVar

import pytest

from tidings import DomainEvent, EventBus, _tracing, register_event
from tidings.codec import default_codec
from tidings.delivery import Dispatcher, Received
from tidings.memory import MemoryDeadLetterStore
from tidings.ports import DeadLetter
from tidings.retry import RetryPolicy


@register_event
@dataclass(frozen=True)
class Pinged(DomainEvent):
    """An event for these tests."""

    event_type: ClassVar[str] = "tests.hooks.pinged"
    n: int = 0


@register_event
@dataclass(frozen=True)
class Unheard(DomainEvent):
    """An event no handler takes."""

    event_type: ClassVar[str] = "tests.hooks.unheard"


class _Span:
    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    def done(self, fresh: bool) -> None:
        self.log.append(f"{self.name}:done:{fresh}")

    def busy(self, retry_in: float) -> None:
        self.log.append(f"{self.name}:busy")

    def failed(
        self, error: BaseException, *, retry_in: float | None = None, dead_letter: str | None = None
    ) -> None:
        self.log.append(f"{self.name}:failed:{'retry' if retry_in is not None else 'dead'}")

    def end(self) -> None:
        self.log.append(f"{self.name}:end")

    def __enter__(self) -> _Span:
        self.log.append(f"{self.name}:enter")
        return self

    def __exit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        self.log.append(f"{self.name}:exit")


class _Recorder:
    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    def publish(
        self, events: Sequence[DomainEvent], system: str, destination: str | None
    ) -> AbstractContextManager[object]:
        return self._block(f"publish:{len(events)}")

    def relay(
        self, events: Sequence[DomainEvent], traceparents: Sequence[str | None], destination: str
    ) -> AbstractContextManager[object]:
        return self._block(f"relay:{len(events)}")

    @contextmanager
    def _block(self, what: str) -> Iterator[object]:
        self.log.append(f"{self.name}:{what}")
        yield None
        self.log.append(f"{self.name}:{what}:end")

    def handle(
        self,
        handler: str,
        event: DomainEvent,
        *,
        body: bytes | None,
        system: str,
        destination: str,
        attempt: int,
    ) -> _Span:
        self.log.append(f"{self.name}:handle:{handler}:{attempt}")
        return _Span(self.log, self.name)

    def traceparent(self, event: DomainEvent) -> str | None:
        return None if self.name == "a" else f"tp-{self.name}"

    def rejected(self, letter: DeadLetter, *, system: str) -> None:
        self.log.append(f"{self.name}:rejected:{system}")

    def unrouted(self, event_type: str, count: int, *, system: str) -> None:
        self.log.append(f"{self.name}:unrouted:{event_type}:{count}")


class _Batcher(_Recorder):
    """A recorder that takes a worker's runs a batch at a time."""

    def __init__(self, log: list[str], name: str) -> None:
        super().__init__(log, name)
        self.batches: list[list[_tracing.RunReport]] = []

    def runs(self, runs: Sequence[_tracing.RunReport], *, system: str) -> None:
        self.log.append(f"{self.name}:runs:{system}:{len(runs)}")
        self.batches.append(list(runs))


@pytest.fixture
def two() -> Iterator[list[str]]:
    """Two recording integrations installed, removed again after the test."""
    log: list[str] = []
    _tracing.install("test-a", _Recorder(log, "a"))
    _tracing.install("test-b", _Recorder(log, "b"))
    yield log
    _tracing.uninstall("test-a")
    _tracing.uninstall("test-b")


def test_nothing_is_installed_by_default_and_uninstall_restores_none() -> None:
    """With no integration the slot is None, and removing the last one empties it again."""
    assert _tracing.hooks is None
    _tracing.install("test-only", _Recorder([], "only"))
    assert _tracing.installed("test-only") is _tracing.hooks
    _tracing.uninstall("test-only")
    _tracing.uninstall("never-installed")
    assert _tracing.hooks is None


def test_every_integration_sees_a_worker_handler_run(two: list[str]) -> None:
    """A worker's handler run is reported to both integrations, the first ending last."""
    bus = EventBus()
    bus.add_handler(lambda event: None, Pinged, name="ping")
    dispatcher = Dispatcher(bus, dead_letters=MemoryDeadLetterStore(), transport="t")
    dispatcher.dispatch(Received(default_codec.encode(Pinged(n=1))))
    assert two == [
        "a:handle:ping:1",
        "b:handle:ping:1",
        "b:done:True",
        "a:done:True",
        "b:end",
        "a:end",
    ]


def test_rejections_and_unrouted_events_reach_every_integration(two: list[str]) -> None:
    """An undecodable message and an event without handlers are reported to each integration."""
    dispatcher = Dispatcher(EventBus(), dead_letters=MemoryDeadLetterStore(), transport="t")
    dispatcher.dispatch(Received(b"not json"))
    dispatcher.dispatch(Received(default_codec.encode(Unheard())))
    assert two == [
        "a:rejected:t",
        "b:rejected:t",
        "a:unrouted:tests.hooks.unheard:1",
        "b:unrouted:tests.hooks.unheard:1",
    ]


def test_publish_blocks_nest_and_the_first_traceparent_given_wins(two: list[str]) -> None:
    """Publishing enters every integration's block; the first non-empty traceparent is used."""
    hooks = _tracing.hooks
    assert hooks is not None
    with _tracing.publishing([Pinged()], "tidings", None):
        pass
    assert two == ["a:publish:1", "b:publish:1", "b:publish:1:end", "a:publish:1:end"]
    assert hooks.traceparent(Pinged()) == "tp-b"


def test_a_batch_integration_gets_a_workers_runs_in_one_call_and_the_others_their_spans() -> None:
    """A worker reports a batch's runs to a batch integration once, the others still per run."""
    log: list[str] = []
    batcher = _Batcher(log, "m")
    _tracing.install("test-a", _Recorder(log, "a"))
    _tracing.install("test-m", batcher)
    try:
        bus = EventBus()
        bus.add_handler(lambda event: None, Pinged, name="ping")

        @bus.subscribe(Pinged, name="refuse", retry=RetryPolicy(max_attempts=1))
        def refuse(event: Pinged) -> None:
            if event.n == 2:
                raise ValueError("two")

        dispatcher = Dispatcher(bus, dead_letters=MemoryDeadLetterStore(), transport="t")
        events = [Pinged(n=1), Pinged(n=2)]
        dispatcher.dispatch_many([Received(default_codec.encode(e)) for e in events])
        assert [line for line in log if line.startswith("m:")] == ["m:runs:t:4"]
        assert log.count("a:handle:ping:1") == 2
        assert log.count("a:handle:refuse:1") == 2
        [batch] = batcher.batches
        assert [(name, event.n, outcome) for name, event, _, _, outcome in batch] == [
            ("ping", 1, _tracing.DONE),
            ("refuse", 1, _tracing.DONE),
            ("ping", 2, _tracing.DONE),
            ("refuse", 2, _tracing.DEAD),
        ]
        starts = [started for _, _, started, _, _ in batch]
        assert starts == sorted(starts)
        assert all(took >= 0 for _, _, _, took, _ in batch)
        log.clear()
        bus.publish(Pinged(n=1))  # in-process: every integration gets its span
        assert "m:handle:ping:1" in log
        assert "a:handle:ping:1" in log
    finally:
        _tracing.uninstall("test-a")
        _tracing.uninstall("test-m")
    assert _tracing.batch_hooks is None
    assert _tracing.span_hooks is None
