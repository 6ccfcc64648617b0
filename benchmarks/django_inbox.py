"""The Django inbox against the SQLAlchemy ``SqlInbox``, on one PostgreSQL database, one run.

Per event, each side opens its inbox's guard for a fresh event id (so the claim is new), and
the handler writes one effect row in it: ``DjangoInbox`` with the row created through the ORM
(``Delivery.objects.create``), ``SqlInbox`` with the same row inserted through SQLAlchemy Core
on ``current_connection()``. Both in a database of their own (created and dropped here), on
one connection each, measured in alternating rounds, reported as medians. Time per event;
ratio SqlInbox / DjangoInbox (target: the Django inbox at most 15% slower).
"""

from __future__ import annotations

import os
import statistics
import time
import uuid
from collections.abc import Callable
from urllib.parse import urlsplit

import django
import sqlalchemy as sa
from django.conf import settings

from benchmarks.harness import Row

POSTGRES_URL = os.environ.get(
    "TIDINGS_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
TARGET = 1 / 1.15  # ours at most 15% slower
HANDLER = "bench.deliver"


def _alternate(
    rounds: int, first: Callable[[], float], second: Callable[[], float]
) -> tuple[list[float], list[float]]:
    """Run both ``rounds`` times, swapping which goes first every round."""
    a: list[float] = []
    b: list[float] = []
    for i in range(rounds):
        if i % 2:
            b.append(second())
            a.append(first())
        else:
            a.append(first())
            b.append(second())
    return a, b


def _setup_django(name: str) -> None:
    """Point Django at database ``name`` of the benchmark server, with the two apps."""
    url = urlsplit(POSTGRES_URL)
    settings.configure(
        USE_TZ=True,
        INSTALLED_APPS=["tidings.integrations.django", "benchmarks.django_app"],
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": name,
                "USER": url.username or "postgres",
                "PASSWORD": url.password or "",
                "HOST": url.hostname or "127.0.0.1",
                "PORT": str(url.port or 5432),
            }
        },
        TIDINGS_AUTODISCOVER=False,
    )
    django.setup()


def inbox_row(name: str, *, quick: bool) -> Row:
    """DjangoInbox + one ORM write vs SqlInbox + one Core write, per event."""
    from django.db import connection  # noqa: PLC0415

    from benchmarks.django_app.models import Delivery  # noqa: PLC0415
    from tidings.inbox.sql import SqlInbox, current_connection  # noqa: PLC0415
    from tidings.integrations.django.inbox import DjangoInbox  # noqa: PLC0415
    from tidings.integrations.django.models import InboxEntry  # noqa: PLC0415

    rounds, per_round = (10, 50) if quick else (40, 100)
    with connection.schema_editor() as editor:
        editor.create_model(InboxEntry)
        editor.create_model(Delivery)
    engine = sa.create_engine(POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}", pool_size=1)
    metadata = sa.MetaData()
    sql_inbox = SqlInbox(engine, table_name="bench_sql_inbox", metadata=metadata)
    deliveries = sa.Table(
        "bench_sql_delivery",
        metadata,
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("order_id", sa.String(64), nullable=False),
    )
    metadata.create_all(engine)
    insert = sa.insert(deliveries)
    django_inbox = DjangoInbox()
    source = "urn:bench"

    def ours(count: int) -> float:
        start = time.perf_counter_ns()
        for n in range(count):
            event_id = uuid.uuid4().hex
            with django_inbox.guard(HANDLER, event_id, source) as fresh:
                if fresh:
                    Delivery.objects.create(event_id=event_id, order_id=f"order-{n}")
        return (time.perf_counter_ns() - start) / count / 1000

    def baseline(count: int) -> float:
        start = time.perf_counter_ns()
        for n in range(count):
            event_id = uuid.uuid4().hex
            with sql_inbox.guard(HANDLER, event_id, source) as fresh:
                if fresh:
                    current_connection().execute(
                        insert, {"event_id": event_id, "order_id": f"order-{n}"}
                    )
        return (time.perf_counter_ns() - start) / count / 1000

    try:
        ours(50), baseline(50)  # warm up: connections, statement caches
        ours_us, base_us = _alternate(rounds, lambda: ours(per_round), lambda: baseline(per_round))
    finally:
        connection.close()
        engine.dispose()
    mine, base = statistics.median(ours_us), statistics.median(base_us)
    return Row("Django inbox + ORM write vs SqlInbox + Core write, PostgreSQL (per event)",
               round(mine, 1), round(base, 1), "µs/event", round(base / mine, 3),
               round(TARGET, 3), base / mine >= TARGET)  # fmt: skip


def rows(*, quick: bool = False) -> list[Row]:
    """Measure and return the Django inbox row (PostgreSQL must be reachable, Django installed)."""
    import psycopg  # noqa: PLC0415

    url = urlsplit(POSTGRES_URL)
    name = f"bench_django_{uuid.uuid4().hex[:8]}"
    server = {
        "host": url.hostname or "127.0.0.1",
        "port": url.port or 5432,
        "user": url.username or "postgres",
        "password": url.password or None,
        "dbname": (url.path or "/test").lstrip("/") or "test",
        "autocommit": True,
    }
    with psycopg.connect(**server) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        _setup_django(name)
        return [inbox_row(name, quick=quick)]
    finally:
        with psycopg.connect(**server) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
