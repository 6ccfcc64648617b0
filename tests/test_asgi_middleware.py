import asyncio
import logging
import socket
import subprocess
import sys
import textwrap
import time
import uuid
import warnings

import pytest

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

from starlette.applications import Starlette  # noqa: E402
from starlette.authentication import AuthCredentials, AuthenticationBackend, SimpleUser  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402
from starlette.middleware.authentication import AuthenticationMiddleware  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse  # noqa: E402
from starlette.routing import Route, WebSocketRoute  # noqa: E402

with warnings.catch_warnings():
    # Starlette >= 1.x prefers its httpx2 fork for the TestClient and warns when it falls back
    # to httpx, which the dev extra installs (and which the ASGITransport tests use directly).
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient
from starlette.websockets import WebSocket  # noqa: E402

from tidings import current_context  # noqa: E402
from tidings.integrations.asgi import (  # noqa: E402
    CorrelationMiddleware,
    tenant_from_header,
    tenant_from_subdomain,
    tenant_from_user,
)


def seen() -> dict[str, str | None]:
    context = current_context()
    return {
        "correlation_id": context.correlation_id,
        "causation_id": context.causation_id,
        "tenant_id": context.tenant_id,
    }


async def async_view(request: Request) -> JSONResponse:
    return JSONResponse(seen())


def sync_view(request: Request) -> JSONResponse:
    return JSONResponse(seen())


async def async_stream(request: Request) -> StreamingResponse:
    async def body():
        for _ in range(3):
            await asyncio.sleep(0)
            yield f"{current_context().correlation_id}\n"

    return StreamingResponse(body())


def sync_stream(request: Request) -> StreamingResponse:
    def body():
        for _ in range(3):
            yield f"{current_context().correlation_id}\n"

    return StreamingResponse(body())


async def own_header(request: Request) -> PlainTextResponse:
    return PlainTextResponse("x", headers={"X-Correlation-ID": "set-by-app"})


