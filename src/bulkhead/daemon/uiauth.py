"""The web console's authentication front (issue 21; docs/UI.md "Authentication").

A browser reaches `/ui` in one of two ways, neither weaker than the API:

* with a client certificate (mTLS): the connection's peer is the certificate, exactly as for the API;
* with a login link issued by `bulkhead ui login` (POST /v1/ui/login-links, itself an mTLS/local-socket
  API call): a 256-bit random token, stored only as its SHA-256, redeemable once within LINK_TTL_S. Its
  redemption sets a session cookie (HttpOnly, Secure, SameSite=Strict, Path=/ui) whose value is stored
  only as its SHA-256 too. The session is bound to the *peer that issued the link* (its certificate or
  the local root socket): on every request the front substitutes that peer and the Gate authenticates it
  again through Daemon.authenticate, so revoking the certificate or deleting the principal ends the
  session at its next request.

A cookie counts only under /ui and only on a connection without a certificate: the API (/v1) never
accepts it. The console WebSocket of a page (/ui/vms/{id}/console/ws) is the API's console WebSocket
with the session's peer, after an Origin check (cross-site WebSocket hijacking). Every /ui response gets
the security headers of SECURITY_HEADERS (strict CSP without inline script, frame-ancestors 'none',
no-store). CSRF: `csrf_token(scope)` is an HMAC of the session (or certificate) under a per-daemon key;
ui.py refuses a state change whose form field does not match (403).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import anyio

__all__ = ["COOKIE", "LINK_TTL_S", "SECURITY_HEADERS", "SESSION_TTL_S", "UiAuth", "UiFront", "csrf_ok"]

COOKIE = "bulkhead_session"
LINK_TTL_S = 60.0
SESSION_TTL_S = 8 * 3600.0
PEER_KEY = "bulkhead.peer"  # = app.PEER_KEY (app.py imports this module: it cannot import app)
UI_PEER_KEY = "bulkhead.ui_session"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
    (b"cross-origin-opener-policy", b"same-origin"),
]
_LOGIN = re.compile(r"^/ui/login/([A-Za-z0-9_-]{20,100})$")
_UI_WS = re.compile(r"^/ui/vms/([0-9a-fA-F-]{36})/console/ws$")


def _h(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class _Session:
    peer: dict[str, Any]
    principal: str
    expires: float


class UiAuth:
    """Login links and sessions, held as hashes only (a memory dump or a log line never holds a usable
    token). In memory: a daemon restart logs every browser out, which is the safe direction."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._links: dict[str, _Session] = {}
        self._sessions: dict[str, _Session] = {}
        self.key = secrets.token_bytes(32)  # the CSRF HMAC key

    def issue_link(self, peer: dict[str, Any], principal: str) -> str:
        """A fresh single-use token for `peer` (already authenticated by the Gate)."""
        token = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            self._links = {k: v for k, v in self._links.items() if v.expires > now}
            self._links[_h(token)] = _Session(dict(peer), principal, now + LINK_TTL_S)
        return token

    def redeem(self, token: str) -> tuple[str | None, str]:
        """(session id, principal) for a valid unused link (the link is gone afterwards, used or not),
        else (None, principal or "")."""
        now = time.monotonic()
        with self._lock:
            link = self._links.pop(_h(token), None)
            if link is None or link.expires <= now:
                return None, link.principal if link else ""
            sid = secrets.token_urlsafe(32)
            self._sessions[_h(sid)] = _Session(link.peer, link.principal, now + SESSION_TTL_S)
            return sid, link.principal

    def session_peer(self, sid: str) -> dict[str, Any] | None:
        with self._lock:
            s = self._sessions.get(_h(sid))
            if s is None or s.expires <= time.monotonic():
                self._sessions.pop(_h(sid), None)
                return None
            return s.peer

    def end(self, sid: str) -> None:
        with self._lock:
            self._sessions.pop(_h(sid), None)

    def csrf_for(self, binding: str) -> str:
        return hmac.new(self.key, b"csrf\0" + binding.encode(), hashlib.sha256).hexdigest()


def _binding(scope: MutableMapping[str, Any]) -> str:
    """What a CSRF token is bound to: the session, or the connection's certificate."""
    sid = str(scope.get(UI_PEER_KEY) or "")
    if sid:
        return "s:" + _h(sid)
    peer = scope.get("extensions", {}).get(PEER_KEY) or {}
    der = peer.get("der")
    return "c:" + hashlib.sha256(der).hexdigest() if isinstance(der, bytes | bytearray) else "l:" + str(peer.get("uid"))


def csrf_ok(auth: UiAuth, scope: MutableMapping[str, Any], token: str) -> bool:
    return bool(token) and hmac.compare_digest(auth.csrf_for(_binding(scope)), token)


def _cookie(scope: dict[str, Any]) -> str:
    for k, v in scope.get("headers", []):
        if k == b"cookie":
            for part in v.decode("latin-1").split(";"):
                name, _, value = part.strip().partition("=")
                if name == COOKIE:
                    return str(value)
    return ""


def _header(scope: dict[str, Any], name: bytes) -> str:
    return next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == name), "")


