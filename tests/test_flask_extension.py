"""The Flask extension: echo, fallback, minting, validation, tenants, streaming, threads."""

from __future__ import annotations

import logging
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

flask = pytest.importorskip("flask")

from flask import Flask, Response, jsonify, stream_with_context  # noqa: E402

from tidings import current_context  # noqa: E402
from tidings.integrations.flask import Tidings  # noqa: E402

THREADS = 8


def seen() -> dict[str, str | None]:
    context = current_context()
    return {
        "correlation_id": context.correlation_id,
        "causation_id": context.causation_id,
        "tenant_id": context.tenant_id,
    }


def make_app(**options) -> Flask:
    app = Flask(__name__)
    Tidings(app, **options)
    barrier = threading.Barrier(THREADS, timeout=10)

    @app.get("/")
    def view():
        return jsonify(seen())

    @app.get("/async")
    async def async_view():
        return jsonify(seen())

    @app.get("/stream")
    def stream():
        def body():
            for _ in range(3):
                yield f"{current_context().correlation_id}\n"

        return Response(stream_with_context(body()))

    @app.get("/plain-stream")
    def plain_stream():
        return Response(f"{current_context().correlation_id}\n" for _ in range(2))

    @app.get("/own")
    def own():
        return Response("x", headers={"X-Correlation-ID": "set-by-view"})

    @app.get("/together")
    def together():
        barrier.wait()
        return jsonify(seen())

    return app


@pytest.fixture(autouse=True)
def _nothing_stays_bound():
    yield
    assert current_context().correlation_id is None


def test_a_valid_incoming_id_is_bound_and_echoed():
    """A valid X-Correlation-ID is what the view sees and what the response echoes."""
    response = make_app().test_client().get("/", headers={"X-Correlation-ID": "req-1:a.b_c"})
    assert response.json == {
        "correlation_id": "req-1:a.b_c",
        "causation_id": None,
        "tenant_id": None,
    }
    assert response.headers["X-Correlation-ID"] == "req-1:a.b_c"


def test_the_fallback_header_is_used_when_the_main_one_is_absent():
    """Without X-Correlation-ID the X-Request-ID value becomes the correlation id."""
    response = make_app().test_client().get("/", headers={"X-Request-ID": "from-lb"})
    assert response.json["correlation_id"] == "from-lb"
    assert response.headers["X-Correlation-ID"] == "from-lb"


def test_an_id_is_minted_when_none_is_sent():
    """Without any id header a fresh uuid4 is bound and echoed."""
    response = make_app().test_client().get("/")
    assert uuid.UUID(response.json["correlation_id"]).version == 4
    assert response.headers["X-Correlation-ID"] == response.json["correlation_id"]


@pytest.mark.parametrize("raw", ["bad id <script>alert(1)</script>", "a" * 129, "semi;colon"])
def test_an_invalid_id_is_replaced_and_never_logged_raw(raw, caplog):
    """An invalid id is replaced by a uuid4; the warning names its length, not its value."""
    caplog.set_level(logging.WARNING, logger="tidings.integrations.flask")
    response = make_app().test_client().get("/", headers={"X-Correlation-ID": raw})
    replacement = response.json["correlation_id"]
    assert uuid.UUID(replacement).version == 4
    assert response.headers["X-Correlation-ID"] == replacement
    (record,) = [r for r in caplog.records if r.name == "tidings.integrations.flask"]
    message = record.getMessage()
    assert raw not in message
    assert f"length {len(raw)}" in message
    assert replacement in message
    assert "<" not in message


def test_configured_headers_and_the_views_own_header():
    """Configured header names replace the defaults; a header the view set is kept."""
    http = make_app(header="Trace-Id", fallback_headers=("Alt-Id",)).test_client()
    response = http.get("/", headers={"Alt-Id": "alt-1", "X-Correlation-ID": "ignored"})
    assert response.json["correlation_id"] == "alt-1"
    assert response.headers["Trace-Id"] == "alt-1"
    own = make_app().test_client().get("/own", headers={"X-Correlation-ID": "c-1"})
    assert own.headers["X-Correlation-ID"] == "set-by-view"


def test_bad_configuration_is_rejected():
    """A max_length below 1 or an empty header name raises ValueError."""
    with pytest.raises(ValueError, match="max_length"):
        Tidings(max_length=0)
    with pytest.raises(ValueError, match="non-empty"):
        Tidings(fallback_headers=("",))


def test_the_tenant_resolver_and_init_app():
    """A tenant resolver gets the request; init_app works for an application factory."""
    app = Flask(__name__)
    extension = Tidings(tenant=lambda request: request.headers.get("X-Tenant"))
    extension.init_app(app)
    app.add_url_rule("/", view_func=lambda: jsonify(seen()))
    http = app.test_client()
    assert app.extensions["tidings"] is extension
    assert http.get("/", headers={"X-Tenant": "acme"}).json["tenant_id"] == "acme"
    assert http.get("/").json["tenant_id"] is None


def test_an_unfit_tenant_from_the_resolver_binds_none(caplog):
    """A resolver's tenant with a CR/LF, or over 256 chars, binds no tenant and logs a warning."""
    tenants = iter(["evil\r\nforged", "t" * 257])
    app = make_app(tenant=lambda request: next(tenants))
    http = app.test_client()
    with caplog.at_level(logging.WARNING, "tidings.integrations.flask"):
        assert http.get("/").json["tenant_id"] is None
        assert http.get("/").json["tenant_id"] is None
    assert caplog.text.count("rejected the tenant id") == 2
    assert not any("\r" in record.getMessage() for record in caplog.records)


def test_async_views_see_the_context():
    """An async view, run by Flask through asgiref, sees the request's id."""
    pytest.importorskip("asgiref")
    response = make_app().test_client().get("/async", headers={"X-Correlation-ID": "a-1"})
    assert response.json["correlation_id"] == "a-1"


@pytest.mark.parametrize("path", ["/stream", "/plain-stream"])
def test_streamed_bodies_see_the_context(path):
    """Streamed bodies, with or without stream_with_context, see the id at every step."""
    response = make_app().test_client().get(path, headers={"X-Correlation-ID": "s-1"})
    assert response.headers["X-Correlation-ID"] == "s-1"
    lines = response.get_data(as_text=True).splitlines()
    assert lines
    assert set(lines) == {"s-1"}


def test_the_context_does_not_leak_between_requests():
    """A request without an id never sees the previous request's id, and nothing stays bound."""
    http = make_app().test_client()
    assert http.get("/", headers={"X-Correlation-ID": "first"}).json["correlation_id"] == "first"
    assert current_context().correlation_id is None
    assert http.get("/").json["correlation_id"] not in (None, "first")


def test_concurrent_requests_in_threads_keep_their_own_ids():
    """Requests held together in the view by a barrier each see and get back their own id."""
    app = make_app()

    def call(n: int):
        return app.test_client().get("/together", headers={"X-Correlation-ID": f"req-{n}"})

    with ThreadPoolExecutor(THREADS) as pool:
        responses = list(pool.map(call, range(THREADS)))
    for n, response in enumerate(responses):
        assert response.headers["X-Correlation-ID"] == f"req-{n}"
        assert response.json["correlation_id"] == f"req-{n}"