async def socket_view(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_json(seen())
    await websocket.close()


ROUTES = [
    Route("/async", async_view),
    Route("/sync", sync_view),
    Route("/stream", async_stream),
    Route("/sync-stream", sync_stream),
    Route("/own", own_header),
    WebSocketRoute("/ws", socket_view),
]


def client(**options) -> TestClient:
    return TestClient(
        Starlette(routes=ROUTES, middleware=[Middleware(CorrelationMiddleware, **options)])
    )


def test_a_valid_incoming_id_is_bound_and_echoed():
    """A valid X-Correlation-ID is what the view sees and what the response echoes."""
    with client() as http:
        response = http.get("/async", headers={"X-Correlation-ID": "req-1:a.b_c"})
    assert response.json() == {
        "correlation_id": "req-1:a.b_c",
        "causation_id": None,
        "tenant_id": None,
    }
    assert response.headers["X-Correlation-ID"] == "req-1:a.b_c"


def test_the_fallback_header_is_used_when_the_main_one_is_absent():
    """Without X-Correlation-ID the X-Request-ID value becomes the correlation id."""
    with client() as http:
        response = http.get("/async", headers={"X-Request-ID": "from-lb"})
    assert response.json()["correlation_id"] == "from-lb"
    assert response.headers["X-Correlation-ID"] == "from-lb"


def test_header_names_are_configurable():
    """A configured header and fallback replace the default names, echo included."""
    with client(header="Trace-Id", fallback_headers=("Alt-Id",)) as http:
        response = http.get("/async", headers={"Alt-Id": "alt-1", "X-Correlation-ID": "ignored"})
    assert response.json()["correlation_id"] == "alt-1"
    assert response.headers["Trace-Id"] == "alt-1"
    assert "X-Correlation-ID" not in response.headers


def test_an_id_is_minted_when_none_is_sent():
    """Without any id header a fresh uuid4 is bound and echoed."""
    with client() as http:
        response = http.get("/async")
    minted = response.json()["correlation_id"]
    assert uuid.UUID(minted).version == 4
    assert response.headers["X-Correlation-ID"] == minted


@pytest.mark.parametrize("raw", ["bad id <script>alert(1)</script>", "a" * 129, "semi;colon"])
def test_an_invalid_id_is_replaced_and_never_logged_raw(raw, caplog):
    """An invalid id is replaced by a uuid4; the warning names its length, not its value."""
    caplog.set_level(logging.WARNING, logger="tidings.integrations.asgi")
    with client() as http:
        response = http.get("/async", headers={"X-Correlation-ID": raw})
    replacement = response.json()["correlation_id"]
    assert uuid.UUID(replacement).version == 4
    assert response.headers["X-Correlation-ID"] == replacement
    (record,) = caplog.records
    message = record.getMessage()
    assert raw not in message
    assert f"length {len(raw)}" in message
    assert replacement in message
    assert "<" not in message
    assert " " not in message.split("excerpt ")[1].split(")")[0]


def test_a_custom_validator_and_max_length_apply():
    """Ids pass only when within max_length and accepted by the given validator."""
    with client(validate=str.isdigit, max_length=4) as http:
        kept = http.get("/async", headers={"X-Correlation-ID": "1234"}).json()["correlation_id"]
        too_long = http.get("/async", headers={"X-Correlation-ID": "12345"}).json()
        rejected = http.get("/async", headers={"X-Correlation-ID": "abcd"}).json()
    assert kept == "1234"
    assert too_long["correlation_id"] != "12345"
    assert rejected["correlation_id"] != "abcd"


def test_bad_configuration_is_rejected():
    """A max_length below 1 or an empty header name raises ValueError at construction."""
    with pytest.raises(ValueError, match="max_length"):
        CorrelationMiddleware(async_view, max_length=0)
    with pytest.raises(ValueError, match="non-empty ASCII"):
        CorrelationMiddleware(async_view, fallback_headers=("",))


def test_echo_can_be_turned_off_and_never_overrides_the_apps_header():
    """With echo=False no header is added; an app's own header is left as the app set it."""
    with client(echo=False) as http:
        assert "X-Correlation-ID" not in http.get("/async").headers
    with client() as http:
        assert http.get("/own").headers.get_list("X-Correlation-ID") == ["set-by-app"]


def test_sync_endpoints_see_the_request_context():
    """A sync view, run in the thread pool, sees the request's correlation id."""
    with client() as http:
        response = http.get("/sync", headers={"X-Correlation-ID": "sync-1"})
    assert response.json()["correlation_id"] == "sync-1"


@pytest.mark.parametrize("path", ["/stream", "/sync-stream"])
def test_streaming_bodies_see_the_request_context(path):
    """A streaming body generator (async or sync) reads the request's id on every chunk."""
    with client() as http:
        response = http.get(path, headers={"X-Correlation-ID": "stream-1"})
    assert response.text == "stream-1\n" * 3
    assert response.headers["X-Correlation-ID"] == "stream-1"


def test_tenant_from_header():
    """The header resolver binds a valid tenant header and ignores an invalid one."""
    with client(tenant=tenant_from_header("X-Tenant-ID")) as http:
        good = http.get("/async", headers={"X-Tenant-ID": "acme"}).json()
        bad = http.get("/async", headers={"X-Tenant-ID": "ac me"}).json()
        absent = http.get("/async").json()
    assert (good["tenant_id"], bad["tenant_id"], absent["tenant_id"]) == ("acme", None, None)


@pytest.mark.parametrize(
    ("host", "tenant"),
    [
        ("acme.example.com", "acme"),
        ("ACME.Example.com:8443", "acme"),
        ("example.com", None),
        ("a.b.example.com", None),
        ("acme.other.org", None),
    ],
)
def test_tenant_from_subdomain(host, tenant):
    """The subdomain resolver takes the one label in front of the base domain, else None."""
    with client(tenant=tenant_from_subdomain("example.com")) as http:
        response = http.get("/async", headers={"Host": host})
    assert response.json()["tenant_id"] == tenant


class TenantUser(SimpleUser):
    def __init__(self, username: str, tenant_id: str) -> None:
        super().__init__(username)
        self.tenant_id = tenant_id


class HeaderAuth(AuthenticationBackend):
    async def authenticate(self, conn):
        if "Authorization" not in conn.headers:
            return None
        return AuthCredentials(["authenticated"]), TenantUser("ann", "tenant-of-ann")


def test_tenant_from_user_reads_the_authenticated_user():
    """Inside Starlette's AuthenticationMiddleware the user's tenant_id is bound."""
    app = Starlette(
        routes=ROUTES,
        middleware=[
            Middleware(AuthenticationMiddleware, backend=HeaderAuth()),
            Middleware(CorrelationMiddleware, tenant=tenant_from_user()),
        ],
    )
    with TestClient(app) as http:
        signed_in = http.get("/async", headers={"Authorization": "x"}).json()
        anonymous = http.get("/async").json()
    assert signed_in["tenant_id"] == "tenant-of-ann"
    assert anonymous["tenant_id"] is None


def test_tenant_from_user_reads_a_mapping_user():
    """A user given as a mapping is read by key; a missing key gives None."""
    resolve = tenant_from_user("org")
    assert resolve({"user": {"org": 42}}) == "42"
    assert resolve({"user": {}}) is None
    assert resolve({}) is None


def test_an_async_tenant_resolver_is_awaited():
    """A coroutine function resolver is awaited and its result bound."""

    async def resolve(scope):
        await asyncio.sleep(0)
        return "async-tenant"

    with client(tenant=resolve) as http:
        assert http.get("/async").json()["tenant_id"] == "async-tenant"


def test_websockets_are_bound_but_not_echoed():
    """A websocket endpoint sees the handshake's correlation id and tenant."""
    with (
        client(tenant=tenant_from_header()) as http,
        http.websocket_connect(
            "/ws", headers={"X-Correlation-ID": "ws-1", "X-Tenant-ID": "acme"}
        ) as websocket,
    ):
        assert websocket.receive_json() == {
            "correlation_id": "ws-1",
            "causation_id": None,
            "tenant_id": "acme",
        }


def test_lifespan_passes_through_untouched():
    """A lifespan scope reaches the app with no context bound."""
    calls = []

    async def app(scope, receive, send):
        calls.append((scope["type"], current_context().correlation_id))

    asyncio.run(CorrelationMiddleware(app)({"type": "lifespan"}, None, None))
    assert calls == [("lifespan", None)]


def test_concurrent_requests_keep_their_own_ids():
    """Fifty overlapping requests each see and get back their own id, none leaking."""
    count = 50
    arrived = 0
    all_in = asyncio.Event()

    async def overlapping(request: Request) -> JSONResponse:
        nonlocal arrived
        arrived += 1
        if arrived == count:
            all_in.set()
        await asyncio.wait_for(all_in.wait(), timeout=10)
        return JSONResponse(seen())

    app = CorrelationMiddleware(Starlette(routes=[Route("/", overlapping)]))

    async def run() -> list:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await asyncio.gather(
                *(http.get("/", headers={"X-Correlation-ID": f"req-{n}"}) for n in range(count))
            )

    responses = asyncio.run(run())
    for n, response in enumerate(responses):
        assert response.headers["X-Correlation-ID"] == f"req-{n}"
        assert response.json()["correlation_id"] == f"req-{n}"
    assert current_context().correlation_id is None


SERVER = textwrap.dedent(
    """
    import asyncio, sys
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from tidings import current_context
    from tidings.integrations.asgi import CorrelationMiddleware

    async def view(request):
        for _ in range(5):
            await asyncio.sleep(0.001)
        return PlainTextResponse(current_context().correlation_id)

    app = CorrelationMiddleware(Starlette(routes=[Route("/", view)]))
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
    """
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, deadline: float) -> None:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"uvicorn exited early: {process.communicate()[1]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"uvicorn did not listen on 127.0.0.1:{port} in time")


@pytest.mark.integration
def test_a_real_uvicorn_server_keeps_concurrent_requests_apart():
    """Through a uvicorn process, concurrent requests each get back and see their own id."""
    pytest.importorskip("uvicorn")
    port = free_port()
    process = subprocess.Popen(  # noqa: S603 - runs this interpreter on a fixed script
        [sys.executable, "-c", SERVER, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_port(port, process, time.monotonic() + 15)

        async def run() -> list:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
                return await asyncio.gather(
                    *(http.get("/", headers={"X-Correlation-ID": f"live-{n}"}) for n in range(30))
                )

        for n, response in enumerate(asyncio.run(run())):
            assert response.headers["X-Correlation-ID"] == f"live-{n}"
            assert response.text == f"live-{n}"
    finally:
        process.terminate()
        try:
            process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


HOSTILE_TENANTS = ["a\r\nforged: line", "t" * 257, "acmé", "", "tab\there", object(), True]


@pytest.mark.parametrize("value", HOSTILE_TENANTS, ids=repr)
def test_a_resolver_returning_an_unfit_tenant_binds_none_and_logs_an_excerpt(value, caplog):
    """A resolver's value that is not a printable-ASCII id of 1-256 chars binds no tenant."""
    with (
        caplog.at_level(logging.WARNING, "tidings.integrations.asgi"),
        client(tenant=lambda scope: value) as http,
    ):
        body = http.get("/async").json()
    assert body["tenant_id"] is None
    warning = "\n".join(r.getMessage() for r in caplog.records)
    assert "rejected the tenant id" in warning
    assert "\r" not in warning
    assert "forged: line" not in warning


def test_an_async_resolver_returning_an_int_binds_its_decimal_form():
    """An async resolver's int tenant (a primary key) is bound as its decimal string."""

    async def resolve(scope):
        return 42

    with client(tenant=resolve) as http:
        assert http.get("/async").json()["tenant_id"] == "42"
