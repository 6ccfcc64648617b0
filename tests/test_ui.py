"""The ops page (tidings.ui) over the stores a real run filled, through Starlette's TestClient."""

import html
import re
import warnings
from collections.abc import Iterator
from dataclasses import replace
from urllib.parse import quote

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from tests.apps import ui_shop
from tests.ui_run import Scene, shop_run

from tidings.cli import make_cli
from tidings.deadletter.redis import RedisDeadLetterStore
from tidings.testing.workers import wait_until
from tidings.ui import OpsConfig, create_app

with warnings.catch_warnings():
    # Starlette >= 1.x prefers its httpx2 fork for the TestClient (see test_asgi_middleware).
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", "redis"])
def scene(request, unique_name, tmp_path, redis_url) -> Iterator[Scene]:
    with shop_run(request.param, unique_name, tmp_path) as made:
        yield made


LOCAL = "http://127.0.0.1"
"""The address the page's tests reach it at (a host it serves)."""


def client_for(scene: Scene, *, allow_replay: bool = False, csrf: str = "") -> TestClient:
    engine = sa.create_engine(scene.outbox_url)
    config = OpsConfig(
        audit=scene.audit,
        dead_letters=scene.letters,
        outbox_engine=engine,
        replayer=scene.bus.transport,  # type: ignore[arg-type]
        allow_replay=allow_replay,
        **({"csrf_token": csrf} if csrf else {}),
    )
    return TestClient(create_app(config), base_url=LOCAL)


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, "the confirmation form carries a CSRF token"
    return match.group(1)


def form_of(page: str) -> dict[str, str]:
    """The hidden fields of a confirmation page's form, as a browser would POST them."""
    fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', page))
    assert "csrf" in fields, "the confirmation form carries a CSRF token"
    return {name: html.unescape(value) for name, value in fields.items()}


def test_a_search_by_correlation_id_lands_on_the_trace_drawn_as_a_causal_timeline(scene):
    """The run's correlation id leads to its trace: an SVG with each event, run and dead letter."""
    web = client_for(scene)
    page = web.get("/", params={"q": scene.order.correlation_id})
    assert page.status_code == 200
    assert page.url.path == "/trace"
    html = page.text
    svg = html[html.index("<svg") : html.index("</svg>")]
    assert svg.count('class="row event"') == 2  # the order and the payment it caused
    labels = ("billing.charge handled (attempt 2)", "mail.confirm dead_lettered",
              "ledger.record handled (attempt 1)", ui_shop.PaymentTaken.event_type)  # fmt: skip
    for label in labels:
        assert label in svg
    assert "marker-end" in svg  # the causal arrow from the order to its payment
    assert re.search(r"\d+\.\d ms", svg)
    assert scene.order.event_id in html


def test_a_search_by_event_id_or_tenant_lists_the_request(scene):
    """An event id or the tenant finds the run's request, linked to its trace."""
    web = client_for(scene)
    trace_link = f"/trace?id={quote(scene.order.correlation_id)}"
    page = web.get("/", params={"q": scene.order.event_id, "by": "event"})
    assert trace_link in page.text.replace("&amp;", "&")
    page = web.get("/", params={"q": "acme", "by": "tenant"})
    assert trace_link in page.text
    assert "7" in page.text
    missing = web.get("/", params={"q": "no-such-request"})
    assert missing.status_code == 200
    assert "Nothing in the audit trail" in missing.text
    assert web.get("/trace", params={"id": "no-such-request"}).status_code == 404


def test_text_from_messages_is_escaped_on_every_page(scene):
    """The handlers' markup in errors and ids is shown escaped, never as HTML."""
    web = client_for(scene)
    (letter,) = scene.letters.list()
    for path in (f"/trace?id={quote(scene.order.correlation_id)}", "/letters",
                 f"/letters/{letter.id}"):  # fmt: skip
        html = web.get(path).text
        assert "<script>" not in html
        assert "<b>" not in html
    trace = web.get("/trace", params={"id": scene.order.correlation_id}).text
    assert "&lt;b&gt;o-1&lt;/b&gt;" in trace
    shown = web.get(f"/letters/{letter.id}").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in shown
    page = web.get("/", params={"q": "<img src=x onerror=alert(1)>"})
    assert "<img" not in page.text
    assert "script-src" not in page.headers["content-security-policy"]  # no script may run


def test_the_outbox_page_shows_lag_per_partition_and_quarantined_rows(scene):
    """Pending rows per partition key with their age, and the quarantined row with its reason."""
    html = client_for(scene).get("/outbox").text
    partitions = html[html.index('id="partitions"') :]
    assert re.search(r"k-a</td><td class=\"num\">2</td>", partitions)
    assert re.search(r"k-b</td><td class=\"num\">1</td>", partitions)
    assert 'id="pending">3<' in html
    assert 'id="quarantined">1<' in html
    assert "poison-1" in html


