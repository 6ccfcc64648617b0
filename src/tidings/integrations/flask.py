"""``Tidings``: the Flask extension that binds one correlation id (and tenant) per request.

::

    app = Flask(__name__)
    Tidings(app, tenant=lambda request: request.headers.get("X-Tenant-ID"))

or, with an application factory, ``tidings = Tidings()`` then ``tidings.init_app(app)``. The
id rules are those of :class:`tidings.integrations.asgi.CorrelationMiddleware`; the ids are
bound from ``before_request`` to ``teardown_request``, and for every step of a streamed body.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextvars import Token
from typing import Any, Final

try:
    from flask import Flask, Request, Response, g, request
except ImportError as exc:
    msg = "tidings.integrations.flask needs Flask: pip install 'tidings[flask]'"
    raise ImportError(msg) from exc

from tidings.context import EventContext, bind, reset
from tidings.integrations._correlation import checked_tenant, choose_id, is_valid_id

__all__ = ["FlaskTenantResolver", "Tidings"]

FlaskTenantResolver = Callable[[Request], "str | None"]
"""Returns the tenant of a request (called inside its request context), or ``None``."""

logger = logging.getLogger(__name__)

_CONTEXT: Final = "_tidings_context"
_RESET_KEY: Final = "_tidings_token"


class _BoundIterator:
    # Binds the ids around each step only: the server iterates after teardown_request ran.
    def __init__(self, parts: Iterable[Any], context: EventContext) -> None:
        self._parts: Iterator[Any] = iter(parts)
        self._source = parts
        self._context = context

    def __iter__(self) -> _BoundIterator:
        return self

    def __next__(self) -> Any:
        token = bind(self._context)
        try:
            return next(self._parts)
        finally:
            reset(token)

    def close(self) -> None:
        close = getattr(self._source, "close", None)
        if close is not None:
            token = bind(self._context)
            try:
                close()
            finally:
                reset(token)


class Tidings:
    """Bind a correlation id and tenant for each request of a Flask app; echo the id.

    The id is the value of the first of ``header``, then ``fallback_headers``, present on the
    request. It is kept if it has 1 to ``max_length`` characters and ``validate`` accepts it
    (default :func:`~tidings.integrations.asgi.is_valid_id`); otherwise it is replaced by a
    fresh uuid4 and a warning (logger ``tidings.integrations.flask``) names its length and a
    masked excerpt, never the raw value. With no such header a uuid4 is minted. ``tenant``
    (see :data:`FlaskTenantResolver`) gives the tenant id, else it is ``None``; it must be
    printable ASCII of 1 to 256 characters (an ``int`` is taken as its decimal form), or no
    tenant is bound and a warning gives a masked excerpt. Both are bound,
    with ``causation_id=None``, from ``before_request`` until ``teardown_request`` (the token is
    kept on :data:`flask.g`), and around every step of a streamed response body, so
    generators, with or without ``stream_with_context``, see them. The id is set under
    ``header`` on the response unless the view already set it. Exceptions from the view or the
    resolver propagate unchanged; each request binds in its own thread or context only.

    Raises:
        ValueError: ``max_length`` is below 1 or a header name is empty.
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        header: str = "X-Correlation-ID",
        fallback_headers: Iterable[str] = ("X-Request-ID",),
        tenant: FlaskTenantResolver | None = None,
        validate: Callable[[str], bool] = is_valid_id,
        max_length: int = 128,
    ) -> None:
        if max_length < 1:
            msg = f"Tidings(max_length={max_length}) must be at least 1"
            raise ValueError(msg)
        self.names = (header, *fallback_headers)
        if not all(self.names):
            msg = "Tidings header names must be non-empty"
            raise ValueError(msg)
        self.header = header
        self.tenant = tenant
        self.validate = validate
        self.max_length = max_length
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Register the request hooks on ``app`` and record this extension as ``"tidings"``."""
        app.extensions["tidings"] = self
        app.before_request(self._bind)
        app.after_request(self._echo)
        app.teardown_request(self._reset)

    def _bind(self) -> None:
        correlation_id = choose_id(
            ((name, request.headers.get(name)) for name in self.names),
            validate=self.validate,
            max_length=self.max_length,
            logger=logger,
        )
        tenant_id = None
        if self.tenant is not None:
            tenant_id = checked_tenant(self.tenant(request), logger=logger)
        context = EventContext(correlation_id=correlation_id, tenant_id=tenant_id)
        setattr(g, _CONTEXT, context)
        setattr(g, _RESET_KEY, bind(context))

    def _echo(self, response: Response) -> Response:
        context: EventContext | None = g.get(_CONTEXT)
        if context is None or context.correlation_id is None:
            return response
        if response.is_streamed:
            response.response = _BoundIterator(response.response, context)
        if self.header not in response.headers:
            response.headers[self.header] = context.correlation_id
        return response

    def _reset(self, exc: BaseException | None) -> None:
        token: Token[EventContext] | None = g.pop(_RESET_KEY, None)
        if token is not None:
            reset(token)
