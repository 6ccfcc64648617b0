"""500 responses carry the correlation id: CorrelationMiddleware answers what the app raised."""

import asyncio
import logging
import subprocess
import sys
import textwrap
import time
import warnings

import pytest

pytest.importorskip("starlette")
fastapi = pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from fastapi import FastAPI  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

with warnings.catch_warnings():
    # Starlette >= 1.x prefers its httpx2 fork for the TestClient (see test_asgi_middleware).
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient

from tests.test_asgi_middleware import free_port, wait_for_port  # noqa: E402

from tidings import current_context  # noqa: E402
from tidings.integrations.asgi import CorrelationMiddleware  # noqa: E402

ID = {"X-Correlation-ID": "err-1"}


class Boom(Exception):
    pass


def fastapi_app(**options) -> FastAPI:
    app = FastAPI(**options)
    app.add_middleware(CorrelationMiddleware)

    @app.get("/async")
    async def async_boom() -> dict[str, str]:
        raise Boom("async view failed")

    @app.get("/sync")
    def sync_boom() -> dict[str, str]:
        raise Boom("sync view failed")

    @app.get("/ok")
    async def ok() -> dict[str, str]:
        return {"ok": "yes"}

    return app


async def starlette_async(request: Request) -> PlainTextResponse:
    raise Boom("async view failed")


def starlette_sync(request: Request) -> PlainTextResponse:
    raise Boom("sync view failed")


async def broken_stream(request: Request) -> StreamingResponse:
    async def body():
        yield "first part\n"
        raise Boom("failed mid-stream")

    return StreamingResponse(body())


def starlette_app(**options) -> Starlette:
    return Starlette(
        routes=[
            Route("/async", starlette_async),
            Route("/sync", starlette_sync),
            Route("/stream", broken_stream),
        ],
        middleware=[Middleware(CorrelationMiddleware)],
        **options,
    )


@pytest.mark.parametrize("path", ["/async", "/sync"])
def test_a_fastapi_500_carries_the_id(path):
    """A FastAPI view that raises answers a plain 500 carrying the request's id."""
    with TestClient(fastapi_app(), raise_server_exceptions=False) as http:
        response = http.get(path, headers=ID)
    assert response.status_code == 500
    assert response.text == "Internal Server Error"
    assert response.headers["X-Correlation-ID"] == "err-1"


@pytest.mark.parametrize("path", ["/async", "/sync"])
def test_a_starlette_500_carries_the_id(path):
    """A plain Starlette view that raises answers a 500 carrying the request's (minted) id."""
    with TestClient(starlette_app(), raise_server_exceptions=False) as http:
        response = http.get(path)
    assert response.status_code == 500
    assert len(response.headers["X-Correlation-ID"]) == 36  # a minted uuid4


@pytest.mark.parametrize("path", ["/async", "/sync"])
def test_the_exception_is_still_raised_to_the_server(path):
    """The app's exception reaches the server (and TestClient) after the 500 went out."""
    with TestClient(fastapi_app()) as http, pytest.raises(Boom):
        http.get(path, headers=ID)


@pytest.mark.parametrize("is_async", [True, False])
def test_the_apps_own_500_handler_builds_the_response(is_async):
    """An app's handler for Exception (sync or async) gives the 500, with the id echoed."""
    app = fastapi_app()
    seen: list[str | None] = []

    def build(request: Request, exc: Exception) -> JSONResponse:
        seen.append(current_context().correlation_id)
        return JSONResponse({"error": type(exc).__name__}, status_code=500)

    async def abuild(request: Request, exc: Exception) -> JSONResponse:
        return build(request, exc)

    app.add_exception_handler(Exception, abuild if is_async else build)
    with TestClient(app, raise_server_exceptions=False) as http:
        response = http.get("/async", headers=ID)
    assert response.status_code == 500
    assert response.json() == {"error": "Boom"}
    assert response.headers["X-Correlation-ID"] == "err-1"
    assert seen[0] == "err-1"  # the handler runs with the request's context bound


def test_a_status_500_handler_is_used_as_starlette_would():
    """A handler registered under 500 (not Exception) is the one used."""
    app = starlette_app(
        exception_handlers={500: lambda request, exc: PlainTextResponse("ours", status_code=503)}
    )
    with TestClient(app, raise_server_exceptions=False) as http:
        response = http.get("/sync", headers=ID)
    assert (response.status_code, response.text) == (503, "ours")
    assert response.headers["X-Correlation-ID"] == "err-1"


def test_a_failing_500_handler_still_gives_a_plain_500_with_the_id(caplog):
    """When the app's own 500 handler raises, a plain 500 with the id goes out instead."""

    def broken(request: Request, exc: Exception) -> PlainTextResponse:
        raise RuntimeError("handler broken")

    app = starlette_app(exception_handlers={Exception: broken})
    with (
        caplog.at_level(logging.WARNING, "tidings.integrations.asgi"),
        TestClient(app, raise_server_exceptions=False) as http,
    ):
        response = http.get("/sync", headers=ID)
    assert response.status_code == 500
    assert response.headers["X-Correlation-ID"] == "err-1"
    assert "RuntimeError" in caplog.text


