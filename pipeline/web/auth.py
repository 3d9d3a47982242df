"""Who may read the dashboard and its query API: operators, and viewers for their own channels.

The broadcast nodes face the internet, so the dashboard pages and `/api/*` are closed by default.
Two credentials open them, and they are distinct:

- **Operator API keys** (`PIPELINE_OPERATOR_API_KEYS`, comma-separated, or `operator_api_keys` in
  the TOML file): everything. Sent as `Authorization: Bearer KEY` or `X-API-Key: KEY`, or — for a
  browser — as the session cookie that `POST /operator/login` sets (HttpOnly, SameSite=Strict). The
  cookie holds no key: `s1.<expiry>.<HMAC-SHA256(key, expiry)>`, checked against every configured key,
  so it works on every node that has the key, and removing a key ends its sessions.
- **Viewer tokens** (pipeline/core/tokens.py, as the WebSocket and SSE endpoints take them), as
  `Authorization: Bearer TOKEN` or `?token=`: only the routes about one channel, and only for a
  channel the token covers; `/api/channels` lists only those channels; `/api/topologies` (the
  metrics, no data) is open to them. Pipeline-wide routes (`/api/stats`, `/api/splits`,
  `/api/dev-token`) and the pages are for operators only.

No credential: 401 (`WWW-Authenticate: Bearer`; the pages answer with a login form). A wrong one,
or one that does not reach that far: 403. Every credential a request carries must be right.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson
from aiohttp import web

from pipeline.core import tokens
from pipeline.runtime.settings import Settings

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

COOKIE = "pipeline_operator"
SESSION_PREFIX = "s1"
LOGIN_PATH = "/operator/login"
LOGOUT_PATH = "/operator/logout"
REALM = 'Bearer realm="operator"'


@dataclass(frozen=True, slots=True)
class Access:
    """What a request may read: everything (an operator), or a viewer token's channels."""

    operator: bool
    viewer: tokens.Claims | None = None


ACCESS = web.RequestKey("access", Access)  # what the guard found, for the handler it wraps


