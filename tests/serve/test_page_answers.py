"""The live page's answers, byte for byte: what a refused browser or script is told, the headers
that keep the page locked down, and the Authorization forms a client may send.

tests/serve/test_live_page.py checks that these answers work; here each is compared whole, so a
changed word, header or content type is caught (mutation testing found them unchecked).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections.abc import Iterator, MutableMapping
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

import poolwatch
from poolwatch._serve.page import MAX_QUERY_BYTES

TOKEN = "Yf+3kQ/zP0a+Lm7/Q1w2Eg=="

PAGE_401 = (
    "401: the poolwatch live page needs its token (POOLWATCH_UI_TOKEN, else POOLWATCH_HEALTH_TOKEN).\n"
    "Open /poolwatch?token=<token> once in the browser, the token as it is ('+', '/' and '=' need no "
    "escaping), or send 'Authorization: Bearer <token>'.\n"
)


@pytest.fixture
def engine(sync_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(sync_url, pool_size=2)
    yield engine
    engine.dispose()


@pytest.fixture
def client(engine: sa.Engine, registry: CollectorRegistry) -> Iterator[TestClient]:
    app = FastAPI()
    poolwatch.instrument(app, engine, registry=registry, name="main", ui="token", ui_token=TOKEN)
    with TestClient(app) as client:
        yield client


def test_the_refused_page_is_plain_text_saying_how_to_give_the_token(client: TestClient) -> None:
    refused = client.get("/poolwatch")
    assert refused.status_code == 401
    assert refused.headers["content-type"] == "text/plain; charset=utf-8"
    assert refused.headers["www-authenticate"] == 'Bearer realm="poolwatch"'
    assert refused.text == PAGE_401


def test_the_refused_state_is_json_naming_the_setting(client: TestClient) -> None:
    refused = client.get("/poolwatch/state")
    assert refused.status_code == 401
    assert refused.headers["content-type"] == "application/json"
    assert refused.headers["www-authenticate"] == 'Bearer realm="poolwatch"'
    assert refused.json() == {"detail": "a bearer token is required (POOLWATCH_UI_TOKEN)"}


def test_the_refused_page_under_another_path_names_that_path(
    engine: sa.Engine, registry: CollectorRegistry
) -> None:
    app = FastAPI()
    poolwatch.instrument(app, engine, registry=registry, ui="token", ui_token=TOKEN, ui_path="/ops/pool")
    with TestClient(app) as client:
        refused = client.get("/ops/pool")
    assert refused.status_code == 401
    assert refused.text == PAGE_401.replace("/poolwatch?token=", "/ops/pool?token=")


def test_the_page_carries_exactly_its_lockdown_headers(client: TestClient) -> None:
    answer = client.get("/poolwatch", headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "text/html; charset=utf-8"
    scripts = re.findall(r"<script>(.*?)</script>", answer.text, re.S)
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    assert answer.headers["content-security-policy"] == (
        f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["x-frame-options"] == "DENY"
    assert answer.headers["referrer-policy"] == "no-referrer"
    # A header token sets no cookie: only an address with ?token= does.
    assert "set-cookie" not in answer.headers


def test_the_state_is_json_that_is_not_sniffed(client: TestClient) -> None:
    answer = client.get("/poolwatch/state", headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert [pool["name"] for pool in json.loads(answer.content)["pools"]] == ["main"]


def test_the_cookie_set_from_the_address_is_exact(client: TestClient) -> None:
    opened = client.get(f"/poolwatch?token={TOKEN}", headers={"X-Forwarded-Proto": "https"})
    assert opened.status_code == 200
    assert opened.headers["set-cookie"] == (
        "poolwatch_token=Yf%2B3kQ%2FzP0a%2BLm7%2FQ1w2Eg%3D%3D; Path=/poolwatch; HttpOnly; "
        "SameSite=Strict; Secure"
    )


@pytest.mark.parametrize(
    "authorization",
    [
        f"Bearer {TOKEN}",
        f"bearer {TOKEN}",
        f"BEARER {TOKEN}",
        f"Bearer  {TOKEN}",  # more than one space before the credentials
        f"  Bearer {TOKEN}  ",
    ],
)
def test_the_bearer_scheme_is_read_as_http_says(client: TestClient, authorization: str) -> None:
    assert client.get("/poolwatch/state", headers={"Authorization": authorization}).status_code == 200


@pytest.mark.parametrize(
    "authorization",
    [
        TOKEN,  # no scheme
        f"Basic {TOKEN}",
        f"Bearer{TOKEN}",
        "Bearer",
        "Bearer   ",
        f"Token {TOKEN}",
        f"Bearer {TOKEN} extra",
    ],
)
def test_other_authorization_forms_are_refused(client: TestClient, authorization: str) -> None:
    assert client.get("/poolwatch/state", headers={"Authorization": authorization}).status_code == 401


# -- tokens that are not text, and stale cookies ---------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "variable"),
    [
        ({"ui": "token", "ui_token": "ab\udcffcd"}, "ui_token (POOLWATCH_UI_TOKEN)"),
        ({"health_details": "token", "health_token": "ab\udcffcd"}, "health_token (POOLWATCH_HEALTH_TOKEN)"),
    ],
)
def test_a_token_that_is_not_text_is_refused_at_start_naming_the_setting(
    engine: sa.Engine, settings: dict[str, str], variable: str
) -> None:
    """Bytes that are not UTF-8 (a variable set from a binary secret) could never be typed or sent:
    refused at start, instead of failing every request that compares against them."""
    with pytest.raises(ValueError) as refused:
        poolwatch.instrument(FastAPI(), engine, registry=CollectorRegistry(), **settings)  # type: ignore[arg-type]
    assert str(refused.value) == (
        f"poolwatch: invalid setting {variable}: Value error, the token must be UTF-8 text; it holds bytes "
        "that are not"
    )
    assert "ab" not in str(refused.value)


def test_a_token_variable_holding_bytes_that_are_not_text_is_refused(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(os.environb, b"POOLWATCH_UI", b"token")
    monkeypatch.setitem(os.environb, b"POOLWATCH_UI_TOKEN", b"ab\xffcd")
    with pytest.raises(ValueError, match=r"invalid setting ui_token \(POOLWATCH_UI_TOKEN\): .*UTF-8 text"):
        poolwatch.instrument(FastAPI(), engine, registry=CollectorRegistry())


@pytest.mark.parametrize("path", ["/poolwatch", "/poolwatch/state"])
def test_a_given_token_that_is_not_text_is_refused_not_an_error(client: TestClient, path: str) -> None:
    assert client.get(f"{path}?token=%FF%FE").status_code == 401
    client.cookies.set("poolwatch_token", "%FF%FE")
    assert client.get(path).status_code == 401


def test_a_stale_cookie_does_not_lock_out_a_right_token_in_another_form(client: TestClient) -> None:
    """A cookie left from an earlier token is sent with every request: the right token in the
    address or the header still opens the page, whichever form comes first or last."""
    client.cookies.set("poolwatch_token", "an-old-token")
    assert client.get("/poolwatch/state", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert client.get("/poolwatch/state", params={"token": TOKEN}).status_code == 200
    client.cookies.clear()
    client.cookies.set("poolwatch_token", TOKEN.replace("+", "%2B").replace("/", "%2F"))
    assert client.get("/poolwatch/state", headers={"Authorization": "Bearer wrong"}).status_code == 200
    assert client.get("/poolwatch/state", params={"token": "wrong"}).status_code == 200


@pytest.mark.parametrize(
    ("cookie", "status"),
    [
        (f"poolwatch_token={TOKEN}", 200),
        (f"theme=dark; poolwatch_token={TOKEN}", 200),  # not the first cookie
        (f"theme=dark;poolwatch_token={TOKEN}", 200),  # no space after the separator
        (f"session={TOKEN}", 401),  # the right value under another cookie's name
        (f"poolwatch_token=; session={TOKEN}", 401),
        (f"poolwatch_token_old={TOKEN}", 401),
    ],
)
def test_only_the_pages_own_cookie_carries_the_token(client: TestClient, cookie: str, status: int) -> None:
    """Read from the raw Cookie header, as a browser sends it: the token counts under the page's
    cookie name only, wherever that cookie stands among the others."""
    answer = client.get(
        "/poolwatch/state", headers={"Cookie": cookie.replace("+", "%2B").replace("/", "%2F")}
    )
    assert answer.status_code == status, cookie


def test_a_token_in_an_address_over_its_bound_is_refused(client: TestClient) -> None:
    """The query is read up to 8,192 bytes: the right token in a query of exactly that size opens
    the page, one byte more is refused however right the token is."""
    token = "token=" + TOKEN.replace("+", "%2B").replace("/", "%2F")
    for size, status in ((MAX_QUERY_BYTES, 200), (MAX_QUERY_BYTES + 1, 401)):
        padding = "&pad=" + "x" * (size - len(token) - len("&pad="))
        query = token + padding
        assert len(query) == size
        client.cookies.clear()  # only the address may carry the token here
        assert client.get(f"/poolwatch/state?{query}").status_code == status, size


# -- Secure behind a proxy -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("forwarded", "secure"),
    [
        ("for=192.0.2.60;proto=https", True),
        ('for="[2001:db8::1]";proto="HTTPS"', True),
        # Two hops: the first (the client's side) decides.
        ("for=192.0.2.60;proto=https, for=198.51.100.17;proto=http", True),
        ("for=192.0.2.60;proto=http, for=198.51.100.17;proto=https", False),
        ("for=192.0.2.60;proto=http;by=203.0.113.43", False),
        ("for=https;by=https", False),  # https as some other parameter's value is not the protocol
    ],
)
def test_the_forwarded_header_decides_secure_by_its_first_protocol(
    client: TestClient, forwarded: str, secure: bool
) -> None:
    opened = client.get(f"/poolwatch?token={TOKEN}", headers={"Forwarded": forwarded})
    assert opened.status_code == 200
    assert opened.headers["set-cookie"].endswith("; Secure") is secure


# -- HEAD, as the application answers it -----------------------------------------------------------


@pytest.mark.parametrize("path", ["/poolwatch", "/poolwatch/state"])
async def test_head_has_the_headers_and_no_body(
    engine: sa.Engine, registry: CollectorRegistry, path: str
) -> None:
    app = FastAPI()
    poolwatch.instrument(app, engine, registry=registry, name="main", ui="always")
    sent: list[MutableMapping[str, Any]] = []
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "HEAD",
        "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
        "headers": [(b"host", b"app")], "client": ("127.0.0.1", 1), "server": ("app", 80),
    }  # fmt: skip

    async def receive() -> MutableMapping[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    assert sent[0]["status"] == 200
    headers = dict(sent[0]["headers"])
    assert int(headers[b"content-length"]) > 0
    assert b"".join(bytes(m.get("body", b"")) for m in sent[1:]) == b""
