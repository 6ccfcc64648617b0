"""The transport conformance suite run against MemoryTransport: workers are threads of this process.

One harness per class, with its own broker: each service's worker is a started MemoryTransport
whose bus has the suite's handlers; publisher buses are separate transports on the same broker,
as a web process and its workers would be around a real one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from tidings import EventBus
from tidings.delivery import Received
from tidings.events import DomainEvent
from tidings.memory import MemoryDeadLetterStore, MemoryInbox
from tidings.ports import DeadLetter
from tidings.testing.transport import (
    MAIN,
    Features,
    MemoryJournal,
    TransportConformance,
    install_handlers,
)
from tidings.transports.memory import MemoryBroker, MemoryTransport


class CountingTransport(MemoryTransport):
    """Counts the messages it queued, for ``messages_sent``."""

    def __init__(self, counter: list[int], lock: threading.Lock, **options: object) -> None:
        super().__init__(**options)
        self.counter, self.lock = counter, lock

    def send(self, events: Sequence[DomainEvent]) -> None:
        super().send(events)
        with self.lock:
            self.counter[0] += len(events) * len(self.publish_to)


class MemoryHarness:
    """A :class:`~tidings.testing.transport.TransportHarness` for MemoryTransport."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.broker = MemoryBroker()
        self.journal = MemoryJournal()
        self.store = MemoryDeadLetterStore()
        self.inbox = MemoryInbox()
        self._buses: list[EventBus] = []
        self._workers: dict[str, MemoryTransport] = {}
        self._sent, self._lock = [0], threading.Lock()

    def publisher_bus(self, services: Sequence[str] = (MAIN,)) -> EventBus:
        """Return a bus publishing to the queue of every one of ``services``."""
        transport = CountingTransport(
            self._sent,
            self._lock,
            dead_letters=self.store,
            queue=f"{self.name}:publisher",
            publish_to=services,
            broker=self.broker,
        )
        bus = EventBus(transport=transport)
        self._buses.append(bus)
        return bus

    def refusing_bus(self) -> EventBus:
        """Not needed: an in-process queue refuses nothing (``broker_refuses=False``)."""
        raise NotImplementedError

    @contextmanager
    def worker(self, service: str = MAIN) -> Iterator[None]:
        """Start the service's worker (one thread) on first use; it runs until :meth:`close`."""
        if service not in self._workers:
            transport = MemoryTransport(
                dead_letters=self.store, queue=service, inbox=self.inbox, broker=self.broker
            )
            install_handlers(EventBus(transport=transport), self.journal, service=service)
            transport.start()
            self._workers[service] = transport
        yield

    def dead_letters(self) -> list[DeadLetter]:
        """Return the dead letters the workers stored."""
        return self.store.list(limit=1000)

    def messages_sent(self) -> int:
        """Return how many messages the publisher buses queued."""
        with self._lock:
            return self._sent[0]

    def inject(self, body: bytes, service: str = MAIN) -> None:
        """Queue ``body`` as a message for ``service``'s worker."""
        self.broker.put(service, Received(body, destination=service))

    def close(self) -> None:
        """Stop the workers and close the publishers' transports."""
        for transport in self._workers.values():
            transport.close()
        for bus in self._buses:
            assert bus.transport is not None
            bus.transport.close()


class TestMemoryTransport(TransportConformance):
    """MemoryTransport, workers as threads of the test process."""

    # redelivers_on_crash=False: a crash takes the process, and its queues, with it.
    features = Features(
        ordered=True,
        redelivers_on_crash=False,
        batches=False,
        fan_out_to_services=True,
        encodes_before_sending=True,
        broker_refuses=False,
    )

    @classmethod
    def make_harness(cls, name: str) -> MemoryHarness:
        return MemoryHarness(name)
