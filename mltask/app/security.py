"""What stands between the app and whoever can reach its port: it can start code on this machine.

- every request carries the access token, once as ``?token=`` (the URL ``mltask app``
  prints, as Jupyter does), then as an HttpOnly, SameSite=Strict cookie; a wrong or missing
  token is a 403 before any route runs;
- the ``Host`` header must name this server (localhost, an IP address, or the ``--host``
  given), so a page on another site cannot reach it through DNS rebinding;
- every state-changing request is a POST carrying the CSRF token of the page (a header no
  other site can set) from our own origin;
- paths taken from a request are confined to the root: no ``..``, no absolute path, no link
  leading out, else the caller answers 404.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import time
from pathlib import Path, PurePosixPath
from urllib.parse import urlencode

from starlette.datastructures import URL, Headers
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CSRF_HEADER = "x-csrf-token"
_SAFE_METHODS = ("GET", "HEAD")
_HEADERS = [
    # No inline script anywhere: data reaches the page as JSON in <script type="application/json">.
    (b"content-security-policy", b"default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
     b"img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
     b"form-action 'self'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]


def csrf_token(token: str) -> str:
    """The CSRF token pages carry, derived from the access token so no state is kept."""
    return hmac.new(token.encode(), b"mltask-app csrf", hashlib.sha256).hexdigest()


def cookie_name(port: int) -> str:
    """Cookies are per host, not per port: two apps on one machine must not share one."""
    return f"mltask-app-{port}"


class Guard:
    """ASGI middleware: Host, token and CSRF checks, and security headers on every answer.

    Plain ASGI rather than Starlette's ``BaseHTTPMiddleware`` so that server-sent event
    streams pass through unbuffered.
    """

    def __init__(self, app: ASGIApp, token: str, port: int, host: str) -> None:
        self.app = app
        self.token = token
        self.csrf = csrf_token(token)
        self.cookie = cookie_name(port)
        self.port = port
        self.names = {"localhost", host.lower().strip("[]")}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # no websockets here
            return
        started = time.perf_counter()
        request = Request(scope)
        refusal = self._refusal(request)
        if refusal is not None:
            await _forbidden(refusal)(scope, receive, send)
            return
        given = request.query_params.get("token")
        if given is not None:  # the printed URL: set the cookie, and take the token out of the address bar
            query = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
            target = URL(scope=scope).replace(query=query, scheme="", netloc="")
            response = RedirectResponse(str(target) or "/", status_code=303)
            response.set_cookie(self.cookie, self.token, httponly=True, samesite="strict", path="/")
            await response(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                elapsed = (time.perf_counter() - started) * 1000
                message["headers"] = [*message.get("headers", []), *_HEADERS,
                                      (b"server-timing", f"app;dur={elapsed:.2f}".encode())]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _refusal(self, request: Request) -> str | None:
        """Why this request is refused, or ``None``."""
        if not self._host_ok(request.headers.get("host", "")):
            return "this server answers only to its own address (Host header refused)"
        given = request.query_params.get("token") or request.cookies.get(self.cookie) or ""
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return "open the app with the URL `mltask app` printed: it carries the access token"
        if request.method not in _SAFE_METHODS:
            if not hmac.compare_digest(request.headers.get(CSRF_HEADER, "").encode(), self.csrf.encode()):
                return "this request lacks the page's CSRF token; reload the page"
            if not _same_origin(request.headers):
                return "cross-site requests are refused"
        return None

    def _host_ok(self, header: str) -> bool:
        """Our own names, or an IP literal: DNS rebinding needs a domain name to rebind."""
        name, _, port = header.rpartition(":") if not header.endswith("]") else (header, "", "")
        if not name or port != str(self.port):
            return False
        name = name.lower().strip("[]")
        if name in self.names:
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True


def _same_origin(headers: Headers) -> bool:
    origin = headers.get("origin")
    if origin is not None and origin.removeprefix("http://").removeprefix("https://") != headers.get("host"):
        return False
    return headers.get("sec-fetch-site", "same-origin") in ("same-origin", "none")


def _forbidden(why: str) -> PlainTextResponse:
    return PlainTextResponse(f"403 Forbidden: {why}\n", status_code=403)


def confined(base: Path, relative: str) -> Path | None:
    """``base / relative`` if that stays inside ``base`` with no link on the way; else ``None``.

    Refuses absolute paths, ``..``, empty or hidden parts and any symlink, whether it leads
    out or not: the root holds tasks the app made or listed, never links to elsewhere.
    """
    parts = PurePosixPath(relative).parts
    if not parts or relative.startswith("/") or "\\" in relative or "\x00" in relative:
        return None
    if any(part in ("", ".", "..") or part.startswith(".") for part in parts):
        return None
    path = base.joinpath(*parts)
    current = base
    for part in parts:
        current = current / part
        if os.path.islink(current):
            return None
    real = Path(os.path.realpath(path))
    return path if real.is_relative_to(os.path.realpath(base)) else None
