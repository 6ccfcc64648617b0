"""Private ``redis-server`` processes for tests that need settings of their own.

A test takes the ``redis_server`` fixture (import it into the test module) and calls it with
``redis-server`` arguments; each server listens on a free port of 127.0.0.1 (or the one given),
keeps its files in the test's temporary directory, and is stopped after the test. A server
killed by the test can be started again on its port (the same files).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from tests.workers import wait_until

__all__ = ["Server", "redis_server"]

Server = Callable[..., str]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Server]:
    """Start private ``redis-server`` processes with the given arguments; stop them after."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    started: list[subprocess.Popen[bytes]] = []

    def start(*arguments: str, port: int | None = None) -> str:
        if port is None:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
        directory = tmp_path / f"redis-{port}"
        directory.mkdir(exist_ok=True)  # a server started again on its port keeps its files
        command = [
            "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
            *arguments,
        ]  # fmt: skip
        process = subprocess.Popen(  # noqa: S603 - our own command line
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        started.append(process)
        client = redis.Redis(port=port, retry=Retry(NoBackoff(), 0))

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_until(answers, timeout=10, what=f"redis-server on port {port}")
        client.close()
        return f"redis://127.0.0.1:{port}/0"

    yield start
    for process in started:
        process.terminate()
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
