"""The live page: ``<ui_path>`` serves one self-contained HTML file, ``<ui_path>/state`` its JSON.

``<ui_path>/`` serves the page too (a typed or bookmarked address often ends in a slash), unless the
application routes it itself.

``POOLWATCH_UI`` decides who may see them: ``never`` (not served: the paths reach the application),
``always``, or ``token``: a bearer token (``POOLWATCH_UI_TOKEN``, else ``POOLWATCH_HEALTH_TOKEN``)
in an ``Authorization: Bearer`` header, in a ``?token=`` query parameter (what a browser can type),
or in the ``poolwatch_token`` cookie that a page opened with ``?token=`` sets for its own path, so
the page's JSON requests carry it. The whole token is compared, with ``hmac.compare_digest``. The
query parameter is read as a person types it: ``+`` is a plus sign (``openssl rand -base64`` tokens
have them), not a space as in an HTML form's encoding; percent-escapes such as ``%2B`` are decoded.

The HTML holds no data: the page's script fetches the JSON and builds the DOM with ``textContent``,
so a route template such as ``/<script>`` shows as text. A Content-Security-Policy allows exactly
that one inline script (by its hash) and requests to the page's own origin.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote_to_bytes

from .._log import internal_errors
from .http import READ_METHODS, Receive, Rendered, Scope, Send, asgi_response, header, method_not_allowed
from .state import StateBuilder

if TYPE_CHECKING:
    from .watched import Watched

Endpoint = Callable[[Scope, Receive, Send], Awaitable[None]]

COOKIE = "poolwatch_token"
STATE_SUFFIX = "/state"
MAX_QUERY_BYTES = 8192


@cache
def page_html() -> tuple[bytes, str]:
    """The page, and the CSP source that allows its one inline script."""
    html = resources.files("poolwatch._serve").joinpath("static/poolwatch.html").read_text("utf-8")
    start = html.index("<script>") + len("<script>")
    script = html[start : html.index("</script>", start)]
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    return html.encode("utf-8"), f"'sha256-{digest}'"


class LivePage:
    def __init__(self, watch: Watched) -> None:
        self.watch = watch
        self.builder = StateBuilder()

    @property
    def paths(self) -> tuple[str, str]:
        path = self.watch.settings.ui_path
        return path, path + STATE_SUFFIX

    def endpoints(self) -> dict[str, Endpoint]:
        """Every path the live page answers, to its endpoint: the page (with and without a
        trailing slash) and its JSON."""
        page, state = self.paths
        return {page: self.page, page + "/": self.page, state: self.state}

    # -- rendered from plain inputs -----------------------------------------------------------

    def answer(
        self,
        which: str,
        method: str,
        authorization: str | None = None,
        query: bytes = b"",
        cookie: str | None = None,
        *,
        cookie_path: str = "/",
        secure: bool = False,
    ) -> Rendered:
        """``which`` is ``"page"`` or ``"state"``."""
        if method not in READ_METHODS:
            return method_not_allowed()
        query_token = _query_token(query)
        if not self._allowed(authorization, query_token, _cookie_token(cookie)):
            return _unauthorized(which, self.watch.settings.ui_path)
        if which == "state":
            return self._state()
        html, script_source = page_html()
        headers = [
            (b"content-security-policy", _csp(script_source).encode("ascii")),
            (b"x-content-type-options", b"nosniff"),
            (b"x-frame-options", b"DENY"),
            # The address may carry ?token=: never send it on as a Referer.
            (b"referrer-policy", b"no-referrer"),
        ]
        if query_token is not None and self.watch.settings.ui == "token":
            cookie_value = (
                f"{COOKIE}={quote(query_token.encode('utf-8', 'surrogateescape'), safe='')}; "
                f"Path={quote(cookie_path)}; HttpOnly; SameSite=Strict"
            )
            if secure:
                cookie_value += "; Secure"
            headers.append((b"set-cookie", cookie_value.encode("latin-1")))
        return Rendered(html, "text/html; charset=utf-8", headers)

    def _state(self) -> Rendered:
        watch = self.watch
        try:
            names = watch.pool_names
            recorders = list(zip(names, watch.recorders, strict=False))
            body = self.builder.build(recorders, watch.requests).encode("utf-8")
        except Exception as error:
            internal_errors.record("live_page_state", error)
            failed = b'{"detail":"poolwatch could not read its state; see poolwatch_internal_errors_total"}'
            return Rendered(failed, "application/json", [], 500)
        return Rendered(body, "application/json", [(b"x-content-type-options", b"nosniff")])

    def _allowed(self, authorization: str | None, query_token: str | None, cookie_token: str | None) -> bool:
        settings = self.watch.settings
        if settings.ui == "always":
            return True
        secret = settings.ui_secret
        if settings.ui != "token" or secret is None:
            return False
        expected = secret.get_secret_value().encode("utf-8")
        given = [_bearer(authorization), query_token, cookie_token]
        # Every form is compared, each in constant time, so which one is present shows in no timing.
        matched = False
        for candidate in given:
            if candidate:
                matched |= hmac.compare_digest(candidate.encode("utf-8", "surrogateescape"), expected)
        return matched

    # -- ASGI ---------------------------------------------------------------------------------

    async def page(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._serve("page", scope, receive, send)

    async def state(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._serve("state", scope, receive, send)

    async def _serve(self, which: str, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope.get("method", "GET")
        rendered = self.answer(
            which,
            method,
            header(scope, "authorization"),
            scope.get("query_string", b""),
            header(scope, "cookie"),
            cookie_path=scope.get("root_path", "") + self.watch.settings.ui_path,
            secure=_over_https(scope),
        )
        await asgi_response(rendered, method)(scope, receive, send)


def _csp(script_source: str) -> str:
    return (
        f"default-src 'none'; script-src {script_source}; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


def _bearer(authorization: str | None) -> str | None:
    if authorization is None:
        return None
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return credentials.strip() or None


def _over_https(scope: Scope) -> bool:
    """Whether the browser talks https: to this server, or to a proxy in front of it that says so.

    A proxy's word is taken without asking who sent it: it only adds ``Secure`` to the cookie, which
    a client could ask for anyway, and a cookie without ``Secure`` over https must never be set.
    """
    if scope.get("scheme") in ("https", "wss"):
        return True
    forwarded_proto = header(scope, "x-forwarded-proto")
    if forwarded_proto is not None and forwarded_proto.split(",")[0].strip().lower() == "https":
        return True
    forwarded = header(scope, "forwarded")
    if forwarded is not None:
        first = forwarded.split(",")[0]
        for pair in first.split(";"):
            name, _, value = pair.strip().partition("=")
            if name.lower() == "proto" and value.strip('"').lower() == "https":
                return True
    return False


def _query_token(query: bytes) -> str | None:
    """The first non-empty ``token`` parameter, as typed: ``+`` stays a plus sign (RFC 3986; only
    an HTML form's encoding makes it a space), percent-escapes are decoded."""
    if not query or len(query) > MAX_QUERY_BYTES:
        return None
    for part in query.split(b"&"):
        name, _, value = part.partition(b"=")
        if unquote_to_bytes(name) == b"token" and value:
            return unquote_to_bytes(value).decode("utf-8", "surrogateescape")
    return None


def _cookie_token(cookie: str | None) -> str | None:
    if not cookie:
        return None
    for part in cookie.split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE and value:
            return unquote_to_bytes(value).decode("utf-8", "surrogateescape")
    return None


def _unauthorized(which: str, ui_path: str) -> Rendered:
    headers = [(b"www-authenticate", b'Bearer realm="poolwatch"')]
    if which == "state":
        body = {"detail": "a bearer token is required (POOLWATCH_UI_TOKEN)"}
        return Rendered(json.dumps(body).encode("utf-8"), "application/json", headers, 401)
    text = (
        "401: the poolwatch live page needs its token (POOLWATCH_UI_TOKEN, else POOLWATCH_HEALTH_TOKEN).\n"
        f"Open {ui_path}?token=<token> once in the browser, the token as it is ('+', '/' and '=' need no "
        "escaping), or send 'Authorization: Bearer <token>'.\n"
    )
    return Rendered(text.encode("utf-8"), "text/plain; charset=utf-8", headers, 401)
