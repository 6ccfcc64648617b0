"""A Celery service whose handler writes a Django ``Shipment`` inside the ``DjangoInbox`` guard.

Worker subprocesses start as ``celery -A tests.apps.celery_django_shop worker -Q <queue>``
with these environment variables; the test process calls :func:`make` with the same values:

- ``DJSHOP_QUEUE``: the queue (required; without it nothing is built on import).
- ``DJSHOP_PREFIX``: the first part of the test's Redis keys (gate, dead letters) and of the
  broker's unacknowledged hash, index and mutex, so that the short visibility timeout (3 s,
  swept every second) restores only this test's messages.
- ``DJSHOP_ALIAS``: the Django database (of ``tests.django_project.settings``) of the inbox
  and the shipments; ``TIDINGS_DJANGO_TEST_RUN`` names the run's databases.

The handler creates one ``Shipment`` per event through the ORM. While ``{prefix}:gate-on``
exists, the first run of each event, after writing its row (uncommitted), sets
``{prefix}:written:<id>`` and waits (at most :data:`GATE_LIMIT` s) in the open transaction:
the test kills the worker there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar

import django
import redis
from celery import Celery
from django.conf import settings

from tidings import DomainEvent, EventBus, register_event
from tidings.deadletter.redis import RedisDeadLetterStore
from tidings.retry import RetryPolicy
from tidings.transports.celery import CeleryTransport

REDIS_URL = os.environ.get("TIDINGS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
HANDLER = "djshop.book"
GATE_LIMIT = 30.0
"""The longest a gated handler waits, so no worker waits for ever."""


@register_event
@dataclass(frozen=True)
class ShipmentRequested(DomainEvent):
    event_type: ClassVar[str] = "celery_django_shop.shipment_requested"
    order_id: str = ""


def setup_django(alias: str) -> None:
    """Configure Django with the test project's settings (once per process) for ``alias``."""
    from tests.django_project import settings as project  # noqa: PLC0415

    if not settings.configured:
        names = [name for name in dir(project) if name.isupper()]
        settings.configure(**{name: getattr(project, name) for name in names})
        django.setup()
    if alias.startswith("mariadb"):
        import pymysql  # noqa: PLC0415

        pymysql.install_as_MySQLdb()


def make(queue: str, prefix: str, alias: str) -> tuple[EventBus, CeleryTransport, redis.Redis]:
    """Build the service: Celery app, transport with a Django inbox, the handler."""
    setup_django(alias)
    from tests.django_project.shop.models import Shipment  # noqa: PLC0415

    from tidings.integrations.django.inbox import DjangoInbox  # noqa: PLC0415

    client = redis.Redis.from_url(REDIS_URL)
    app = Celery(f"djshop-{queue}", broker=REDIS_URL)
    app.conf.update(
        task_default_queue=queue,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            "unacked_key": f"{prefix}:unacked",
            "unacked_index_key": f"{prefix}:unacked_index",
            "unacked_mutex_key": f"{prefix}:unacked_mutex",
            "visibility_timeout": 3,
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
        },
    )
    transport = CeleryTransport(
        app,
        queue=queue,
        inbox=DjangoInbox(using=alias),
        dead_letters=RedisDeadLetterStore(client, prefix=f"{prefix}:dlq"),
        retry=RetryPolicy(max_attempts=3, initial_delay=0.05, max_delay=0.2),
    )
    bus = EventBus(transport=transport)

    @bus.subscribe(ShipmentRequested, name=HANDLER)
    def book(event: ShipmentRequested) -> None:
        Shipment.objects.using(alias).create(event_id=event.event_id, value=event.order_id)
        gated = client.exists(f"{prefix}:gate-on")
        if gated and client.set(f"{prefix}:gate:{event.event_id}", 1, nx=True):
            client.set(f"{prefix}:written:{event.event_id}", 1)
            client.blpop([f"{prefix}:never"], timeout=GATE_LIMIT)  # killed while it waits

    return bus, transport, client


def _from_environment() -> tuple[Any, ...]:
    return make(os.environ["DJSHOP_QUEUE"], os.environ["DJSHOP_PREFIX"], os.environ["DJSHOP_ALIAS"])


if os.environ.get("DJSHOP_QUEUE"):
    bus, transport, _client = _from_environment()
    app = transport.app