def test_dead_letters_are_listed_by_filter_and_shown_in_full(scene):
    """Handler, event type and since filters pick the letter; its page shows body and reason."""
    web = client_for(scene)
    (letter,) = scene.letters.list()
    assert letter.id in web.get("/letters", params={"handler": "mail.confirm"}).text
    assert letter.id in web.get("/letters", params={"since": "1h"}).text
    event_type = ui_shop.OrderPlaced.event_type
    assert letter.id in web.get("/letters", params={"event_type": event_type}).text
    assert letter.id not in web.get("/letters", params={"handler": "billing.charge"}).text
    for since in ("last tuesday", "999999d", "9" * 5000 + "d"):
        assert web.get("/letters", params={"since": since}).status_code == 400
    shown = web.get(f"/letters/{letter.id}").text
    assert "MailDown" in shown
    assert "o-1" in shown  # the body, as UTF-8 text
    (link,) = re.findall(r'id="event-trace" href="([^"]+)"', shown)
    found = web.get(link.replace("&amp;", "&"))
    assert found.status_code == 200
    assert scene.order.correlation_id in found.text  # the letter's event leads to its request
    assert web.get("/letters/no-such-letter").status_code == 404


def test_a_read_only_page_refuses_replay_and_purge_with_403(scene):
    """Without allow_replay, the POSTs are 403 even with the right token; the letter stays."""
    web = client_for(scene, csrf="the-right-token")
    (letter,) = scene.letters.list()
    confirm = web.get("/letters/confirm", params={"action": "replay", "id": letter.id}).text
    assert "read-only" in confirm
    assert 'method="post"' not in confirm
    for action in ("replay", "purge"):
        form = {"id": letter.id, "confirm": "yes", "csrf": "the-right-token"}
        assert web.post(f"/letters/{action}", data=form).status_code == 403
    assert scene.letters.count() == 1


def test_replay_after_confirmation_sends_the_letter_back_and_it_is_handled(scene):
    """With allow_replay and the form's token, the repaired handler gets the letter and runs."""
    web = client_for(scene, allow_replay=True)
    (letter,) = scene.letters.list()
    form = {"id": letter.id, "confirm": "yes", "csrf": "not-the-token"}
    assert web.post("/letters/replay", data=form).status_code == 403
    confirm = web.get("/letters/confirm", params={"action": "replay", "id": letter.id}).text
    form = form_of(confirm)
    scene.client.delete(f"{scene.prefix}:broken")
    done = web.post("/letters/replay", data=form)
    assert done.status_code == 200
    assert "replayed to" in done.text
    wait_until(
        lambda: scene.client.lrange(f"{scene.prefix}:mailed", 0, -1) == [b"o-1"],
        timeout=30,
        what="the replayed letter to be handled",
    )
    assert scene.letters.count() == 0


def test_purge_by_filter_after_confirmation_deletes_only_the_matching_letters(scene):
    """A purge of the filter's letters removes them and keeps a letter that does not match."""
    web = client_for(scene, allow_replay=True)
    kept = RedisDeadLetterStore(scene.client, prefix=f"{scene.prefix}:dlq")
    (letter,) = scene.letters.list()
    confirm = web.get("/letters/confirm", params={"action": "purge", "handler": "nobody"}).text
    assert "nothing to purge" in confirm
    confirm = web.get("/letters/confirm", params={"action": "purge", "handler": "mail.confirm"})
    assert letter.id in confirm.text
    form = form_of(confirm.text)
    assert web.post("/letters/purge", data={**form, "confirm": ""}).status_code == 400
    done = web.post("/letters/purge", data=form)
    assert "purged" in done.text
    assert kept.count() == 0


def test_a_page_addressed_to_another_host_or_posted_from_another_site_is_refused(scene):
    """A rebound name (Host) gets 400 and a cross-site POST (Origin) 403; the letter stays."""
    web = client_for(scene, allow_replay=True)
    (letter,) = scene.letters.list()
    assert web.get("/letters", headers={"host": "attacker.example"}).status_code == 400
    form = form_of(web.get("/letters/confirm", params={"action": "purge", "id": letter.id}).text)
    posted = web.post("/letters/purge", data=form, headers={"origin": "http://attacker.example"})
    assert posted.status_code == 403
    assert scene.letters.get(letter.id) is not None
    same_site = web.post("/letters/purge", data=form, headers={"origin": "http://127.0.0.1:8050"})
    assert same_site.status_code == 200
    assert scene.letters.get(letter.id) is None


