"""The live page's serving, its JSON and its sizing hint, in process on real PostgreSQL.

The browser side (the page's script, escaping, console errors) is tests/test_live_page.py.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from starlette.responses import PlainTextResponse

import poolwatch
from poolwatch._record.events import RECENT_EVENTS_KEPT, GcReclaimed, LeakDetected, emit, recent
from poolwatch._serve.sizing import Window, advise
from poolwatch._serve.state import StateBuilder, quantile
from tests.metrics import scrape

TOKEN = "s3cret-token"


@pytest.fixture
def engine(sync_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(sync_url, pool_size=2, max_overflow=1)
    yield engine
    engine.dispose()


def _app(engine: sa.Engine, registry: CollectorRegistry, **settings: Any) -> FastAPI:
    app = FastAPI()

    @app.get("/items/{item_id}")
    def item(item_id: int) -> dict[str, int]:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
            connection.execute(sa.text("SELECT 2"))
        return {"item": item_id}

    poolwatch.instrument(app, engine, registry=registry, name="main", **settings)
    return app


def _build(recorders: list[tuple[str, Any]]) -> dict[str, Any]:
    answer: dict[str, Any] = json.loads(StateBuilder().build(recorders, None))
    return answer


def _rows(pool: dict[str, Any]) -> list[dict[str, Any]]:
    return [dict(zip(pool["connection_fields"], values, strict=True)) for values in pool["connections"]]


# -- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"ui": "sometimes"}, "invalid setting ui (POOLWATCH_UI)"),
        ({"ui": "token"}, "invalid setting ui_token (POOLWATCH_UI_TOKEN): a non-empty token is required"),
        ({"ui": "token", "ui_token": " "}, "invalid setting ui_token (POOLWATCH_UI_TOKEN)"),
        ({"ui_path": "/"}, "invalid setting ui_path (POOLWATCH_UI_PATH)"),
        ({"ui_path": "poolwatch"}, "invalid setting ui_path (POOLWATCH_UI_PATH)"),
        ({"ui_path": "/pool watch"}, "invalid setting ui_path (POOLWATCH_UI_PATH)"),
    ],
)
def test_bad_ui_settings_fail_naming_the_setting(
    engine: sa.Engine, registry: CollectorRegistry, settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        poolwatch.watch(engine, registry=registry, **settings)


def test_the_ui_token_falls_back_to_the_health_token(engine: sa.Engine, registry: CollectorRegistry) -> None:
    app = _app(engine, registry, ui="token", health_token=TOKEN)
    with TestClient(app) as client:
        assert client.get("/poolwatch/state").status_code == 401
        answer = client.get("/poolwatch/state", headers={"Authorization": f"Bearer {TOKEN}"})
        assert answer.status_code == 200


def test_a_trailing_slash_in_ui_path_is_dropped(engine: sa.Engine, registry: CollectorRegistry) -> None:
    app = _app(engine, registry, ui="always", ui_path="/ops/pool/")
    with TestClient(app) as client:
        assert client.get("/ops/pool").status_code == 200
        assert client.get("/ops/pool/state").json()["format"] == 1


# -- who is served -----------------------------------------------------------------------------


def test_off_by_default_the_paths_reach_the_application(
    engine: sa.Engine, registry: CollectorRegistry
) -> None:
    with TestClient(_app(engine, registry)) as client:
        assert client.get("/poolwatch").status_code == 404
        assert client.get("/poolwatch/state").status_code == 404


def test_the_applications_own_route_wins(engine: sa.Engine, registry: CollectorRegistry) -> None:
    app = _app(engine, registry, ui="always")

    @app.get("/poolwatch", response_class=PlainTextResponse)
    def own_page() -> str:
        return "the application's own"

    with TestClient(app) as client:
        assert client.get("/poolwatch").text == "the application's own"
        # Only the path the application took: the JSON beside it is still poolwatch's.
        assert client.get("/poolwatch/state").json()["format"] == 1


def test_the_page_is_self_contained_and_its_script_allowed_by_hash(
    engine: sa.Engine, registry: CollectorRegistry
) -> None:
    with TestClient(_app(engine, registry, ui="always")) as client:
        answer = client.get("/poolwatch")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "text/html; charset=utf-8"
    html = answer.text
    # Nothing from elsewhere: no URL with a scheme or a host in the page at all.
    assert not re.search(r"(src|href)=\"(https?:)?//", html)
    assert "innerHTML" not in html and "insertAdjacentHTML" not in html and "document.write" not in html
    scripts = re.findall(r"<script>(.*?)</script>", html, re.S)
    assert len(scripts) == 1
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    csp = answer.headers["content-security-policy"]
    assert f"script-src 'sha256-{digest}'" in csp
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert answer.headers["referrer-policy"] == "no-referrer"


def test_in_sidecar_mode_the_page_stays_on_the_applications_port(
    engine: sa.Engine, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POOLWATCH_METRICS_HOST", "127.0.0.1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    app = FastAPI()
    watch = poolwatch.instrument(app, engine, registry=registry, name="main", metrics_port=port, ui="always")
    try:
        with TestClient(app) as client:
            assert client.get("/metrics").status_code == 404  # moved to the metrics port
            assert client.get("/poolwatch/state").json()["pools"][0]["name"] == "main"
    finally:
        watch.close()


def test_mounted_under_a_root_path(engine: sa.Engine, registry: CollectorRegistry) -> None:
    app = _app(engine, registry, ui="token", ui_token=TOKEN)
    with TestClient(app, root_path="/api") as client:
        answer = client.get("/api/poolwatch", params={"token": TOKEN})
        assert answer.status_code == 200
        cookie = answer.headers["set-cookie"]
        assert "Path=/api/poolwatch;" in cookie
        # The browser sends it back for the JSON beside the page.
        assert client.get("/api/poolwatch/state").status_code == 200


# -- the token ---------------------------------------------------------------------------------


def test_each_token_form_opens_the_page_and_a_wrong_one_does_not(
    engine: sa.Engine, registry: CollectorRegistry
) -> None:
    app = _app(engine, registry, ui="token", ui_token=TOKEN, health_token="another-one")
    with TestClient(app) as client:
        for path in ("/poolwatch", "/poolwatch/state"):
            client.cookies.clear()  # the page given ?token= below sets one
            refused = client.get(path)
            assert refused.status_code == 401
            assert refused.headers["www-authenticate"].startswith("Bearer")
            assert TOKEN not in refused.text
            for wrong in ("another-one", TOKEN + "x", TOKEN[:-1], ""):
                assert client.get(path, headers={"Authorization": f"Bearer {wrong}"}).status_code == 401
                assert client.get(path, params={"token": wrong}).status_code == 401
            assert client.get(path, headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
            assert client.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
            assert client.get(path, params={"token": TOKEN}).status_code == 200
        client.cookies.clear()
        assert client.get("/poolwatch/state").status_code == 401
        opened = client.get("/poolwatch", params={"token": TOKEN})
        cookie = opened.headers["set-cookie"]
        assert cookie.startswith("poolwatch_token=")
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie
        assert client.get("/poolwatch/state").status_code == 200  # with the cookie alone


# A token as ``openssl rand -base64 18`` makes them: '+', '/' and '='.
BASE64_TOKEN = "Yf+3kQ/zP0a+Lm7/Q1w2Eg=="


def _page_app(engine: sa.Engine, registry: CollectorRegistry, token: str = BASE64_TOKEN) -> FastAPI:
    return _app(engine, registry, ui="token", ui_token=token)


def test_a_token_with_plus_slash_and_equals_is_taken_as_typed(
    engine: sa.Engine, registry: CollectorRegistry
) -> None:
    with TestClient(_page_app(engine, registry)) as client:

        def status(url: str, **kwargs: Any) -> int:
            client.cookies.clear()  # the token alone, never a cookie an earlier answer set
            answer = client.get(url, **kwargs)
            return int(answer.status_code)

        # As typed in the address bar: '+' is the token's own, not a space.
        typed = client.get(f"/poolwatch?token={BASE64_TOKEN}")
        assert typed.request.url.query == f"token={BASE64_TOKEN}".encode()  # sent unchanged
        assert typed.status_code == 200
        assert status(f"/poolwatch/state?token={BASE64_TOKEN}") == 200
        # Percent-escaped, as a copied link or a script may send it.
        assert status("/poolwatch/state?token=Yf%2B3kQ%2FzP0a%2BLm7%2FQ1w2Eg%3D%3D") == 200
        assert status("/poolwatch/state", params={"token": BASE64_TOKEN}) == 200
        # Among other parameters, and as the first non-empty one.
        assert status(f"/poolwatch/state?x=1&token=&token={BASE64_TOKEN}") == 200
        # An HTML form's encoding would read '+' as a space: that is another token.
        assert status(f"/poolwatch/state?token={BASE64_TOKEN.replace('+', '%20')}") == 401
        assert status(f"/poolwatch/state?token={BASE64_TOKEN.replace('+', ' ')}") == 401
        # The cookie the page sets carries the token whole: the JSON answers with it alone.
        client.cookies.clear()
        opened = client.get(f"/poolwatch?token={BASE64_TOKEN}")
        assert "poolwatch_token=Yf%2B3kQ%2FzP0a%2BLm7%2FQ1w2Eg%3D%3D;" in opened.headers["set-cookie"]
        assert client.get("/poolwatch/state").status_code == 200


def _near_misses(token: str) -> list[str]:
    flipped_last = token[:-1] + ("A" if token[-1] != "A" else "B")
    flipped_first = ("A" if token[0] != "A" else "B") + token[1:]
    return [
        token[:-1],  # a prefix
        token[: len(token) // 2],
        token + "x",  # the token and more
        flipped_last,  # the right length, one byte wrong
        flipped_first,
        token.upper(),
        "",  # empty
        " ",  # whitespace
        "\t",
        " " + token,  # the token with whitespace around it is another token in a query or cookie
        token + " ",
    ]


@pytest.mark.parametrize("token", [TOKEN, BASE64_TOKEN])
def test_near_misses_of_the_token_are_refused_in_every_form(
    engine: sa.Engine, registry: CollectorRegistry, token: str
) -> None:
    from urllib.parse import quote

    with TestClient(_page_app(engine, registry, token)) as client:
        for path in ("/poolwatch", "/poolwatch/state"):
            for wrong in _near_misses(token):
                assert wrong != token
                client.cookies.clear()
                assert client.get(f"{path}?token={quote(wrong, safe='')}").status_code == 401, repr(wrong)
                if (
                    wrong.strip() and wrong.strip() != token
                ):  # a header's surrounding blanks are not its value
                    bearer = client.get(path, headers={"Authorization": f"Bearer {wrong}"})
                    assert bearer.status_code == 401, repr(wrong)
                cookie = {"Cookie": f"poolwatch_token={quote(wrong, safe='')}"}
                assert client.get(path, headers=cookie).status_code == 401, repr(wrong)
            client.cookies.clear()
            assert client.get(path, headers={"Authorization": "Bearer"}).status_code == 401
            assert client.get(path, headers={"Authorization": "Bearer    "}).status_code == 401
            assert client.get(path, headers={"Authorization": token}).status_code == 401  # no scheme
            # The right one, in each form.
            assert client.get(path, headers={"Authorization": f"Bearer {token}"}).status_code == 200
            assert client.get(f"{path}?token={quote(token, safe='')}").status_code == 200
            cookie = {"Cookie": f"poolwatch_token={quote(token, safe='')}"}
            assert client.get(path, headers=cookie).status_code == 200


def test_the_token_is_compared_whole_in_constant_time(engine: sa.Engine, registry: CollectorRegistry) -> None:
    import hmac
    from unittest import mock

    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def recording(given: bytes, expected: bytes) -> bool:
        compared.append((given, expected))
        return real(given, expected)

    with TestClient(_page_app(engine, registry)) as client, mock.patch("hmac.compare_digest", recording):
        assert client.get("/poolwatch/state", params={"token": BASE64_TOKEN[:5]}).status_code == 401
        assert client.get("/poolwatch/state", params={"token": BASE64_TOKEN}).status_code == 200
    # Each given token against the whole expected one: never a prefix of either side.
    assert compared == [
        (BASE64_TOKEN[:5].encode(), BASE64_TOKEN.encode()),
        (BASE64_TOKEN.encode(), BASE64_TOKEN.encode()),
    ]


@pytest.mark.parametrize(
    ("base_url", "headers", "secure"),
    [
        ("http://testserver", {}, False),
        ("https://testserver", {}, True),
        ("http://testserver", {"X-Forwarded-Proto": "https"}, True),  # TLS ends at a proxy
        ("http://testserver", {"X-Forwarded-Proto": "https, http"}, True),
        ("http://testserver", {"Forwarded": 'for=1.2.3.4;proto="https";host=example.com'}, True),
        ("http://testserver", {"X-Forwarded-Proto": "http"}, False),
    ],
    ids=["http", "https", "x-forwarded-proto", "x-forwarded-proto chain", "forwarded", "proxy says http"],
)
def test_the_cookie_is_httponly_samesite_strict_and_secure_over_https(
    engine: sa.Engine, registry: CollectorRegistry, base_url: str, headers: dict[str, str], secure: bool
) -> None:
    with TestClient(_page_app(engine, registry, TOKEN), base_url=base_url) as client:
        opened = client.get(f"/poolwatch?token={TOKEN}", headers=headers)
        assert opened.status_code == 200
        attributes = [part.strip() for part in opened.headers["set-cookie"].split(";")]
        assert attributes[0].startswith("poolwatch_token=")
        assert "HttpOnly" in attributes
        assert "SameSite=Strict" in attributes
        assert "Path=/poolwatch" in attributes
        assert ("Secure" in attributes) is secure
        # Only ?token= sets it: a header or the cookie itself sets none.
        bearer = client.get("/poolwatch", headers={"Authorization": f"Bearer {TOKEN}", **headers})
        assert "set-cookie" not in bearer.headers


def test_the_401_page_says_how_to_give_the_token(engine: sa.Engine, registry: CollectorRegistry) -> None:
    with TestClient(_page_app(engine, registry)) as client:
        refused = client.get("/poolwatch")
        assert refused.status_code == 401
        assert "/poolwatch?token=<token>" in refused.text and "need no escaping" in refused.text
        assert BASE64_TOKEN not in refused.text


def test_the_page_answers_at_its_path_with_a_trailing_slash_too(
    engine: sa.Engine, registry: CollectorRegistry
) -> None:
    from poolwatch._serve.page import LivePage

    watch = poolwatch.watch(engine, registry=CollectorRegistry(), ui="always")
    try:
        page = LivePage(watch)
        assert set(page.endpoints()) == {"/poolwatch", "/poolwatch/", "/poolwatch/state"}
    finally:
        watch.close()


def test_a_trailing_slash_serves_the_page_unless_the_application_routes_it(
    engine: sa.Engine, registry: CollectorRegistry
) -> None:
    with TestClient(_page_app(engine, registry)) as client:
        opened = client.get(f"/poolwatch/?token={BASE64_TOKEN}")
        assert opened.status_code == 200 and "<title>poolwatch</title>" in opened.text
        assert "Path=/poolwatch;" in opened.headers["set-cookie"]  # covers /poolwatch/state
        assert client.get("/poolwatch/state").status_code == 200
        client.cookies.clear()
        assert client.get("/poolwatch/").status_code == 401
    owned = _app(engine, CollectorRegistry(), ui="always")

    @owned.get("/poolwatch/", response_class=PlainTextResponse)
    def own_page() -> str:
        return "the application's own"

    with TestClient(owned) as client:
        assert client.get("/poolwatch/").text == "the application's own"


def test_the_state_json_only_answers_get_and_head(engine: sa.Engine, registry: CollectorRegistry) -> None:
    with TestClient(_app(engine, registry, ui="always")) as client:
        assert client.post("/poolwatch/state").status_code == 405
        head = client.head("/poolwatch/state")
        assert head.status_code == 200 and head.content == b""


# -- what the JSON says --------------------------------------------------------------------------


def test_a_connection_out_shows_its_site_route_and_age(
    engine: sa.Engine, registry: CollectorRegistry
) -> None:
    app = _app(engine, registry, ui="always", leak_threshold_seconds=5)
    with TestClient(app) as client:
        for item in range(3):
            assert client.get(f"/items/{item}").status_code == 200
        held = engine.connect()
        line = sys._getframe().f_lineno - 1
        taken = time.monotonic()
        time.sleep(0.2)
        try:
            state = client.get("/poolwatch/state").json()
            read = time.monotonic()
        finally:
            held.close()
    (pool,) = state["pools"]
    assert pool["name"] == "main"
    assert pool["now"]["used"] == 1 and pool["now"]["max"] == 3
    assert pool["connections_out"] == 1
    assert pool["connection_fields"] == [
        "age_ms", "method", "route", "site", "function", "statements", "statement_ms", "leaked",
        "connection_age_ms", "uses", "idle_in_transaction_ms", "after_response_ms",
    ]  # fmt: skip
    (values,) = pool["connections"]
    row = dict(zip(pool["connection_fields"], values, strict=True))
    # Relative to the application's root (the working directory the suite runs from).
    assert row["site"] == f"{Path(__file__).relative_to(Path.cwd())}:{line}"
    assert row["function"] == "test_a_connection_out_shows_its_site_route_and_age"
    assert row["route"] == "<none>" and row["method"] == "<none>"
    # Held 0.2 s before the read, and no longer than the time between taking and reading it.
    assert row["leaked"] is False and isinstance(row["age_ms"], int)
    assert 200 <= row["age_ms"] <= (read - taken) * 1000 + 1
    # Counted by the statement timer while the connection is out: none ran on it yet.
    assert row["statements"] == 0 and row["statement_ms"] == 0
    series = pool["history"]
    assert len(series["seconds_ago"]) == len(series["used"]) == len(series["idle"]) == len(series["pending"])
    assert series["seconds_ago"][-1] == 0 and series["used"][-1] == 1
    by_time = {r["route"]: r for r in state["routes_by_connection_time"]}
    assert by_time["/items/{item_id}"]["checkouts"] == 3
    by_queries = {r["route"]: r for r in state["routes_by_queries"]}
    # The same statements poolwatch_request_queries counts (the reset on checkin among them).
    samples = scrape(registry)
    count = samples.value("poolwatch_request_queries_count", route="/items/{item_id}", method="GET")
    total = samples.value("poolwatch_request_queries_sum", route="/items/{item_id}", method="GET")
    assert count == 3 and total >= 6
    assert by_queries["/items/{item_id}"]["queries_per_request"] == round(total / count, 2)
    assert by_queries["/items/{item_id}"]["requests"] == 3


def test_statements_are_read_from_the_checkout_when_the_capture_side_keeps_them(
    engine: sa.Engine, registry: CollectorRegistry
) -> None:
    watch = poolwatch.watch(engine, registry=registry, name="main")
    recorder = watch.recorders[0]
    with engine.connect():
        ((record, entry),) = list(recorder.open_checkouts.items())
        # The trailing field the statement timer keeps: [statements, seconds in statements].
        recorder.open_checkouts[record] = (*entry[:7], [7, 0.25])  # type: ignore[assignment]
        try:
            (row,) = _rows(_build([("main", recorder)])["pools"][0])
        finally:
            recorder.open_checkouts[record] = entry
    assert row["statements"] == 7 and row["statement_ms"] == 250


def test_leaks_are_flagged_oldest_first(engine: sa.Engine, registry: CollectorRegistry) -> None:
    watch = poolwatch.watch(engine, registry=registry, name="main", leak_threshold_seconds=0.05)
    recorder = watch.recorders[0]
    first = engine.connect()
    try:
        time.sleep(0.1)  # the leak threshold is the behaviour here: a deadline, passed by far
        second = engine.connect()
        try:
            rows = _rows(_build([("main", recorder)])["pools"][0])
        finally:
            second.close()
    finally:
        first.close()
    assert [row["leaked"] for row in rows] == [True, False]
    assert rows[0]["age_ms"] > rows[1]["age_ms"]


def test_events_of_the_watched_pools_come_newest_first_without_stacks(
    engine: sa.Engine, registry: CollectorRegistry
) -> None:
    watch = poolwatch.watch(engine, registry=registry, name="main")
    emit(LeakDetected("main", "/a", 31.0, 30.0, "app.py:3", "handler", stack="SELECT 'secret'"))
    emit(GcReclaimed("other-pool", "/b", 1.0, "app.py:4", "lost"))
    emit(GcReclaimed("main", "/c", 2.0, "app.py:5", "lost"))
    events = _build(list(zip(watch.pool_names, watch.recorders, strict=True)))["events"]
    assert [(e["kind"], e["route"]) for e in events[:2]] == [("gc_reclaimed", "/c"), ("leak_detected", "/a")]
    assert all(e["pool"] == "main" for e in events)
    assert all("stack" not in e for e in events)
    assert events[1]["site"] == "app.py:3" and events[1]["function"] == "handler"


def test_recent_events_are_bounded() -> None:
    for n in range(RECENT_EVENTS_KEPT + 50):
        emit(GcReclaimed("bounded", f"/r{n}", 0.0, "x.py:1", "f"))
    kept = recent()
    assert len(kept) == RECENT_EVENTS_KEPT
    last = kept[-1][1]
    assert isinstance(last, GcReclaimed) and last.route == f"/r{RECENT_EVENTS_KEPT + 49}"


def test_the_json_never_holds_the_dsn(sync_url: str, registry: CollectorRegistry) -> None:
    url = sa.make_url(sync_url).set(password="hunter2-secret", username="postgres")
    engine = sa.create_engine(url)
    try:
        with TestClient(_app(engine, registry, ui="always")) as client:
            text = client.get("/poolwatch/state").text
    finally:
        engine.dispose()
    assert "hunter2" not in text and "postgres@" not in text


# -- history and window --------------------------------------------------------------------------


def test_each_series_ends_with_the_interval_under_way(engine: sa.Engine, registry: CollectorRegistry) -> None:
    watch = poolwatch.watch(engine, registry=registry, name="main")
    builder = StateBuilder()
    recorders = list(zip(watch.pool_names, watch.recorders, strict=True))
    first = json.loads(builder.build(recorders, None))["pools"][0]["history"]
    with engine.connect():
        second = json.loads(builder.build(recorders, None))["pools"][0]["history"]
    # Read before the sampler ended any interval: the one under way is the only point, up to now.
    assert first["seconds_ago"][-1] == 0 and first["used"][-1] == 0
    assert second["used"][-1] == 1 and second["peak_used"][-1] == 1 and second["seconds_ago"][-1] == 0
    assert len(second["idle"]) == len(second["pending"]) == len(second["seconds_ago"])


def test_quantile_interpolates_like_prometheus() -> None:
    bounds = (0.1, 0.2, 0.4)
    assert quantile(0.95, bounds, [0, 0, 0, 0]) is None
    assert quantile(0.5, bounds, [10, 0, 0, 0]) == pytest.approx(0.05)
    assert quantile(0.95, bounds, [50, 50, 0, 0]) == pytest.approx(0.19)
    assert quantile(0.95, bounds, [0, 0, 0, 5]) == 0.4  # +Inf: the highest finite bound


# -- sizing --------------------------------------------------------------------------------------


def _window(**values: Any) -> Window:
    base: dict[str, Any] = {
        "seconds": 120.0,
        "intervals": 120,
        "interval_seconds": 1.0,
        "checkouts": 960,
        "timeouts": 0,
        "wait_p95": 0.0005,
        "held_seconds": 96.0,  # 0.8 in use on average
        "peak_used": 4,
        "max_pending": 0,
        "mean_used": 0.9,
        "kept_seconds": 120.0,
        "kept_peak_used": 4,
        "kept_max_pending": 0,
        "kept_timeouts": 0,
    }
    base.update(values)
    return Window(**base)


def test_sizing_says_too_small_when_checkouts_time_out() -> None:
    hint = advise(10, _window(timeouts=3, peak_used=10, max_pending=5))
    assert hint.verdict == "too_small"
    assert "3 checkout(s) timed out" in hint.reason
    assert hint.suggested_max is not None and hint.suggested_max > 10


def test_sizing_says_too_small_when_a_full_pool_queues() -> None:
    hint = advise(5, _window(peak_used=5, max_pending=2, wait_p95=0.2))
    assert hint.verdict == "too_small" and "callers queued" in hint.reason


def test_sizing_never_says_too_small_when_nobody_queued_or_timed_out() -> None:
    # Busy on average (4.5 of 5 in use) and even full at its peak, yet every caller got a
    # connection at once: more connections would sit idle.
    for peak in (4, 5):
        hint = advise(5, _window(checkouts=6000, held_seconds=540.0, peak_used=peak))
        assert hint.verdict == "right", hint
        assert "Little's law: 50.0 checkouts/s × 90.0 ms mean hold = 4.5 connections" in hint.reason
        assert "bursts will fill it" in hint.reason


def test_sizing_says_too_big_when_half_the_pool_never_moves() -> None:
    hint = advise(20, _window(peak_used=4))
    assert hint.verdict == "too_big"
    assert hint.suggested_max is not None and 4 < hint.suggested_max < 20


def test_sizing_says_right_and_why() -> None:
    hint = advise(6, _window(peak_used=4, held_seconds=240.0))
    assert hint.verdict == "right" and "peak 4 of 6" in hint.reason


def test_sizing_waits_for_data_and_knows_unbounded_pools() -> None:
    short = advise(10, _window(seconds=9.9, intervals=9))
    assert short.verdict == "unknown" and "needs at least 10 s" in short.reason
    assert advise(10, _window(checkouts=0, peak_used=0, held_seconds=0.0)).verdict == "unknown"
    assert advise(None, _window()).verdict == "unbounded"


def test_sizing_puts_leaks_before_a_bigger_pool() -> None:
    hint = advise(5, _window(timeouts=1), leaked_now=2)
    assert "2 connection(s) are held past the leak threshold" in hint.reason


def test_sizing_never_shrinks_below_a_peak_seen_earlier_in_the_kept_history() -> None:
    # Quiet for the last five minutes, but 12 of 20 were in use an hour ago: shrinking to 6
    # would have queued that hour.
    assert advise(20, _window(peak_used=4, kept_peak_used=12, kept_seconds=3600.0)).verdict == "right"
    hint = advise(20, _window(peak_used=4, kept_peak_used=6, kept_seconds=3600.0))
    assert hint.verdict == "too_big" and hint.suggested_max == 9 and "in the last 60.0 min" in hint.reason
    # Someone queued (or timed out) earlier: never "too big".
    assert advise(20, _window(peak_used=4, kept_max_pending=1)).verdict == "right"
    assert advise(20, _window(peak_used=4, kept_timeouts=1)).verdict == "right"


@pytest.mark.parametrize("limit", [1, 2, 3, 5, 10, 20, 50])
def test_a_suggested_limit_is_never_below_the_exact_peak(limit: int) -> None:
    for peak, pending, timeouts, mean in itertools.product(
        range(limit + 1), (0, 1, 7), (0, 2), (0.0, 0.3, 0.9)
    ):
        window = _window(
            peak_used=peak,
            kept_peak_used=peak,
            max_pending=pending,
            timeouts=timeouts,
            held_seconds=mean * peak * 120.0,
        )
        hint = advise(limit, window)
        if hint.suggested_max is not None:
            assert hint.suggested_max >= peak, (limit, peak, pending, timeouts, mean, hint)
        if hint.verdict == "too_small":
            assert pending or timeouts, hint
        if hint.verdict == "too_big":
            assert peak * 2 <= limit and not pending and not timeouts, hint
