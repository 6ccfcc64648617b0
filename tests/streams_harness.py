"""Real ``tidings worker`` processes for the Redis Streams tests, restarted when they die."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.workers import ROOT, stop

TIDINGS = str(Path(sys.executable).parent / "tidings")


class SupervisedWorker:
    """A ``tidings worker`` process, started again whenever it exits, as systemd would.

    ``restarts`` counts how often it was started again after dying; :meth:`close` stops it
    (SIGTERM, then SIGKILL after a grace period) and stops supervising.
    """

    def __init__(self, app: str, redis_url: str, env: Mapping[str, str], args: Sequence[str] = ()):
        self.command = [TIDINGS, "worker", "--app", app, "--transport", redis_url, *args]
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
        self.restarts = 0
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self.process = self._start()
        self._thread = threading.Thread(target=self._supervise, daemon=True)
        self._thread.start()

    def _start(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(  # noqa: S603 - our own command line
            self.command,
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _supervise(self) -> None:
        while not self._closing.wait(0.05):
            with self._lock:
                if self.process.poll() is not None and not self._closing.is_set():
                    self.process = self._start()
                    self.restarts += 1

    def kill(self) -> int:
        """Kill the current process with SIGKILL (the supervisor starts a new one); its pid."""
        with self._lock:
            pid = self.process.pid
            os.killpg(pid, 9)
            self.process.wait()
            return pid

    def close(self) -> None:
        """Stop supervising and stop the process gracefully."""
        self._closing.set()
        self._thread.join()
        with self._lock:
            stop(self.process)
