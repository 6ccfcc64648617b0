"""``CorrelationMiddleware``: one correlation id (and tenant) bound for each ASGI request.

A pure ASGI middleware: it works with FastAPI, Starlette or any ASGI app and imports nothing
outside the standard library (Starlette only to answer a Starlette app's 500, see below). For
each HTTP or websocket connection it takes the correlation id from the request header
(``X-Correlation-ID``, else ``X-Request-ID``), replaces an invalid one, mints one when absent,
resolves the tenant, and binds both with :class:`~tidings.event_context` around the whole
downstream call, so sync views (run in a thread pool that copies the context), async views
and streaming bodies all see them, and concurrent requests never see each other's. The id is
echoed on every HTTP response, a 500 the app raised included::

    app.add_middleware(CorrelationMiddleware, tenant=tenant_from_header("X-Tenant-ID"))

To use :func:`tenant_from_user`, place this middleware *inside* the authentication middleware,
which sets ``scope["user"]`` (in Starlette, add it before ``AuthenticationMiddleware``).

:func:`lifespan` opens a bus's transport when the app starts and closes it when it stops::

    app = FastAPI(lifespan=lifespan(bus))
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from tidings.context import event_context
from tidings.integrations._correlation import checked_tenant, choose_id, is_valid_id

__all__ = [
    "CorrelationMiddleware",
    "TenantResolver",
    "is_valid_id",
    "lifespan",
    "tenant_from_header",
    "tenant_from_subdomain",
    "tenant_from_user",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
TenantResolver = Callable[[Scope], "str | Awaitable[str | None] | None"]
"""Returns the tenant of a connection from its ASGI scope, or ``None``; may be ``async``."""

logger = logging.getLogger(__name__)

if TYPE_CHECKING:  # for the annotation of lifespan only
    from tidings.bus import EventBus


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if bytes(key).lower() == name:
            return bytes(value).decode("latin-1")
    return None


class CorrelationMiddleware:
    """Bind a correlation id and tenant for each HTTP and websocket connection; echo the id.

    Errors carry the id too. When the app raises before it started a response, this
    middleware sends the 500 itself, through the echoing send: on a Starlette or FastAPI app
    (``scope["app"]``) the one the app would send (its handler for ``500`` or ``Exception``,
    in debug mode the traceback page, else Starlette's plain 500), on any other app a plain
    500; then it re-raises the exception, unchanged, so the server's log, Sentry and
    ``TestClient`` see it. Starlette's ``ServerErrorMiddleware``, outside every user
    middleware, sees that a response started and sends no second one; it calls the app's 500
    handler once more and discards that response, so keep such a handler free of side
    effects (report errors from logging, which sees the exception once). An exception after
    the response started propagates with nothing more sent.

    The id is the value of the first of ``header``, then ``fallback_headers``, present on the
    request. It is kept if it has 1 to ``max_length`` characters and ``validate`` accepts it
    (default :func:`is_valid_id`); otherwise it is replaced by a fresh uuid4 and a warning is
    logged with its length and a masked 16-character excerpt, never the raw value. With no
    such header a uuid4 is minted. ``tenant`` (see :data:`TenantResolver`) gives the tenant id;
    without one the tenant is ``None``. What it returns is held to the envelope's rule for
    ids (printable ASCII, 1 to 256 characters; an ``int`` is taken as its decimal form):
    anything else binds no tenant and logs a warning with a masked excerpt. Both are bound,
    with ``causation_id=None``, for the whole downstream call, streaming bodies included. With
    ``echo``, the id is added under ``header`` to the HTTP response, unless the app already
    set that header. Websockets are bound but not echoed; ``lifespan`` and other scope types
    pass through untouched. Exceptions from the app or the resolver propagate unchanged. Safe
    for concurrent connections: it holds no per-request state.

    Raises:
        ValueError: ``max_length`` is below 1 or a header name is empty or not ASCII.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        header: str = "X-Correlation-ID",
        fallback_headers: Iterable[str] = ("X-Request-ID",),
        validate: Callable[[str], bool] = is_valid_id,
        max_length: int = 128,
        tenant: TenantResolver | None = None,
        echo: bool = True,
    ) -> None:
        if max_length < 1:
            msg = f"CorrelationMiddleware(max_length={max_length}) must be at least 1"
            raise ValueError(msg)
        names = (header, *fallback_headers)
        for name in names:
            if not name or not name.isascii():
                msg = f"CorrelationMiddleware header name {name!r} must be non-empty ASCII"
                raise ValueError(msg)
        self.app = app
        self.header = header
        self.validate = validate
        self.max_length = max_length
        self.tenant = tenant
        self.echo = echo
        self._names = tuple(name.lower().encode("ascii") for name in names)
        self._echo_name = header.lower().encode("ascii")

    def _correlation_id(self, scope: Scope) -> str:
        return choose_id(
            ((name.decode("ascii"), _header(scope, name)) for name in self._names),
            validate=self.validate,
            max_length=self.max_length,
            logger=logger,
        )

    async def _tenant_id(self, scope: Scope) -> str | None:
        if self.tenant is None:
            return None
        result = self.tenant(scope)
        if inspect.isawaitable(result):
            result = await result
        return checked_tenant(result, logger=logger)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection with its correlation id and tenant bound."""
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        correlation_id = self._correlation_id(scope)
        tenant_id = await self._tenant_id(scope)
        if not (self.echo and scope["type"] == "http"):
            with event_context(
                correlation_id=correlation_id, tenant_id=tenant_id, causation_id=None
            ):
                await self.app(scope, receive, send)
            return
        started = False
        echoing = self._echoing(send, correlation_id.encode("latin-1"))

        async def send_noting_start(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await echoing(message)

        with event_context(correlation_id=correlation_id, tenant_id=tenant_id, causation_id=None):
            try:
                await self.app(scope, receive, send_noting_start)
            except Exception as exc:
                if not started:
                    # Starlette's ServerErrorMiddleware sits outside every user middleware and
                    # sends its 500 on the server's own send, without this header: answer here,
                    # through the echoing send, so that it sees a response started and only
                    # re-raises (for the server's log, Sentry and TestClient).
                    await _send_error_response(scope, receive, send_noting_start, exc)
                raise

    def _echoing(self, send: Send, value: bytes) -> Send:
        name = self._echo_name

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or ())
                if not any(bytes(key).lower() == name for key, _ in headers):
                    message = {**message, "headers": [*headers, (name, value)]}
            await send(message)

        return send_with_id


_PLAIN_500 = b"Internal Server Error"


async def _send_error_response(scope: Scope, receive: Receive, send: Send, exc: Exception) -> None:
    """Answer a request whose app raised before responding, as the app's framework would.

    On a Starlette (FastAPI) app, found as ``scope["app"]``: in debug mode its traceback page,
    else the app's own handler for ``500`` or ``Exception`` if it has one, else Starlette's
    plain 500. On any other app, or if that handler raises, a plain-text 500. Over HTTP/1 it
    says ``Connection: close``: servers (uvicorn) close a connection whose app raised, and a
    client told so does not send its next request on it. Never raises
    for the response it builds (the caller re-raises the app's exception); a send that fails
    (the client went away) is left to the server, which sees the re-raised exception.
    """
    if scope.get("http_version") in ("1.0", "1.1"):
        send = _closing(send)
    try:
        response = await _starlette_error_response(scope, exc)
    except Exception as failure:  # noqa: BLE001 - the plain 500 below still carries the id
        logger.warning(
            "the app's 500 handler raised %s while handling %s; sent a plain 500 instead",
            type(failure).__name__,
            type(exc).__name__,
        )
        response = None
    try:
        if response is not None:
            await response(scope, receive, send)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 500,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(_PLAIN_500)).encode("ascii")),
                ],
            }
        )
        await send({"type": "http.response.body", "body": _PLAIN_500})
    except Exception:  # the app's own exception is what the caller re-raises
        logger.debug("the 500 response could not be sent", exc_info=True)


def _closing(send: Send) -> Send:
    """Add ``Connection: close`` to the response: the server closes it after the re-raise."""

    async def send_closing(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [
                (key, value)
                for key, value in message.get("headers") or ()
                if bytes(key).lower() != b"connection"
            ]
            message = {**message, "headers": [*headers, (b"connection", b"close")]}
        await send(message)

    return send_closing


async def _starlette_error_response(scope: Scope, exc: Exception) -> Any:
    """The response Starlette's ServerErrorMiddleware would send, or ``None`` off Starlette."""
    app: Any = scope.get("app")
    handlers = getattr(app, "exception_handlers", None)
    if not isinstance(handlers, Mapping):
        return None
    try:
        from starlette.concurrency import run_in_threadpool  # noqa: PLC0415 - Starlette apps only
        from starlette.middleware.errors import ServerErrorMiddleware  # noqa: PLC0415
        from starlette.requests import Request  # noqa: PLC0415
    except ImportError:  # pragma: no cover - an app with exception_handlers but no Starlette
        return None
    request = Request(scope)
    errors = ServerErrorMiddleware(app, debug=bool(getattr(app, "debug", False)))
    if errors.debug:
        return await run_in_threadpool(errors.debug_response, request, exc)
    handler = None
    for key, value in handlers.items():  # Starlette keeps the last of them, in this order
        if key in (500, Exception):
            handler = value
    if handler is None:
        return errors.error_response(request, exc)
    if _is_async_callable(handler):
        return await handler(request, exc)
    return await run_in_threadpool(handler, request, exc)


def _is_async_callable(obj: Any) -> bool:
    """Whether calling ``obj`` returns an awaitable: a coroutine function, or a partial of one."""
    while isinstance(obj, functools.partial):
        obj = obj.func
    return inspect.iscoroutinefunction(obj) or inspect.iscoroutinefunction(
        getattr(obj, "__call__", None)  # noqa: B004 - an object whose __call__ is async
    )


def lifespan(bus: EventBus) -> Callable[[Any], contextlib.AbstractAsyncContextManager[None]]:
    """Return an ASGI lifespan that opens ``bus``'s transport at start and closes it at stop.

    For ``FastAPI(lifespan=lifespan(bus))`` or ``Starlette(lifespan=...)``; inside a lifespan
    of your own, ``async with lifespan(bus)(app): ...``. At start it awaits the transport's
    ``aopen`` if it has one (Redis Streams connects its publishing client on the app's event
    loop); a broker that is down then is logged, not raised, so the app starts and serves
    what needs no broker, and each publish connects again (raising ``PublishError`` while the
    broker is away). Celery's ``aopen`` connects its publishing connection in a thread;
    transports without ``aopen`` connect on their first publish.
    At stop, :meth:`EventBus.aclose <tidings.bus.EventBus.aclose>`: the loop's async clients,
    the transport's connections and the bus's publishing threads are closed, after the sends
    under way finished. A bus without a transport needs nothing and gets nothing.
    """

    @contextlib.asynccontextmanager
    async def run(app: Any) -> AsyncIterator[None]:
        transport = bus.transport
        if transport is None:
            yield
            return
        aopen = getattr(transport, "aopen", None)
        if aopen is not None:
            await aopen()
        try:
            yield
        finally:
            await bus.aclose()

    return run


def tenant_from_header(name: str = "X-Tenant-ID") -> TenantResolver:
    """Return a resolver that reads the tenant from request header ``name``.

    A missing value, or one :func:`is_valid_id` rejects (or over 128 characters), gives
    ``None``: a header is client input and must not reach the logs unchecked. Use it only
    where a trusted proxy sets the header or the tenant is checked against the user.
    """
    key = name.lower().encode("ascii")

    def resolve(scope: Scope) -> str | None:
        value = _header(scope, key)
        if value is None or len(value) > 128 or not is_valid_id(value):
            return None
        return value

    return resolve


def tenant_from_subdomain(base_domain: str) -> TenantResolver:
    """Return a resolver that takes the tenant from the host: ``acme.example.com`` -> ``acme``.

    The tenant is the single DNS label directly in front of ``base_domain`` in the ``Host``
    header (port ignored, case folded). The bare base domain, a host outside it, or more than
    one label in front of it (``a.b.example.com``) gives ``None``.
    """
    suffix = "." + base_domain.lower().strip(".")

    def resolve(scope: Scope) -> str | None:
        host = (_header(scope, b"host") or "").rsplit(":", 1)[0].lower().rstrip(".")
        if not host.endswith(suffix):
            return None
        label = host[: -len(suffix)]
        if not label or "." in label or not is_valid_id(label):
            return None
        return label

    return resolve


def tenant_from_user(attribute: str = "tenant_id") -> TenantResolver:
    """Return a resolver that reads ``attribute`` of ``scope["user"]`` (set by auth middleware).

    Works with an object (``getattr``) or a mapping (``[attribute]``); no user, or no such
    attribute, or a ``None`` value gives ``None``; any other value is converted with ``str``.
    """

    def resolve(scope: Scope) -> str | None:
        user = scope.get("user")
        if user is None:
            return None
        found = user.get(attribute) if isinstance(user, Mapping) else getattr(user, attribute, None)
        return None if found is None else str(found)

    return resolve
