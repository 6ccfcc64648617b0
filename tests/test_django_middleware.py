"""The Django CorrelationMiddleware: sync and async chains, streaming, tenants, no leaks."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

import pytest

django = pytest.importorskip("django")

from django.conf import settings  # noqa: E402
from django.core.exceptions import ImproperlyConfigured  # noqa: E402
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse  # noqa: E402
from django.test import AsyncClient, Client, override_settings  # noqa: E402
from django.urls import path  # noqa: E402
from tests.django_project import settings as project_settings  # noqa: E402

from tidings import current_context  # noqa: E402

if not settings.configured:
    # settings.configure, not DJANGO_SETTINGS_MODULE (see tests/test_django_outbox.py).
    settings.configure(
        **{
            name: getattr(project_settings, name)
            for name in dir(project_settings)
            if name.isupper()
        }
    )
django.setup()

MIDDLEWARE = "tidings.integrations.django.middleware.CorrelationMiddleware"


def seen() -> dict[str, str | None]:
    context = current_context()
    return {
        "correlation_id": context.correlation_id,
        "causation_id": context.causation_id,
        "tenant_id": context.tenant_id,
    }


def sync_view(request):
    return JsonResponse(seen())


async def async_view(request):
    return JsonResponse(seen())


def sync_stream(request):
    def body():
        for _ in range(3):
            yield f"{current_context().correlation_id}\n"

    return StreamingHttpResponse(body())


async def async_stream(request):
    async def body():
        for _ in range(3):
            await asyncio.sleep(0)
            yield f"{current_context().correlation_id}\n"

    return StreamingHttpResponse(body())


def own_header(request):
    return HttpResponse("x", headers={"X-Correlation-ID": "set-by-view"})


BARRIER: dict[str, asyncio.Event] = {}
ARRIVED: list[str] = []


async def overlapping(request):
    ARRIVED.append(request.path)
    if len(ARRIVED) == 20:
        BARRIER["all_in"].set()
    await asyncio.wait_for(BARRIER["all_in"].wait(), timeout=10)
    return JsonResponse(seen())


def tenant_of(request):
    return request.headers.get("X-Tenant") or None


async def async_tenant_of(request):
    return "async-" + request.headers.get("X-Tenant", "none")


urlpatterns = [
    path("sync", sync_view),
    path("async", async_view),
    path("stream", sync_stream),
    path("async-stream", async_stream),
    path("own", own_header),
    path("overlap", overlapping),
]


@pytest.fixture(autouse=True)
def _urls_and_middleware():
    with override_settings(
        ROOT_URLCONF=__name__, ALLOWED_HOSTS=["testserver"], MIDDLEWARE=[MIDDLEWARE]
    ):
        yield
    assert current_context().correlation_id is None


def test_a_valid_incoming_id_is_bound_and_echoed():
    """A valid X-Correlation-ID is what a sync view sees and what the response echoes."""
    response = Client().get("/sync", headers={"X-Correlation-ID": "req-1:a.b_c"})
    assert response.json() == {
        "correlation_id": "req-1:a.b_c",
        "causation_id": None,
        "tenant_id": None,
    }
    assert response.headers["X-Correlation-ID"] == "req-1:a.b_c"


def test_the_fallback_header_and_minting():
    """X-Request-ID is used without X-Correlation-ID, and a uuid4 is minted without either."""
    http = Client()
    fallback = http.get("/sync", headers={"X-Request-ID": "from-lb"})
    assert fallback.json()["correlation_id"] == "from-lb"
    assert fallback.headers["X-Correlation-ID"] == "from-lb"
    minted = http.get("/sync")
    assert uuid.UUID(minted.json()["correlation_id"]).version == 4
    assert minted.headers["X-Correlation-ID"] == minted.json()["correlation_id"]


@pytest.mark.parametrize("raw", ["bad id <script>alert(1)</script>", "a" * 129, "semi;colon"])
def test_an_invalid_id_is_replaced_and_never_logged_raw(raw, caplog):
    """An invalid id is replaced by a uuid4; the warning names its length, not its value."""
    caplog.set_level(logging.WARNING, logger="tidings.integrations.django.middleware")
    response = Client().get("/sync", headers={"X-Correlation-ID": raw})
    replacement = response.json()["correlation_id"]
    assert uuid.UUID(replacement).version == 4
    assert response.headers["X-Correlation-ID"] == replacement
    (record,) = [r for r in caplog.records if r.name == "tidings.integrations.django.middleware"]
    message = record.getMessage()
    assert raw not in message
    assert f"length {len(raw)}" in message
    assert replacement in message
    assert "<" not in message


def test_the_header_setting_and_the_views_own_header():
    """TIDINGS_CORRELATION_HEADER renames the header, and a header the view set is kept."""
    with override_settings(TIDINGS_CORRELATION_HEADER="Trace-Id"):
        response = Client().get("/sync", headers={"Trace-Id": "t-1", "X-Correlation-ID": "no"})
    assert response.json()["correlation_id"] == "t-1"
    assert response.headers["Trace-Id"] == "t-1"
    own = Client().get("/own", headers={"X-Correlation-ID": "c-1"})
    assert own.headers["X-Correlation-ID"] == "set-by-view"


def test_async_views_and_sync_views_under_the_async_client():
    """Under AsyncClient (an async chain) async and sync views both see their request's id."""

    async def run():
        http = AsyncClient()
        return (
            await http.get("/async", headers={"X-Correlation-ID": "a-1"}),
            await http.get("/sync", headers={"X-Correlation-ID": "s-1"}),
        )

    first, second = asyncio.run(run())
    assert first.json()["correlation_id"] == "a-1"
    assert first.headers["X-Correlation-ID"] == "a-1"
    assert second.json()["correlation_id"] == "s-1"


