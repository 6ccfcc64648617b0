"""One demo run, from starting the workers to the reconciled result.

Start the workers, the relay and the web server; send the requests; wait until every event is
settled; then summarise and reconcile what the journal recorded, and gather where to look:
the handlers' metrics and one request's tree from the audit trail, which every process of the
run (this one: web, relay and embedded workers; a Celery worker) records.
"""

from __future__ import annotations

import logging
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Final

import sqlalchemy as sa

from tidings.audit import install_audit, uninstall_audit
from tidings.bus import EventBus
from tidings.demo.events import OrderPlaced, StockReserved
from tidings.demo.journal import Journal, JournalLogHandler
from tidings.demo.look import Look, audit_trace, scrape, wait_for_audit
from tidings.demo.modes import CeleryMode, EmbeddedMode, Mode
from tidings.demo.shop import ALWAYS, HANDLERS, TENANTS, Shop, event_entry, planned_failures
from tidings.demo.summary import DemoResult, summarise
from tidings.demo.web import Answer, WebServer, make_app, orders_for, send_orders
from tidings.events import DomainEvent
from tidings.outbox import Backoff, Relay

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from rich.console import Console

__all__ = ["LOST_CONFIRMATIONS", "DemoOptions", "LossyPublish", "run_demo"]

log = logging.getLogger("tidings.demo")

LOST_CONFIRMATIONS: Final = frozenset({2, 5})
"""The relay batches (1-based) whose broker confirmation the demo loses, so they go twice."""
_PREFIX: Final = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,39}")
RUNS_PER_ORDER: Final = len(HANDLERS[OrderPlaced.event_type]) + len(
    HANDLERS[StockReserved.event_type]
)


@dataclass(frozen=True)
class DemoOptions:
    """How to run the demo.

    Attributes:
        requests: orders to place, one HTTP request each.
        seed: the orders drawn, and which of them the loyalty handler fails on.
        broker: ``None`` for the embedded mode, else a Celery broker URL (``redis://``,
            ``amqp://``): handlers then run in Celery worker processes.
        db: the SQLAlchemy URL of the shop's database (``postgresql://`` uses psycopg);
            ``None``: a SQLite file in a temporary directory.
        workers: worker threads (embedded) or Celery pool processes.
        concurrency: requests in flight at once.
        timeout: seconds the run may take before it gives up waiting.
        prefix: the run's name, the first part of its queue, tables and keys (a letter,
            then up to 39 letters, digits or ``_``); ``None``: a new random one.
    """

    requests: int = 300
    seed: int = 0
    broker: str | None = None
    db: str | None = None
    workers: int = 4
    concurrency: int = 16
    timeout: float = 120.0
    prefix: str | None = None

    def __post_init__(self) -> None:
        if self.requests < 1 or self.workers < 1 or self.concurrency < 1 or self.timeout <= 0:
            msg = "the demo needs requests, workers and concurrency >= 1 and a positive timeout"
            raise ValueError(msg)
        if self.prefix is not None and not _PREFIX.fullmatch(self.prefix):
            msg = "the demo's prefix is a letter, then up to 39 letters, digits or _"
            raise ValueError(msg)


class LossyPublish:
    """The relay's publish: sends to the bus and journals each event; loses some confirmations.

    For the batches numbered in ``lose`` it raises after the send, as if the broker's
    confirmation never arrived: the relay keeps the rows and sends them again, and the
    handlers' inbox suppresses the duplicates.
    """

    def __init__(self, bus: EventBus, journal: Journal, lose: frozenset[int]) -> None:
        self.bus = bus
        self.journal = journal
        self.lose = lose
        self.batches = 0

    def __call__(self, events: Sequence[DomainEvent]) -> None:
        """Publish ``events``; see the class docstring."""
        self.batches += 1
        self.bus.publish(*events)
        for event in events:
            self.journal.add(event_entry("published", event))
        if self.batches in self.lose:
            msg = f"simulated: the broker's confirmation of relay batch {self.batches} was lost"
            raise ConnectionError(msg)


