"""The chaos rig's one-minute run: faults of every kind, then nothing lost or doubled."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from tests.conftest import require_server

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.mark.parametrize("transport", ["streams", "celery-redis", "celery-rabbitmq"])
def test_a_minute_of_chaos_loses_nothing(transport):
    """Under a minute of kills, stops, broker and database faults: 0 lost, 0 SQL-inbox repeats."""
    require_server("postgresql")
    require_server("redis")  # the rig starts its own, but needs redis-server installed
    from chaos.rig import Rig  # noqa: PLC0415 - the rig imports the project's services

    with tempfile.TemporaryDirectory() as directory:
        rig = Rig(transport, duration=60, rate=40, workdir=Path(directory), fault_every=2.0, seed=7)
        report = rig.run()
    print(report.table())
    assert sum(report.faults.values()) >= 15
    assert report.passed, report.table()
