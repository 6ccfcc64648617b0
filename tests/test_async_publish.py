"""Async publishing never hangs: timeouts on every publishing connection, no blocked event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

import pytest
import redis
from tests.conftest import require_server
from tests.workers import ROOT

from tidings import DomainEvent, EventBus, current_context, event_context, register_event
from tidings.errors import MissingDependencyError, PublishError
from tidings.integrations.asgi import lifespan
from tidings.memory import MemoryDeadLetterStore
from tidings.transports.redis_streams import RedisStreamsTransport

DEFAULT_TIMEOUT = 10.0  # EventBus(publish_timeout=...)'s default: apublish raises by then


@register_event
@dataclass(frozen=True)
class ParcelSent(DomainEvent):
    event_type: ClassVar[str] = "tests.async_publish.parcel_sent"
    parcel_id: str = ""


class HungBroker:
    """A TCP listener on 127.0.0.1 that accepts every connection and never answers."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):  # the listener closed: the test is over
            while True:
                connection, _ = self.server.accept()
                self.accepted.append(connection)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # wakes the blocked accept() up (Linux)
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        for connection in self.accepted:
            connection.close()
        self._thread.join(5)


@pytest.fixture
def hung() -> Iterator[HungBroker]:
    """A broker that accepts connections and never answers, closed after the test."""
    broker = HungBroker()
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture
def client(redis_url: str, unique_name: str) -> Iterator[redis.Redis]:
    """A client on the test server; every key under the test's name is deleted afterwards."""
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        keys = [*client.scan_iter(f"{unique_name}*")]
        if keys:
            client.delete(*keys)
        client.close()


def streams_bus(client: redis.Redis, prefix: str, **options: object) -> EventBus:
    transport = RedisStreamsTransport(
        client,
        service="shop",
        dead_letters=MemoryDeadLetterStore(),
        stream_prefix=prefix,
        **options,  # type: ignore[arg-type]
    )
    return EventBus(transport=transport)


async def ticking(stop: asyncio.Event) -> float:
    """Tick on the loop until ``stop``; return the longest gap between two ticks, in seconds."""
    longest, last = 0.0, time.monotonic()
    while not stop.is_set():
        await asyncio.sleep(0.01)
        now = time.monotonic()
        longest, last = max(longest, now - last), now
    return longest


# -- Redis Streams: natively async ------------------------------------------------------------


@pytest.mark.integration
def test_apublish_on_streams_adds_the_entries_on_the_loop_without_a_thread(client, unique_name):
    """On Redis Streams, apublish goes through redis.asyncio: the sync send is never called."""
    bus = streams_bus(client, unique_name)
    transport = bus.transport
    assert isinstance(transport, RedisStreamsTransport)

    def no_thread(events: Sequence[DomainEvent]) -> None:
        raise AssertionError("the sync send ran")

    transport.send = no_thread  # type: ignore[method-assign]

    async def run() -> None:
        with event_context(correlation_id="async-1"):
            await bus.apublish(ParcelSent(parcel_id="p-1"), ParcelSent(parcel_id="p-2"))
        await bus.aclose()

    asyncio.run(run())
    stream = transport.stream(ParcelSent)
    entries = client.xrange(stream)
    assert len(entries) == 2
    assert b"async-1" in entries[0][1][b"envelope"]
    assert not [t for t in threading.enumerate() if t.name.startswith("tidings-publish")]


@pytest.mark.integration
def test_streams_publishes_on_clients_with_timeouts_and_keeps_the_users_own(client, unique_name):
    """A client without timeouts gets publishing connections that have them (5 s by default)."""
    bus = streams_bus(client, unique_name)
    transport = bus.transport
    assert isinstance(transport, RedisStreamsTransport)
    bus.publish(ParcelSent(parcel_id="p-1"))
    sender = transport._senders.sync(client)
    kwargs = sender.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] is not None
    assert kwargs["socket_connect_timeout"] is not None
    assert client.xlen(transport.stream(ParcelSent)) == 1
    bus.close()
    timed = redis.Redis(host="127.0.0.1", socket_timeout=30, socket_connect_timeout=2)
    own = streams_bus(timed, unique_name).transport
    assert own._senders.sync(timed) is timed  # type: ignore[union-attr]


