"""The HTTP API (FastAPI). Routes are thin: they parse with pydantic models and call the Daemon.

The `Gate` ASGI middleware runs in front of every request: it authenticates the connection's peer (mTLS
certificate -> principal, or the local root socket -> bootstrap principal), refuses unknown, revoked and
expired certificates (401, audited as a security event), caps the body size (413), and appends the
request's audit record before the response starts; if that append fails the response is replaced by a
503 (fail closed: nothing is disclosed, nothing was changed).
"""

from __future__ import annotations

import json
import uuid
from typing import Any
from uuid import UUID

import anyio
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from bulkhead.control.models import (
    AssignmentCreate,
    AssignmentOut,
    AuditRecordOut,
    CheckpointOut,
    ConsistencyProofOut,
    ConsoleOut,
    DiskCreate,
    DiskOut,
    ErrorOut,
    InclusionProofOut,
    IntegrityOut,
    MeasurementOut,
    NetworkCountersOut,
    NetworkCreate,
    NetworkOut,
    PrincipalIssue,
    PrincipalIssued,
    PrincipalOut,
    RoleCreate,
    RoleOut,
    TenantCreate,
    TenantOut,
    VmCreate,
    VmEventOut,
    VmOut,
    WhoAmI,
)
from bulkhead.daemon.service import ApiError, ReqCtx

__all__ = ["MAX_BODY", "PEER_KEY", "build_app", "inject_peer"]

MAX_BODY = 64 * 1024
PEER_KEY = "bulkhead.peer"
_ERR = {"model": ErrorOut}
ERRORS: dict[int | str, dict[str, Any]] = {
    401: _ERR, 403: _ERR, 404: _ERR, 409: _ERR, 413: _ERR, 503: _ERR,
}
_SINCE = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}([T ][0-9:.]{1,15}Z?)?$"


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
        if scope["type"] == "http":
            scope = dict(scope)
            scope["extensions"] = {**(scope.get("extensions") or {}), PEER_KEY: peer}
        await app(scope, receive, send)

    return wrapped


def ctx_of(request: Request) -> ReqCtx:
    ctx: ReqCtx = request.scope["bulkhead.ctx"]
    return ctx


Ctx = Depends(ctx_of)


