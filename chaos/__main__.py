"""``python -m chaos``: run the chaos rig (see :mod:`chaos`); exit 1 if any scenario failed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from chaos.rig import run

TRANSPORTS = ("streams", "celery-redis", "celery-rabbitmq")


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the scenarios."""
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__)
    parser.add_argument(
        "--transport", action="append", choices=TRANSPORTS, help="default: every transport"
    )
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of faults")
    parser.add_argument("--rate", type=float, default=80.0, help="orders committed per second")
    parser.add_argument(
        "--fault-every", type=float, default=5.0, help="mean seconds between faults"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--report", type=Path, help="also write the report (Markdown) here")
    options = parser.parse_args(argv)
    return run(
        options.transport or list(TRANSPORTS),
        duration=options.duration,
        rate=options.rate,
        fault_every=options.fault_every,
        seed=options.seed,
        report_path=options.report,
    )


if __name__ == "__main__":
    sys.exit(main())