class UiFront:
    """ASGI front of the whole app: /ui requests get the session's peer and the security headers; every
    other path goes through untouched (the API never sees a cookie-derived identity)."""

    def __init__(self, app: Any, auth: UiAuth, audit: Callable[[str, str], object] | None = None,
                 public: Any = None) -> None:
        self.public = public  # /ui/login and /ui/static/*: no identity needed (ui.public_app)
        self.inner = app  # the Gate
        self.app = getattr(app, "app", app)  # the FastAPI app, for introspection (openapi), as on the Gate
        self.auth = auth
        self.audit = audit  # (principal id, result): the redemption's audit record (Daemon.event)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = str(scope.get("path", ""))
        if scope["type"] not in ("http", "websocket") or not (path == "/ui" or path.startswith("/ui/")):
            await self.inner(scope, receive, send)
            return
        if scope["type"] == "http" and self.public is not None and (path == "/ui/login" or path.startswith("/ui/static/")):
            await self.public(scope, receive, self._secured(send))
            return
        scope = dict(scope)
        ext = dict(scope.get("extensions") or {})
        peer = ext.get(PEER_KEY)
        if not (peer and peer.get("kind") == "tls"):  # no certificate on this connection: a session?
            sid = _cookie(scope)
            sess = self.auth.session_peer(sid) if sid else None
            if sess is not None:
                ext[PEER_KEY] = sess
                scope[UI_PEER_KEY] = sid
            elif scope["type"] == "http" and (m := _LOGIN.match(path)):
                await self._redeem(m.group(1), send, _header(scope, b"sec-fetch-site"))
                return
            elif scope["type"] == "http":
                await self._plain(send, 303, b"", [(b"location", b"/ui/login")])
                return
            scope["extensions"] = ext
        if scope["type"] == "websocket":
            m = _UI_WS.match(path)
            origin = urlsplit(_header(scope, b"origin")).netloc
            if m is None or origin != _header(scope, b"host"):  # cross-site WebSocket hijacking
                await receive()
                await send({"type": "websocket.close", "code": 4403, "reason": "bad origin or path"})
                return
            scope["path"] = f"/v1/vms/{m.group(1)}/console/ws"
            await self.inner(scope, receive, send)
            return
        await self.inner(scope, receive, self._secured(send))

    @staticmethod
    def _secured(send: Any) -> Any:
        async def secured(msg: dict[str, Any]) -> None:
            if msg["type"] == "http.response.start":
                keep = [(k, v) for k, v in msg.get("headers", []) if k.lower() != b"cache-control"]
                msg = {**msg, "headers": [*keep, *SECURITY_HEADERS]}
            await send(msg)

        return secured

    async def _redeem(self, token: str, send: Any, fetch_site: str = "") -> None:
        """Login CSRF (an attacker's own link, opened in the victim's browser from the attacker's page,
        would log the victim in as the attacker): a browser names where a navigation came from in
        Sec-Fetch-Site (W3C Fetch Metadata). A link is redeemed only when it was typed, pasted or opened
        from outside the browser (`none`) or from the console itself (`same-origin`), or by a client that
        sends no fetch metadata. A refused attempt does not use the link up."""
        if fetch_site and fetch_site not in ("none", "same-origin"):
            if self.audit is not None:
                await anyio.to_thread.run_sync(self.audit, "", "403")
            await self._plain(send, 403, b"a login link opened from another site is refused (login CSRF): paste it "
                                         b"into the address bar\n")
            return
        sid, principal = self.auth.redeem(token)
        if self.audit is not None:
            await anyio.to_thread.run_sync(self.audit, principal, "200" if sid else "403")
        if sid is None:
            await self._plain(send, 403, b"this login link is unknown, used or expired: run `bulkhead ui login` again\n")
            return
        cookie = f"{COOKIE}={sid}; Path=/ui; Secure; HttpOnly; SameSite=Strict; Max-Age={int(SESSION_TTL_S)}"
        await self._plain(send, 303, b"", [(b"location", b"/ui/vms"), (b"set-cookie", cookie.encode())])

    @staticmethod
    async def _plain(send: Any, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None) -> None:
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
                   *SECURITY_HEADERS, *(extra or [])]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def declare_surfaces() -> None:
    """The web console's routes: outside the OpenAPI document (they are HTML), listed here."""
    from bulkhead.surface import declare

    common = ("the session cookie (only on a connection without a certificate, only under /ui) or an mTLS "
              "certificate; the Gate authenticates the peer again, caps the body, audits the request")
    for name, accepts, op in (
        ("GET /ui/login/{token}", "a login-link token (43 base64url chars, hashed, single use, 60 s); no other "
         "identity; sets the session cookie; audited as ui/login", "ui_login_link"),
        ("GET /ui/*", f"{common}; views call the API's service methods with the request's RBAC context",
         "ui_views"),
        ("POST /ui/vms/{vm_id}/{op}", f"{common}; form body (<= 20 fields) with the CSRF token (HMAC of the "
         "session) checked first (403); op in start|stop|shutdown|pause|resume, authorized by the service",
         "ui_vm_action"),
        ("WEBSOCKET /ui/vms/{vm_id}/console/ws", f"{common}; Origin must equal Host; then the API's console "
         "WebSocket (RBAC, one writer, audited)", "ui_console_ws"),
    ):
        declare("api-route", name, owner=__name__, boundary="client-daemon", accepts=accepts, operation=op,
                fuzz="fuzz/fuzz_api_models.py")
