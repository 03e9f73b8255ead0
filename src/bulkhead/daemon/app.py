"""The HTTP API (FastAPI): the Gate in front, then each service's routes (declared in its module: they
parse with pydantic models and call the service).

The `Gate` ASGI middleware runs in front of every request: it authenticates the connection's peer (mTLS
certificate -> principal, or the local root socket -> bootstrap principal), refuses unknown, revoked and
expired certificates (401, audited as a security event), caps the body size (413), and appends the
request's audit record before the response starts; if that append fails the response is replaced by a
503 (fail closed: nothing is disclosed, nothing was changed).
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from bulkhead.daemon.access import access_routes
from bulkhead.daemon.auditapi import audit_routes
from bulkhead.daemon.daemon import Daemon, daemon_routes
from bulkhead.daemon.disks import disk_routes
from bulkhead.daemon.metrics import Observe
from bulkhead.daemon.networks import network_routes
from bulkhead.daemon.opsroutes import ops_routes
from bulkhead.daemon.power import power_routes
from bulkhead.daemon.service import ApiError, ReqCtx
from bulkhead.daemon.snapshots import snapshot_routes
from bulkhead.daemon.store import StateUnavailable
from bulkhead.daemon.tenants import tenant_routes
from bulkhead.daemon.ui import login_link_routes, public_app, ui_routes
from bulkhead.daemon.uiauth import UiAuth, UiFront
from bulkhead.daemon.vms import vm_routes
from bulkhead.errors import BulkheadError

__all__ = ["MAX_BODY", "PEER_KEY", "build_app", "inject_peer"]

MAX_BODY = 64 * 1024
PEER_KEY = "bulkhead.peer"


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> tuple[dict[str, Any], bytes]:
    data = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    for k, v in (headers or {}).items():
        hdrs.append((k.encode(), v.encode()))
    return {"type": "http.response.start", "status": status, "headers": hdrs}, data


class Gate:
    def __init__(self, app: Any, daemon: Any, max_body: int = MAX_BODY) -> None:
        self.app = app
        self.daemon = daemon
        self.max_body = max_body

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self.app(scope, receive, send)
            elif scope["type"] == "websocket":  # the interactive console (consoleapi.py authenticates + audits)
                from bulkhead.daemon.consoleapi import serve_console_ws

                await serve_console_ws(self.daemon, scope, receive, send)
            return
        rid = str(uuid.uuid4())
        peer = scope.get("extensions", {}).get(PEER_KEY)
        caller, why = await anyio.to_thread.run_sync(self.daemon.authenticate, peer)
        if caller is None:
            try:
                await anyio.to_thread.run_sync(self.daemon.auth_refused, peer, why, rid, scope.get("path", ""))
                await self._reply(send, 401, {"detail": why}, rid)
            except ApiError as exc:
                await self._reply(send, exc.status, {"detail": exc.detail}, rid)
            return
        ctx = ReqCtx(caller, rid, scope.get("method", ""), scope.get("path", ""))
        scope["bulkhead.ctx"] = ctx
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    too_big = int(v) > self.max_body
                except ValueError:
                    too_big = True
                if too_big:
                    await self._audited_reply(ctx, send, 413, f"request body over {self.max_body} bytes")
                    return
        # read the whole body first (it is small by contract): an oversized one is refused before the app
        chunks: list[bytes] = []
        seen = 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # the client went away
            body = msg.get("body", b"")
            seen += len(body)
            if seen > self.max_body:
                await self._audited_reply(ctx, send, 413, f"request body over {self.max_body} bytes")
                return
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay_receive() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        replaced = False

        async def audited_send(msg: dict[str, Any]) -> None:
            nonlocal replaced
            if msg["type"] == "http.response.start":
                msg.setdefault("headers", [])
                msg["headers"] = [*msg["headers"], (b"x-request-id", rid.encode())]
                if not ctx.audited:
                    try:
                        await anyio.to_thread.run_sync(self.daemon.append_request, ctx, str(msg["status"]))
                    except ApiError as exc:
                        if msg["status"] == 503:  # already a refusal (e.g. its own audit failure): keep it
                            await send(msg)
                            return
                        replaced = True
                        start, body = _json(503, {"detail": exc.detail}, {"x-request-id": rid})
                        await send(start)
                        await send({"type": "http.response.body", "body": body})
                        return
            elif replaced:
                return
            await send(msg)

        await self.app(scope, replay_receive, audited_send)

    async def _audited_reply(self, ctx: ReqCtx, send: Any, status: int, detail: str) -> None:
        try:
            await anyio.to_thread.run_sync(self.daemon.append_request, ctx, str(status))
        except ApiError as exc:
            status, detail = exc.status, exc.detail
        await self._reply(send, status, {"detail": detail}, ctx.request_id)

    @staticmethod
    async def _reply(send: Any, status: int, body: Any, rid: str) -> None:
        start, data = _json(status, body, {"x-request-id": rid})
        await send(start)
        await send({"type": "http.response.body", "body": data})


def inject_peer(app: Any, peer: dict[str, Any]) -> Any:
    """Wrap an ASGI app so every request carries `peer` (used by the servers' protocols and by tests
    that call the app in-process)."""

    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            scope = dict(scope)
            scope["extensions"] = {**(scope.get("extensions") or {}), PEER_KEY: peer}
        await app(scope, receive, send)

    return wrapped


def build_app(daemon: Daemon | None) -> Any:
    """The ASGI application: FastAPI routes behind the Gate."""
    api = FastAPI(
        title="bulkhead management API",
        version="1",
        description="mTLS-authenticated management of tenants, principals, roles, VMs, disks and the audit log.",
        openapi_url="/v1/openapi.json",
        docs_url=None,
        redoc_url=None,
    )

    @api.exception_handler(ApiError)
    @api.exception_handler(BulkheadError)
    async def _api_error(request: Request, exc: Exception) -> JSONResponse:
        """The one handler: an operation's ApiError, or a domain error answered by api_status.TABLE."""
        err = exc if isinstance(exc, ApiError) else ApiError.of(exc)
        if err.status == 422:  # same shape as pydantic's validation errors (HTTPValidationError)
            return JSONResponse({"detail": [{"loc": ["body"], "msg": err.detail, "type": err.kind or "value_error"}]},
                                422)
        body = {"detail": err.detail, **({"kind": err.kind} if err.kind else {})}
        return JSONResponse(body, status_code=err.status)

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        ctx = request.scope.get("bulkhead.ctx")
        if ctx is not None:
            ctx.decision = ctx.decision or "invalid"
        errors = [{"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
                  for e in exc.errors()[:20]]
        return JSONResponse({"detail": errors}, status_code=422)

    @api.exception_handler(sqlite3.Error)
    async def _state_db(request: Request, exc: sqlite3.Error) -> JSONResponse:
        """A safety net (issue 12, soak finding B): a state-database failure that no operation mapped (a full
        or locked disk) is answered as StateUnavailable (503 with its kind), never a 500; the operations
        keep their changes in one transaction, so nothing was committed."""
        return await _api_error(request, StateUnavailable(f"the state database is unavailable ({exc})"))

    @api.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:  # pragma: no cover - a bug
        return JSONResponse({"detail": "internal error"}, status_code=500)

    def the() -> Daemon:
        if daemon is None:  # built for its schema only (openapi_document)
            raise RuntimeError("this app has no daemon")
        return daemon

    # each service declares its routes; they find the service at request time (daemon None: the schema)
    api.include_router(access_routes(lambda: the().access))
    api.include_router(tenant_routes(lambda: the().tenants))
    api.include_router(disk_routes(lambda: the().disks))
    api.include_router(network_routes(lambda: the().networks))
    # the fleet's daemon puts its own VM service behind the same routes and adds its host routes
    api.include_router(vm_routes(lambda: the().vm_api, Daemon.vm_model if daemon is None else daemon.vm_model))
    api.include_router(power_routes(lambda: the().power))
    api.include_router(snapshot_routes(lambda: the().snapshots))
    api.include_router(daemon_routes(the))
    api.include_router(audit_routes(lambda: the().audit_api))
    for ops in ops_routes(the):  # metrics, images, attestation policy (daemon/opsroutes.py)
        api.include_router(ops)
    for extra in daemon.extra_routers() if daemon is not None else ():
        api.include_router(extra)
    api.include_router(login_link_routes(the))  # the web console (daemon/ui.py, docs/UI.md)
    api.include_router(ui_routes(the))
    front = UiFront(Gate(api, daemon), daemon.ui_auth if daemon is not None else UiAuth(),
                    None if daemon is None else lambda who, result: daemon.event(
                        "api", "ui/login", principal=who, scope="/", result=result), public_app())
    return Observe(front, lambda: the().metrics)  # one log line + metrics per request


def openapi_document(daemon: Daemon | None) -> dict[str, Any]:
    app = build_app(daemon)
    doc: dict[str, Any] = app.app.openapi()  # Observe.app is the FastAPI app, as on the Gate
    return doc


if __name__ == "__main__":  # regenerate docs/openapi.json: python -m bulkhead.daemon.app > docs/openapi.json
    import sys

    sys.stdout.write(json.dumps(openapi_document(None), indent=2, sort_keys=True) + "\n")
