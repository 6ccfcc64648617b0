"""The README's quick starts, run as written: their files, their commands, real processes.

Each quick start section of README.md is read in document order: a Python block whose first
line is ``# file: PATH`` becomes that file of a fresh project (``# add to: PATH`` appends to
it), and each line of a ``sh`` block is run the way a user runs it, in a terminal of its own
where it keeps running (``celery``, ``uvicorn``, ``runserver``, ``tidings_relay``); ``curl``
becomes the same request sent with httpx. ``pip install`` runs as written, in a fresh virtual
environment per quick start, with ``tidings[...]`` taken from a wheel built from this checkout
(so a dependency the extras forget fails here, as it would for a user); the environments are
cached under ``.venv/quick-starts`` by the wheel's hash and the line, so only a change of either
pays the install again. Three kinds of change keep tests apart and fast,
and only these: the queue (``QUEUE = "shop"`` and ``-Q shop``) gets a name of the test's own;
the web server a free port (and ``runserver`` ``--noreload``); the worker options that start it
faster, the relay a shorter poll interval. Redis is the test server (``REDIS_URL``, which the
files read).
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tests.workers import ROOT, stop, wait_until

pytest.importorskip("celery")
redis = pytest.importorskip("redis")
httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.integration

README = ROOT / "README.md"
WAIT = 60.0  # seconds for the worker's log lines: every process starts meanwhile
FILE_MARKER = re.compile(r"# (file|add to): (\S+)\n")
BLOCK = re.compile(r"```(python|sh)\n(.*?)```", flags=re.DOTALL)
LONG_RUNNING = ("celery", "uvicorn", "runserver", "tidings_relay")
UNSET = ("DJANGO_SETTINGS_MODULE", "PYTHONPATH", "VIRTUAL_ENV")  # a user's shell has none
VENVS = ROOT / ".venv" / "quick-starts"
TIDINGS_REQUIREMENT = re.compile(r"^tidings(\[[a-z0-9,-]+\])?$")


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from this checkout, as a user's ``pip install`` would get it."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(  # noqa: S603 - pip, building our own project
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (built,) = out.glob("tidings-*.whl")
    return built


def user_venv(wheel: Path, requirements: list[str]) -> Path:
    """A virtual environment holding exactly ``pip install REQUIREMENTS``, tidings from ``wheel``.

    Cached by the wheel's content and the requirements; a half-made one is never reused.
    """
    resolved = []
    for requirement in requirements:
        match = TIDINGS_REQUIREMENT.match(requirement)
        resolved.append(f"{wheel}{match.group(1) or ''}" if match else requirement)
    key = hashlib.sha256(wheel.read_bytes() + "\0".join(requirements).encode()).hexdigest()[:16]
    venv = VENVS / key
    python = venv / "bin" / "python"
    if (venv / ".complete").exists():
        return python
    shutil.rmtree(venv, ignore_errors=True)
    VENVS.mkdir(parents=True, exist_ok=True)
    for old in VENVS.iterdir():  # environments of older wheels
        shutil.rmtree(old, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)  # noqa: S603
    subprocess.run(  # noqa: S603 - the README's own pip line
        [str(python), "-m", "pip", "install", "--quiet", *resolved],
        check=True,
        capture_output=True,
        timeout=900,
    )
    (venv / ".complete").touch()
    return python


def section(title: str) -> str:
    """The README text under the ``## title`` heading, up to the next ``## `` heading."""
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


