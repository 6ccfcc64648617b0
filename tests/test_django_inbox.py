"""The Django inbox: the claim row commits in the handler's ``transaction.atomic`` block."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

django = pytest.importorskip("django")

from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connections  # noqa: E402
from django.db.backends.signals import connection_created  # noqa: E402
from tests.django_project import settings as project_settings  # noqa: E402
from tests.django_project.databases import (  # noqa: E402
    create_mariadb,
    create_postgres,
    drop_mariadb,
    drop_postgres,
    use_pymysql,
)
from tests.workers import celery_worker  # noqa: E402

from conftest import require_server  # noqa: E402 - after the importorskip
from tidings.errors import InboxBusyError  # noqa: E402
from tidings.ports import Inbox  # noqa: E402
from tidings.testing.inbox import DEADLINE, Features, InboxConformance  # noqa: E402
from tidings.testing.workers import wait_until  # noqa: E402

# Processes this module spawns open the same per-run databases.
os.environ.setdefault("TIDINGS_DJANGO_TEST_RUN", project_settings.RUN)

if not settings.configured:
    names = [name for name in dir(project_settings) if name.isupper()]
    settings.configure(**{name: getattr(project_settings, name) for name in names})
django.setup()

from tests.django_project.shop.models import Shipment  # noqa: E402

from tidings.integrations.django.inbox import DjangoInbox  # noqa: E402
from tidings.integrations.django.models import InboxEntry  # noqa: E402


def _django_inbox(run: str, alias: str) -> DjangoInbox:
    """Build a DjangoInbox on ``alias`` in a fresh (spawned) process of this run."""
    os.environ["TIDINGS_DJANGO_TEST_RUN"] = run
    import django as fresh  # noqa: PLC0415
    from django.conf import settings as child  # noqa: PLC0415
    from tests.django_project import settings as project  # noqa: PLC0415

    if not child.configured:
        child.configure(**{name: getattr(project, name) for name in dir(project) if name.isupper()})
        fresh.setup()
    if alias.startswith("mariadb"):
        use_pymysql()
    return DjangoInbox(using=alias)


@pytest.fixture(
    scope="module",
    params=[
        "default",
        pytest.param("postgres", marks=pytest.mark.integration),
        pytest.param("mariadb", marks=pytest.mark.integration),
    ],
)
def alias(request: pytest.FixtureRequest) -> Iterator[str]:
    """A migrated database for this module: a SQLite file, or a server database of its own."""
    name: str = request.param
    if name == "postgres":
        require_server("postgresql")
        create_postgres(settings.DATABASES[name]["NAME"])
    elif name == "mariadb":
        require_server("mariadb")
        use_pymysql()
        create_mariadb(settings.DATABASES[name]["NAME"])
    try:
        call_command("migrate", database=name, verbosity=0)
        yield name
    finally:
        for each in (name, f"{name}_impatient"):
            connections[each].close()
        if name == "postgres":
            drop_postgres(settings.DATABASES[name]["NAME"])
        elif name == "mariadb":
            drop_mariadb(settings.DATABASES[name]["NAME"])
        else:
            Path(settings.DATABASES[name]["NAME"]).unlink(missing_ok=True)


class _ThreadInbox:
    """A DjangoInbox whose guards, in threads other than the main one, then close the connection.

    As a Celery worker's Django fixup closes the connection after each task: the suite's
    threads would otherwise leave theirs open.
    """

    by_source = True

    def __init__(self, alias: str) -> None:
        self.alias, self.inbox = alias, DjangoInbox(using=alias)

    @contextlib.contextmanager
    def guard(self, handler: str, event_id: str, source: str | None = None) -> Iterator[bool]:
        try:
            with self.inbox.guard(handler, event_id, source) as fresh:
                yield fresh
        finally:
            if threading.current_thread() is not threading.main_thread():
                connections[self.alias].close()


class _Inserts:
    """Counts the claim inserts sent on every connection (SQLite waits where nobody sees it)."""

    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()

    def __call__(self, execute: Callable[..., Any], sql: str, *args: Any) -> Any:
        if sql.startswith(f'INSERT INTO "{InboxEntry._meta.db_table}"'):
            with self.lock:
                self.count += 1
        return execute(sql, *args)

    def attach(self, sender: Any, connection: Any, **_: Any) -> None:
        connection.execute_wrappers.append(self)


class TestDjangoInbox(InboxConformance):
    features = Features(
        waits_for_holder=True,
        gives_up_waiting=True,
        rollback_discards_effects=True,
        shared_between_processes=True,
    )

    @pytest.fixture(autouse=True)
    def _store(self, alias: str) -> Iterator[None]:
        self.alias = alias
        self.inserts = _Inserts()
        for each in (alias, f"{alias}_impatient"):
            connections[each].close()  # reopened with the counter
        connection_created.connect(self.inserts.attach)
        yield
        connection_created.disconnect(self.inserts.attach)
        InboxEntry.objects.using(alias).all().delete()
        Shipment.objects.using(alias).all().delete()
        for each in (alias, f"{alias}_impatient"):
            connections[each].close()

    def make_inbox(self) -> Inbox:
        return _ThreadInbox(self.alias)

    def make_impatient_inbox(self) -> Inbox:
        return _ThreadInbox(f"{self.alias}_impatient")

    def record_effect(self, value: str) -> None:
        Shipment.objects.using(self.alias).create(event_id=value, value=value)

    def committed_effects(self) -> list[str]:
        found: list[str] = []

        def read() -> None:  # another thread: another connection, outside the guard
            try:
                found.extend(Shipment.objects.using(self.alias).values_list("value", flat=True))
            finally:
                connections[self.alias].close()

        reader = threading.Thread(target=read)
        reader.start()
        reader.join(DEADLINE)
        return found

    def inbox_factory(self) -> Callable[[], Inbox]:
        return functools.partial(_django_inbox, project_settings.RUN, self.alias)

    def blocked_claimers(self) -> int:
        if self.alias == "postgres":
            with connections["postgres_impatient"].cursor() as cursor:
                cursor.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE wait_event_type = 'Lock' AND query LIKE %s",
                    [f"%{InboxEntry._meta.db_table}%"],
                )
                return int(cursor.fetchone()[0])
        if self.alias == "mariadb":  # a claim that has not returned is listed with its statement
            with connections["mariadb_impatient"].cursor() as cursor:
                cursor.execute(
                    "SELECT count(*) FROM information_schema.processlist WHERE info LIKE %s",
                    [f"INSERT IGNORE INTO `{InboxEntry._meta.db_table}`%"],
                )
                return int(cursor.fetchone()[0])
        return self.inserts.count - 1

    def wait_for_blocked_claimer(self) -> None:
        wait_until(lambda: self.blocked_claimers() > 0, timeout=DEADLINE, what="a waiting claim")

    def test_keys_longer_than_their_columns_are_hashed_not_refused(self) -> None:
        """An over-long handler or event id claims its hashed key: once, distinct, never cut."""
        inbox, long_id, other = DjangoInbox(using=self.alias), "e" * 65, "e" * 64 + "f"
        with inbox.guard("h" * 201, long_id, "s" * 300) as fresh:
            assert fresh
        with inbox.guard("h" * 201, long_id, "s" * 300) as fresh:
            assert not fresh
        assert inbox.is_done("h" * 201, long_id, "s" * 300)
        assert not inbox.is_done("h" * 201, other, "s" * 300)
        rows = InboxEntry.objects.using(self.alias).values_list("handler", "source", "event_id")
        assert all(len(h) <= 200 and len(s) <= 200 and len(e) <= 64 for h, s, e in rows)

    def test_sources_are_told_apart(self) -> None:
        """One event id from two producers is two keys: each takes effect once."""
        inbox = DjangoInbox(using=self.alias)
        for source in ("urn:a", "urn:b"):
            with inbox.guard("h", "e-1", source) as fresh:
                assert fresh
        with inbox.guard("h", "e-1", "urn:a") as fresh:
            assert not fresh
        assert not inbox.is_done("h", "e-1", "urn:c")

    def test_keys_differing_in_case_or_trailing_spaces_are_distinct(self) -> None:
        """Event ids, handlers and sources compare byte for byte (no case-blind collation)."""
        inbox = DjangoInbox(using=self.alias)
        for handler, event_id, source in [
            ("h", "abc", "urn:a"),
            ("h", "ABC", "urn:a"),
            ("h", "abc ", "urn:a"),
            ("H", "abc", "urn:a"),
            ("h", "abc", "URN:A"),
            ("h", "\u00e4bc", "urn:a"),
        ]:
            with inbox.guard(handler, event_id, source) as fresh:
                assert fresh, (handler, event_id, source)

    def test_impatient_claimer_on_a_held_key_is_busy(self) -> None:
        """A claim that gives up on a held key raises InboxBusyError naming no raw input."""
        held = DjangoInbox(using=self.alias)
        impatient = DjangoInbox(using=f"{self.alias}_impatient")
        outcome: list[BaseException | bool] = []

        def claim() -> None:
            try:
                with impatient.guard("h", "e\n-1") as fresh:
                    outcome.append(fresh)
            except InboxBusyError as exc:
                outcome.append(exc)
            finally:
                connections[f"{self.alias}_impatient"].close()

        with held.guard("h", "e\n-1"):
            other = threading.Thread(target=claim)
            other.start()
            other.join(DEADLINE)
        assert len(outcome) == 1
        assert isinstance(outcome[0], InboxBusyError)
        assert outcome[0].retry_after > 0
        assert "\n" not in str(outcome[0])

    def test_prune_deletes_only_older_rows_in_batches(self) -> None:
        """prune() removes rows processed before the cut-off, in batches, and says how many."""
        from datetime import timedelta  # noqa: PLC0415

        from django.utils import timezone  # noqa: PLC0415

        inbox = DjangoInbox(using=self.alias)
        for n in range(7):
            with inbox.guard("h", f"e{n}"):
                pass
        assert inbox.prune(timedelta(hours=1), batch_size=3) == 0
        assert inbox.prune(timezone.now() + timedelta(minutes=1), batch_size=3) == 7
        assert not inbox.is_done("h", "e6")
        with pytest.raises(ValueError, match="batch_size"):
            inbox.prune(timedelta(0), batch_size=0)


@pytest.mark.integration
def test_a_worker_killed_mid_handler_leaves_one_effect_row_after_redelivery(
    alias: str, redis_url: str, unique_name: str
) -> None:
    """Kill -9 in the guard after the ORM write: the redelivery commits one effect, one entry."""
    from tests.apps import celery_django_shop  # noqa: PLC0415

    bus, transport, client = celery_django_shop.make(unique_name, unique_name, alias)
    env = {
        "DJSHOP_QUEUE": unique_name,
        "DJSHOP_PREFIX": unique_name,
        "DJSHOP_ALIAS": alias,
        "TIDINGS_DJANGO_TEST_RUN": project_settings.RUN,
        "TIDINGS_TEST_REDIS_URL": redis_url,
    }
    event = celery_django_shop.ShipmentRequested(order_id="o-1")
    marker = celery_django_shop.ShipmentRequested(order_id="marker")
    shipments = Shipment.objects.using(alias)
    entries = InboxEntry.objects.using(alias).filter(handler=celery_django_shop.HANDLER)
    try:
        client.set(f"{unique_name}:gate-on", 1)
        with celery_worker("tests.apps.celery_django_shop", unique_name, env) as first:
            bus.publish(event)
            wait_until(
                lambda: client.exists(f"{unique_name}:written:{event.event_id}"),
                timeout=60,
                what="the handler to write its row and wait",
            )
            assert not shipments.filter(event_id=event.event_id).exists()  # not committed
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=10)
        assert not shipments.exists()
        assert not entries.exists()
        with celery_worker("tests.apps.celery_django_shop", unique_name, env):
            wait_until(
                lambda: shipments.filter(event_id=event.event_id).exists(),
                timeout=60,
                what="the redelivered event's effect",
            )
            bus.publish(event)  # delivered once more: a duplicate
            bus.publish(marker)
            wait_until(
                lambda: shipments.filter(event_id=marker.event_id).exists(),
                timeout=60,
                what="the marker's effect",
            )
        assert shipments.filter(event_id=event.event_id).count() == 1
        assert entries.filter(event_id=event.event_id).count() == 1
        assert shipments.count() == entries.count() == 2
    finally:
        shipments.all().delete()
        InboxEntry.objects.using(alias).all().delete()
        for key in client.scan_iter(f"{unique_name}*"):
            client.delete(key)
        transport.close()
        client.close()


@pytest.mark.integration
def test_redis_streams_worker_with_a_django_inbox_writes_one_row_per_event(
    alias: str, redis_url: str, unique_name: str
) -> None:
    """A Streams worker guarded by DjangoInbox commits one ORM row per event, duplicates or not."""
    import redis  # noqa: PLC0415
    from tests.apps.celery_django_shop import ShipmentRequested  # noqa: PLC0415

    from tidings import EventBus  # noqa: PLC0415
    from tidings.memory import MemoryDeadLetterStore  # noqa: PLC0415
    from tidings.transports.redis_streams import RedisStreamsTransport  # noqa: PLC0415

    client = redis.Redis.from_url(redis_url)
    transport = RedisStreamsTransport(
        client,
        service=unique_name,
        stream_prefix=f"{unique_name}:stream",
        block_ms=100,
        inbox=DjangoInbox(using=alias),
        dead_letters=MemoryDeadLetterStore(),
    )
    bus = EventBus(transport=transport)
    opened: list[Any] = []  # the consumer threads' Django connections, closed at the end

    @bus.subscribe(ShipmentRequested, name="streams.book")
    def book(event: ShipmentRequested) -> None:
        opened.append(connections[alias])
        Shipment.objects.using(alias).create(event_id=event.event_id, value=event.order_id)

    events = [ShipmentRequested(order_id=f"o-{n}") for n in range(5)]
    marker = ShipmentRequested(order_id="marker")
    shipments = Shipment.objects.using(alias)
    stopping = threading.Event()
    worker = threading.Thread(target=transport.run, args=(stopping,), daemon=True)
    try:
        bus.publish(*events)
        bus.publish(*events)  # every event delivered twice
        bus.publish(marker)
        worker.start()
        wait_until(lambda: shipments.filter(value="marker").exists(), what="the marker's row")
        stopping.set()
        worker.join(30)
        assert not worker.is_alive(), "the consumers did not stop"
        assert sorted(shipments.values_list("event_id", flat=True)) == sorted(
            e.event_id for e in [*events, marker]
        )
        assert InboxEntry.objects.using(alias).filter(handler="streams.book").count() == 6
    finally:
        stopping.set()
        worker.join(30)
        for wrapper in {id(w): w for w in opened}.values():
            if wrapper.connection is not None:
                wrapper.connection.close()  # their threads are gone: close the driver's
        shipments.all().delete()
        InboxEntry.objects.using(alias).all().delete()
        for key in client.scan_iter(f"{unique_name}*"):
            client.delete(key)
        client.close()


def test_import_without_django_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without Django, importing the Django inbox fails with the extra to install."""
    import importlib  # noqa: PLC0415
    import sys  # noqa: PLC0415

    monkeypatch.setitem(sys.modules, "django.db", None)
    monkeypatch.delitem(sys.modules, "tidings.integrations.django.inbox")
    with pytest.raises(ImportError, match=r"tidings\[django\]"):
        importlib.import_module("tidings.integrations.django.inbox")
