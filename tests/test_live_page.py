"""The live page in a real browser: the demo under load on PostgreSQL, served by uvicorn, read by
Debian's headless Chromium through Selenium and Debian's chromedriver (scripts/setup.sh installs
both).

The demo runs with ``POOLWATCH_UI=token``, so the same process shows both that the page and its JSON
refuse a caller without the token and that a browser given ``?token=`` once keeps working.

The run saves the screenshot that README and the documentation show, ``docs/live-page.png``, every
time (``POOLWATCH_LIVE_PAGE_SCREENSHOT`` names another file, relative to the checkout, or ``off``).
"""

from __future__ import annotations

import inspect
import os
import secrets
import shutil
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from demo_app import misbehave
from tests.live_page_app import SCRIPT_ROUTE
from tests.ports import free_port
from tests.test_operator_e2e import _database, _process, _wait_until_ok

ROOT = Path(__file__).resolve().parent.parent
LEAK_THRESHOLD_SECONDS = 2
WAIT = 30  # seconds the browser may take to show something; a deadline, not a measurement


@dataclass
class Demo:
    base: str
    token: str
    logs: Path

    def log_tail(self) -> str:
        path = self.logs / "demo.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-40:]) if path.exists() else ""


def _require(name: str) -> str:
    for candidate in (shutil.which(name), f"/usr/bin/{name}"):
        if candidate and os.path.exists(candidate):
            return candidate
    pytest.fail(
        f"{name} is not installed: the live page is tested in Debian's Chromium. "
        "Install the `chromium` and `chromium-driver` packages (scripts/setup.sh test does) and run again."
    )


