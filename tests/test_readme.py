import re
import sys
import types
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


# A block starting "# file: PATH" or "# add to: PATH" is a file of a quick start: it runs as
# that file, in a project of its own, in tests/test_quick_starts.py.
QUICK_START_FILE = re.compile(r"# (file|add to): ")


def python_blocks() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    return [block for block in blocks if not QUICK_START_FILE.match(block)]


def test_readme_python_examples_run_as_written(monkeypatch):
    """Every Python example in the README runs, in order, and its assertions hold."""
    blocks = python_blocks()
    assert len(blocks) >= 4
    module = types.ModuleType("readme_examples")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for block in blocks:
        exec(compile(block, str(README), "exec"), module.__dict__)  # noqa: S102 - our README
