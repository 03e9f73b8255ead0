"""Tenants: create, list, get, delete (docs/API.md "Tenant isolation").

A tenant is visible to a principal with `tenant/read` at its scope or with any assignment inside it; a
tenant that still owns VMs, disks or networks cannot be deleted (409). Deleting one removes the
assignments at and below its scope.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from uuid import UUID

from fastapi import APIRouter, Response

from bulkhead.control import rbac
from bulkhead.control.models import TenantCreate, TenantOut
from bulkhead.daemon.auditlog import now_iso
from bulkhead.daemon.routing import Ctx, router
from bulkhead.daemon.service import ApiError, Core, ReqCtx
from bulkhead.daemon.store import new_id

__all__ = ["TenantService", "tenant_routes"]


class TenantService:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.store = core.store

    # ------------------------------------------------------------------ tenants
    def tenant_create(self, ctx: ReqCtx, name: str) -> dict[str, Any]:
        self.core.authorize(ctx, "tenant/write", "/", visible=lambda: True)
        if self.store.q1("SELECT 1 FROM tenants WHERE name = ?", (name,)):
            raise ApiError(409, f"a tenant named {name!r} already exists")
        tid = new_id()
        ctx.detail["tenant"] = tid
        with self.core.mutation(ctx, "201") as c:
            created = now_iso()
            c.execute("INSERT INTO tenants VALUES (?,?,?)", (tid, name, created))
        return {"id": tid, "name": name, "created": created}

    def _tenant(self, ctx: ReqCtx, tenant_id: str, action: str) -> Any:
        row = self.store.q1("SELECT * FROM tenants WHERE id = ?", (tenant_id,))
        if row is None:
            ctx.scope = rbac.tenant_scope(tenant_id)
            raise self.core.deny_unknown(ctx, action)
        self.core.authorize(ctx, action, rbac.tenant_scope(tenant_id),
                       visible=lambda: self.core.can_see_tenant(ctx.caller, tenant_id))
        return row

    def tenant_get(self, ctx: ReqCtx, tenant_id: str) -> dict[str, Any]:
        return dict(self._tenant(ctx, tenant_id, "tenant/read"))

    def tenant_list(self, ctx: ReqCtx) -> list[dict[str, Any]]:
        ctx.action, ctx.scope, ctx.decision = "tenant/read", "/", "allow"
        rows = self.store.q("SELECT * FROM tenants ORDER BY name")
        readable = self.core.readable_scopes(ctx.caller, "tenant/read")
        mine = self.core.my_scopes(ctx.caller)
        out = []
        for r in rows:
            ts = rbac.tenant_scope(r["id"])
            if any(rbac.scope_within(ts, s) for s in readable) or any(rbac.scope_within(s, ts) for s in mine):
                out.append(dict(r))
        return out

    def tenant_delete(self, ctx: ReqCtx, tenant_id: str) -> None:
        self._tenant(ctx, tenant_id, "tenant/delete")
        with self.core.mutation(ctx, "204") as c:
            if self.store.q1("SELECT 1 FROM vms WHERE tenant = ?", (tenant_id,)) or self.store.q1(
                "SELECT 1 FROM disks WHERE tenant = ?", (tenant_id,)
            ) or self.store.q1("SELECT 1 FROM networks WHERE tenant = ?", (tenant_id,)):
                raise ApiError(409, "the tenant still has VMs, disks or networks; delete them first")
            c.execute("DELETE FROM tenants WHERE id = ?", (tenant_id,))
            c.execute("DELETE FROM assignments WHERE scope = ? OR scope LIKE ?",
                      (rbac.tenant_scope(tenant_id), rbac.tenant_scope(tenant_id) + "/%"))
            self.core.rbac_changed()


def tenant_routes(svc: Callable[[], TenantService]) -> APIRouter:
    r = router()

    @r.post("/tenants", response_model=TenantOut, status_code=201)
    def tenant_create(body: TenantCreate, ctx: ReqCtx = Ctx) -> Any:
        return svc().tenant_create(ctx, body.name)

    @r.get("/tenants", response_model=list[TenantOut])
    def tenant_list(ctx: ReqCtx = Ctx) -> Any:
        return svc().tenant_list(ctx)

    @r.get("/tenants/{tenant_id}", response_model=TenantOut)
    def tenant_get(tenant_id: UUID, ctx: ReqCtx = Ctx) -> Any:
        return svc().tenant_get(ctx, str(tenant_id))

    @r.delete("/tenants/{tenant_id}", status_code=204)
    def tenant_delete(tenant_id: UUID, ctx: ReqCtx = Ctx) -> Response:
        svc().tenant_delete(ctx, str(tenant_id))
        return Response(status_code=204)

    return r
