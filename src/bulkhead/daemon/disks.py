"""Disk images of a tenant: create (sparse), list, get, delete (docs/API.md "Tenant isolation").

A disk belongs to one tenant; a VM's drives must be disks of its own tenant (vms.py). A disk attached to
a VM cannot be deleted (409).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

from fastapi import APIRouter, Response

from bulkhead.control import rbac
from bulkhead.control.models import DiskCreate, DiskOut
from bulkhead.daemon.auditlog import now_iso
from bulkhead.daemon.routing import Ctx, router
from bulkhead.daemon.service import ApiError, Core, ReqCtx
from bulkhead.daemon.store import new_id
from bulkhead.errors import HostError

__all__ = ["DiskService", "disk_routes"]


class DiskService:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.store = core.store
        self.paths = core.paths

    def users(self, disk_id: str, writable_only: bool) -> list[str]:
        users = []
        for r in self.store.q("SELECT id, spec FROM vms WHERE spec LIKE ?", (f"%{disk_id}%",)):
            for d in json.loads(r["spec"]).get("drives", []):
                if d["disk"] == disk_id and (not writable_only or not d["read_only"]):
                    users.append(r["id"])
        return users

    def disk_create(self, ctx: ReqCtx, tenant: str, name: str, size_mib: int) -> dict[str, Any]:
        self.core.authorize_in_tenant(ctx, "disk/write", tenant)
        if self.store.q1("SELECT 1 FROM disks WHERE tenant = ? AND name = ?", (tenant, name)):
            raise ApiError(409, f"a disk named {name!r} already exists in this tenant")
        disk_id = new_id()
        path = self.paths.disks / f"{disk_id}.img"
        ctx.detail.update(disk=disk_id, size_mib=size_mib)
        try:
            self.paths.disks.mkdir(parents=True, exist_ok=True)
            with open(path, "xb") as f:
                f.truncate(size_mib << 20)  # sparse
        except OSError as exc:
            raise ApiError.of(HostError(f"cannot create the disk image: {exc.strerror}")) from None
        created = now_iso()
        try:
            with self.core.mutation(ctx, "201") as c:
                c.execute("INSERT INTO disks VALUES (?,?,?,?,?,?)", (disk_id, tenant, name, size_mib, str(path), created))
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return {"id": disk_id, "tenant": tenant, "name": name, "size_mib": size_mib, "created": created}

    def _disk(self, ctx: ReqCtx, disk_id: str, action: str) -> Any:
        return self.core.owned_row(ctx, "disk", disk_id, action)

    def disk_get(self, ctx: ReqCtx, disk_id: str) -> dict[str, Any]:
        return _disk_out(self._disk(ctx, disk_id, "disk/read"))

    def disk_list(self, ctx: ReqCtx, tenant: str) -> list[dict[str, Any]]:
        ctx.action, ctx.scope, ctx.decision = "disk/read", rbac.tenant_scope(tenant), "allow"
        rows = self.store.q("SELECT * FROM disks WHERE tenant = ? ORDER BY name", (tenant,))
        return [_disk_out(r) for r in self.core.visible_rows(ctx, "disk", rows)]

    def disk_delete(self, ctx: ReqCtx, disk_id: str) -> None:
        row = self._disk(ctx, disk_id, "disk/delete")
        with self.core.mutation(ctx, "204") as c:
            if self.users(disk_id, writable_only=False):
                raise ApiError(409, "the disk is attached to a VM; delete the VM first")
            c.execute("DELETE FROM disks WHERE id = ?", (disk_id,))
        try:
            Path(row["path"]).unlink(missing_ok=True)
        except OSError:
            pass


def _disk_out(r: Any) -> dict[str, Any]:
    return {"id": r["id"], "tenant": r["tenant"], "name": r["name"], "size_mib": r["size_mib"], "created": r["created"]}


def disk_routes(svc: Callable[[], DiskService]) -> APIRouter:
    r = router()

    @r.post("/tenants/{tenant_id}/disks", response_model=DiskOut, status_code=201)
    def disk_create(tenant_id: UUID, body: DiskCreate, ctx: ReqCtx = Ctx) -> Any:
        return svc().disk_create(ctx, str(tenant_id), body.name, body.size_mib)

    @r.get("/tenants/{tenant_id}/disks", response_model=list[DiskOut])
    def disk_list(tenant_id: UUID, ctx: ReqCtx = Ctx) -> Any:
        return svc().disk_list(ctx, str(tenant_id))

    @r.get("/disks/{disk_id}", response_model=DiskOut)
    def disk_get(disk_id: UUID, ctx: ReqCtx = Ctx) -> Any:
        return svc().disk_get(ctx, str(disk_id))

    @r.delete("/disks/{disk_id}", status_code=204)
    def disk_delete(disk_id: UUID, ctx: ReqCtx = Ctx) -> Response:
        svc().disk_delete(ctx, str(disk_id))
        return Response(status_code=204)

    return r
