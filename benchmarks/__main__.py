"""``make bench``: tidings against the baseline, side by side, in one run.

Each row times our operation and its baseline in alternating rounds (so both see the same
machine load), takes the median time per operation of each, and reports the ratio
baseline / ours: above 1 means tidings is faster. Results go to stdout as a Markdown table and
to ``benchmarks/results.json`` as a list of ``{name, ours, baseline, unit, ratio, target, met}``.

Run ``python -m benchmarks --quick`` for a fast smoke run, ``--check`` to exit 1 when a target
is missed.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from dataclasses import asdict
from pathlib import Path

from benchmarks import celery_e2e, core, outbox_bench, streams_audit, streams_e2e
from benchmarks.harness import Row, measure, table

RESULTS = Path(__file__).with_name("results.json")


def redis_reachable() -> bool:
    """Whether the local Redis server accepts connections (the Celery rows need it)."""
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1):
            return True
    except OSError:
        return False


def postgres_reachable() -> bool:
    """Whether the local PostgreSQL server accepts connections (the outbox rows need it)."""
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


def _metrics_rows(*, quick: bool, celery: bool = False) -> list[Row]:
    """A row with metrics against the same without (Streams, or Celery); none without the extra."""
    try:
        from benchmarks import metrics_e2e  # noqa: PLC0415 - needs the prometheus extra
    except ImportError:
        print("prometheus_client is not installed: the metrics rows are skipped\n")
        return []
    return metrics_e2e.celery_rows(quick=quick) if celery else metrics_e2e.rows(quick=quick)


def _ui_rows(only: str | None, *, quick: bool) -> list[Row]:
    """The ops page's trace-search rows (Redis; PostgreSQL too when reachable), if asked."""
    if only not in (None, "ui"):
        return []
    if not redis_reachable():
        print("Redis is not reachable on 127.0.0.1:6379: the ops page rows are skipped\n")
        return []
    try:
        from benchmarks import ui_trace  # noqa: PLC0415 - needs the ui extra
    except ImportError:
        print("the ui extra is not installed: the ops page rows are skipped\n")
        return []
    return ui_trace.rows(quick=quick, postgres=postgres_reachable())


def _django_rows(only: str | None, *, quick: bool) -> list[Row]:
    """The Django inbox row against SqlInbox (PostgreSQL; the django extra), if asked."""
    if only not in (None, "django"):
        return []
    if not postgres_reachable():
        print("PostgreSQL is not reachable on 127.0.0.1:5432: the Django inbox row is skipped\n")
        return []
    try:
        from benchmarks import django_inbox  # noqa: PLC0415 - needs the django extra
    except ImportError:
        print("Django is not installed: the Django inbox row is skipped\n")
        return []
    return django_inbox.rows(quick=quick)


def main(argv: list[str] | None = None) -> int:
    """Run every case, print the table, write results.json; return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--quick", action="store_true", help="few short rounds (smoke test)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--only",
        choices=["core", "celery", "streams", "streams-memory", "outbox", "django", "ui"],
        help="run one group (default: all)",
    )
    args = parser.parse_args(argv)
    rounds, budget = (3, 0.02) if args.quick else (9, 0.25)
    rows = []
    if args.only in (None, "core"):
        rows += [measure(case, rounds, budget) for case in core.cases()]
    if args.only in (None, "celery"):
        if redis_reachable():
            rows += celery_e2e.rows(quick=args.quick)
            rows += _metrics_rows(quick=args.quick, celery=True)
        else:
            print("Redis is not reachable on 127.0.0.1:6379: the Celery rows are skipped\n")
    if args.only in (None, "streams", "streams-memory"):
        if not redis_reachable():
            print("Redis is not reachable on 127.0.0.1:6379: the Streams rows are skipped\n")
        elif args.only != "streams-memory":
            rows += streams_e2e.rows(quick=args.quick)
            rows += streams_audit.rows(quick=args.quick)
            rows += _metrics_rows(quick=args.quick)
        if args.only != "streams" and redis_reachable():
            rows += streams_e2e.memory_rows(quick=args.quick)
    if args.only in (None, "outbox"):
        if redis_reachable() and postgres_reachable():
            rows += outbox_bench.rows(quick=args.quick)
        else:
            print("PostgreSQL or Redis is not reachable locally: the outbox rows are skipped\n")
    rows += _django_rows(args.only, quick=args.quick)
    rows += _ui_rows(args.only, quick=args.quick)
    print(table(rows))
    print(
        f"\nin-process rows: medians of {rounds} alternating rounds; Celery rows: medians of "
        f"{1 if args.quick else 3} rounds, one prefork worker; Streams rows: medians of "
        f"{1 if args.quick else 5} rounds, one `tidings worker`; Python {sys.version.split()[0]}"
    )
    args.output.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    missed = [r.name for r in rows if r.met is False]
    if missed:
        print("targets missed: " + ", ".join(missed))
    return 1 if (missed and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
