"""The ops page in a real headless Chromium: `tidings ui` serving a real run, driven by selenium.

Debian's ``chromium`` and ``chromium-driver`` are installed by ``make test`` (its ``browser``
step, as root); without them the test skips, saying so, except under ``CI=true``, where it
fails. The trace page's screenshot is the test's artefact: saved in its tmp dir and in
``build/artefacts/ui-trace.png`` (kept after the run, ignored by git); with
``TIDINGS_UPDATE_SCREENSHOT=1`` also as ``docs/ui-trace.png``, the README's picture, which a
test run otherwise leaves as committed.
"""

import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
from tests.test_asgi_middleware import free_port
from tests.ui_run import shop_run

from tidings.testing.workers import running, wait_until

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
TIDINGS = str(Path(sys.executable).with_name("tidings"))
ROOT_DIR = Path(__file__).resolve().parent.parent
ARTEFACT = ROOT_DIR / "build" / "artefacts" / "ui-trace.png"
DOCS_SCREENSHOT = ROOT_DIR / "docs" / "ui-trace.png"
DEADLINE = 30.0


def _no_browser(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI runs the browser test: {reason} (make test installs it as root)")
    pytest.skip(reason)


@pytest.fixture
def browser():
    """A headless Chromium through chromedriver, quit after the test."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        _no_browser(f"no {CHROMIUM} or {CHROMEDRIVER}: apt-get install chromium chromium-driver")
    try:
        from selenium import webdriver  # noqa: PLC0415 - the dev extra
        from selenium.webdriver.chrome.service import Service  # noqa: PLC0415
    except ImportError:
        _no_browser("selenium is not installed (the dev extra)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1280,860"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(DEADLINE)
    # An element is looked for until it is there (a click's next page may still be loading,
    # on a loaded machine), up to the deadline.
    driver.implicitly_wait(DEADLINE)
    try:
        yield driver
    finally:
        driver.quit()


def _listening(port: int, process) -> bool:
    assert process.poll() is None, f"tidings ui exited with {process.returncode}"
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def test_the_ops_page_finds_a_real_runs_trace_and_replays_its_dead_letter(
    browser, unique_name, tmp_path, redis_url
):
    """In Chromium: pages render, a search finds the run's trace, and a replay is handled."""
    from selenium.webdriver.common.by import By  # noqa: PLC0415 - the dev extra

    with shop_run("sqlite", unique_name, tmp_path) as scene:
        port = free_port()
        command = [
            TIDINGS, "ui", "--audit", scene.audit_url, "--audit-name", f"a_{unique_name}",
            "--store", redis_url, "--name", f"{unique_name}:dlq", "--db", scene.outbox_url,
            "--app", "tests.apps.ui_shop:bus", "--allow-replay", "--port", str(port),
        ]  # fmt: skip
        with running(command, {"UI_SHOP_PREFIX": unique_name}) as server:
            wait_until(lambda: _listening(port, server), timeout=DEADLINE, what="tidings ui")
            base = f"http://127.0.0.1:{port}"

            browser.get(f"{base}/")
            assert "tidings ops" in browser.title
            box = browser.find_element(By.NAME, "q")
            box.send_keys(scene.order.correlation_id)
            box.submit()
            wait_until(lambda: "/trace" in browser.current_url, timeout=DEADLINE, what="trace")
            shown = browser.find_element(By.ID, "correlation-id").text
            assert shown == scene.order.correlation_id
            svg = browser.find_element(By.ID, "trace")
            assert len(svg.find_elements(By.CSS_SELECTOR, "g.event")) == 2
            assert len(svg.find_elements(By.CSS_SELECTOR, "g.dead_lettered")) == 1
            assert "mail.confirm dead_lettered" in svg.text
            height = browser.execute_script("return document.body.scrollHeight")
            browser.set_window_size(1280, min(max(int(height) + 40, 600), 1400))
            picture = tmp_path / "ui-trace.png"
            assert browser.save_screenshot(str(picture))
            assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            ARTEFACT.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(picture, ARTEFACT)
            if os.environ.get("TIDINGS_UPDATE_SCREENSHOT"):
                shutil.copyfile(picture, DOCS_SCREENSHOT)

            browser.get(f"{base}/outbox")
            assert browser.find_element(By.ID, "pending").text == "3"
            assert "poison-1" in browser.find_element(By.ID, "quarantine").text
            browser.get(f"{base}/counters")
            assert "dead letters" in browser.find_element(By.ID, "counters").text

            browser.get(f"{base}/letters?handler=mail.confirm")
            (letter,) = scene.letters.list()
            browser.find_element(By.LINK_TEXT, letter.id).click()
            assert browser.find_element(By.ID, "letter-id").text == letter.id
            browser.find_element(By.ID, "replay").click()
            scene.client.delete(f"{unique_name}:broken")  # repaired before the replay
            browser.find_element(By.ID, "confirm-button").click()
            outcome = browser.find_element(By.ID, "outcomes").text  # the replay's page
            assert "replayed to" in outcome, outcome
            wait_until(
                lambda: scene.client.lrange(f"{unique_name}:mailed", 0, -1) == [b"o-1"],
                timeout=DEADLINE,
                what="the replayed letter to be handled",
            )
            assert scene.letters.count() == 0
