"""The transport conformance suite run against RedisStreamsTransport, with real worker processes.

One harness per class: each service's worker is a ``tidings worker`` process, started on first
use and restarted (by a supervisor thread, as systemd would) whenever it dies, so that a crashed
handler's entry is reclaimed by the replacement after ``claim_idle``. Streams, journal, inbox and
dead letters live in Redis under the harness's name and are deleted at the end.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest
import redis
from tests.apps.conformance_streams import RedisJournal, make_bus
from tests.streams_harness import SupervisedWorker

from conftest import require_server
from tidings import EventBus
from tidings.deadletter.redis import RedisDeadLetterStore
from tidings.events import DomainEvent
from tidings.ports import DeadLetter
from tidings.testing.transport import MAIN, Features, Noted, TransportConformance
from tidings.transports.redis_streams import RedisStreamsTransport

WORKER_APP = "tests.apps.conformance_streams:bus"


class CountingTransport(RedisStreamsTransport):
    """Counts the entries it added, for ``messages_sent``."""

    sent = 0
    lock = threading.Lock()

    def send(self, events: Sequence[DomainEvent]) -> None:
        super().send(events)
        with CountingTransport.lock:
            CountingTransport.sent += len(events)


class StreamsHarness:
    """A :class:`~tidings.testing.transport.TransportHarness` for RedisStreamsTransport."""

    def __init__(self, redis_url: str, name: str) -> None:
        self.redis_url, self.name = redis_url, name
        self.client = redis.Redis.from_url(redis_url)
        self.journal = RedisJournal(self.client, name)
        self.store = RedisDeadLetterStore(self.client, prefix=f"{name}:dlq")
        self._buses: list[EventBus] = []
        self._workers: dict[str, SupervisedWorker] = {}
        self._sent_before = CountingTransport.sent

    def publisher_bus(self, services: Sequence[str] = (MAIN,)) -> EventBus:
        """Return a publishing bus: every service's group reads the same streams."""
        bus, _ = make_bus(
            self.client, self.name, service="publisher", transport_class=CountingTransport
        )
        self._buses.append(bus)
        return bus

    def refusing_bus(self) -> EventBus:
        """Return a bus whose stream key holds a string, so Redis refuses XADD (WRONGTYPE)."""
        prefix = f"{self.name}:refusing"
        self.client.set(f"{prefix}:stream:{Noted.event_type}", "not a stream")
        bus, _ = make_bus(self.client, prefix, service="publisher")
        self._buses.append(bus)
        return bus

    @contextmanager
    def worker(self, service: str = MAIN) -> Iterator[None]:
        """Run the service's supervised worker; MAIN's runs until :meth:`close`.

        Every group reads every stream, so a publisher cannot aim at one service: another
        service's worker is stopped, and its groups destroyed, when the block ends, so that it
        does not handle (and dead-letter) the events of later tests.
        """
        if service not in self._workers:
            env = {
                "CONFORMANCE_REDIS": self.redis_url,
                "CONFORMANCE_PREFIX": self.name,
                "CONFORMANCE_SERVICE": service,
            }
            self._workers[service] = SupervisedWorker(WORKER_APP, self.redis_url, env)
        try:
            yield
        finally:
            if service != MAIN:
                self._workers.pop(service).close()
                for stream in self.client.scan_iter(f"{self.name}:stream:*", _type="stream"):
                    self.client.xgroup_destroy(stream, service)

    def dead_letters(self) -> list[DeadLetter]:
        """Return the dead letters the workers stored."""
        return self.store.list(limit=1000)

    def messages_sent(self) -> int:
        """Return how many entries the publisher buses of this process added."""
        with CountingTransport.lock:
            return CountingTransport.sent - self._sent_before

    def inject(self, body: bytes, service: str = MAIN) -> None:
        """Add an entry whose envelope field is ``body`` to a stream every service reads."""
        self.client.xadd(f"{self.name}:stream:{Noted.event_type}", {"envelope": body})

    def close(self) -> None:
        """Stop the workers, close the transports, delete every key of the harness."""
        try:
            for worker in self._workers.values():
                worker.close()
        finally:
            for bus in self._buses:
                assert bus.transport is not None
                bus.transport.close()
            keys = [*self.client.scan_iter(f"{self.name}*")]
            if keys:
                self.client.delete(*keys)
            self.client.close()


@pytest.mark.integration
class TestRedisStreamsTransport(TransportConformance):
    """RedisStreamsTransport, workers started with ``tidings worker``."""

    # batches=False: a published list is one pipelined round trip, but every event is an entry
    # of its own (acknowledged, reclaimed and dead-lettered on its own), so not fewer messages.
    features = Features(
        ordered=True,
        redelivers_on_crash=True,
        batches=False,
        fan_out_to_services=True,
        encodes_before_sending=True,
        broker_refuses=True,
    )

    @classmethod
    def make_harness(cls, name: str) -> StreamsHarness:
        return StreamsHarness(require_server("redis"), name)
