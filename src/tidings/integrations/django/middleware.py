"""``CorrelationMiddleware``: one correlation id (and tenant) bound for each Django request.

Add it near the top of ``MIDDLEWARE`` (below ``AuthenticationMiddleware`` if the tenant
resolver reads ``request.user``)::

    MIDDLEWARE = [..., "tidings.integrations.django.middleware.CorrelationMiddleware", ...]
    TIDINGS_CORRELATION_HEADER = "X-Correlation-ID"          # the default
    TIDINGS_TENANT_RESOLVER = "myproject.tenancy.tenant_of"  # optional: request -> str | None

It works under WSGI and ASGI, with sync and async views, and keeps the ids bound while a
``StreamingHttpResponse`` body is produced. The id rules are those of
:class:`tidings.integrations.asgi.CorrelationMiddleware`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Final

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from tidings.context import event_context
from tidings.integrations._correlation import checked_tenant, choose_id, is_valid_id

__all__ = ["CorrelationMiddleware"]

logger = logging.getLogger(__name__)

_MAX_LENGTH: Final = 128


class _BoundIterator:
    # Binds the ids around each step only, so nothing leaks into the server between steps.
    def __init__(self, parts: Iterator[Any], scope: event_context) -> None:
        self._parts = parts
        self._scope = scope

    def __iter__(self) -> _BoundIterator:
        return self

    def __next__(self) -> Any:
        with self._scope:
            return next(self._parts)

    def close(self) -> None:
        close = getattr(self._parts, "close", None)
        if close is not None:
            with self._scope:
                close()


class _BoundAsyncIterator:
    def __init__(self, parts: AsyncIterator[Any], scope: event_context) -> None:
        self._parts = parts
        self._scope = scope

    def __aiter__(self) -> _BoundAsyncIterator:
        return self

    async def __anext__(self) -> Any:
        with self._scope:
            return await anext(self._parts)

    async def aclose(self) -> None:
        aclose = getattr(self._parts, "aclose", None)
        if aclose is not None:
            with self._scope:
                await aclose()


class CorrelationMiddleware:
    """Bind a correlation id and tenant for each request and echo the id on the response.

    The id is the value of the ``TIDINGS_CORRELATION_HEADER`` request header (default
    ``X-Correlation-ID``), else of ``X-Request-ID``. A value of 1 to 128 characters that
    :func:`~tidings.integrations.asgi.is_valid_id` accepts is kept; any other is replaced by a
    fresh uuid4 and a warning (logger ``tidings.integrations.django.middleware``) names its
    length and a masked excerpt, never the raw value. With no such header a uuid4 is minted.
    The tenant is what the callable named by the dotted path ``TIDINGS_TENANT_RESOLVER``
    returns for the request (it may be ``async`` when the chain is async), else ``None``;
    it must be printable ASCII of 1 to 256 characters (an ``int`` is taken as its decimal
    form), or no tenant is bound and a warning gives a masked excerpt.
    Both are bound with ``causation_id=None`` for the rest of the chain and the view, and for
    every step of a streaming body. The id is set under the configured header on the response
    unless the view already set it. Settings are read once, when Django builds the chain.
    Exceptions from the view or the resolver propagate unchanged.

    Raises:
        ImproperlyConfigured: ``TIDINGS_TENANT_RESOLVER`` does not import or is not callable.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response
        self._is_async = iscoroutinefunction(get_response)
        if self._is_async:
            markcoroutinefunction(self)
        self.header: str = getattr(settings, "TIDINGS_CORRELATION_HEADER", "X-Correlation-ID")
        self._names = tuple(dict.fromkeys((self.header, "X-Request-ID")))
        self.tenant = _resolver(getattr(settings, "TIDINGS_TENANT_RESOLVER", None))

    def _correlation_id(self, request: Any) -> str:
        return choose_id(
            ((name, request.headers.get(name)) for name in self._names),
            validate=is_valid_id,
            max_length=_MAX_LENGTH,
            logger=logger,
        )

    def __call__(self, request: Any) -> Any:
        """Run the rest of the chain for ``request`` with the ids bound (awaitable if async)."""
        if self._is_async:
            return self._acall(request)
        tenant_id = None
        if self.tenant is not None:
            tenant_id = checked_tenant(self.tenant(request), logger=logger)
        correlation_id = self._correlation_id(request)
        scope = event_context(correlation_id=correlation_id, tenant_id=tenant_id, causation_id=None)
        with scope:
            response = self.get_response(request)
        return self._finish(response, correlation_id, scope)

    async def _acall(self, request: Any) -> Any:
        tenant_id = None
        if self.tenant is not None:
            tenant_id = self.tenant(request)
            if inspect.isawaitable(tenant_id):
                tenant_id = await tenant_id
            tenant_id = checked_tenant(tenant_id, logger=logger)
        correlation_id = self._correlation_id(request)
        scope = event_context(correlation_id=correlation_id, tenant_id=tenant_id, causation_id=None)
        with scope:
            response = await self.get_response(request)
        return self._finish(response, correlation_id, scope)

    def _finish(self, response: Any, correlation_id: str, scope: event_context) -> Any:
        if getattr(response, "streaming", False):
            content = response.streaming_content
            if getattr(response, "is_async", False):
                response.streaming_content = _BoundAsyncIterator(content, scope)
            else:
                response.streaming_content = _BoundIterator(content, scope)
        if not response.has_header(self.header):
            response[self.header] = correlation_id
        return response


def _resolver(path: object) -> Callable[[Any], Any] | None:
    if path is None:
        return None
    try:
        found = import_string(path) if isinstance(path, str) else path
    except ImportError as exc:
        msg = f"TIDINGS_TENANT_RESOLVER {path!r} does not import: {exc}"
        raise ImproperlyConfigured(msg) from exc
    if not callable(found):
        msg = f"TIDINGS_TENANT_RESOLVER {path!r} is not callable"
        raise ImproperlyConfigured(msg)
    resolver: Callable[[Any], Any] = found
    return resolver