def test_a_purge_acts_only_on_the_letters_its_confirmation_showed(scene):
    """A letter dead-lettered after the confirmation is kept; a changed match is refused."""
    web = client_for(scene, allow_replay=True)
    (letter,) = scene.letters.list()
    page = web.get("/letters/confirm", params={"action": "purge", "since": "1h"}).text
    form = form_of(page)
    assert form["count"] == "1"
    assert form["since"] != "1h", "the age is fixed when the page is shown"
    later = replace(letter, id="came-later", failed_at="2999-01-01T00:00:00+00:00")
    scene.letters.add(later)
    done = web.post("/letters/purge", data=form)
    assert done.status_code == 200, done.text
    assert scene.letters.get(letter.id) is None
    assert scene.letters.get("came-later") is not None
    page = web.get("/letters/confirm", params={"action": "purge", "id": "came-later"}).text
    form = form_of(page)
    scene.letters.remove("came-later")
    assert web.post("/letters/purge", data=form).status_code == 409


def test_the_counters_page_totals_the_stores_and_refreshes_itself(scene):
    """Dead letters, pending and quarantined outbox rows are counted; the page reloads."""
    html = client_for(scene).get("/counters").text
    assert '<meta http-equiv="refresh" content="5">' in html
    for name, value in (("dead letters", "1"), ("outbox pending", "3"),
                        ("outbox quarantined", "1")):  # fmt: skip
        assert re.search(rf"<div>{name}</div><div class=\"value\">{value}</div>", html)


def test_a_failing_store_is_a_page_without_its_password(unique_name):
    """An unreachable store gives an error page naming the failure, its password hidden."""
    url = "redis://:s3cret-pw@127.0.0.1:1/0"
    store = RedisDeadLetterStore.from_url(url, prefix=unique_name)
    web = TestClient(create_app(OpsConfig(dead_letters=store, redact=(url,))), base_url=LOCAL)
    page = web.get("/letters")
    assert page.status_code == 500
    assert "ConnectionError" in page.text
    assert "s3cret-pw" not in page.text
    store.close()


def test_pages_without_their_store_say_which_option_gives_it():
    """Each page names the option that configures what it shows."""
    web = TestClient(create_app(OpsConfig()), base_url=LOCAL)
    assert "--audit" in web.get("/", params={"q": "x"}).text
    assert "--db" in web.get("/outbox").text
    assert "--store" in web.get("/letters").text


def test_the_command_needs_something_to_show_and_defaults_to_localhost():
    """`tidings ui` without a store is a usage error; its help says it binds 127.0.0.1."""
    runner = CliRunner()
    result = runner.invoke(make_cli(), ["ui"], env={"TIDINGS_DLQ_URL": "", "TIDINGS_AUDIT_URL": ""})
    assert result.exit_code == 2
    assert "nothing to show" in result.output
    help_text = runner.invoke(make_cli(), ["ui", "--help"]).output
    assert "127.0.0.1" in help_text
    assert "--allow-replay" in help_text


def test_a_store_the_command_cannot_open_is_a_usage_error_without_its_password(tmp_path):
    """A missing SQLite file or an unknown dialect is refused in one line, password hidden."""
    runner = CliRunner()
    missing = runner.invoke(make_cli(), ["ui", "--audit", f"sqlite:///{tmp_path / 'no.db'}"])
    assert missing.exit_code == 2
    assert "--audit" in missing.output
    assert not (tmp_path / "no.db").exists()
    unknown = runner.invoke(make_cli(), ["ui", "--db", "nosuchdb://app:s3cret-pw@db/x"])
    assert unknown.exit_code == 2
    assert "s3cret-pw" not in unknown.output


def test_a_huge_trace_draws_at_most_max_rows_and_counts_the_rest():
    """Past MAX_ROWS rows the picture stops drawing, says how many it left out, and stays sane."""
    from tidings.audit import AuditRecord  # noqa: PLC0415
    from tidings.audit.tree import causal_tree  # noqa: PLC0415
    from tidings.ui.graph import MAX_ROWS, layout  # noqa: PLC0415

    records = [
        AuditRecord("handled", "e-1", event_type="t\x1b[2J", correlation_id="c", handler="h",
                    attempt=1, at=1000.0 + n / 1000, duration=0.0005)
        for n in range(MAX_ROWS + 50)
    ]  # fmt: skip
    picture = layout(causal_tree("c", records))
    assert len(picture.rows) == MAX_ROWS
    assert picture.hidden == 51  # the event's row is drawn first
    assert "\x1b" not in picture.rows[0].label
    assert all(picture.axis_x0 <= row.x <= picture.axis_x1 for row in picture.rows)