@pytest.mark.parametrize("make", [fastapi_app, starlette_app])
def test_debug_mode_shows_the_traceback_page_with_the_id(make):
    """In debug mode the 500 is Starlette's traceback page, and it carries the id too."""
    with TestClient(make(debug=True), raise_server_exceptions=False) as http:
        html = http.get("/sync", headers={**ID, "Accept": "text/html"})
        text = http.get("/sync", headers=ID)
    assert html.status_code == 500
    assert html.headers["content-type"].startswith("text/html")
    assert "sync view failed" in html.text
    assert html.headers["X-Correlation-ID"] == "err-1"
    assert "Boom: sync view failed" in text.text
    assert text.headers["X-Correlation-ID"] == "err-1"


def call(app, path: str) -> tuple[list[dict], BaseException | None]:
    """Run one HTTP request through ``app`` at the ASGI level; the messages sent and the error."""
    sent: list[dict] = []
    requests = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict:
        if requests:
            return requests.pop()
        await asyncio.Event().wait()  # the client never disconnects; cancelled with the app
        raise AssertionError("unreachable")

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"test"), (b"x-correlation-id", b"err-1")],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }
    try:
        asyncio.run(app(scope, receive, send))
    except Exception as exc:  # noqa: BLE001 - returned for the test to check
        return sent, exc
    return sent, None


@pytest.mark.parametrize("make", [fastapi_app, starlette_app])
def test_exactly_one_response_is_sent_and_the_error_re_raised(make):
    """Starlette sends no second response once the middleware's 500 started; it re-raises."""
    sent, error = call(make(), "/async")
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert len(starts) == 1
    assert starts[0]["status"] == 500
    assert (b"x-correlation-id", b"err-1") in starts[0]["headers"]
    assert isinstance(error, Boom)


def test_a_bare_asgi_app_that_raises_gets_a_plain_500_with_the_id():
    """Around an app that is not Starlette, the 500 is plain text and carries the id."""

    async def bare(scope, receive, send) -> None:
        raise Boom("bare app failed")

    sent, error = call(CorrelationMiddleware(bare), "/")
    assert isinstance(error, Boom)
    assert sent[0]["status"] == 500
    assert (b"x-correlation-id", b"err-1") in sent[0]["headers"]
    assert sent[1] == {"type": "http.response.body", "body": b"Internal Server Error"}


def test_an_error_after_the_response_started_sends_nothing_more():
    """An exception mid-stream propagates, and no second response start is sent."""
    sent, error = call(starlette_app(), "/stream")
    assert isinstance(error, Boom)
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert len(starts) == 1
    assert starts[0]["status"] == 200
    assert (b"x-correlation-id", b"err-1") in starts[0]["headers"]


def test_no_echo_leaves_errors_to_the_framework():
    """With echo=False the middleware does not answer errors: Starlette's own 500 goes out."""
    app = Starlette(
        routes=[Route("/sync", starlette_sync)],
        middleware=[Middleware(CorrelationMiddleware, echo=False)],
    )
    with TestClient(app, raise_server_exceptions=False) as http:
        response = http.get("/sync", headers=ID)
    assert response.status_code == 500
    assert "X-Correlation-ID" not in response.headers


SERVER = textwrap.dedent(
    """
    import sys
    import uvicorn
    from fastapi import FastAPI
    from tidings.integrations.asgi import CorrelationMiddleware

    app = FastAPI()
    app.add_middleware(CorrelationMiddleware)

    @app.get("/async-boom")
    async def async_boom():
        raise LookupError("async view failed")

    @app.get("/sync-boom")
    def sync_boom():
        raise LookupError("sync view failed")

    @app.get("/ok")
    async def ok():
        return {"ok": True}

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="info")
    """
)


@pytest.mark.integration
def test_a_real_uvicorn_server_sends_500s_with_the_id_and_logs_the_error():
    """Through uvicorn, a FastAPI 500 carries the id and the server still logs the exception."""
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
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            answers = {
                path: http.get(path, headers={"X-Correlation-ID": f"live{path[1:]}"})
                for path in ("/async-boom", "/sync-boom", "/ok")
            }
    finally:
        process.terminate()
        try:
            _, log = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            _, log = process.communicate()
    for path in ("/async-boom", "/sync-boom"):
        assert answers[path].status_code == 500
        assert answers[path].text == "Internal Server Error"
        assert answers[path].headers["X-Correlation-ID"] == f"live{path[1:]}"
    assert answers["/ok"].headers["X-Correlation-ID"] == "liveok"
    assert answers["/async-boom"].headers["connection"] == "close"
    assert log.count("Exception in ASGI application") == 2
    assert "LookupError: async view failed" in log
    assert "LookupError: sync view failed" in log
