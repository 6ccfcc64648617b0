"""The test suite's worker helpers: those of :mod:`tidings.testing.workers`, run from the root."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from subprocess import Popen

from tidings.testing.workers import celery_worker as _celery_worker
from tidings.testing.workers import stop, wait_until

__all__ = ["ROOT", "celery_worker", "stop", "wait_until"]

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def celery_worker(
    app: str, queue: str, env: Mapping[str, str], *, pool: str = "solo", concurrency: int = 1
) -> Iterator[Popen[bytes]]:
    """Run a Celery worker for ``app`` (a module under the project root) for the block."""
    with _celery_worker(app, queue, env, pool=pool, concurrency=concurrency, cwd=ROOT) as worker:
        yield worker
