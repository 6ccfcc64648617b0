"""The Django relay on PostgreSQL wakes on the NOTIFY of ``publish``; polling is the fallback."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

django = pytest.importorskip("django")
psycopg = pytest.importorskip("psycopg")

from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connections, transaction  # noqa: E402
from django.test.utils import CaptureQueriesContext  # noqa: E402
from tests.django_project import settings as project_settings  # noqa: E402
from tests.django_project.bus import DjangoOrderPlaced  # noqa: E402
from tests.django_project.databases import create_postgres, drop_postgres  # noqa: E402

from conftest import require_server  # noqa: E402 - after the importorskip
from tidings import EventBus  # noqa: E402
from tidings.testing.workers import wait_until  # noqa: E402

pytestmark = pytest.mark.integration

if not settings.configured:
    names = [name for name in dir(project_settings) if name.isupper()]
    settings.configure(**{name: getattr(project_settings, name) for name in names})
django.setup()

from tidings.integrations.django import publish  # noqa: E402
from tidings.integrations.django.models import OutboxEvent  # noqa: E402
from tidings.integrations.django.relay import Relay  # noqa: E402

ALIAS = "postgres"
LISTENING = (
    """SELECT pid FROM pg_stat_activity WHERE datname = %s AND query = 'LISTEN "tidings_outbox"'"""
)


@pytest.fixture(scope="module", autouse=True)
def _database() -> Iterator[None]:
    """This module's PostgreSQL database, migrated, dropped at the end."""
    require_server("postgresql")
    name = settings.DATABASES[ALIAS]["NAME"]
    create_postgres(name)
    try:
        call_command("migrate", database=ALIAS, verbosity=0)
        yield
    finally:
        connections[ALIAS].close()
        drop_postgres(name)


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    yield
    OutboxEvent.objects.using(ALIAS).all().delete()


def _listeners() -> list[int]:
    with connections[ALIAS].cursor() as cursor:
        cursor.execute(LISTENING, [settings.DATABASES[ALIAS]["NAME"]])
        return [row[0] for row in cursor.fetchall()]


@contextmanager
def _running(relay: Relay) -> Iterator[None]:
    stop = threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive(), "the relay did not stop"


def _bus() -> tuple[EventBus, list[DjangoOrderPlaced]]:
    seen: list[DjangoOrderPlaced] = []
    bus = EventBus()
    bus.add_handler(seen.append, DjangoOrderPlaced, name="tests.django.listen")
    return bus, seen


def test_publish_inserts_and_notifies_in_one_round_trip() -> None:
    """publish() of three events is one statement, and a listener is notified at commit."""
    pg = settings.DATABASES[ALIAS]
    with psycopg.connect(
        host=pg["HOST"], port=pg["PORT"], user=pg["USER"], password=pg["PASSWORD"] or None,
        dbname=pg["NAME"], autocommit=True,
    ) as listener:  # fmt: skip
        listener.execute('LISTEN "tidings_outbox"')
        events = [DjangoOrderPlaced(aggregate_id="o-1", n=n) for n in range(3)]
        with transaction.atomic(using=ALIAS), CaptureQueriesContext(connections[ALIAS]) as sent:
            publish(*events, using=ALIAS)
        notified = list(listener.notifies(timeout=10, stop_after=1))
    statements = [query["sql"] for query in sent.captured_queries]
    assert len(statements) == 1, statements
    assert "pg_notify" in statements[0]
    assert [n.channel for n in notified] == ["tidings_outbox"]
    stored = OutboxEvent.objects.using(ALIAS).order_by("id").values_list("event_id", flat=True)
    assert list(stored) == [e.event_id for e in events]


def test_relay_wakes_on_notify_long_before_its_poll() -> None:
    """With a 60 s poll, a relay LISTENing relays an event committed while it waits at once."""
    bus, seen = _bus()
    first, second = (
        DjangoOrderPlaced(aggregate_id="o-1", n=1),
        DjangoOrderPlaced(aggregate_id="o-1", n=2),
    )
    with _running(Relay(bus, using=ALIAS, poll_interval=60)):
        wait_until(_listeners, timeout=20, what="the relay to LISTEN")
        with transaction.atomic(using=ALIAS):
            publish(first, using=ALIAS)
        wait_until(lambda: first in seen, timeout=20, what="the first event")
        with transaction.atomic(using=ALIAS):
            publish(second, using=ALIAS)  # the relay is idle now, for a minute
        wait_until(lambda: second in seen, timeout=20, what="the event the NOTIFY announced")
    assert seen == [first, second]
    wait_until(lambda: not _listeners(), timeout=20, what="the listener to close")


def test_relay_polls_while_its_listener_is_gone_and_listens_again() -> None:
    """A listener killed by the server leaves polling in charge, and is opened again."""
    bus, seen = _bus()
    event = DjangoOrderPlaced(aggregate_id="o-2", n=1)
    with _running(Relay(bus, using=ALIAS, poll_interval=0.5)):
        (pid,) = wait_until(_listeners, timeout=20, what="the relay to LISTEN")
        with connections[ALIAS].cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
        wait_until(lambda: pid not in _listeners(), timeout=20, what="the listener to die")
        with transaction.atomic(using=ALIAS):
            publish(event, using=ALIAS)
        wait_until(lambda: event in seen, timeout=20, what="the event, polled")
        wait_until(lambda: set(_listeners()) - {pid}, timeout=20, what="a new listener")
    assert seen == [event]


def test_relay_without_listen_only_polls() -> None:
    """listen=False opens no listener, and the relay still relays by polling."""
    bus, seen = _bus()
    event = DjangoOrderPlaced(aggregate_id="o-3", n=1)
    with _running(Relay(bus, using=ALIAS, poll_interval=0.2, listen=False)):
        with transaction.atomic(using=ALIAS):
            publish(event, using=ALIAS)
        wait_until(lambda: event in seen, timeout=20, what="the event, polled")
        assert not _listeners()
