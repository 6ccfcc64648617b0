"""The coverage-guided fuzz target runs clean: no untyped exception, no input over the bound."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_atheris_finds_nothing_in_sixty_seconds():
    """A minute of coverage-guided fuzzing of every decode entry point finds no failure."""
    pytest.importorskip("atheris", reason="atheris is in the dev extra (Linux, CPython)")
    with tempfile.TemporaryDirectory() as work:
        corpus = Path(work) / "corpus"
        result = subprocess.run(  # noqa: S603 - our own target, our own arguments
            [
                sys.executable,
                "-m",
                "tests.fuzz.decode_target",
                str(corpus),
                "-max_total_time=60",
                "-max_len=65536",
                "-rss_limit_mb=4096",
                "-timeout=10",
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    tail = (result.stdout + result.stderr)[-4000:]
    assert result.returncode == 0, tail
    assert "Done" in tail, tail
