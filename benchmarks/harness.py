"""The measuring harness: two callables, alternating rounds, medians, a ratio.

Each row times our operation and its baseline in alternating rounds (so both see the same
machine load), takes the median time per operation of each, and reports the ratio
baseline / ours: above 1 means tidings is faster. Results go to stdout as a Markdown table and
to ``benchmarks/results.json`` as a list of ``{name, ours, baseline, unit, ratio, target, met}``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    """One measured comparison."""

    name: str
    ours: float
    baseline: float
    unit: str
    ratio: float
    target: float | None
    met: bool | None


@dataclass(frozen=True)
class Case:
    """Two callables doing the same job; ``target`` is the minimum ratio asked for."""

    name: str
    ours: Callable[[], object]
    baseline: Callable[[], object]
    target: float | None = None


def per_op_ns(func: Callable[[], object], loops: int) -> float:
    """Return the mean time of one call of ``func`` over ``loops`` calls, in nanoseconds."""
    start = time.perf_counter_ns()
    for _ in range(loops):
        func()
    return (time.perf_counter_ns() - start) / loops


def calibrate(func: Callable[[], object], budget_s: float) -> int:
    """Return a loop count that makes one round of ``func`` take about ``budget_s``."""
    loops = 1
    while True:
        elapsed = per_op_ns(func, loops) * loops / 1e9
        if elapsed >= budget_s / 10 or loops >= 10_000_000:
            return max(1, int(loops * budget_s / max(elapsed, 1e-9)))
        loops *= 10


def measure(case: Case, rounds: int, budget_s: float) -> Row:
    """Time ``case`` in alternating rounds and summarise medians."""
    ours_loops = calibrate(case.ours, budget_s)
    base_loops = calibrate(case.baseline, budget_s)
    ours: list[float] = []
    base: list[float] = []
    for _ in range(rounds):
        ours.append(per_op_ns(case.ours, ours_loops))
        base.append(per_op_ns(case.baseline, base_loops))
    ours_ns, base_ns = statistics.median(ours), statistics.median(base)
    ratio = base_ns / ours_ns
    met = None if case.target is None else ratio >= case.target
    return Row(
        case.name, round(ours_ns, 1), round(base_ns, 1), "ns/op", round(ratio, 2), case.target, met
    )


def table(rows: list[Row]) -> str:
    """Render rows as a Markdown table."""
    lines = [
        "| benchmark | tidings | baseline | ratio (in tidings' favour) | target |",
        "|---|---:|---:|---:|---|",
    ]
    for row in rows:
        target = "" if row.target is None else f"≥ {row.target:g}× {'met' if row.met else 'MISSED'}"
        lines.append(
            f"| {row.name} | {row.ours:,.0f} {row.unit} | {row.baseline:,.0f} {row.unit} "
            f"| {row.ratio:.2f}× | {target} |"
        )
    return "\n".join(lines)