@pytest.fixture(scope="module")
def demo(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    work = tmp_path_factory.mktemp("live-page")
    port = free_port()
    token = secrets.token_urlsafe(16)
    env = {
        **os.environ,
        "DEMO_MISBEHAVE": "true",
        "POOLWATCH_LEAK_THRESHOLD_SECONDS": str(LEAK_THRESHOLD_SECONDS),
        "POOLWATCH_SLOW_QUERY_SECONDS": "0.5",
        "POOLWATCH_UI": "token",
        "POOLWATCH_UI_TOKEN": token,
        "PYTHONUNBUFFERED": "1",
    }
    base = f"http://127.0.0.1:{port}"
    app_args = [sys.executable, "-m", "uvicorn", "tests.live_page_app:app"]
    app_args += ["--host", "127.0.0.1", "--port", str(port), "--no-access-log"]
    # No deliberate misbehaviour from the load: the tests leak on purpose themselves, and the
    # demo allows only two deliberate holds at once.
    load_args = [sys.executable, "-m", "demo_app.load", "--url", base, "--quiet", "--duration", "600"]
    load_args += ["--concurrency", "4", "--seed", "11", "--misbehave-ratio", "0"]
    with _database(postgres_url) as database_url:
        env["DATABASE_URL"] = database_url
        with _process(app_args, work / "demo.log", env) as app:
            _wait_until_ok(f"{base}/health/live", app, work / "demo.log", "the demo app")
            with _process(load_args, work / "load.log", env):
                yield Demo(base, token, work)
            assert app.poll() is None, f"the demo app died:\n{(work / 'demo.log').read_text()}"


@pytest.fixture(scope="module")
def browser(demo: Demo) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = _require("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1500"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(_require("chromedriver")))
    try:
        driver.get(f"{demo.base}/poolwatch?token={demo.token}")
        yield driver
    finally:
        driver.quit()


def _updates(driver: WebDriver) -> int:
    value = driver.execute_script("return document.body.dataset.updates || '0'")
    return int(value)


def _wait_for(driver: WebDriver, what: str, condition: Any, demo: Demo) -> Any:
    try:
        return WebDriverWait(driver, WAIT, poll_frequency=0.2).until(lambda d: condition(d))
    except Exception:
        status = driver.find_element(By.ID, "status").text
        rows = _connection_rows(driver)
        pytest.fail(f"the page never showed {what} (status: {status!r}, rows: {rows})\n{demo.log_tail()}")


def _connection_rows(driver: WebDriver) -> list[dict[str, str]]:
    """The rows of the connections tables, read in one script call: the page rebuilds its DOM every
    second, so elements looked up one by one could be replaced in between."""
    rows: list[dict[str, str]] = driver.execute_script(
        """
        return Array.from(document.querySelectorAll("tr.conn")).map((row) => {
          const cell = (name) => row.querySelector("td." + name).textContent;
          return {method: cell("method"), route: cell("route"), site: cell("site"),
                  function: cell("function"), leak: cell("leak"), class: row.className,
                  route_children: String(row.querySelector("td.route").children.length)};
        });
        """
    )
    return rows


def _severe_console_messages(driver: webdriver.Chrome) -> list[dict[str, Any]]:
    return [entry for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]


# -- the token ---------------------------------------------------------------------------------


def test_without_the_token_page_and_json_answer_401(demo: Demo) -> None:
    for path in ("/poolwatch", "/poolwatch/state"):
        assert httpx.get(demo.base + path).status_code == 401, path
        assert httpx.get(demo.base + path, params={"token": "wrong"}).status_code == 401, path
        wrong = {"Authorization": "Bearer wrong"}
        assert httpx.get(demo.base + path, headers=wrong).status_code == 401, path
        assert httpx.get(demo.base + path, cookies={"poolwatch_token": "wrong"}).status_code == 401
    right = {"Authorization": f"Bearer {demo.token}"}
    answer = httpx.get(demo.base + "/poolwatch/state", headers=right)
    assert answer.status_code == 200
    assert answer.json()["format"] == 1
    assert demo.token not in answer.text


def test_the_state_json_holds_no_dsn_or_literal(demo: Demo) -> None:
    # The load writes users with e-mail addresses, and a DSN's credentials sit before an "@": the
    # JSON has neither, whatever the load is doing.
    answer = httpx.get(demo.base + "/poolwatch/state", headers={"Authorization": f"Bearer {demo.token}"})
    assert answer.status_code == 200
    assert "@" not in answer.text
    assert "postgres" not in answer.text.replace('"postgresql"', "")


# -- in the browser ----------------------------------------------------------------------------


def test_page_loads_without_console_errors_and_the_numbers_move(
    demo: Demo, browser: webdriver.Chrome
) -> None:
    _wait_for(browser, "a first update", lambda d: _updates(d) >= 1, demo)
    # The token given in the address went into a cookie and out of the address bar.
    assert "token" not in browser.current_url

    def checkouts(driver: WebDriver) -> str:
        script = (
            "return Array.from(document.querySelectorAll('section.pool .stats .v'), (v) => v.textContent)"
        )
        return " ".join(driver.execute_script(script))

    first = checkouts(browser)
    assert first, "no pool card on the page"
    _wait_for(browser, "numbers that change under load", lambda d: checkouts(d) not in ("", first), demo)
    assert _severe_console_messages(browser) == []


def test_a_leaked_connection_appears_with_its_route_and_site(demo: Demo, browser: webdriver.Chrome) -> None:
    screenshot = os.environ.get("POOLWATCH_LIVE_PAGE_SCREENSHOT", "docs/live-page.png")
    if screenshot == "off":
        screenshot = ""
    if screenshot:
        # A picture worth keeping shows the sizing hint, which needs 10 s of watching.
        verdict = "return Array.from(document.querySelectorAll('.sizing'), (e) => e.className).join()"
        _wait_for(browser, "a sizing verdict", lambda d: "unknown" not in d.execute_script(verdict), demo)
    answer = httpx.post(f"{demo.base}/misbehave/leak", params={"seconds": 25})
    assert answer.status_code == 202, answer.text
    _, first_line = inspect.getsourcelines(misbehave._hold_in_background)
    source = inspect.getsource(misbehave._hold_in_background).splitlines()
    offset = next(i for i, line in enumerate(source) if "engine.connect()" in line)
    # Relative to the demo's working directory, the repository (its root as poolwatch sees it).
    expected_site = f"{Path(misbehave.__file__).resolve().relative_to(ROOT)}:{first_line + offset}"

    def leaked_row(driver: WebDriver) -> dict[str, str] | None:
        for row in _connection_rows(driver):
            if row["route"] == "/misbehave/leak" and "leaked" in row["class"]:
                return row
        return None

    row = _wait_for(browser, "the leaked connection flagged in the table", leaked_row, demo)
    assert row["method"] == "POST"
    assert row["site"] == expected_site
    assert row["function"] == "_hold_in_background"
    assert row["leak"] == "LEAK"
    if screenshot:
        browser.save_screenshot(str(ROOT / screenshot))
    assert _severe_console_messages(browser) == []


def test_a_route_template_with_markup_renders_as_text(demo: Demo, browser: webdriver.Chrome) -> None:
    path = "/odd/%3Cscript%3Ewindow.__poolwatch_xss=1%3C/script%3E/7"
    answers: list[httpx.Response] = []
    holder = threading.Thread(
        target=lambda: answers.append(httpx.get(demo.base + path, params={"seconds": 8}, timeout=30)),
        daemon=True,
    )
    holder.start()
    try:

        def markup_row(driver: WebDriver) -> dict[str, str] | None:
            return next((r for r in _connection_rows(driver) if r["route"] == SCRIPT_ROUTE), None)

        row = _wait_for(browser, "the route with markup in its template", markup_row, demo)
        assert row["method"] == "GET"
        assert row["route_children"] == "0"  # a text node, no element made from the markup
        # Shown as the very characters of the template, and nothing ran or was parsed from it.
        assert browser.find_elements(By.CSS_SELECTOR, "#main td script") == []
        assert browser.execute_script("return window.__poolwatch_xss") is None
        assert _severe_console_messages(browser) == []
    finally:
        holder.join(timeout=30)
    assert [answer.status_code for answer in answers] == [200]
