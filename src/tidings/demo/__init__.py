"""``tidings demo``: a small shop, from the HTTP request to the handlers and back.

A FastAPI app (served by uvicorn in a thread, behind ``CorrelationMiddleware``) takes a few
hundred concurrent orders for two tenants, each request with its own correlation id. The view
writes the order and its ``OrderPlaced`` in one transaction (the outbox); the relay publishes
them; handlers send a (fake) email, update a read model, raise a follow-up event and, one of
them, fail now and then to show retries and a dead letter. Handlers run in worker threads
(the embedded default: SQLite, no server) or in Celery worker processes (``broker``). Every
step is journaled with its context, so the run ends with a summary, one request's full trace
in causal order, and a reconciliation: every committed event handled once per handler.

Importing this package registers the ``shop.*`` event types in the default registry; only the
CLI and the demo's worker import it.
"""

from tidings.demo.events import OrderLine, OrderPlaced, StockReserved
from tidings.demo.journal import Entry
from tidings.demo.report import print_report
from tidings.demo.run import DemoOptions, run_demo
from tidings.demo.summary import DemoResult, TraceLine

__all__ = [
    "DemoOptions",
    "DemoResult",
    "Entry",
    "OrderLine",
    "OrderPlaced",
    "StockReserved",
    "TraceLine",
    "print_report",
    "run_demo",
]
