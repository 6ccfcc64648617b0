"""The Celery baseline: a stock Celery app and its plain task, with nothing of tidings.

``python -m celery -A benchmarks.apps.celery_plain worker`` runs the baseline as users run it
today; ``BENCH_PLAIN_QUEUE`` and ``BENCH_PREFIX`` (Redis keys) come from the environment.
:mod:`benchmarks.apps.celery_bench` builds its app and plain task with the same functions.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery

REDIS_URL = os.environ.get("TIDINGS_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


def celery_app(queue: str) -> Celery:
    """A Celery app on the benchmark's Redis, configured alike for both workers."""
    app = Celery("bench", broker=REDIS_URL)
    app.conf.update(
        task_default_queue=queue,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_prefetch_multiplier=16,
    )
    return app


def plain_task(app: Celery, client: redis.Redis, prefix: str) -> Any:
    """Register the baseline on ``app``: a plain task doing what the tidings handler does."""

    @app.task(name="bench.plain", ignore_result=True, acks_late=True)
    def plain(data: dict[str, Any]) -> None:
        if data.get("latency"):
            client.rpush(f"{prefix}:started", f"{data['order_id']}|{time.time()}")
        if data.get("marker"):
            client.set(f"{prefix}:done", "1")

    return plain


if os.environ.get("BENCH_PLAIN_QUEUE"):
    app = celery_app(os.environ["BENCH_PLAIN_QUEUE"])
    plain = plain_task(app, redis.Redis.from_url(REDIS_URL), os.environ["BENCH_PREFIX"])