def build_app(daemon: Any) -> Any:
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
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        if exc.status == 422:  # same shape as pydantic's validation errors (HTTPValidationError)
            return JSONResponse({"detail": [{"loc": ["body"], "msg": exc.detail, "type": exc.kind or "value_error"}]},
                                422)
        body = {"detail": exc.detail, **({"kind": exc.kind} if exc.kind else {})}
        return JSONResponse(body, status_code=exc.status)

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        ctx = request.scope.get("bulkhead.ctx")
        if ctx is not None:
            ctx.decision = ctx.decision or "invalid"
        errors = [{"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
                  for e in exc.errors()[:20]]
        return JSONResponse({"detail": errors}, status_code=422)

    @api.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:  # pragma: no cover - a bug
        return JSONResponse({"detail": "internal error"}, status_code=500)

    r = APIRouter(prefix="/v1", responses=ERRORS)
    d = daemon
    vm_model: Any = getattr(daemon, "vm_model", VmOut)  # the fleet's VMs also name their host (docs/FLEET.md)

    @r.get("/whoami", response_model=WhoAmI)
    def whoami(ctx: ReqCtx = Ctx) -> Any:
        return d.whoami(ctx)

    @r.post("/tenants", response_model=TenantOut, status_code=201)
    def tenant_create(body: TenantCreate, ctx: ReqCtx = Ctx) -> Any:
        return d.tenant_create(ctx, body.name)

    @r.get("/tenants", response_model=list[TenantOut])
    def tenant_list(ctx: ReqCtx = Ctx) -> Any:
        return d.tenant_list(ctx)

    @r.get("/tenants/{tenant_id}", response_model=TenantOut)
    def tenant_get(tenant_id: UUID, ctx: ReqCtx = Ctx) -> Any:
        return d.tenant_get(ctx, str(tenant_id))

    @r.delete("/tenants/{tenant_id}", status_code=204)
    def tenant_delete(tenant_id: UUID, ctx: ReqCtx = Ctx) -> Response:
        d.tenant_delete(ctx, str(tenant_id))
        return Response(status_code=204)

    @r.post("/tenants/{tenant_id}/disks", response_model=DiskOut, status_code=201)
    def disk_create(tenant_id: UUID, body: DiskCreate, ctx: ReqCtx = Ctx) -> Any:
        return d.disk_create(ctx, str(tenant_id), body.name, body.size_mib)

    @r.get("/tenants/{tenant_id}/disks", response_model=list[DiskOut])
    def disk_list(tenant_id: UUID, ctx: ReqCtx = Ctx) -> Any:
        return d.disk_list(ctx, str(tenant_id))

    @r.get("/disks/{disk_id}", response_model=DiskOut)
    def disk_get(disk_id: UUID, ctx: ReqCtx = Ctx) -> Any:
        return d.disk_get(ctx, str(disk_id))

    @r.delete("/disks/{disk_id}", status_code=204)
    def disk_delete(disk_id: UUID, ctx: ReqCtx = Ctx) -> Response:
        d.disk_delete(ctx, str(disk_id))
        return Response(status_code=204)

    @r.post("/tenants/{tenant_id}/networks", response_model=NetworkOut, status_code=201)
    def network_create(tenant_id: UUID, body: NetworkCreate, ctx: ReqCtx = Ctx) -> Any:
        return d.network_create(ctx, str(tenant_id), body)

    @r.get("/tenants/{tenant_id}/networks", response_model=list[NetworkOut])
    def network_list(tenant_id: UUID, ctx: ReqCtx = Ctx) -> Any:
        return d.network_list(ctx, str(tenant_id))

    @r.get("/networks/{network_id}", response_model=NetworkOut)
    def network_get(network_id: UUID, ctx: ReqCtx = Ctx) -> Any:
        return d.network_get(ctx, str(network_id))

    @r.delete("/networks/{network_id}", status_code=204)
    def network_delete(network_id: UUID, ctx: ReqCtx = Ctx) -> Response:
        d.network_delete(ctx, str(network_id))
        return Response(status_code=204)

    @r.get("/networks/{network_id}/counters", response_model=NetworkCountersOut)
    def network_counters(network_id: UUID, ctx: ReqCtx = Ctx) -> Any:
        return d.network_counters(ctx, str(network_id))

    @r.post("/vms", response_model=vm_model, status_code=201)
    def vm_create(body: VmCreate, ctx: ReqCtx = Ctx) -> Any:
        return d.vm_create(ctx, body)

    @r.get("/vms", response_model=list[vm_model])
    def vm_list(tenant: UUID | None = None, ctx: ReqCtx = Ctx) -> Any:
        return d.vm_list(ctx, str(tenant) if tenant else None)

    @r.get("/vms/{vm_id}", response_model=vm_model)
    def vm_get(vm_id: UUID, ctx: ReqCtx = Ctx) -> Any:
        return d.vm_get(ctx, str(vm_id))

    @r.delete("/vms/{vm_id}", status_code=204)
    def vm_delete(vm_id: UUID, ctx: ReqCtx = Ctx) -> Response:
        d.vm_delete(ctx, str(vm_id))
        return Response(status_code=204)

    def _op(op: str) -> None:
        def handler(vm_id: UUID, ctx: ReqCtx = Ctx) -> Any:
            return d.vm_op(ctx, str(vm_id), op)

        handler.__name__ = f"vm_{op}"
        r.post(f"/vms/{{vm_id}}/{op}", response_model=vm_model, name=f"vm_{op}")(handler)

    for op in ("start", "stop", "pause", "resume"):
        _op(op)

    @r.get("/vms/{vm_id}/console", response_model=ConsoleOut)
    def vm_console(
        vm_id: UUID, offset: int = Query(0, ge=0, le=1 << 40), limit: int = Query(65536, ge=1, le=65536),
        ctx: ReqCtx = Ctx,
    ) -> Any:
        return d.vm_console(ctx, str(vm_id), offset, limit)

    @r.get("/vms/{vm_id}/events", response_model=list[VmEventOut])
    def vm_events(vm_id: UUID, ctx: ReqCtx = Ctx) -> Any:
        return d.vm_events(ctx, str(vm_id))

    @r.get("/vms/{vm_id}/measurement", response_model=MeasurementOut)
    def vm_measurement(vm_id: UUID, ctx: ReqCtx = Ctx) -> Any:
        return d.vm_measurement(ctx, str(vm_id))

    @r.get("/integrity", response_model=IntegrityOut)
    def integrity(ctx: ReqCtx = Ctx) -> Any:
        return d.integrity_status(ctx)

    @r.get("/principals", response_model=list[PrincipalOut])
    def principal_list(ctx: ReqCtx = Ctx) -> Any:
        return d.principal_list(ctx)

    @r.post("/principals", response_model=PrincipalIssued, status_code=201)
    def principal_issue(body: PrincipalIssue, ctx: ReqCtx = Ctx) -> Any:
        return d.principal_issue(ctx, body.name, body.csr_pem, body.days)

    @r.get("/principals/{principal_id}", response_model=PrincipalOut)
    def principal_get(principal_id: UUID, ctx: ReqCtx = Ctx) -> Any:
        return d.principal_get(ctx, str(principal_id))

    @r.post("/principals/{principal_id}/revoke", response_model=PrincipalOut)
    def principal_revoke(principal_id: UUID, ctx: ReqCtx = Ctx) -> Any:
        return d.principal_revoke(ctx, str(principal_id))

    @r.get("/roles", response_model=list[RoleOut])
    def role_list(ctx: ReqCtx = Ctx) -> Any:
        return d.role_list(ctx)

    @r.post("/roles", response_model=RoleOut, status_code=201)
    def role_create(body: RoleCreate, ctx: ReqCtx = Ctx) -> Any:
        return d.role_create(ctx, body)

    @r.get("/roles/{role_id}", response_model=RoleOut)
    def role_get(role_id: UUID, ctx: ReqCtx = Ctx) -> Any:
        return d.role_get(ctx, str(role_id))

    @r.delete("/roles/{role_id}", status_code=204)
    def role_delete(role_id: UUID, ctx: ReqCtx = Ctx) -> Response:
        d.role_delete(ctx, str(role_id))
        return Response(status_code=204)

    @r.get("/assignments", response_model=list[AssignmentOut])
    def assignment_list(principal: UUID | None = None, ctx: ReqCtx = Ctx) -> Any:
        return d.assignment_list(ctx, str(principal) if principal else None)

    @r.post("/assignments", response_model=AssignmentOut, status_code=201)
    def assignment_create(body: AssignmentCreate, ctx: ReqCtx = Ctx) -> Any:
        return d.assignment_create(ctx, body.principal, body.role, body.scope)

    @r.delete("/assignments/{assignment_id}", status_code=204)
    def assignment_delete(assignment_id: UUID, ctx: ReqCtx = Ctx) -> Response:
        d.assignment_delete(ctx, str(assignment_id))
        return Response(status_code=204)

    @r.get("/audit", response_model=list[AuditRecordOut], response_model_exclude_none=True)
    def audit_list(
        since: str | None = Query(None, max_length=40, pattern=_SINCE),
        principal: UUID | None = None,
        vm: UUID | None = None,
        after: int = Query(0, ge=0, le=1 << 62),
        limit: int = Query(1000, ge=1, le=10000),
        leaf: bool = False,
        ctx: ReqCtx = Ctx,
    ) -> Any:
        return d.audit_query(ctx, since=since, principal=str(principal) if principal else None,
                             vm=str(vm) if vm else None, after_seq=after, limit=limit, leaf=leaf)

    @r.get("/audit/checkpoint", response_model=CheckpointOut)
    def audit_checkpoint(ctx: ReqCtx = Ctx) -> Any:
        return d.audit_checkpoint(ctx)

    @r.get("/audit/proof/inclusion", response_model=InclusionProofOut)
    def audit_inclusion(seq: int = Query(..., ge=1, le=1 << 62), size: int | None = Query(None, ge=1, le=1 << 62),
                        ctx: ReqCtx = Ctx) -> Any:
        return d.audit_inclusion(ctx, seq, size)

    @r.get("/audit/proof/consistency", response_model=ConsistencyProofOut)
    def audit_consistency(old: int = Query(..., ge=1, le=1 << 62), new: int = Query(..., ge=1, le=1 << 62),
                          ctx: ReqCtx = Ctx) -> Any:
        return d.audit_consistency(ctx, old, new)

    extra = getattr(daemon, "extra_routes", None)  # the fleet controller's /hosts routes
    if extra is not None:
        extra(r)
    api.include_router(r)
    return Gate(api, daemon)


def openapi_document(daemon: Any) -> dict[str, Any]:
    app = build_app(daemon)
    doc: dict[str, Any] = app.app.openapi()
    return doc


if __name__ == "__main__":  # regenerate docs/openapi.json: python -m bulkhead.daemon.app > docs/openapi.json
    import sys

    sys.stdout.write(json.dumps(openapi_document(None), indent=2, sort_keys=True) + "\n")
