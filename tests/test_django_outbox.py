"""The Django outbox: publish in transaction.atomic, the direct on_commit mode, the relay."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from io import StringIO
from pathlib import Path

import pytest

django = pytest.importorskip("django")

from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.core.management.base import CommandError  # noqa: E402
from django.db import connections, transaction  # noqa: E402
from django.utils import timezone  # noqa: E402
from tests.django_project import settings as project_settings  # noqa: E402
from tests.django_project.bus import DjangoOrderPlaced  # noqa: E402

from conftest import require_server  # noqa: E402 - after the importorskip
from tidings import EventBus, PublishError, UsageError  # noqa: E402
from tidings.testing.workers import wait_until  # noqa: E402

if not settings.configured:
    # settings.configure, not DJANGO_SETTINGS_MODULE: that variable would reach the Celery
    # workers other test modules start, and Celery's Django fixup would set Django up there.
    settings.configure(
        **{
            name: getattr(project_settings, name)
            for name in dir(project_settings)
            if name.isupper()
        }
    )
django.setup()  # no warning filter needed: Django 4.2-5.2 emit none here

from tidings.integrations.django import publish, publish_on_commit  # noqa: E402
from tidings.integrations.django.models import OutboxEvent, OutboxQuarantine  # noqa: E402
from tidings.integrations.django.relay import Relay  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


BUS_SEEN: list[DjangoOrderPlaced] = []
bus = EventBus()  # what `tidings_relay --bus test_django_outbox:bus` publishes through


@bus.subscribe(DjangoOrderPlaced, name="tests.django.record")
def _record(event: DjangoOrderPlaced) -> None:
    BUS_SEEN.append(event)


def _create_postgres(name: str) -> None:
    psycopg = pytest.importorskip("psycopg")
    pg = settings.DATABASES["postgres"]
    with psycopg.connect(
        host=pg["HOST"],
        port=pg["PORT"],
        user=pg["USER"],
        password=pg["PASSWORD"] or None,
        dbname=settings.POSTGRES_MAINTENANCE_DB,
        autocommit=True,
    ) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}"')
        connection.execute(f'CREATE DATABASE "{name}"')


def _drop_postgres(name: str) -> None:
    import psycopg  # noqa: PLC0415

    pg = settings.DATABASES["postgres"]
    with psycopg.connect(
        host=pg["HOST"],
        port=pg["PORT"],
        user=pg["USER"],
        password=pg["PASSWORD"] or None,
        dbname=settings.POSTGRES_MAINTENANCE_DB,
        autocommit=True,
    ) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(
    scope="module",
    params=["default", pytest.param("postgres", marks=pytest.mark.integration)],
)
def alias(request: pytest.FixtureRequest) -> Iterator[str]:
    """A migrated database for this module: a SQLite file, or a PostgreSQL database of its own."""
    name: str = request.param
    if name == "postgres":
        require_server("postgresql")
        _create_postgres(settings.DATABASES[name]["NAME"])
    try:
        call_command("migrate", database=name, verbosity=0)
        yield name
    finally:
        connections[name].close()
        if name == "postgres":
            _drop_postgres(settings.DATABASES[name]["NAME"])
        else:
            Path(settings.DATABASES[name]["NAME"]).unlink(missing_ok=True)


@pytest.fixture(autouse=True)
def _clean(alias: str) -> Iterator[None]:
    BUS_SEEN.clear()
    yield
    OutboxEvent.objects.using(alias).all().delete()
    OutboxQuarantine.objects.using(alias).all().delete()
    BUS_SEEN.clear()


def _order(key: str, n: int) -> DjangoOrderPlaced:
    return DjangoOrderPlaced(aggregate_id=key, n=n)


def test_publish_in_atomic_then_relay_once_publishes_exactly_once(alias: str) -> None:
    """A committed publish is stored with its envelope and relayed once, then the row is gone."""
    event = _order("o-1", 1)
    with transaction.atomic(using=alias):
        publish(event, using=alias)
    row = OutboxEvent.objects.using(alias).get()
    assert (row.event_id, row.event_type, row.partition_key) == (
        event.event_id,
        "tests.django.order_placed",
        "o-1",
    )
    assert row.published_at is None
    assert row.attempts == 0
    assert f'"id":"{event.event_id}"' in row.payload
    assert Relay(bus, using=alias).run_once() == 1
    assert Relay(bus, using=alias).run_once() == 0
    assert [event] == BUS_SEEN
    assert not OutboxEvent.objects.using(alias).exists()


def test_rollback_stores_and_publishes_nothing(alias: str) -> None:
    """A rolled-back transaction leaves no outbox row, so the relay publishes nothing."""

    class Boom(Exception):
        pass

    def change_that_fails() -> None:
        with transaction.atomic(using=alias):
            publish(_order("o-1", 1), using=alias)
            raise Boom

    with pytest.raises(Boom):
        change_that_fails()
    assert not OutboxEvent.objects.using(alias).exists()
    assert Relay(bus, using=alias).run_once() == 0
    assert BUS_SEEN == []


def test_publish_outside_atomic_raises_a_clear_error(alias: str) -> None:
    """Publishing in autocommit is refused with a message naming atomic and publish_on_commit."""
    with pytest.raises(UsageError, match=r"transaction\.atomic.*publish_on_commit"):
        publish(_order("o-1", 1), using=alias)
    assert not OutboxEvent.objects.using(alias).exists()


def test_publish_refuses_what_is_not_an_event(alias: str) -> None:
    """A non-event argument is refused before anything is written."""
    with pytest.raises(UsageError, match="DomainEvent"), transaction.atomic(using=alias):
        publish(_order("o-1", 1), {"not": "an event"}, using=alias)  # type: ignore[arg-type]
    assert not OutboxEvent.objects.using(alias).exists()


def test_publish_on_commit_runs_after_commit_and_not_on_rollback(alias: str) -> None:
    """The direct mode publishes only once the transaction committed, never on rollback."""
    committed = _order("o-1", 1)
    with transaction.atomic(using=alias):
        publish_on_commit(committed, bus=bus, using=alias)
        assert BUS_SEEN == []
    assert [committed] == BUS_SEEN

    with transaction.atomic(using=alias):
        publish_on_commit(_order("o-2", 2), bus=bus, using=alias)
        transaction.set_rollback(True, using=alias)
    assert [committed] == BUS_SEEN
    assert not OutboxEvent.objects.using(alias).exists()


def test_publish_on_commit_logs_a_failed_publish_without_failing_the_commit(
    alias: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A bus that fails after the commit loses the event: logged, and the commit stands."""
    broken = EventBus()

    @broken.subscribe(DjangoOrderPlaced, name="tests.django.broken")
    def _fail(event: DjangoOrderPlaced) -> None:
        raise RuntimeError("broker down")

    event = _order("o-1", 1)
    with transaction.atomic(using=alias):
        publish_on_commit(event, bus=broken, using=alias)
    assert event.event_id in caplog.text
    assert "lost" in caplog.text


