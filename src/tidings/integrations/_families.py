"""The series tidings counts into: labelled counters and histograms, cheap and summable.

prometheus_client's ``Histogram.observe`` takes two locked increments and a loop over the
buckets (about 1.5 µs; 2 µs and two file writes in its multiprocess mode): twice per handler
run, a measurable share of a worker's time. Here an update is one lock and, for a histogram, a
bisection. Each family is a collector a registry scrapes like any other.

A prefork worker's handlers run in child processes: each child writes its :meth:`Family.state`
to a file of its own in a directory (:class:`Snapshots`, every second and when it exits), and
the main process serves the sum of its own state and every file (:class:`Gathered`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

__all__ = ["Family", "FastCounter", "FastHistogram", "Gathered", "Snapshots", "State"]

log = logging.getLogger("tidings.metrics")

State = dict[tuple[str, ...], list[float]]
"""A family's values by label values: ``[count]`` for a counter; a histogram's per-bucket
counts (the last is +Inf, not cumulative) followed by its sum."""


class _Cell:
    """The values of one label set, behind one lock."""

    __slots__ = ("lock", "values")

    def __init__(self, size: int) -> None:
        self.values = [0.0] * size
        self.lock = threading.Lock()

    def read(self) -> list[float]:
        with self.lock:
            return list(self.values)


class _CounterCell(_Cell):
    __slots__ = ()

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` (at least 0)."""
        with self.lock:
            self.values[0] += amount


class _HistogramCell(_Cell):
    __slots__ = ("bounds",)

    def __init__(self, bounds: tuple[float, ...]) -> None:
        super().__init__(len(bounds) + 2)
        self.bounds = bounds

    def observe(self, amount: float) -> None:
        """Count ``amount`` in the first bucket whose bound is at least it; add it to the sum."""
        index = bisect_left(self.bounds, amount)
        with self.lock:
            self.values[index] += 1
            self.values[-1] += amount


class Family(Collector):
    """A labelled family; thread-safe. :meth:`reset` forgets every value (in a forked child)."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labels)
        self._cells: dict[tuple[str, ...], Any] = {}
        self._lock = threading.Lock()

    def reset(self) -> None:
        """Start again from no values, with new locks (a lock held at a fork stays held)."""
        self._cells = {}
        self._lock = threading.Lock()

    def _cell(self) -> _Cell:
        raise NotImplementedError

    def _labelled(self, values: tuple[str, ...]) -> Any:
        cell = self._cells.get(values)
        if cell is None:
            if len(values) != len(self.labelnames):
                msg = f"{self.name} takes {len(self.labelnames)} label values, not {len(values)}"
                raise ValueError(msg)
            with self._lock:
                cell = self._cells.setdefault(values, self._cell())
        return cell

    def state(self) -> State:
        """A copy of every label set's values."""
        return {values: cell.read() for values, cell in list(self._cells.items())}

    def exposed(self, state: State) -> Metric:
        """The metric family of ``state``, as prometheus_client exposes its own."""
        raise NotImplementedError

    def describe(self) -> Iterable[Metric]:
        return [self.exposed({})]

    def collect(self) -> Iterable[Metric]:
        return [self.exposed(self.state())]


class FastCounter(Family):
    """A counter family, exposed as ``<name>_total``; :meth:`labels` gives a cell to ``inc``."""

    def labels(self, *values: str) -> _CounterCell:
        """The cell of these label values, made on first use."""
        cell: _CounterCell = self._labelled(values)
        return cell

    def _cell(self) -> _Cell:
        return _CounterCell(1)

    def exposed(self, state: State) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, counts in state.items():
            family.add_metric(list(values), counts[0])
        return family


class FastHistogram(Family):
    """A histogram family (``_bucket``, ``_sum``, ``_count``); ``+Inf`` is added to ``buckets``."""

    def __init__(
        self, name: str, documentation: str, labels: Sequence[str], buckets: Sequence[float]
    ) -> None:
        super().__init__(name, documentation, labels)
        self.bounds = tuple(float(bound) for bound in buckets)
        self._edges = [*(str(floatToGoString(b)) for b in self.bounds), "+Inf"]  # type: ignore[no-untyped-call]

    def labels(self, *values: str) -> _HistogramCell:
        """The cell of these label values, made on first use."""
        cell: _HistogramCell = self._labelled(values)
        return cell

    def _cell(self) -> _Cell:
        return _HistogramCell(self.bounds)

    def exposed(self, state: State) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, counts in state.items():
            cumulative, running = [], 0.0
            for edge, count in zip(self._edges, counts[:-1], strict=True):
                running += count
                cumulative.append((edge, running))
            family.add_metric(list(values), cumulative, counts[-1])
        return family


def _summed(states: Iterable[State], size: int) -> State:
    total: State = {}
    for state in states:
        for values, counts in state.items():
            if len(counts) != size:
                continue  # written by another version of the family: not addable
            into = total.setdefault(values, [0.0] * size)
            for i, count in enumerate(counts):
                into[i] += count
    return total


class Snapshots:
    """Writes the state of ``families()`` to ``<directory>/tidings-<pid>.json``.

    :meth:`start` writes every ``interval`` seconds in a daemon thread; :meth:`write` writes
    now. Each write replaces the file whole (a reader never sees half of one).
    """

    def __init__(
        self, directory: Path, families: Callable[[], Sequence[Family]], interval: float = 1.0
    ) -> None:
        self.directory = directory
        self.families = families
        self.interval = interval
        self._stop = threading.Event()
        # Named by the pid and this writer's own token: a later child given the same pid
        # (recycled children, pid wrap-around) writes a file of its own, never over this one.
        self._name = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"

    def write(self) -> None:
        """Write this process's state now; an error is logged, never raised."""
        pid = self._name
        document = {
            family.name: [[list(values), counts] for values, counts in family.state().items()]
            for family in self.families()
        }
        path = self.directory / f"tidings-{pid}.json"
        partial = self.directory / f".tidings-{pid}.json.partial"
        try:
            partial.write_text(json.dumps(document))
            partial.replace(path)
        except OSError:
            log.warning("cannot write this process's metrics to %s", path, exc_info=True)

    def start(self) -> None:
        """Write every ``interval`` seconds until :meth:`stop`."""
        threading.Thread(target=self._run, name="tidings-metrics", daemon=True).start()

    def stop(self) -> None:
        """Stop the writing thread (after its current write), and write once more."""
        self._stop.set()
        self.write()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.write()


class Gathered(Collector):
    """At each scrape: the families' state in this process plus every child's file, summed.

    With no ``directory``, the families of this process alone (for a registry of its own).
    """

    def __init__(self, directory: Path | None, families: Callable[[], Sequence[Family]]) -> None:
        self.directory = directory
        self.families = families

    def collect(self) -> Iterable[Metric]:
        written: list[dict[str, Any]] = []
        paths = [] if self.directory is None else sorted(self.directory.glob("tidings-*.json"))
        for path in paths:
            try:
                document = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # a child's file removed or replaced while read: the next scrape has it
            if isinstance(document, dict):
                written.append(document)
        found = []
        for family in self.families():
            size = len(family.bounds) + 2 if isinstance(family, FastHistogram) else 1
            states = [family.state()]
            for document in written:
                entries = document.get(family.name, [])
                states.append({tuple(values): counts for values, counts in entries})
            found.append(family.exposed(_summed(states, size)))
        return found
