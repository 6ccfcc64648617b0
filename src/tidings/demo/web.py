"""The shop's web side: a FastAPI app served by uvicorn in a thread, and its customers.

The app is wrapped in :class:`~tidings.integrations.asgi.CorrelationMiddleware` with the
tenant taken from ``X-Tenant-ID``; its one view, ``POST /orders``, places an order through
:meth:`Shop.place_order <tidings.demo.shop.Shop.place_order>` (order and event in one
transaction). Customers are an httpx client sending concurrent requests, each with its own
``X-Correlation-ID``.
"""

# No `from __future__ import annotations`: FastAPI reads the view's annotations at runtime,
# and its body models are local to make_app (FastAPI is an optional extra).
import asyncio
import importlib
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tidings.demo.journal import record
from tidings.demo.shop import CATALOGUE, Shop

__all__ = ["Answer", "Customer", "WebServer", "make_app", "orders_for", "send_orders"]


def _require(module: str) -> None:
    """Import ``module`` or raise an ImportError that names the extra to install."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        msg = f"the demo needs {module} (FastAPI, uvicorn, httpx): pip install 'tidings[demo]'"
        raise ImportError(msg, name=module) from exc


def make_app(shop: Shop) -> Any:
    """Return the shop's ASGI app: FastAPI inside ``CorrelationMiddleware``.

    Raises:
        ImportError: FastAPI is not installed (the ``demo`` extra).
    """
    _require("fastapi")
    from fastapi import FastAPI, HTTPException  # noqa: PLC0415 - the optional `demo` extra
    from pydantic import BaseModel  # noqa: PLC0415

    from tidings.context import current_context  # noqa: PLC0415
    from tidings.integrations.asgi import (  # noqa: PLC0415
        CorrelationMiddleware,
        tenant_from_header,
    )

    class Item(BaseModel):
        sku: str
        quantity: int

    class NewOrder(BaseModel):
        order_id: str
        email: str
        items: list[Item]

    app = FastAPI(title="tidings demo shop")

    @app.post("/orders", status_code=201)
    def place(order: NewOrder) -> dict[str, str]:
        # A sync view: FastAPI runs it in a thread that copied the request's context.
        if current_context().tenant_id is None:
            raise HTTPException(400, "X-Tenant-ID is required")
        shop.journal.add(record("request", name="POST /orders", detail=order.order_id))
        try:
            event = shop.place_order(
                order.order_id, order.email, [(i.sku, i.quantity) for i in order.items]
            )
        except KeyError as exc:
            raise HTTPException(422, f"unknown SKU {exc}") from None
        return {"order_id": order.order_id, "event_id": event.event_id}

    return CorrelationMiddleware(app, tenant=tenant_from_header("X-Tenant-ID"))


class WebServer:
    """Serves an ASGI app with uvicorn in a daemon thread on 127.0.0.1 and a free port.

    Use as a context manager: entering starts the server and waits until it accepts
    connections; leaving stops it.
    """

    def __init__(self, app: Any) -> None:
        _require("uvicorn")
        import uvicorn  # noqa: PLC0415 - the optional `demo` extra

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port: int = probe.getsockname()[1]
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="demo-web", daemon=True)

    @property
    def url(self) -> str:
        """The server's base URL."""
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "WebServer":
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                msg = f"the demo's web server did not start on port {self.port}"
                raise RuntimeError(msg)
            time.sleep(0.01)
        return self

    def __exit__(self, *_: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


@dataclass(frozen=True)
class Answer:
    """The shop's answer to one request: its status and the correlation id it echoed."""

    status: int
    sent_id: str
    echoed_id: str | None


@dataclass(frozen=True)
class Customer:
    """One request to send: its order, its tenant and its correlation id."""

    order_id: str
    tenant: str
    email: str
    items: tuple[tuple[str, int], ...]
    correlation_id: str


def orders_for(requests: int, tenants: tuple[str, ...], seed: int) -> list[Customer]:
    """Draw ``requests`` orders from ``seed``: same seed, same orders (fresh correlation ids)."""
    rng = random.Random(seed)  # noqa: S311 - demo data
    skus = sorted(CATALOGUE)
    customers = []
    for number in range(1, requests + 1):
        tenant = tenants[number % len(tenants)]
        items = tuple(
            (sku, rng.randint(1, 3)) for sku in sorted(rng.sample(skus, rng.randint(1, 3)))
        )
        email = f"c{rng.randrange(40)}@{tenant}.example"
        customers.append(Customer(f"ord-{number:05d}", tenant, email, items, str(uuid.uuid4())))
    return customers


def send_orders(
    base_url: str,
    customers: list[Customer],
    *,
    concurrency: int = 16,
    on_done: Callable[[], None] = lambda: None,
) -> list[Answer]:
    """POST every order, ``concurrency`` at a time; return the answers, in order.

    ``on_done`` is called after each response (for a progress bar).
    """
    _require("httpx")
    import httpx  # noqa: PLC0415 - the optional `demo` extra

    async def run() -> list[Answer]:
        limit = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:

            async def one(customer: Customer) -> Answer:
                async with limit:
                    response = await client.post(
                        "/orders",
                        json={
                            "order_id": customer.order_id,
                            "email": customer.email,
                            "items": [{"sku": s, "quantity": q} for s, q in customer.items],
                        },
                        headers={
                            "X-Correlation-ID": customer.correlation_id,
                            "X-Tenant-ID": customer.tenant,
                        },
                    )
                on_done()
                echoed = response.headers.get("X-Correlation-ID")
                return Answer(response.status_code, customer.correlation_id, echoed)

            return list(await asyncio.gather(*(one(c) for c in customers)))

    return asyncio.run(run())