def test_relay_keeps_order_per_key_across_batches(alias: str) -> None:
    """Rows of each key reach the bus in the order they were written, batch after batch."""
    with transaction.atomic(using=alias):
        for n in range(6):
            publish(_order("a", n), _order("b", n), using=alias)
    relay = Relay(bus, using=alias, batch_size=4)
    while relay.run_once():
        pass
    for key in ("a", "b"):
        assert [e.n for e in BUS_SEEN if e.aggregate_id == key] == list(range(6))


def test_relay_holds_back_a_key_behind_a_row_it_did_not_claim(alias: str) -> None:
    """A claimed row waits while an older pending row of its key is outside the batch."""
    with transaction.atomic(using=alias):
        publish(_order("a", 0), _order("a", 1), _order("b", 0), using=alias)
    relay = Relay(bus, using=alias)
    with transaction.atomic(using=alias):
        rows = relay._claim()
        kept = relay._in_order(rows[1:])  # as if another relay held a-0
    assert [row[1] for row in rows] == ["a", "a", "b"]
    assert [row[1] for row in kept] == ["b"]


def test_relay_skips_rows_locked_by_another_relay_and_keeps_their_key_waiting(
    alias: str,
) -> None:
    """With a-0 locked by another transaction, the relay sends b-0 but neither a-0 nor a-1."""
    if alias != "postgres":
        pytest.skip("SQLite has no row locks: one relay per SQLite database")
    with transaction.atomic(using=alias):
        publish(_order("a", 0), _order("a", 1), _order("b", 0), using=alias)
    first = OutboxEvent.objects.using(alias).order_by("id").first()
    locked, release = threading.Event(), threading.Event()

    def hold_first_row() -> None:
        try:
            with transaction.atomic(using=alias):
                OutboxEvent.objects.using(alias).select_for_update().get(id=first.id)
                locked.set()
                release.wait(10)
        finally:
            connections[alias].close()

    holder = threading.Thread(target=hold_first_row)
    holder.start()
    try:
        assert locked.wait(10)
        assert Relay(bus, using=alias).run_once() == 1
        assert [(e.aggregate_id, e.n) for e in BUS_SEEN] == [("b", 0)]
    finally:
        release.set()
        holder.join(10)
    assert Relay(bus, using=alias).run_once() == 2
    assert [(e.aggregate_id, e.n) for e in BUS_SEEN] == [("b", 0), ("a", 0), ("a", 1)]