@dataclass
class Project:
    """A quick start's project folder, its running processes and their output files."""

    root: Path
    env: dict[str, str]
    queue: str
    port: int
    wheel: Path
    python: str = ""
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def write(self, block: str) -> None:
        """Write (or append) the file a ``# file:`` / ``# add to:`` block names."""
        marker = FILE_MARKER.match(block)
        assert marker, f"a quick start's Python block must start with '# file: PATH': {block!r}"
        mode, path = marker.groups()
        if 'QUEUE = "shop"' in block:
            block = block.replace('QUEUE = "shop"', f'QUEUE = "{self.queue}"')
        target = self.root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("a" if mode == "add to" else "w") as output:
            output.write(("\n" if mode == "add to" else "") + block)

    def run(self, line: str) -> httpx.Response | None:
        """Run one command line of a ``sh`` block; return the response of a ``curl``."""
        argv = shlex.split(line, comments=True)
        if not argv:
            return None
        name, *args = argv
        if name == "pip":
            assert args[0] == "install", line
            self.python = str(user_venv(self.wheel, args[1:]))
            return None
        if name == "curl":
            return self.curl(args)
        assert self.python, "a quick start's first command is its pip install"
        if name == "django-admin":
            command = [self.python, "-m", "django", *args]
        elif name == "python" and args[:1] == ["manage.py"]:
            command = [self.python, *args]
        elif name in ("celery", "uvicorn"):
            command = [self.python, "-m", name, *args]
        else:
            pytest.fail(f"the quick start test does not know how to run {line!r}")
        if not any(word in command for word in LONG_RUNNING):
            subprocess.run(  # noqa: S603 - the README's own command
                command, cwd=self.root, env=self.env, check=True, capture_output=True, timeout=60
            )
            return None
        self.start(self.adapted(command))
        return None

    def adapted(self, command: list[str]) -> list[str]:
        """The command with this test's queue, port and faster start-up options."""
        if "-Q" in command:
            command[command.index("-Q") + 1] = self.queue
        if "worker" in command:
            command += ["--pool=solo", "--without-mingle", "--without-gossip",
                        "--without-heartbeat"]  # fmt: skip
        if "uvicorn" in command:
            command += ["--port", str(self.port)]
        if "runserver" in command:
            command += ["--noreload", f"127.0.0.1:{self.port}"]
        if "tidings_relay" in command:
            command += ["--poll-interval", "0.05"]
        return command

    def start(self, command: list[str]) -> None:
        """Start a long-running command, its output going to a file of the same name."""
        name = next(word for word in LONG_RUNNING if word in command)
        with (self.root / f"{name}.log").open("wb") as output:
            self.processes[name] = subprocess.Popen(  # noqa: S603 - the README's own command
                command,
                cwd=self.root,
                env=self.env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def curl(self, args: list[str]) -> httpx.Response:
        """Send what ``curl ARGS`` sends, to this test's port once the web server listens."""
        method, headers, url = "GET", {}, ""
        words = iter(args)
        for word in words:
            if word == "-X":
                method = next(words)
            elif word == "-H":
                key, _, value = next(words).partition(":")
                headers[key.strip()] = value.strip()
            else:
                url = word
        assert url.startswith("localhost:8000/"), url
        url = url.replace("localhost:8000", f"http://127.0.0.1:{self.port}", 1)

        def listening() -> bool:
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", self.port)) == 0

        self.wait(listening, "the web server to listen")
        return httpx.request(method, url, headers=headers, timeout=10)

    def log(self, name: str) -> str:
        """What the process ``name`` wrote so far."""
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait(self, condition: Callable[[], object], what: str) -> None:
        """Wait for ``condition`` with a deadline; on timeout, fail showing every output."""
        try:
            wait_until(condition, timeout=WAIT, what=what)
        except AssertionError as exc:
            outputs = "\n".join(f"--- {name}:\n{self.log(name)[-3000:]}" for name in LONG_RUNNING)
            raise AssertionError(f"{exc}\n{outputs}") from None


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def project(redis_url: str, unique_name: str, tmp_path: Path, wheel: Path) -> Iterator[Project]:
    """An empty project folder whose processes use the test Redis and are stopped afterwards."""
    env = {key: value for key, value in os.environ.items() if key not in UNSET}
    env.update(REDIS_URL=redis_url, PYTHONUNBUFFERED="1")
    scene = Project(tmp_path, env, unique_name, free_port(), wheel)
    try:
        yield scene
    finally:
        for process in scene.processes.values():  # all at once: each takes a second or two
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in scene.processes.values():
            stop(process)
        client = redis.Redis.from_url(redis_url)
        # The queue and kombu's bindings of it, and the inbox marks of the quick starts' handler.
        keys = [*client.scan_iter(f"*{unique_name}*"),
                *client.scan_iter("tidings:inbox:shop.events.on_order_placed:*")]  # fmt: skip
        if keys:
            client.delete(*keys)
        client.close()


def run_quick_start(project: Project, title: str) -> httpx.Response:
    """Write the section's files and run its commands in document order; return the reply."""
    responses = []
    for kind, block in BLOCK.findall(section(title)):
        if kind == "python":
            project.write(block)
            continue
        for line in block.splitlines():
            response = project.run(line)
            if response is not None:
                responses.append(response)
    assert len(responses) == 1, "a quick start ends with one curl"
    return responses[0]


def assert_logged(project: Project, name: str, ids: str, *messages: str) -> None:
    """Wait until process ``name`` logged each message on a line carrying ``[ids``."""

    def logged() -> bool:
        lines = project.log(name).splitlines()
        return all(any(ids in line and m in line for line in lines) for m in messages)

    project.wait(logged, f"{name} to log {messages} with {ids}")


def test_fastapi_quick_start_carries_the_request_id_to_the_celery_task(project: Project) -> None:
    """The FastAPI quick start as written logs one correlation id in the view, handler and task."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    response = run_quick_start(project, "Quick start: FastAPI + Celery + Redis")
    answered = time.monotonic()
    assert response.status_code == 200, response.text
    correlation_id = response.headers["X-Correlation-ID"]
    assert_logged(project, "uvicorn", f"[{correlation_id} acme]", "placing order o-1")
    assert_logged(
        project, "celery", f"[{correlation_id} acme]", "order o-1 placed", "receipt sent for o-1"
    )
    print(
        f"\nFastAPI quick start: curl to the worker's log lines {time.monotonic() - answered:.2f} s"
    )


def test_django_quick_start_carries_the_request_id_through_the_outbox(project: Project) -> None:
    """The Django quick start as written relays the view's event and logs one id throughout."""
    pytest.importorskip("django")
    response = run_quick_start(project, "Quick start: Django")
    answered = time.monotonic()
    assert response.status_code == 200, response.text
    correlation_id = response.headers["X-Correlation-ID"]
    assert_logged(project, "runserver", f"[{correlation_id}]", "placing order o-1")
    assert_logged(
        project, "celery", f"[{correlation_id}]", "order o-1 placed", "receipt sent for o-1"
    )
    print(
        f"\nDjango quick start: curl to the worker's log lines {time.monotonic() - answered:.2f} s"
    )
    assert project.processes["tidings_relay"].poll() is None, project.log("tidings_relay")
