"""End to end: one correlation id from the HTTP request to a Celery task a handler started.

The web view runs in this process (an ASGI app behind ``CorrelationMiddleware``, called over
httpx); the outbox relay is a real ``tidings relay`` process and the handler runs in a real
Celery worker process, on the test Redis server. Every process logs through ``ContextFilter``
into one Redis list (see :mod:`tests.apps.e2e_shop`), which the test reads.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("celery")
sa = pytest.importorskip("sqlalchemy")
pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")
redis = pytest.importorskip("redis")

from tests.apps import e2e_shop  # noqa: E402
from tests.workers import ROOT, celery_worker, stop, wait_until  # noqa: E402

pytestmark = pytest.mark.integration

TIDINGS = str(Path(sys.executable).parent / "tidings")
WAIT = 60.0  # seconds for the first log lines: the worker and the relay start meanwhile


@pytest.fixture
def scene(redis_url: str, unique_name: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    """This test's queue, key prefix and SQLite database, and the environment naming them."""
    db_url = f"sqlite:///{tmp_path / 'shop.sqlite3'}"
    engine = sa.create_engine(db_url)
    e2e_shop.Base.metadata.create_all(engine)
    engine.dispose()
    env = {
        "E2E_QUEUE": unique_name,
        "E2E_PREFIX": unique_name,
        "E2E_DB": db_url,
        "TIDINGS_TEST_REDIS_URL": redis_url,
    }
    client = redis.Redis.from_url(redis_url)
    try:
        yield env
    finally:
        keys = list(client.scan_iter(f"*{unique_name}*"))  # ours, and kombu's queue bindings
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture
def relay(scene: dict[str, str], tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A ``tidings relay`` process publishing the outbox through the shop's Celery transport."""
    command = [TIDINGS, "relay", "--db", scene["E2E_DB"], "--poll-interval", "0.05",
               "--transport", "tests.apps.e2e_shop:bus"]  # fmt: skip
    with (tmp_path / "relay.log").open("wb") as output:
        process = subprocess.Popen(  # noqa: S603 - our own command line
            command,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **scene},
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        stop(process)


def _request(web: object, path: str, headers: dict[str, str]) -> httpx.Response:
    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=web)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
            return await client.post(path, headers=headers)

    return asyncio.run(send())


def test_request_correlation_id_reaches_relay_handler_and_task_logs(
    scene: dict[str, str], relay: subprocess.Popen[bytes]
) -> None:
    """Log lines of the view, the relay, the worker's handler and its Celery task share ids."""
    shop = e2e_shop.make(scene["E2E_QUEUE"], scene["E2E_PREFIX"], scene["E2E_DB"])
    e2e_shop.configure_logging(shop.client, scene["E2E_PREFIX"])
    correlation_id = str(uuid.uuid4())
    try:
        with celery_worker("tests.apps.e2e_shop", scene["E2E_QUEUE"], scene):
            response = _request(
                shop.web,
                "/orders/o-1",
                {"X-Correlation-ID": correlation_id, "X-Tenant-ID": "acme"},
            )
            assert response.status_code == 200
            assert response.headers["X-Correlation-ID"] == correlation_id

            def lines() -> list[list[str]]:
                raw = shop.client.lrange(f"{scene['E2E_PREFIX']}:logs", 0, -1)
                found = [line.decode().split("|", 3) for line in raw]
                return found if len(found) >= 4 else []

            records = wait_until(lines, timeout=WAIT, what="the task's log line")
    finally:
        e2e_shop.log.handlers.clear()
        shop.engine.dispose()
        shop.client.close()
    assert relay.poll() is None, "the relay died"
    assert len(records) == 4, records
    by_step = {
        "relay" if message.startswith("relayed ") else message.split(":", 1)[0]: (
            cid, tenant, cause, message
        )
        for cid, tenant, cause, message in records
    }  # fmt: skip
    assert sorted(by_step) == ["handler", "relay", "task", "view"]
    assert {(cid, tenant) for cid, tenant, _, _ in by_step.values()} == {(correlation_id, "acme")}
    event_id = by_step["relay"][3].split()[2]  # "relayed <type> <id> from <table>"
    assert by_step["view"][2] == "-"  # the request itself was caused by no event
    assert by_step["relay"][2] == by_step["handler"][2] == by_step["task"][2] == event_id
    assert by_step["task"][3] == "task: receipt sent for o-1"
