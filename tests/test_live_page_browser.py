"""The live page in Debian's headless Chromium, against an app under a real uvicorn on PostgreSQL:
a base64 token typed into the address bar as it is, structured event fields and code sites shown
readably. (tests/test_live_page.py drives the demo under load.)"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

import poolwatch
from poolwatch._record.events import ThreadpoolStarvation, emit
from tests.fault_fixtures import Served
from tests.test_live_page import _require

# As `openssl rand -base64 18` makes them: '+', '/' and '='; and one without.
BASE64_TOKEN = "Yf+3kQ/zP0a+Lm7/Q1w2Eg=="
PLAIN_TOKEN = "s3cret-token"
WAIT = 30  # seconds the browser may take to show something; a deadline, not a measurement


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = _require("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1200"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(_require("chromedriver")))
    try:
        yield driver
    finally:
        driver.quit()


def _page(driver: webdriver.Chrome) -> dict[str, Any]:
    """What the page shows, read in one script call (it rebuilds its DOM every second)."""
    shown: dict[str, Any] = driver.execute_script(
        """
        return {
          updates: Number(document.body.dataset.updates || 0),
          status: (document.getElementById("status") || document.body).textContent,
          events: Array.from(document.querySelectorAll("tr.event td.fp"), (cell) => cell.textContent),
          sites: Array.from(document.querySelectorAll("tr.conn td.site"))
            .filter((cell) => cell.className === "site").map((cell) => cell.textContent),
          text: document.body.innerText,
        };
        """
    )
    return shown


@pytest.mark.parametrize("token", [BASE64_TOKEN, PLAIN_TOKEN], ids=["base64", "plain"])
def test_a_typed_token_opens_the_page_and_fields_and_sites_read_plainly(
    sync_url: str, registry: CollectorRegistry, browser: webdriver.Chrome, token: str
) -> None:
    engine = sa.create_engine(sync_url, pool_size=2)
    app = FastAPI()
    poolwatch.instrument(app, engine, registry=registry, name="web", ui="token", ui_token=token)
    starvation = ThreadpoolStarvation(
        pool="web", threads_busy=40, threads_waiting=3, threads_capacity=40.0, callers_waiting=5,
        checked_out=2, seconds_without_checkin=12.0, routes={"/orders/{order_id}": 2, "/users": 1},
    )  # fmt: skip
    try:
        with Served(app) as server:
            emit(starvation)
            held = engine.connect()
            line = sys._getframe().f_lineno - 1
            try:
                # Typed as it is: '+', '/' and '=' unescaped in the address.
                browser.get(f"{server.url}/poolwatch?token={token}")
                try:
                    WebDriverWait(browser, WAIT, poll_frequency=0.2).until(
                        lambda d: _page(d)["updates"] >= 1 and _page(d)["sites"]
                    )
                except Exception:
                    pytest.fail(f"the page never updated: {_page(browser)['status']!r}")
                shown = _page(browser)
            finally:
                held.close()
    finally:
        engine.dispose()
    assert "token" not in browser.current_url
    assert "[object Object]" not in shown["text"]
    assert any("routes=(/orders/{order_id}: 2, /users: 1)" in event for event in shown["events"]), shown[
        "events"
    ]
    # Relative to the application's root: the working directory the suite runs from.
    assert shown["sites"] == [f"{Path(__file__).relative_to(Path.cwd())}:{line}"]
    assert [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"] == []