def test_a_streaming_body_sees_the_context_while_it_is_iterated():
    """A StreamingHttpResponse generator, iterated after the view returned, sees the id."""
    response = Client().get("/stream", headers={"X-Correlation-ID": "stream-1"})
    assert response.headers["X-Correlation-ID"] == "stream-1"
    assert b"".join(response.streaming_content) == b"stream-1\n" * 3
    assert current_context().correlation_id is None


def test_an_async_streaming_body_sees_the_context():
    """An async StreamingHttpResponse body, iterated under AsyncClient, sees the id."""

    async def run():
        response = await AsyncClient().get("/async-stream", headers={"X-Correlation-ID": "as-1"})
        return b"".join([part async for part in response.streaming_content])

    assert asyncio.run(run()) == b"as-1\n" * 3


def test_the_tenant_resolver_named_in_settings():
    """TIDINGS_TENANT_RESOLVER names a callable of the request; async ones are awaited."""
    with override_settings(TIDINGS_TENANT_RESOLVER=f"{__name__}.tenant_of"):
        assert Client().get("/sync", headers={"X-Tenant": "acme"}).json()["tenant_id"] == "acme"
        assert Client().get("/sync").json()["tenant_id"] is None
    with override_settings(TIDINGS_TENANT_RESOLVER=f"{__name__}.async_tenant_of"):
        response = asyncio.run(AsyncClient().get("/async", headers={"X-Tenant": "b"}))
    assert response.json()["tenant_id"] == "async-b"


def test_an_unfit_tenant_from_the_resolver_binds_none(caplog):
    """A resolver's tenant that is not printable ASCII of 1-256 chars binds none, sync or async."""
    with (
        override_settings(TIDINGS_TENANT_RESOLVER=f"{__name__}.tenant_of"),
        caplog.at_level(logging.WARNING, "tidings.integrations.django.middleware"),
    ):
        assert Client().get("/sync", headers={"X-Tenant": "t" * 300}).json()["tenant_id"] is None
    with override_settings(TIDINGS_TENANT_RESOLVER=f"{__name__}.async_tenant_of"):
        response = asyncio.run(AsyncClient().get("/async", headers={"X-Tenant": "b" * 300}))
    assert response.json()["tenant_id"] is None
    assert "rejected the tenant id" in caplog.text


def test_a_bad_tenant_resolver_setting_is_rejected():
    """A resolver path that does not import, or names no callable, is ImproperlyConfigured."""
    for bad in ("no.such.module.resolver", f"{__name__}.MIDDLEWARE"):
        with override_settings(TIDINGS_TENANT_RESOLVER=bad), pytest.raises(ImproperlyConfigured):
            Client().get("/sync")


def test_the_context_does_not_leak_between_requests():
    """A request without an id never sees the previous request's id, and nothing stays bound."""
    http = Client()
    first = http.get("/sync", headers={"X-Correlation-ID": "first"}).json()
    second = http.get("/sync").json()
    assert first["correlation_id"] == "first"
    assert second["correlation_id"] not in (None, "first")
    assert current_context().correlation_id is None


def test_concurrent_async_requests_keep_their_own_ids():
    """Twenty overlapping async requests each see and get back their own id."""
    ARRIVED.clear()

    async def run():
        BARRIER["all_in"] = asyncio.Event()
        http = AsyncClient()
        return await asyncio.gather(
            *(http.get("/overlap", headers={"X-Correlation-ID": f"req-{n}"}) for n in range(20))
        )

    for n, response in enumerate(asyncio.run(run())):
        assert response.headers["X-Correlation-ID"] == f"req-{n}"
        assert json.loads(response.content)["correlation_id"] == f"req-{n}"