def _make_mode(options: DemoOptions, directory: Path, prefix: str) -> Mode:
    db = options.db or f"sqlite:///{directory / 'shop.db'}"
    if options.broker is None:
        return EmbeddedMode(db, prefix, options.seed, options.workers)
    return CeleryMode(
        options.broker, db, prefix, options.seed, workers=options.workers, directory=directory
    )


def _settled(mode: Mode) -> int:
    """(handler, event) pairs done: completed runs plus distinct dead-lettered pairs."""
    letters = mode.dead_letters.list(limit=10_000)
    return mode.journal.count("handled") + len({(d.handler, d.event_id) for d in letters})


def _tables(shop: Shop) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int]]]:
    """The sales read model and the orders table's totals, per tenant."""
    orders = shop.orders.c
    by_tenant = sa.select(orders.tenant_id, sa.func.count(), sa.func.sum(orders.total_cents))
    with shop.engine.connect() as connection:
        sales = connection.execute(sa.select(*shop.sales.c)).all()
        placed = connection.execute(by_tenant.group_by(orders.tenant_id)).all()
    return (
        {row[0]: (int(row[1]), int(row[2])) for row in sales},
        {row[0]: (int(row[1]), int(row[2] or 0)) for row in placed},
    )


def run_demo(
    options: DemoOptions | None = None,
    *,
    console: Console | None = None,
    while_kept: Callable[[DemoResult], None] | None = None,
) -> DemoResult:
    """Run the shop once and return what happened; show progress on ``console`` if given.

    The run installs the audit trail (on its own store) and the metrics (in a registry of its
    own) in this process, replacing any installation this process had, and uninstalls both
    and removes the run's tables and keys before it returns; ``while_kept`` is called with
    the result while they still exist (the workers have stopped by then).

    Raises:
        ImportError: FastAPI, uvicorn or httpx (the ``demo`` extra), prometheus_client, or
            Celery for a broker.
        RuntimeError: the Celery worker did not start.
        TimeoutError: the events were not all settled within ``options.timeout``.
    """
    try:
        from prometheus_client import CollectorRegistry  # noqa: PLC0415 - in the demo extra
    except ImportError as exc:  # pragma: no cover - depends on the environment
        msg = "the demo's metrics need prometheus_client: pip install 'tidings[demo]'"
        raise ImportError(msg) from exc
    from tidings.integrations.prometheus import (  # noqa: PLC0415
        install_metrics,
        uninstall_metrics,
    )

    options = DemoOptions() if options is None else options
    started = time.perf_counter()
    prefix = options.prefix or f"tdemo_{uuid.uuid4().hex[:10]}"
    with tempfile.TemporaryDirectory(prefix="tidings-demo-") as directory:
        mode = _make_mode(options, Path(directory), prefix)
        logger, capture = logging.getLogger("tidings"), JournalLogHandler(mode.journal)
        level = logger.level
        logger.addHandler(capture)
        logger.setLevel(logging.INFO)
        registry = CollectorRegistry()
        install_metrics(registry, service="shop")
        try:
            result = _run(options, mode, started, console, registry)
            if while_kept is not None:
                while_kept(result)
            return result
        finally:
            uninstall_audit()
            uninstall_metrics()
            logger.removeHandler(capture)
            logger.setLevel(level)
            for step in (mode.close, mode.clean_up):
                try:
                    step()
                except Exception as exc:  # noqa: BLE001 - must not hide what failed the run
                    log.warning("the demo could not %s: %s", step.__name__.replace("_", " "), exc)


