"""A coverage-guided fuzz target (atheris) for the codec's decode entry points.

Run by ``tests/test_codec_atheris.py`` under ``make test-slow``; by hand::

    python -m tests.fuzz.decode_target tests/fuzz/corpus -max_total_time=60 -max_len=65536

Every input must end as an event or an ``EventDecodeError`` (any other exception is a finding,
and atheris stops on it), within the per-MiB CPU bound of ``tests/test_codec_hostile.py``.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import atheris

with atheris.instrument_imports(include=["tidings"]):
    import msgspec
    from tests.test_codec_hostile import CODEC, CPU_SECONDS_PER_MIB, MIB, WORST_PAYLOADS

    from tidings import EventDecodeError

SEED_LENGTH = 64 * 1024


def write_corpus(directory: Path) -> Path:
    """Write the seed corpus: the hostile test's worst cases, cut to the fuzzer's input size."""
    directory.mkdir(parents=True, exist_ok=True)
    for index, payload in enumerate(WORST_PAYLOADS.values()):
        (directory / f"worst-{index:02d}").write_bytes(payload[:SEED_LENGTH])
    valid = WORST_PAYLOADS["a huge exponent"].replace(b"1e999999999", b"1.5")
    (directory / "valid").write_bytes(CODEC.encode(CODEC.decode(valid)))
    return directory


def _settle(call: Any) -> None:
    with contextlib.suppress(EventDecodeError):
        call()


def test_one_input(data: bytes) -> None:
    """Decode ``data`` through every entry point; fail on an untyped error or a slow input."""
    bound = CPU_SECONDS_PER_MIB * max(len(data), 64 * 1024) / MIB
    start = time.thread_time()
    _settle(lambda: CODEC.decode(data))
    _settle(lambda: CODEC.read(data))
    _settle(lambda: CODEC.decode(data.decode("utf-8", "replace")))
    try:
        parsed = msgspec.json.decode(data)
    except (msgspec.DecodeError, RecursionError):
        parsed = None
    if isinstance(parsed, dict):
        _settle(lambda: CODEC.from_envelope(parsed))
    spent = time.thread_time() - start
    if spent > 4 * bound:  # four entry points
        msg = f"{len(data)} bytes took {spent:.3f} s of CPU (bound {4 * bound:.3f} s)"
        raise AssertionError(msg)


def main() -> None:
    """Fuzz with libFuzzer's arguments; the first that is a directory gets the seed corpus."""
    for argument in sys.argv[1:]:
        if not argument.startswith("-"):
            write_corpus(Path(argument))
            break
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
