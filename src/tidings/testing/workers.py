"""Real worker processes for tests and benchmarks, and waiting on conditions with deadlines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

__all__ = ["celery_worker", "running", "stop", "wait_until"]

T = TypeVar("T")


def wait_until(condition: Callable[[], T], *, timeout: float = 30.0, what: str = "") -> T:
    """Poll ``condition`` until it returns something truthy and return that.

    Raises:
        AssertionError: ``timeout`` seconds passed first; the message names ``what``.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            msg = f"gave up after {timeout} s waiting for {what or condition}"
            raise AssertionError(msg)
        time.sleep(0.02)


@contextmanager
def running(
    command: list[str], env: Mapping[str, str], *, cwd: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``command`` as a child process for the block, then :func:`stop` it.

    The child runs in its own process group (so :func:`stop` reaches its own children too),
    with ``cwd`` (default: the current directory) as its directory and first on its
    ``PYTHONPATH`` (the caller's ``PYTHONPATH`` after it),
    and ``env`` added to the environment. Its output is discarded.
    """
    directory = Path.cwd() if cwd is None else cwd
    process = subprocess.Popen(  # noqa: S603 - our own command line
        command,
        cwd=directory,
        # The directory first, then the caller's own path (a worktree's src/ stays ahead of an
        # installed tidings).
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                part for part in (str(directory), os.environ.get("PYTHONPATH", "")) if part
            ),
            **env,
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield process
    finally:
        stop(process)


@contextmanager
def celery_worker(
    app: str,
    queue: str,
    env: Mapping[str, str],
    *,
    pool: str = "solo",
    concurrency: int = 1,
    cwd: Path | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``celery -A app worker -Q queue`` for the block, as :func:`running` runs commands."""
    command = [
        sys.executable, "-m", "celery", "-A", app, "worker", "-Q", queue,
        f"--pool={pool}", f"--concurrency={concurrency}", "--without-heartbeat",
        "--without-gossip", "--without-mingle", "--loglevel=WARNING", "-n", f"{queue}@%h",
    ]  # fmt: skip
    with running(command, env, cwd=cwd) as process:
        yield process


def stop(process: subprocess.Popen[bytes], *, grace: float = 10.0) -> None:
    """Stop a worker: SIGTERM to its process group, then SIGKILL after ``grace`` seconds."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=grace)
