"""The transport conformance suite run against CeleryTransport, over Redis and over RabbitMQ.

One harness per class: its worker processes (prefork, one child, so that a crashed handler's
process is replaced by Celery itself) start on first use and serve every test of the class;
each test's events carry the test's scope, so tests do not see each other's effects. The
journal, inbox and dead letters live in Redis under the harness's name; queues are named after
it too, and deleted at the end.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from subprocess import Popen

import pytest
import redis
from celery.signals import after_task_publish
from kombu import Exchange, Queue
from tests.apps.conformance_celery import RedisJournal, make_app, make_bus
from tests.workers import celery_worker

from conftest import require_server
from tidings import DomainEvent, EventBus
from tidings.deadletter.redis import RedisDeadLetterStore
from tidings.ports import DeadLetter
from tidings.testing.transport import MAIN, Features, TransportConformance
from tidings.transports.celery import CeleryTransport

WORKER_APP = "tests.apps.conformance_celery"
CELERY_FEATURES = Features(
    ordered=True,
    redelivers_on_crash=True,
    batches=True,
    fan_out_to_services=True,
    encodes_before_sending=True,
)


class CeleryHarness:
    """A :class:`~tidings.testing.transport.TransportHarness` for CeleryTransport."""

    def __init__(self, broker_url: str, redis_url: str, name: str) -> None:
        self.broker_url, self.redis_url, self.name = broker_url, redis_url, name
        self.client = redis.Redis.from_url(redis_url)
        self.journal = RedisJournal(self.client, name)
        self.store = RedisDeadLetterStore(self.client, prefix=f"{name}:dlq")
        self._queues: set[str] = set()
        self._buses: list[EventBus] = []
        self._workers: dict[str, Popen[bytes]] = {}
        self._stack = ExitStack()
        self._sent = 0
        self._lock = threading.Lock()
        after_task_publish.connect(self._count, weak=False, dispatch_uid=name)

    def queue(self, service: str) -> str:
        """Return the queue of ``service``, remembering it for the clean-up."""
        queue = f"{self.name}_{service}"
        self._queues.add(queue)
        return queue

    def _count(self, sender: object = None, routing_key: str | None = None, **_: object) -> None:
        if routing_key in self._queues:
            with self._lock:
                self._sent += 1

    def publisher_bus(self, services: Sequence[str] = (MAIN,)) -> EventBus:
        """Return a new publishing bus (its own Celery app) sending to the services' queues."""
        queues = [self.queue(service) for service in services]
        bus, _transport = make_bus(
            self.broker_url, self.client, self.name, queue=queues[0], publish_to=queues
        )
        self._buses.append(bus)
        return bus

    def refusing_bus(self) -> EventBus:
        """Return a bus publishing to a queue RabbitMQ keeps empty (a RabbitMQ-only trick)."""
        queue = self.queue("refusing")
        app = make_app(self.broker_url, f"{self.name}-refusing", queue)
        app.conf.task_queues = [
            Queue(
                queue,
                Exchange(queue),
                routing_key=queue,
                queue_arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
            )
        ]
        transport = CeleryTransport(app, queue=queue, dead_letters=self.store, inbox=None)
        bus = EventBus(transport=transport)
        # Routed by type, the queue receives what its bus subscribes to: every event.
        bus.add_handler(lambda event: None, DomainEvent, name=f"{queue}.any")
        self._buses.append(bus)
        return bus

    @contextmanager
    def worker(self, service: str = MAIN) -> Iterator[None]:
        """Start the service's worker on first use; it runs until :meth:`close`."""
        process = self._workers.get(service)
        if process is None:
            queue = self.queue(service)
            env = {
                "CONFORMANCE_BROKER": self.broker_url,
                "CONFORMANCE_REDIS": self.redis_url,
                "CONFORMANCE_PREFIX": self.name,
                "CONFORMANCE_SERVICE": service,
                "CONFORMANCE_QUEUE": queue,
            }
            process = self._stack.enter_context(
                celery_worker(WORKER_APP, queue, env, pool="prefork", concurrency=1)
            )
            self._workers[service] = process
        assert process.poll() is None, f"the {service} worker exited with {process.returncode}"
        yield

    def dead_letters(self) -> list[DeadLetter]:
        """Return the dead letters the workers stored."""
        return self.store.list(limit=1000)

    def messages_sent(self) -> int:
        """Return how many task messages this process published to the harness's queues."""
        with self._lock:
            return self._sent

    def inject(self, body: bytes, service: str = MAIN) -> None:
        """Send ``body`` as the envelope argument of a ``tidings.deliver`` task message."""
        # A connection of our own: kombu's pools are per process and per broker URL, and any
        # test that calls app.close() on an app of this URL closes them for everybody.
        app = make_app(self.broker_url, f"{self.name}-injector", self.queue(MAIN))
        with app.connection_for_write() as connection:
            app.send_task(
                "tidings.deliver",
                args=(body.decode(),),
                queue=self.queue(service),
                producer=app.amqp.Producer(connection),
            )

    def close(self) -> None:
        """Stop the workers, close the transports, delete the queues and keys."""
        after_task_publish.disconnect(dispatch_uid=self.name)
        try:
            self._stack.close()
        finally:
            for bus in self._buses:
                assert bus.transport is not None
                bus.transport.close()
            self._delete_queues()
            keys = [*self.client.scan_iter(f"{self.name}*")]
            # kombu's Redis transport keeps each queue's bindings in keys of its own.
            keys += [
                f"_kombu.{kind}.{queue}"
                for queue in self._queues
                for kind in ("binding", "binding_permanent")
            ]
            self.client.delete(*keys)
            self.client.close()

    def _delete_queues(self) -> None:
        if not self.broker_url.startswith("amqp"):
            return  # Redis queues are keys named after the queue: deleted with the others
        app = make_app(self.broker_url, f"{self.name}-cleaner", self.queue(MAIN))
        with app.connection_for_write() as connection:
            channel = connection.default_channel
            for queue in self._queues:
                channel.queue_delete(queue)
                channel.exchange_delete(queue)


@pytest.mark.integration
class TestCeleryTransportOverRedis(TransportConformance):
    """CeleryTransport with a Redis broker."""

    features = CELERY_FEATURES

    @classmethod
    def make_harness(cls, name: str) -> CeleryHarness:
        url = require_server("redis")
        return CeleryHarness(url, url, name)


@pytest.mark.integration
class TestCeleryTransportOverRabbitMQ(TransportConformance):
    """CeleryTransport with a RabbitMQ broker (journal, inbox and dead letters in Redis)."""

    features = dataclasses.replace(CELERY_FEATURES, broker_refuses=True)

    @classmethod
    def make_harness(cls, name: str) -> CeleryHarness:
        return CeleryHarness(require_server("rabbitmq"), require_server("redis"), f"{name}_amqp")