def test_failed_publish_keeps_rows_pending_and_counts_attempts(alias: str) -> None:
    """When publishing fails the rows stay, their attempts counted, and go out next time."""
    with transaction.atomic(using=alias):
        publish(_order("a", 0), using=alias)

    def down(events: object) -> None:
        raise ConnectionError("broker down")

    with pytest.raises(ConnectionError):
        Relay(down, using=alias).run_once()
    row = OutboxEvent.objects.using(alias).get()
    assert (row.attempts, row.published_at) == (1, None)
    assert Relay(bus, using=alias).run_once() == 1
    assert [e.n for e in BUS_SEEN] == [0]


def test_keep_published_marks_rows_instead_of_deleting(alias: str) -> None:
    """With keep_published, a relayed row stays with published_at set and is not sent again."""
    from datetime import timedelta  # noqa: PLC0415

    with transaction.atomic(using=alias):
        publish(_order("a", 0), using=alias)
    relay = Relay(bus, using=alias, keep_published=timedelta(hours=1))
    assert relay.run_once() == 1
    assert relay.run_once() == 0
    row = OutboxEvent.objects.using(alias).get()
    assert row.published_at is not None
    assert row.attempts == 1
    assert relay.purge(published_before=timedelta(0)) == 1


def test_relay_run_stops_when_asked(alias: str) -> None:
    """The loop drains pending rows and returns once the stop event is set."""
    with transaction.atomic(using=alias):
        publish(_order("a", 0), _order("a", 1), using=alias)
    stop = threading.Event()
    relayed = threading.Event()

    def publish_then_stop(events: object) -> None:
        bus.publish(*events)  # type: ignore[misc]
        if len(BUS_SEEN) == 2:
            relayed.set()
            stop.set()

    thread = threading.Thread(
        target=Relay(publish_then_stop, using=alias, poll_interval=0.05).run, args=(stop,)
    )
    thread.start()
    assert relayed.wait(10)
    thread.join(10)
    assert not thread.is_alive()
    assert [e.n for e in BUS_SEEN] == [0, 1]


def test_management_command_once_relays_pending_rows(alias: str) -> None:
    """`manage.py tidings_relay --bus module:attr --once` publishes what is pending and exits."""
    with transaction.atomic(using=alias):
        publish(_order("a", 0), _order("a", 1), using=alias)
    out = StringIO()
    call_command(
        "tidings_relay",
        "--bus",
        "test_django_outbox:bus",
        "--once",
        "--batch-size",
        "1",
        "--database",
        alias,
        stdout=out,
    )
    assert "Relayed 2 events." in out.getvalue()
    assert [e.n for e in BUS_SEEN] == [0, 1]
    assert not OutboxEvent.objects.using(alias).exists()


def test_management_command_rejects_a_bad_bus(alias: str) -> None:
    """A --bus that is not module:attr, or names nothing usable, is a CommandError."""
    with pytest.raises(CommandError, match="module:attribute"):
        call_command("tidings_relay", "--bus", "nothing", "--once", "--database", alias)
    with pytest.raises(CommandError, match="EventBus or a Transport"):
        call_command("tidings_relay", "--bus", "test_django_outbox:BUS_SEEN", "--once")


def test_import_without_django_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without Django, importing the integration fails with the extra to install."""
    monkeypatch.setitem(sys.modules, "django.db", None)
    monkeypatch.delitem(sys.modules, "tidings.integrations.django")
    with pytest.raises(ImportError, match=r"tidings\[django\]"):
        importlib.import_module("tidings.integrations.django")


def test_relay_command_drains_then_stops_on_sigterm(alias: str) -> None:
    """`manage.py tidings_relay` relays committed rows as they come and exits 0 on SIGTERM."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.django_project.settings",
        "TIDINGS_DJANGO_TEST_RUN": project_settings.RUN,
    }
    command = [
        sys.executable,
        "-m",
        "django",
        "tidings_relay",
        "--bus",
        "tests.django_project.bus:bus",
    ]
    command += ["--database", alias, "--poll-interval", "0.05"]
    relay = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)  # noqa: S603
    try:
        with transaction.atomic(using=alias):
            publish(_order("a", 0), _order("a", 1), using=alias)
        wait_until(
            lambda: not OutboxEvent.objects.using(alias).exists(), timeout=30, what="relayed"
        )
        relay.send_signal(signal.SIGTERM)
        _, errors = relay.communicate(timeout=15)
    finally:
        if relay.poll() is None:
            relay.kill()
            relay.wait()
    assert relay.returncode == 0, errors
    assert "Relaying the outbox" in errors