@pytest.mark.integration
def test_a_hung_redis_makes_concurrent_apublishes_raise_within_the_default_timeout(hung):
    """Five concurrent apublish calls to a silent Redis all raise within the default timeout."""
    bus = streams_bus(redis.Redis.from_url(f"redis://127.0.0.1:{hung.port}/0"), "hung")

    async def run() -> tuple[list[BaseException | None], float, float]:
        stop = asyncio.Event()
        ticker = asyncio.create_task(ticking(stop))
        started = time.monotonic()
        results = await asyncio.gather(
            *(bus.apublish(ParcelSent(parcel_id=f"p-{n}")) for n in range(5)),
            return_exceptions=True,
        )
        elapsed = time.monotonic() - started
        stop.set()
        return results, elapsed, await ticker

    results, elapsed, longest_gap = asyncio.run(run())
    assert all(isinstance(result, PublishError) for result in results), results
    assert elapsed < DEFAULT_TIMEOUT + 1  # concurrently, not one after another (5 x 5 s)
    assert longest_gap < 0.5, f"the event loop stalled for {longest_gap:.2f} s"
    print(f"\nhung Redis: 5 concurrent apublish raised after {elapsed:.2f} s")


def test_a_redis_down_at_start_does_not_stop_the_lifespan(caplog):
    """lifespan(bus) starts with Redis unreachable, logging it; publishing then raises."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]  # closed again: nothing listens there
    bus = streams_bus(redis.Redis.from_url(f"redis://127.0.0.1:{port}/0"), "down")

    async def run() -> BaseException | None:
        async with lifespan(bus)(object()):
            try:
                await bus.apublish(ParcelSent())
            except PublishError as exc:
                return exc
        return None

    assert isinstance(asyncio.run(run()), PublishError)
    assert "Redis did not answer at start" in caplog.text


# -- The thread path: transports without asend ----------------------------------------------


class Blocking:
    """A transport whose send waits until released: it stands for a broker that hangs."""

    name = "blocking"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started: list[str | None] = []
        self.closed = 0

    def bind(self, bus: EventBus) -> None:
        pass

    def subscribed(self, handler: object) -> None:
        pass

    def send(self, events: Sequence[DomainEvent]) -> None:
        self.started.append(current_context().correlation_id)
        if not self.release.wait(30):
            raise PublishError("never released")

    def close(self) -> None:
        self.closed += 1


def test_a_send_in_a_thread_times_out_and_one_still_queued_never_starts():
    """A send in a thread times out; one still waiting for a thread never starts."""
    transport = Blocking()
    bus = EventBus(transport, publish_timeout=0.3, publish_threads=1)

    async def run() -> list[BaseException | None]:
        with event_context(correlation_id="ctx-1"):
            return await asyncio.gather(
                bus.apublish(ParcelSent()), bus.apublish(ParcelSent()), return_exceptions=True
            )

    started = time.monotonic()
    results = asyncio.run(run())
    assert time.monotonic() - started < 5
    assert all(isinstance(result, PublishError) for result in results)
    assert transport.started == ["ctx-1"]  # the caller's context; the second never started
    transport.release.set()
    bus.close()  # waits for the send under way, then closes the transport
    assert transport.closed == 1
    assert not [t for t in threading.enumerate() if t.name.startswith("tidings-publish")]


def test_sends_in_threads_run_concurrently_up_to_publish_threads():
    """Concurrent apublish calls each get a thread: no send waits behind another."""
    transport = Blocking()
    bus = EventBus(transport, publish_threads=4)

    async def run() -> None:
        sending = [asyncio.ensure_future(bus.apublish(ParcelSent())) for _ in range(4)]
        while len(transport.started) < 4:  # all four at once, while none has returned
            await asyncio.sleep(0.01)
        transport.release.set()
        await asyncio.gather(*sending)

    asyncio.run(asyncio.wait_for(run(), 10))
    bus.close()


def test_a_sync_publish_on_an_event_loop_warns_once_naming_apublish(caplog):
    """Bus.publish with a broker transport inside async code sends, and warns once."""
    transport = Blocking()
    transport.release.set()
    bus = EventBus(transport)

    async def view() -> None:
        bus.publish(ParcelSent())
        bus.publish(ParcelSent())

    with caplog.at_level(logging.WARNING, "tidings.bus"):
        asyncio.run(view())
        bus.publish(ParcelSent())  # no loop here: no warning
    assert len(transport.started) == 3
    warnings = [r for r in caplog.records if r.name == "tidings.bus"]
    assert len(warnings) == 1
    assert "await bus.apublish" in warnings[0].getMessage()


# -- A missing dependency names the extra -----------------------------------------------------


class Missing(Blocking):
    """A transport whose send fails on an import, raw or wrapped as the transports do."""

    def __init__(self, name: str, wrapped: bool) -> None:
        super().__init__()
        self.name = name
        self.wrapped = wrapped

    def send(self, events: Sequence[DomainEvent]) -> None:
        try:
            raise ModuleNotFoundError("No module named 'packaging'", name="packaging")
        except ImportError as exc:
            if not self.wrapped:
                raise
            raise PublishError("the broker did not accept 1 event(s); send them again") from exc


@pytest.mark.parametrize("wrapped", [True, False])
@pytest.mark.parametrize(("name", "extra"), [("celery", "celery"), ("redis-streams", "redis")])
def test_a_missing_module_at_send_names_the_extra(name, extra, wrapped):
    """Both publish and apublish raise MissingDependencyError naming the extra, not 'send again'."""
    bus = EventBus(Missing(name, wrapped))
    with pytest.raises(MissingDependencyError) as raised:
        bus.publish(ParcelSent())
    with pytest.raises(MissingDependencyError) as araised:
        asyncio.run(bus.apublish(ParcelSent()))
    for error in (raised.value, araised.value):
        message = str(error)
        assert f"pip install 'tidings[{extra}]'" in message
        assert "'packaging'" in message
        assert "send them again" not in message
        assert error.name == "packaging"
        assert isinstance(error, ImportError)


def test_an_unknown_transports_missing_module_says_what_is_missing():
    """A transport tidings does not know still gets the module named, without an extra."""
    bus = EventBus(Missing("custom", wrapped=False))
    with pytest.raises(MissingDependencyError, match="module 'packaging' is not installed"):
        bus.publish(ParcelSent())


def test_other_publish_errors_are_left_as_they_are():
    """A PublishError not caused by an import stays a PublishError with its advice."""
    transport = Blocking()
    transport.release.set()

    def refuse(events: Sequence[DomainEvent]) -> None:
        raise PublishError("the broker refused; send them again")

    transport.send = refuse  # type: ignore[method-assign]
    with pytest.raises(PublishError, match="send them again") as raised:
        EventBus(transport).publish(ParcelSent())
    assert not isinstance(raised.value, MissingDependencyError)


CELERY_WITHOUT_PACKAGING = textwrap.dedent(
    """
    import sys
    sys.modules["packaging"] = sys.modules["packaging.version"] = None  # not installed
    from celery import Celery
    from tidings import EventBus
    from tidings.errors import MissingDependencyError
    from tidings.memory import MemoryDeadLetterStore
    from tidings.transports.celery import CeleryTransport
    from tests.test_async_publish import ParcelSent

    app = Celery("shop", broker=sys.argv[1])
    bus = EventBus(CeleryTransport(app, dead_letters=MemoryDeadLetterStore()))
    try:
        bus.publish(ParcelSent())
    except MissingDependencyError as exc:
        print(exc)
    """
)


@pytest.mark.integration
def test_celery_on_redis_without_packaging_names_the_celery_extra(redis_url):
    """Without 'packaging' (kombu's Redis transport needs it) the error names tidings[celery]."""
    pytest.importorskip("celery")
    done = subprocess.run(  # noqa: S603 - this interpreter on a fixed script
        [sys.executable, "-c", CELERY_WITHOUT_PACKAGING, redis_url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "pip install 'tidings[celery]'" in done.stdout, done.stderr
    assert "packaging" in done.stdout


# -- Celery: the producer connection times out -------------------------------------------------


def celery_bus(broker: str, queue: str = "tidings", **conf: object) -> EventBus:
    pytest.importorskip("celery")
    from celery import Celery  # noqa: PLC0415 - after the importorskip

    from tidings.transports.celery import CeleryTransport  # noqa: PLC0415 - needs celery

    app = Celery("shop", broker=broker, set_as_current=False)
    app.conf.update(conf)
    return EventBus(
        CeleryTransport(app, queue=queue, dead_letters=MemoryDeadLetterStore(), inbox=None)
    )


@pytest.mark.integration
@pytest.mark.parametrize("scheme", ["redis", "amqp"])
def test_celery_publishing_to_a_hung_broker_fails_within_its_timeouts(hung, scheme):
    """A hung Redis or AMQP broker fails a Celery publish (one attempt) in about 5 s, not never."""
    url = (
        f"redis://127.0.0.1:{hung.port}/0"
        if scheme == "redis"
        else f"amqp://127.0.0.1:{hung.port}//"
    )
    bus = celery_bus(url, task_publish_retry=False, broker_connection_retry=False)
    started = time.monotonic()
    with pytest.raises(PublishError):
        bus.publish(ParcelSent())
    elapsed = time.monotonic() - started
    assert elapsed < DEFAULT_TIMEOUT, f"took {elapsed:.1f} s"
    print(f"\nhung {scheme} broker: Celery publish failed after {elapsed:.2f} s")
    bus.close()


@pytest.mark.integration
def test_concurrent_celery_publishers_do_not_wait_for_each_other(hung):
    """Three publishers on a hung broker all fail within one timeout: none waits behind another."""
    bus = celery_bus(
        f"redis://127.0.0.1:{hung.port}/0", task_publish_retry=False, broker_connection_retry=False
    )
    failed: list[float] = []
    started = time.monotonic()

    def publish() -> None:
        with contextlib.suppress(PublishError):
            bus.publish(ParcelSent())
        failed.append(time.monotonic() - started)

    threads = [threading.Thread(target=publish) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(failed) == 3
    # Queued behind one lock they would end after about 5, 10 and 15 s.
    assert max(failed) < DEFAULT_TIMEOUT, f"ended after {sorted(failed)}"
    bus.close()


@pytest.mark.integration
def test_celery_timeouts_default_to_five_seconds_and_the_apps_own_win(client, unique_name):
    """The producer connection gets 5 s socket timeouts unless the app's options set them."""
    url = client.get_connection_kwargs()
    broker = f"redis://{url['host']}:{url['port']}/{url.get('db', 0)}"
    default = celery_bus(broker, queue=unique_name)
    own = celery_bus(broker, queue=unique_name, broker_transport_options={"socket_timeout": 0.5})
    for bus in (default, own):
        bus.publish(ParcelSent())  # opens the producer connection
    options = [bus.transport._idle[0].connection.transport_options for bus in (default, own)]  # type: ignore[union-attr]
    assert (options[0]["socket_timeout"], options[0]["socket_connect_timeout"]) == (5.0, 5.0)
    assert (options[1]["socket_timeout"], options[1]["socket_connect_timeout"]) == (0.5, 5.0)
    for bus in (default, own):
        bus.close()


@pytest.mark.integration
def test_apublish_through_celery_on_a_hung_broker_raises_within_the_default_timeout(hung):
    """With Celery's default publish retries, apublish still raises within the 10 s default."""
    bus = celery_bus(f"redis://127.0.0.1:{hung.port}/0")

    async def run() -> tuple[BaseException | None, float, float]:
        stop = asyncio.Event()
        ticker = asyncio.create_task(ticking(stop))
        started = time.monotonic()
        try:
            await bus.apublish(ParcelSent())
        except PublishError as exc:
            error: BaseException | None = exc
        else:
            error = None
        elapsed = time.monotonic() - started
        stop.set()
        return error, elapsed, await ticker

    error, elapsed, longest_gap = asyncio.run(run())
    assert isinstance(error, PublishError)
    assert elapsed < DEFAULT_TIMEOUT + 1
    assert longest_gap < 0.5
    started = time.monotonic()
    bus.close()  # waits for the publishing thread: its own socket timeouts end it
    assert time.monotonic() - started < 30, "the publishing thread was left hanging"


# -- A real uvicorn process: the hung broker never freezes the app -----------------------------

WEB_APP = textwrap.dedent(
    """
    import sys
    from dataclasses import dataclass
    from typing import ClassVar

    import redis
    import uvicorn
    from fastapi import FastAPI

    from tidings import DomainEvent, EventBus, register_event
    from tidings.integrations.asgi import CorrelationMiddleware, lifespan
    from tidings.memory import MemoryDeadLetterStore

    kind, broker, port = sys.argv[1], sys.argv[2], int(sys.argv[3])


    @register_event
    @dataclass(frozen=True)
    class OrderPlaced(DomainEvent):
        event_type: ClassVar[str] = "shop.order_placed"
        order_id: str


    if kind == "streams":
        from tidings.transports.redis_streams import RedisStreamsTransport

        transport = RedisStreamsTransport(
            redis.Redis.from_url(broker), service="shop", dead_letters=MemoryDeadLetterStore()
        )
    else:
        from celery import Celery
        from tidings.transports.celery import CeleryTransport

        transport = CeleryTransport(
            Celery("shop", broker=broker),
            queue="shop",
            dead_letters=MemoryDeadLetterStore(),
            inbox=None,
        )
    bus = EventBus(transport=transport)  # every default: publish_timeout=10.0
    app = FastAPI(lifespan=lifespan(bus))
    app.add_middleware(CorrelationMiddleware)


    @app.post("/orders/{order_id}")
    async def place_order(order_id: str) -> dict[str, str]:
        await bus.apublish(OrderPlaced(order_id=order_id))
        return {"order_id": order_id}


    @app.get("/health")
    async def health() -> dict[str, bool]:
        return {"ok": True}


    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
    """
)


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["streams", "celery"])
def test_a_real_uvicorn_app_answers_health_while_a_publish_to_a_hung_broker_fails(hung, kind):
    """Via uvicorn, POST /orders to a hung broker fails within 10 s; GET /health answers in 1 s."""
    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    if kind == "celery":
        pytest.importorskip("celery")
    from tests.test_asgi_middleware import free_port, wait_for_port  # noqa: PLC0415

    port = free_port()
    broker = f"redis://127.0.0.1:{hung.port}/0"
    process = subprocess.Popen(  # noqa: S603 - this interpreter on a fixed script
        [sys.executable, "-c", WEB_APP, kind, broker, str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    async def run() -> tuple[httpx.Response, float, list[float]]:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            started = time.monotonic()
            order = asyncio.ensure_future(
                http.post("/orders/o-1", headers={"X-Correlation-ID": "hung-1"})
            )
            latencies = []
            while not order.done():
                asked = time.monotonic()
                answer = await http.get("/health")
                assert answer.status_code == 200
                latencies.append(time.monotonic() - asked)
                await asyncio.sleep(0.05)  # a request every 50 ms or so: the probe's rhythm
            response = await order
            return response, time.monotonic() - started, latencies

    try:
        wait_for_port(port, process, time.monotonic() + 30)
        response, elapsed, latencies = asyncio.run(run())
    finally:
        process.terminate()
        try:
            _, log = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            _, log = process.communicate()
    assert response.status_code == 500
    assert response.headers["X-Correlation-ID"] == "hung-1"
    assert elapsed <= DEFAULT_TIMEOUT + 1, f"POST /orders took {elapsed:.1f} s"
    assert len(latencies) >= 10
    assert max(latencies) < 1.0, f"GET /health took up to {max(latencies):.2f} s"
    assert "PublishError" in log
    print(
        f"\n{kind}: POST /orders failed after {elapsed:.2f} s; {len(latencies)} GET /health, "
        f"slowest {max(latencies) * 1000:.0f} ms"
    )


# -- lifespan(bus) and the async outbox in FastAPI ----------------------------------------------


@pytest.mark.integration
@pytest.mark.integration
def test_lifespan_connects_celery_at_start_and_a_broker_down_is_not_fatal(redis_url, unique_name):
    """lifespan(bus) opens Celery's publishing connection at start; a down broker only logs."""
    bus = celery_bus(redis_url, unique_name)
    transport = bus.transport

    async def start() -> bool:
        async with lifespan(bus)(None):
            return len(transport._idle) == 1  # type: ignore[union-attr]

    assert asyncio.run(start())
    assert transport._idle == []  # type: ignore[union-attr]  # closed at shutdown
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        nobody = probe.getsockname()[1]
    down = celery_bus(f"redis://127.0.0.1:{nobody}/0", unique_name, broker_connection_timeout=1)

    async def start_down() -> None:
        async with lifespan(down)(None):
            pass

    asyncio.run(start_down())  # no exception: logged, and each publish would connect again


def test_lifespan_opens_the_loops_client_and_closes_everything_at_shutdown(client, unique_name):
    """Under lifespan(bus) a FastAPI app publishes on its loop's client, closed at shutdown."""
    fastapi = pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    bus = streams_bus(client, unique_name)
    transport = bus.transport
    assert isinstance(transport, RedisStreamsTransport)
    app = fastapi.FastAPI(lifespan=lifespan(bus))

    @app.post("/parcels/{parcel_id}")
    async def send_parcel(parcel_id: str) -> dict[str, int]:
        await bus.apublish(ParcelSent(parcel_id=parcel_id))
        return {"twins": len(transport._senders._async)}

    async def run() -> tuple[int, int]:
        async with lifespan(bus)(app):
            opened = len(transport._senders._async)  # aopen made the loop's client
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://shop"
            ) as http:
                answer = await http.post("/parcels/p-9")
        return opened, answer.json()["twins"]

    opened, during = asyncio.run(run())
    assert (opened, during) == (1, 1)  # one client for the loop, reused by the request
    assert len(transport._senders._async) == 0  # closed at shutdown
    assert client.xlen(transport.stream(ParcelSent)) == 1


@pytest.mark.integration
def test_the_readme_async_outbox_view_commits_the_event_with_the_order(unique_name):
    """The README's async view: the order and its event commit in one AsyncSession transaction."""
    fastapi = pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("greenlet")
    import sqlalchemy as sa  # noqa: PLC0415 - the sql extra
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine  # noqa: PLC0415
    from sqlalchemy.orm import DeclarativeBase, mapped_column  # noqa: PLC0415

    from tidings.integrations.asgi import CorrelationMiddleware  # noqa: PLC0415
    from tidings.outbox import Outbox  # noqa: PLC0415

    url = require_server("postgresql")

    class Base(DeclarativeBase):
        pass

    class Order(Base):
        __tablename__ = f"{unique_name}_orders"
        id = mapped_column(sa.String(40), primary_key=True)

    outbox = Outbox(Base.metadata, table_name=f"{unique_name}_outbox")
    sync_engine = sa.create_engine(url)
    Base.metadata.create_all(sync_engine)

    async def run() -> None:
        engine = create_async_engine(url)
        session_factory = async_sessionmaker(engine)
        app = fastapi.FastAPI()
        app.add_middleware(CorrelationMiddleware)

        @app.post("/orders/{order_id}")
        async def place_order(order_id: str) -> dict[str, str]:
            async with session_factory() as session, session.begin():
                session.add(Order(id=order_id))
                await outbox.add_async(session, ParcelSent(parcel_id=order_id))
            return {"order_id": order_id}

        try:
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://shop"
            ) as http:
                answer = await http.post("/orders/o-5", headers={"X-Correlation-ID": "db-1"})
            assert answer.status_code == 200
        finally:
            await engine.dispose()

    try:
        asyncio.run(run())
        with sync_engine.connect() as connection:
            orders = connection.execute(sa.select(Order.id)).scalars().all()
            (envelope,) = connection.execute(sa.select(outbox.table.c.payload)).scalars().all()
        assert orders == ["o-5"]
        assert "db-1" in (envelope if isinstance(envelope, str) else bytes(envelope).decode())
    finally:
        Base.metadata.drop_all(sync_engine)
        sync_engine.dispose()