class Denied(Exception):
    """401 (no credential) or 403 (a wrong one, or not enough), with the reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def parse_keys(text: str) -> list[bytes]:
    return [k.strip().encode() for k in text.split(",") if k.strip()]


class Guard:
    """Checks the credential of each dashboard request; wraps the handlers by what they reveal."""

    def __init__(
        self,
        operator_keys: list[bytes],
        viewer_secret: bytes,
        *,
        session_ttl_s: float = 12 * 3600,
        open_access: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys = [k for k in operator_keys if k]
        self.viewer_secret = viewer_secret
        self.session_ttl_s = session_ttl_s
        self.open_access = open_access
        self.clock = clock

    @classmethod
    def from_settings(cls, settings: Settings) -> Guard:
        return cls(
            parse_keys(settings.operator_api_keys.get_secret_value()),
            settings.broadcast_secret.get_secret_value().encode(),
            session_ttl_s=settings.operator_session_ttl_s,
        )

    @classmethod
    def open(cls) -> Guard:
        """Lets every request through: for an app that authenticates by itself (and the API's own tests)."""
        return cls([], b"", open_access=True)

    # -- credentials ----------------------------------------------------------------------------------
    def _is_key(self, given: str) -> bool:
        raw = given.encode("utf-8", "surrogateescape")
        ok = False
        for key in self.keys:  # every key compared, each in constant time
            ok |= hmac.compare_digest(raw, key)
        return ok

    def session(self, key: bytes, expires: int) -> str:
        """The cookie value of an operator session signed with `key`, valid until unix time `expires`."""
        mac = hmac.new(key, f"pipeline-operator-session:{expires}".encode(), hashlib.sha256).digest()
        return f"{SESSION_PREFIX}.{expires}.{_b64(mac)}"

    def _session_ok(self, value: str) -> bool:
        prefix, _, rest = value.partition(".")
        expires, _, _ = rest.partition(".")
        if prefix != SESSION_PREFIX or not expires.isdigit() or int(expires) <= self.clock():
            return False
        ok = False
        for key in self.keys:
            ok |= hmac.compare_digest(
                self.session(key, int(expires)).encode(), value.encode("utf-8", "replace")
            )
        return ok

    def identify(self, request: web.Request) -> Access:
        """The request's access, or Denied. Headers first; then the session cookie; then `?token=`."""
        if self.open_access:
            return Access(operator=True)
        given_key = request.headers.get("X-API-Key")
        scheme, _, bearer = request.headers.get("Authorization", "").partition(" ")
        bearer = bearer.strip() if scheme.lower() == "bearer" else ""
        if given_key is not None and not self._is_key(given_key):
            raise Denied(403, "invalid operator key")
        if bearer:
            if self._is_key(bearer):
                return Access(operator=True)
            if given_key is not None:
                raise Denied(403, "invalid operator key")
            return Access(operator=False, viewer=self._viewer(bearer))
        if given_key is not None:
            return Access(operator=True)
        cookie = request.cookies.get(COOKIE)
        if cookie and self._session_ok(cookie):
            return Access(operator=True)
        token = request.query.get("token")
        if token:
            return Access(operator=False, viewer=self._viewer(token))
        raise Denied(401, "an operator key or a viewer token is required")

    def _viewer(self, token: str) -> tokens.Claims:
        if not self.viewer_secret:
            raise Denied(403, "viewer tokens are not accepted here")
        try:
            return tokens.verify(self.viewer_secret, token, self.clock())
        except tokens.TokenRefused as exc:
            raise Denied(403, f"viewer token refused: {exc.reason}") from None

    # -- handler wrappers -----------------------------------------------------------------------------
    def _guarded(self, handler: Handler, check: Callable[[web.Request, Access], None], page: bool) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            try:
                access = self.identify(request)
                check(request, access)
            except Denied as exc:
                return login_page(exc, request) if page else _denied(exc)
            request[ACCESS] = access
            return await handler(request)

        return guarded

    def operator(self, handler: Handler) -> Handler:
        """Operators only: pipeline-wide data and minting tokens."""
        return self._guarded(handler, _operator_only, page=False)

    def page(self, handler: Handler) -> Handler:
        """A dashboard page: operators only; anyone else gets the login form (401/403)."""
        return self._guarded(handler, _operator_only, page=True)

    def viewer(self, handler: Handler) -> Handler:
        """Operators and any valid viewer token: descriptions that hold no channel's data."""
        return self._guarded(handler, lambda request, access: None, page=False)

    def channel(self, handler: Handler) -> Handler:
        """One channel's data (`?channel=`): operators, or a viewer token that covers that channel."""
        return self._guarded(handler, _channel_in_scope, page=False)

    def channel_list(self, handler: Handler) -> Handler:
        """The channel list: all for operators; a viewer's token's channels only."""

        async def filtered(request: web.Request) -> web.StreamResponse:
            response = await handler(request)
            claims = request[ACCESS].viewer
            if claims is None or not isinstance(response, web.Response) or response.status != 200:
                return response
            assert response.body is not None
            body = orjson.loads(response.body)  # type: ignore[arg-type]
            body["channels"] = [c for c in body["channels"] if claims.allows(c["channel"])]
            body["count"] = len(body["channels"])
            response.body = orjson.dumps(body)
            return response

        return self._guarded(filtered, lambda request, access: None, page=False)

    # -- the browser's login ----------------------------------------------------------------------------
    def add_routes(self, app: web.Application) -> None:
        """`POST /operator/login` (form field `key`, optional `next`) and `POST /operator/logout`."""
        app.router.add_post(LOGIN_PATH, self._login)
        app.router.add_post(LOGOUT_PATH, self._logout)

    async def _login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        given = form.get("key")
        target = _safe_next(str(form.get("next") or "/dashboard"))
        if not isinstance(given, str) or not self._is_key(given):
            return login_page(Denied(403, "that is not an operator key"), request, target)
        expires = int(self.clock() + self.session_ttl_s)
        response = web.HTTPSeeOther(target)
        response.set_cookie(
            COOKIE,
            self.session(given.encode("utf-8", "surrogateescape"), expires),
            max_age=int(self.session_ttl_s),
            path="/",
            httponly=True,
            samesite="Strict",
            secure=request.secure,
        )
        return response

    async def _logout(self, request: web.Request) -> web.StreamResponse:
        response = web.HTTPSeeOther("/dashboard")
        response.del_cookie(COOKIE, path="/")
        return response


def _operator_only(request: web.Request, access: Access) -> None:
    if not access.operator:
        raise Denied(403, "this needs an operator key; a viewer token reads only its channels")


def _channel_in_scope(request: web.Request, access: Access) -> None:
    if access.operator:
        return
    assert access.viewer is not None
    channel = request.query.get("channel")
    if channel is None:
        raise Denied(403, "a viewer token reads one channel at a time: give channel=")
    if not access.viewer.allows(channel):
        raise Denied(403, f"channel {channel[:64]!r} is outside the token's scope")


def _safe_next(target: str) -> str:
    """Only a path on this server (no scheme, no host, no `//`): never an open redirect."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/dashboard"
    return target


def _denied(exc: Denied) -> web.Response:
    headers = {"Cache-Control": "no-store"}
    if exc.status == 401:
        headers["WWW-Authenticate"] = REALM
    return web.Response(
        body=orjson.dumps({"error": exc.reason}),
        status=exc.status,
        content_type="application/json",
        headers=headers,
    )


LOGIN_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,"><title>Operator sign-in</title>
<style>body{margin:0;font:14px/1.45 system-ui,sans-serif;background:#0f1320;color:#e8ebf3;display:grid;
place-items:center;min-height:100vh}form{background:#171c2c;border:1px solid #262d42;border-radius:10px;
padding:18px 20px;display:grid;gap:10px;min-width:300px}input,button{font:inherit;background:#0f1320;
color:#e8ebf3;border:1px solid #262d42;border-radius:4px;padding:6px 8px}p{margin:0;color:#8d95ab}</style>
</head><body>
<form method="post" action="/operator/login" id="login">
<h1 style="margin:0;font-size:18px">Dashboard</h1>
<p id="reason">__REASON__</p>
<input type="password" name="key" id="key" placeholder="operator key"
  autocomplete="current-password" required>
<input type="hidden" name="next" value="__NEXT__">
<button type="submit">Sign in</button>
</form>
<script>
// A key handed over in the address's fragment (#operator-key=...; never sent to a server) signs in at once.
const key = new URLSearchParams(location.hash.slice(1)).get("operator-key");
if (key) {
  history.replaceState(null, "", location.pathname + location.search);
  document.getElementById("key").value = key;
  document.getElementById("login").submit();
}
</script>
</body></html>
"""


def login_page(exc: Denied, request: web.Request, target: str | None = None) -> web.Response:
    """The 401/403 answer of a page: a sign-in form that comes back to where it was asked."""
    nxt = target or _safe_next(request.path_qs)
    html = LOGIN_HTML.replace("__REASON__", _escape(exc.reason)).replace("__NEXT__", _escape(nxt))
    headers = {"Cache-Control": "no-store"}
    if exc.status == 401:
        headers["WWW-Authenticate"] = REALM
    return web.Response(text=html, status=exc.status, content_type="text/html", headers=headers)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