def test_sqlalchemy_relay_and_outbox_share_the_django_table(alias: str) -> None:
    """The Django table is the SQLAlchemy outbox's: each side's relay drains the other's rows."""
    sa = pytest.importorskip("sqlalchemy")
    from tidings.outbox import Outbox  # noqa: PLC0415 - the sql extra
    from tidings.outbox import Relay as SqlRelay  # noqa: PLC0415

    db = settings.DATABASES[alias]
    if alias == "postgres":
        password = f":{db['PASSWORD']}" if db["PASSWORD"] else ""
        url = f"postgresql+psycopg://{db['USER']}{password}@{db['HOST']}:{db['PORT']}/{db['NAME']}"
    else:
        url = f"sqlite:///{db['NAME']}"
    engine = sa.create_engine(url)
    try:
        outbox = Outbox()
        with transaction.atomic(using=alias):
            publish(_order("a", 0), using=alias)
        assert SqlRelay(engine, outbox, bus, listen=False).run_once() == 1
        with engine.begin() as connection:
            outbox.add(connection, _order("a", 1))
        assert Relay(bus, using=alias).run_once() == 1
    finally:
        engine.dispose()
    assert [e.n for e in BUS_SEEN] == [0, 1]


class _LeakyTransport:
    """A transport whose broker error echoes the database password (as drivers' errors do)."""

    name = "leaky"
    secret = "s3cret-django-pw"  # noqa: S105 - the fake password this test hunts for

    def bind(self, bus: object) -> None:
        """Nothing to bind."""

    def subscribed(self, handler: object) -> None:
        """Nothing to check."""

    def send(self, events: object) -> None:
        """Fail, quoting the password."""
        raise PublishError(f"connection refused (password={self.secret})")

    def send_envelopes(self, envelopes: object) -> None:
        """Fail, quoting the password (an empty batch is the start-up check: it passes)."""
        if envelopes:
            raise PublishError(f"connection refused (password={self.secret})")

    def close(self) -> None:
        """Nothing to close."""


LEAKY = _LeakyTransport()


def test_management_command_refuses_an_event_class_and_keeps_the_rows(alias: str) -> None:
    """`tidings_relay --bus module:EventClass` is refused at start; no row is touched."""
    with transaction.atomic(using=alias):
        publish(_order("a", 0), using=alias)
    with pytest.raises(CommandError, match="the class DjangoOrderPlaced"):
        call_command("tidings_relay", "--bus", "tests.django_project.bus:DjangoOrderPlaced",
                     "--once", "--database", alias)  # fmt: skip
    assert OutboxEvent.objects.using(alias).filter(published_at__isnull=True).count() == 1


def test_management_command_once_error_hides_the_database_password(
    alias: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`tidings_relay --once` failing says why without the database password (nor its log)."""
    monkeypatch.setitem(connections.settings[alias], "PASSWORD", LEAKY.secret)
    with transaction.atomic(using=alias):
        publish(_order("a", 0), using=alias)
    with pytest.raises(CommandError) as caught:
        call_command("tidings_relay", "--bus", "test_django_outbox:LEAKY", "--once",
                     "--database", alias)  # fmt: skip
    assert "connection refused" in str(caught.value)
    assert LEAKY.secret not in str(caught.value)
    assert "***" in str(caught.value)
    assert LEAKY.secret not in caplog.text


def test_management_command_quarantines_a_poison_row_and_its_key_goes_on(alias: str) -> None:
    """A poison row among 80 across 4 keys: quarantined, --once fails naming it, order kept."""
    with transaction.atomic(using=alias):
        publish(*(_order(f"k{n % 4}", n) for n in range(40)), using=alias)
    poison = OutboxEvent.objects.using(alias).create(
        event_id="poison-1", event_type="tests.django.order_placed", partition_key="k1",
        payload="{not json", created_at=timezone.now(),
    )  # fmt: skip
    with transaction.atomic(using=alias):
        publish(*(_order(f"k{n % 4}", n) for n in range(40, 80)), using=alias)
    with pytest.raises(CommandError, match=r"1 row\(s\) could not be relayed and were quarantined"):
        call_command("tidings_relay", "--bus", "test_django_outbox:bus", "--once",
                     "--batch-size", "25", "--max-attempts", "3", "--database", alias)  # fmt: skip
    assert sorted(e.n for e in BUS_SEEN) == list(range(80))
    for key in ("k0", "k1", "k2", "k3"):
        ns = [e.n for e in BUS_SEEN if e.aggregate_id == key]
        assert ns == sorted(ns), key
    assert not OutboxEvent.objects.using(alias).exists()
    [held] = OutboxQuarantine.objects.using(alias).all()
    assert (held.id, held.partition_key, held.attempts) == (poison.id, "k1", 3)
    assert "not a CloudEvents JSON envelope" in held.reason or "not valid JSON" in held.reason
