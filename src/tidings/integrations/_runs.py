"""Handler runs, counted on the hot path: two bisections and one date parse a run, no lock.

Every (service, system, event type, handler) has a :class:`RunSeries` in each thread that
runs it, holding all its per-run values, which the families ``tidings_handled_total``,
``..._handler_failures_total``, ``..._retries_total``, ``..._dead_letters_total`` (reason
``handler``) and the duration and latency histograms read when collected
(:class:`RunCounter`, :class:`RunHistogram`). An in-process run is counted by its
:class:`Run`, about 1.4 µs; a worker's batch by :func:`count_runs`, about 1.2 µs an event
with the worker's own share (through one counter or histogram each: about three).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime

from tidings._tracing import BUSY as _BUSY
from tidings._tracing import DONE as _DONE
from tidings._tracing import DUPLICATE as _DUPLICATE
from tidings._tracing import RETRIED as _RETRIED
from tidings._tracing import RunReport
from tidings.integrations._families import FastCounter, FastHistogram, State

__all__ = [
    "BUSY",
    "DEAD",
    "DONE",
    "DUPLICATE",
    "DURATION_BUCKETS",
    "FAILED",
    "LATENCY_BUCKETS",
    "RETRIED",
    "Run",
    "RunCounter",
    "RunHistogram",
    "RunSeries",
    "count_runs",
]

DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
)  # fmt: skip
LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
    900.0, 3600.0,
)  # fmt: skip
DONE, DUPLICATE, FAILED, RETRIED, BUSY, DEAD = range(6)
"""The outcomes a run series counts, by their index in :attr:`RunSeries.counts`."""

_parse = datetime.fromisoformat
_now = time.time
_clock = time.perf_counter


class RunSeries:
    """The values of one label set's handler runs in one thread: counts and two histograms.

    Only its thread writes them, so no lock is taken (a lock would be a tenth of a run's
    cost); a reader copies each list whole (one step under the GIL), so a collection may at
    worst see a run's count before its duration.
    """

    __slots__ = ("counts", "duration", "labels", "latency")

    def __init__(self, labels: tuple[str, str, str, str]) -> None:
        self.labels = labels  # service, system, event type, handler
        self.counts = [0.0] * 6
        self.duration = [0.0] * (len(DURATION_BUCKETS) + 2)  # per bucket, +Inf, then the sum
        self.latency = [0.0] * (len(LATENCY_BUCKETS) + 2)

    def read(self) -> tuple[list[float], list[float], list[float]]:
        """Copies of the counts, the duration and the latency histogram."""
        return list(self.counts), list(self.duration), list(self.latency)


class Run:
    """One handler run, counted once when it reports how it ended (nothing if cut short).

    The latency is taken then too, from the end less the run's duration to the event's
    ``occurred_at`` (never below 0; none if it does not parse). Made, and ended, in the thread
    whose :class:`RunSeries` it counts into. Each report is written out in full (no shared
    helper): a method call is a tenth of what a counted run costs.
    """

    __slots__ = ("ended", "occurred", "series", "start")

    def __init__(self, series: RunSeries, occurred: object) -> None:
        self.series = series
        self.occurred = occurred
        self.ended = False
        self.start = _clock()

    def done(self, fresh: bool) -> None:
        if self.ended:
            return
        self.ended = True
        took = _clock() - self.start
        series = self.series
        if fresh:
            series.counts[DONE] += 1
            duration = series.duration
            duration[bisect_left(DURATION_BUCKETS, took)] += 1
            duration[-1] += took
        else:  # a duplicate the inbox skipped ran no handler: no duration
            series.counts[DUPLICATE] += 1
        try:  # _latency, inlined: the most frequent report
            moment = _parse(self.occurred)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        age = _now() - took - moment.timestamp()
        if age < 0:
            age = 0.0
        latency = series.latency
        latency[bisect_left(LATENCY_BUCKETS, age)] += 1
        latency[-1] += age

    def busy(self, retry_in: float) -> None:
        if self.ended:
            return
        self.ended = True
        took = _clock() - self.start
        self.series.counts[BUSY] += 1  # the handler did not run: no duration
        _latency(self.series.latency, self.occurred, took)

    def failed(
        self,
        error: BaseException,
        *,
        retry_in: float | None = None,
        dead_letter: str | None = None,
    ) -> None:
        if self.ended:
            return
        self.ended = True
        took = _clock() - self.start
        series = self.series
        counts = series.counts
        counts[FAILED] += 1
        if retry_in is not None:
            counts[RETRIED] += 1
        elif dead_letter is not None:
            counts[DEAD] += 1
        duration = series.duration
        duration[bisect_left(DURATION_BUCKETS, took)] += 1
        duration[-1] += took
        _latency(series.latency, self.occurred, took)

    def end(self) -> None:
        self.ended = True  # cut short by the worker: no outcome to count

    def __enter__(self) -> Run:
        return self

    def __exit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        if error is not None:
            self.failed(error)
        else:
            self.done(fresh=True)


def _latency(latency: list[float], occurred: object, took: float) -> None:
    """Count, in ``latency``, the age of ``occurred`` (ISO-8601) when the run began."""
    try:
        moment = _parse(occurred)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    age = _now() - took - moment.timestamp()
    if age < 0:
        age = 0.0
    latency[bisect_left(LATENCY_BUCKETS, age)] += 1
    latency[-1] += age


def count_runs(
    series_of: Callable[[str, str, str], RunSeries],
    system: str,
    runs: Sequence[RunReport],
    wall: float,
) -> None:
    """Count a worker's batch of ``runs`` of ``system`` as :class:`Run` counts each one.

    ``series_of(system, event_type, handler)`` is this thread's series of those runs; ``wall``
    is ``time.time() - time.perf_counter()`` now, which puts each run's start on the wall
    clock.
    """
    found: dict[tuple[str, str], RunSeries] = {}
    for handler, event, started, took, outcome in runs:
        event_type = event.event_type
        series = found.get((event_type, handler))
        if series is None:
            series = found[event_type, handler] = series_of(system, event_type, handler)
        counts = series.counts
        if outcome == _DONE:
            counts[DONE] += 1
        elif outcome == _DUPLICATE:
            counts[DUPLICATE] += 1
        elif outcome == _BUSY:
            counts[BUSY] += 1
        else:
            counts[FAILED] += 1
            counts[RETRIED if outcome == _RETRIED else DEAD] += 1
        if outcome == _DONE or outcome >= _RETRIED:  # the handler ran: its duration
            duration = series.duration
            duration[bisect_left(DURATION_BUCKETS, took)] += 1
            duration[-1] += took
        try:
            moment = _parse(event.occurred_at)
        except (TypeError, ValueError):
            continue
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        age = wall + started - moment.timestamp()
        if age < 0:
            age = 0.0
        latency = series.latency
        latency[bisect_left(LATENCY_BUCKETS, age)] += 1
        latency[-1] += age


class RunCounter(FastCounter):
    """A counter that adds, to its own cells, outcome counts of the run series.

    ``outcomes`` pairs an outcome with the label values appended to a series' labels (cut to
    ``width``) to make the sample's: ``(DONE, ("done",))`` for ``outcome="done"``.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str],
        runs: Callable[[], Iterable[RunSeries]],
        outcomes: Sequence[tuple[int, tuple[str, ...]]],
        *,
        width: int = 4,
    ) -> None:
        super().__init__(name, documentation, labels)
        self.runs = runs
        self.outcomes = outcomes
        self.width = width

    def state(self) -> State:
        state = super().state()
        for series in list(self.runs()):
            counts = series.read()[0]
            for outcome, extra in self.outcomes:
                into = state.setdefault(series.labels[: self.width] + extra, [0.0])
                into[0] += counts[outcome]
        return state


class RunHistogram(FastHistogram):
    """The duration (``latency=False``) or latency histogram of every run series."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str],
        runs: Callable[[], Iterable[RunSeries]],
        *,
        latency: bool,
    ) -> None:
        super().__init__(
            name, documentation, labels, LATENCY_BUCKETS if latency else DURATION_BUCKETS
        )
        self.runs = runs
        self.latency = latency

    def state(self) -> State:
        state = super().state()
        for series in list(self.runs()):
            _, duration, latency = series.read()
            values = latency if self.latency else duration
            into = state.setdefault(series.labels, [0.0] * len(values))
            for i, value in enumerate(values):  # the series of each thread, summed
                into[i] += value
        return state