def _run(
    options: DemoOptions,
    mode: Mode,
    started: float,
    console: Console | None,
    registry: CollectorRegistry,
) -> DemoResult:
    progress = _Progress(console, options.requests, options.requests * RUNS_PER_ORDER)
    with progress:
        progress.say(
            f"[bold]tidings demo[/] ({mode.description}): {options.requests} orders for "
            f"{' and '.join(TENANTS)}"
        )
        progress.say("starting the workers")
        mode.start(timeout=min(60.0, options.timeout))
        install_audit(mode.audit, flush_interval=0.2)
        publish = LossyPublish(mode.bus, mode.journal, LOST_CONFIRMATIONS)
        relay = Relay(
            mode.shop.engine,
            mode.shop.outbox,
            publish,
            poll_interval=0.05,
            backoff=Backoff(initial=0.1, maximum=1.0),
        )
        stop = threading.Event()
        relaying = threading.Thread(target=relay.run, args=(stop,), name="demo-relay")
        relaying.start()
        customers = orders_for(options.requests, TENANTS, options.seed)
        answers: list[Answer] = []
        failed: list[Exception] = []

        def send(url: str) -> None:
            try:
                answers.extend(
                    send_orders(
                        url,
                        customers,
                        concurrency=options.concurrency,
                        on_done=progress.request_done,
                    )
                )
            except Exception as exc:  # noqa: BLE001 - raised again in the demo's thread
                failed.append(exc)

        def finished() -> bool:
            if failed:
                raise failed[0]
            sent = not sending.is_alive()  # first: once it ended, every status is in
            return _quiet(mode, _expected(answers), progress) and sent

        try:
            with WebServer(make_app(mode.shop)) as server:
                progress.say(f"serving the shop on {server.url}")
                sending = threading.Thread(
                    target=send, args=(server.url,), name="demo-customers", daemon=True
                )
                sending.start()
                _wait(
                    finished,
                    started + options.timeout,
                    lambda: f"{_settled(mode)} of {_expected(answers)} handler runs settled",
                )
        finally:
            stop.set()
            relaying.join(timeout=10)
        expected = _so_far(mode)
        scraped = scrape(mode.metrics_url, registry, expected)
        wait_for_audit(mode.audit, TENANTS, expected)
        mode.close()
    mode.journal.flush()
    sales, placed = _tables(mode.shop)
    doomed = {c.order_id for c in customers if planned_failures(options.seed, c.order_id) == ALWAYS}
    result = summarise(
        mode=mode.description,
        answers=answers,
        entries=mode.journal.entries(),
        letters=mode.dead_letters.list(limit=10_000),
        sales=sales,
        orders=placed,
        doomed=doomed,
        seconds=time.perf_counter() - started,
    )
    where = "this process" if mode.metrics_url is None else f"the Celery worker, {mode.metrics_url}"
    trace = audit_trace(mode.audit, result.traced_correlation_id)
    return replace(result, look=Look(mode.trail, where, scraped, trace))


def _so_far(mode: Mode) -> dict[str, int]:
    """Handler runs done, retries and dead letters the journal and the store hold so far."""
    letters = mode.dead_letters.list(limit=10_000)
    failed, busy = mode.journal.count("failed"), mode.journal.count("busy")
    return {
        "handled": mode.journal.count("handled"),
        "retried": failed - sum(1 for letter in letters if letter.handler) + busy,
        "dead_lettered": len(letters),
    }


def _expected(answers: Sequence[Answer]) -> int:
    """Handler runs the accepted requests lead to, each settled (done or dead-lettered) once."""
    return sum(1 for a in answers if a.status == 201) * RUNS_PER_ORDER


def _quiet(mode: Mode, expected: int, progress: _Progress) -> bool:
    settled = _settled(mode)
    progress.settled(settled)
    return settled >= expected and mode.idle()


def _wait(condition: Callable[[], bool], deadline: float, state: Callable[[], str]) -> None:
    while not condition():
        if time.perf_counter() > deadline:
            msg = f"the demo gave up waiting: {state()}"
            raise TimeoutError(msg)
        time.sleep(0.1)


class _Progress:
    """Two rich progress bars (requests answered, handler runs settled), or nothing."""

    def __init__(self, console: Console | None, requests: int, runs: int) -> None:
        self._bar = None
        if console is None:
            return
        from rich.progress import (  # noqa: PLC0415 - rich is the `cli` extra
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._bar = Progress(
            TextColumn("{task.description:<34}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self._requests = self._bar.add_task("HTTP requests answered", total=requests)
        self._runs = self._bar.add_task("handler runs settled", total=runs)

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *_: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def say(self, text: str) -> None:
        """Print a line above the bars."""
        if self._bar is not None:
            self._bar.console.print(text, highlight=False)

    def request_done(self) -> None:
        """Advance the requests bar by one (thread-safe)."""
        if self._bar is not None:
            self._bar.advance(self._requests)

    def settled(self, count: int) -> None:
        """Set the handler-runs bar."""
        if self._bar is not None:
            self._bar.update(self._runs, completed=count)
