"""The fleet API: the host API's routes, mTLS, tenants, RBAC and audit, with VMs kept in etcd (docs/FLEET.md).

FleetDaemon is the host Daemon (principals, roles, tenants, disks and the audit log in the controller's
state directory) with FleetVmService behind the host API's VM routes: it reads and writes the fleet's
records in etcd instead of running VMs itself; every write is a transaction guarded by the controller's leadership (rule F4). Routes added:
GET /v1/hosts, POST /v1/hosts/{host}/drain and /undrain. VMs answer with the host they run on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from bulkhead.control import rbac
from bulkhead.control.models import VmOut
from bulkhead.daemon.auditlog import now_iso
from bulkhead.daemon.daemon import Daemon
from bulkhead.daemon.routing import Ctx, router
from bulkhead.daemon.service import NOT_FOUND, ApiError, Core, Paths, ReqCtx
from bulkhead.daemon.store import new_id
from bulkhead.daemon.tenants import TenantService
from bulkhead.daemon.vms import VmService, create_checks
from bulkhead.errors import ConfigError, HostError
from bulkhead.fleet.controller import Controller, Snapshot, host_table
from bulkhead.fleet.model import encode, key, valid_host_id
from bulkhead.fleet.store import Cmp, Op

__all__ = ["FleetDaemon", "FleetTenantService", "FleetVmOut", "FleetVmService", "HostOut", "host_routes"]


class FleetVmOut(VmOut):
    host: str | None = None


class HostOut(BaseModel):
    host: str
    state: str
    vms: int
    mem_free_mib: int
    mem_mib: int
    attestation_age_s: float | None
    trusted: bool
    reasons: list[str]
    drained: bool


class SharedPaths(Paths):
    """Images and disks live on the shared directory every host reaches; the rest in the state dir."""

    def __init__(self, state_dir: Path, shared: Path) -> None:
        super().__init__(state_dir)
        self.shared = shared

    @property
    def images(self) -> Path:
        return self.shared / "images"

    @property
    def disks(self) -> Path:
        return self.shared / "disks"


class FleetVmService:
    """The VM operations of the fleet API, with VmService's method names so that `vm_routes` serves them:
    every record is in etcd and every write is a transaction guarded by the controller's leadership (F4).
    Tenants, RBAC, images and the audit log are the host daemon's (`core`, `vms.create_checks`)."""

    def __init__(self, core: Core, vms: VmService, controller: Controller) -> None:
        self.core = core
        self.store = core.store
        self.vms = vms
        self.controller = controller

    def fleet_event(self, kind: str, action: str, detail: dict[str, Any]) -> None:
        try:
            self.core.event(kind, action, vm=str(detail.get("vm", "")), detail=detail)
        except ApiError as exc:  # the controller goes on; the next decision is audited again
            print(f"bulkhead fleet: audit: {exc.detail}")

    # ---- helpers ------------------------------------------------------------------------------------
    def snap(self) -> Snapshot:
        try:
            return Snapshot.read(self.controller.store)
        except HostError as exc:
            raise ApiError(503, f"etcd is unavailable: {exc}") from None

    def write(self, cmp: list[Cmp], ops: list[Op], what: str) -> None:
        try:
            ok = self.controller._guarded(cmp, ops)
        except HostError as exc:
            raise ApiError(503, f"etcd is unavailable, nothing was changed: {exc}") from None
        if not ok:
            raise ApiError(409, f"{what}: changed concurrently or this controller no longer leads; retry")

    def _vm_out(self, snap: Snapshot, vid: str) -> dict[str, Any]:
        vm = snap.rec("vms", vid)
        assert vm is not None
        s = vm["spec"]
        a = snap.rec("assign", vid)
        claim = snap.rec("running", vid)
        if vm.get("desired") == "running":
            state = "running" if claim is not None and a is not None and claim.get("host") == a.get("host") \
                else "starting" if a is not None else "pending"
        else:
            state = "exited" if vm.get("desired") == "exited" else "stopped"
        return {"id": vid, "tenant": vm["tenant"], "name": vm["name"], "state": state, "kernel": s["kernel"],
                "initrd": s.get("initrd"), "cmdline": s.get("cmdline", ""), "mem_mib": s["mem_mib"],
                "cpus": s["cpus"], "drives": [{"disk": d["disk"], "read_only": d["read_only"]} for d in s["drives"]],
                "nics": [], "rng": bool(s.get("rng")), "exit_status": vm.get("exit_status"),
                "created": vm["created"], "updated": vm["updated"], "expected_digest": s.get("expected_digest"),
                "host": (claim or a or {}).get("host") if state in ("running", "starting") else None}

    def _fleet_vm(self, ctx: ReqCtx, snap: Snapshot, vid: str, action: str) -> dict[str, Any]:
        ctx.vm = vid
        vm = snap.rec("vms", vid)
        if vm is None:
            raise self.core.deny_unknown(ctx, action)
        scope = rbac.vm_scope(str(vm["tenant"]), vid)
        self.core.authorize(ctx, action, scope, visible=lambda: self.core.allowed(ctx.caller, "vm/read", scope))
        return vm

    # ---- VMs ----------------------------------------------------------------------------------------
    def _drives(self, snap: Snapshot, tenant: str, body: Any) -> list[dict[str, Any]]:
        """The drives of a new VM: each a disk of the tenant, and a writable one exclusive fleet-wide."""
        drives = []
        for d in body.drives:
            disk = self.store.q1("SELECT * FROM disks WHERE id = ? AND tenant = ?", (str(d.disk), tenant))
            if disk is None:
                raise ApiError(422, f"disk {d.disk} was not found in tenant {tenant}")
            for other in snap.names("vms"):
                for od in (snap.rec("vms", other) or {}).get("spec", {}).get("drives", []):
                    if od["disk"] == str(d.disk) and not (od["read_only"] and d.read_only):
                        raise ApiError(409, f"disk {d.disk} is attached to another VM; a writable disk is "
                                            "exclusive fleet-wide")
            drives.append({"disk": str(d.disk), "read_only": bool(d.read_only)})
        return drives

    def vm_create(self, ctx: ReqCtx, body: Any) -> dict[str, Any]:
        tenant, _ = create_checks(self.vms, ctx, body)  # the host API's checks: tenant, RBAC, images, config
        ts = rbac.tenant_scope(tenant)
        if body.nics:
            raise ApiError(422, "fleet VMs have no NICs yet: cross-host tenant networks come with the overlay "
                                "(docs/FLEET.md)")
        if getattr(body, "vsock_cid", None) is not None:
            raise ApiError(422, "fleet VMs have no vsock yet: a host-side socket is per host (docs/VSOCK.md)")
        snap = self.snap()
        drives = self._drives(snap, tenant, body)
        vid = new_id()
        ctx.vm = vid
        ctx.detail["vm_name"] = body.name
        now = now_iso()
        spec = {"kernel": body.kernel, "initrd": body.initrd, "cmdline": body.cmdline, "mem_mib": body.mem_mib,
                "cpus": body.cpus, "drives": drives, "rng": bool(body.rng)}
        if getattr(body, "expected_digest", None):
            spec["expected_digest"] = body.expected_digest
        rec = {"id": vid, "tenant": tenant, "name": body.name, "spec": spec, "desired": "stopped",
               "created": now, "updated": now, "exit_status": None}
        self.core.event("vm", "vm.create", vm=vid, scope=ts, principal=ctx.caller.id, result="intent",
                        request_id=ctx.request_id, detail={"name": body.name})
        name_key = key("names", tenant, body.name)
        if snap.kv("names", f"{tenant}/{body.name}") is not None:
            raise ApiError(409, f"a VM named {body.name!r} already exists in this tenant")
        self.write([Cmp(name_key, "CREATE", 0), Cmp(key("vms", vid), "CREATE", 0)],
                   [Op(name_key, vid), Op(key("vms", vid), encode(rec))], "create")
        return self._vm_out(self.snap(), vid)

    def vm_get(self, ctx: ReqCtx, vm_id: str) -> dict[str, Any]:
        snap = self.snap()
        self._fleet_vm(ctx, snap, vm_id, "vm/read")
        return self._vm_out(snap, vm_id)

    def vm_list(self, ctx: ReqCtx, tenant: str | None = None) -> list[dict[str, Any]]:
        ctx.action, ctx.scope, ctx.decision = "vm/read", rbac.tenant_scope(tenant) if tenant else "/", "allow"
        snap = self.snap()
        rows = [{"id": v, "tenant": (snap.rec("vms", v) or {}).get("tenant", "")} for v in snap.names("vms")]
        rows = [r for r in rows if r["tenant"] and (tenant is None or r["tenant"] == tenant)]
        out = [self._vm_out(snap, r["id"]) for r in self.core.visible_rows(ctx, "vm", rows)]
        return sorted(out, key=lambda v: v["created"])

    def vm_op(self, ctx: ReqCtx, vm_id: str, op: str) -> dict[str, Any]:
        snap = self.snap()
        vm = self._fleet_vm(ctx, snap, vm_id, f"vm/{op}")
        if op in ("pause", "resume"):
            raise ApiError(409, f"{op} is not offered by the fleet (a paused VM would still hold its host)")
        want = "running" if op == "start" else "stopped"
        if vm.get("desired") == want:
            return self._vm_out(snap, vm_id)  # idempotent: already asked for
        self.core.event("vm", f"vm.{op}", vm=vm_id, scope=ctx.scope, principal=ctx.caller.id, result="intent",
                        request_id=ctx.request_id, detail={"from": vm.get("desired"), "to": want})
        kv = snap.kv("vms", vm_id)
        assert kv is not None
        new = {**vm, "desired": want, "updated": now_iso(), **({"exit_status": None, "error": None}
                                                                if op == "start" else {})}
        self.write([Cmp(key("vms", vm_id), "MOD", kv.mod_revision)], [Op(key("vms", vm_id), encode(new))], op)
        return self._vm_out(self.snap(), vm_id)

    def vm_delete(self, ctx: ReqCtx, vm_id: str) -> None:
        snap = self.snap()
        vm = self._fleet_vm(ctx, snap, vm_id, "vm/delete")
        if vm.get("desired") == "running" or snap.kv("running", vm_id) is not None:
            raise ApiError(409, "stop the VM first (it is running or still stopping on its host)")
        kv = snap.kv("vms", vm_id)
        assert kv is not None
        self.core.event("vm", "vm.delete", vm=vm_id, scope=ctx.scope, principal=ctx.caller.id, result="intent",
                        request_id=ctx.request_id, detail={"name": vm["name"]})
        self.write([Cmp(key("vms", vm_id), "MOD", kv.mod_revision)],
                   [Op(key("vms", vm_id)), Op(key("names", str(vm["tenant"]), str(vm["name"]))),
                    Op(key("assign", vm_id)), Op(key("exit", vm_id))], "delete")
        with self.store.txn() as c:
            c.execute("DELETE FROM assignments WHERE scope = ?", (rbac.vm_scope(str(vm["tenant"]), vm_id),))
            self.core.rbac_changed()

    def vm_console(self, ctx: ReqCtx, vm_id: str, offset: int, limit: int) -> dict[str, Any]:
        self._fleet_vm(ctx, self.snap(), vm_id, "vm/console/read")
        raise ApiError(409, "console output stays on the VM's host in the fleet (docs/FLEET.md)")

    def vm_events(self, ctx: ReqCtx, vm_id: str) -> list[dict[str, Any]]:
        self._fleet_vm(ctx, self.snap(), vm_id, "vm/events/read")
        from bulkhead.daemon.auditlog import query_records

        return [{"time": r.get("time", ""), "event": r.get("action", ""), "detail": r.get("detail") or {}}
                for r in query_records(self.core.audit.path, vm=vm_id, limit=200)
                if r.get("kind") in ("vm", "security")]

    def vm_measurement(self, ctx: ReqCtx, vm_id: str) -> dict[str, Any]:
        self._fleet_vm(ctx, self.snap(), vm_id, "vm/read")
        raise ApiError(409, "launch measurements are taken by the VM's host in the fleet")

    # ---- hosts ----------------------------------------------------------------------------------------
    def host_list(self, ctx: ReqCtx) -> list[dict[str, Any]]:
        self.core.authorize(ctx, "host/read", "/", visible=lambda: True)
        snap = self.snap()
        c = self.controller
        return host_table(snap, c.hosts(snap), time.time(), c.t.attest_max_age)

    def host_drain(self, ctx: ReqCtx, host: str, drain: bool) -> dict[str, Any]:
        self.core.authorize(ctx, "host/drain", "/", visible=lambda: True)
        try:
            valid_host_id(host)
        except ConfigError as exc:
            raise ApiError.of(exc) from None
        snap = self.snap()
        if host not in set(snap.names("known")) | set(snap.names("hosts")):
            raise ApiError(404, NOT_FOUND)
        ctx.detail["host"] = host
        self.core.event("system", "fleet.host.drain" if drain else "fleet.host.undrain", principal=ctx.caller.id,
                        result="intent", request_id=ctx.request_id, detail={"host": host})
        op = Op(key("drain", host), encode({"by": ctx.caller.id, "at": now_iso()})) if drain else Op(key("drain", host))
        self.write([], [op], "drain")
        snap = self.snap()
        rows = host_table(snap, self.controller.hosts(snap), time.time(), self.controller.t.attest_max_age)
        return next(r for r in rows if r["host"] == host)


class FleetTenantService(TenantService):
    """Tenants as on a host, except that one with VMs in the fleet is not deleted."""

    def __init__(self, core: Core, fleet: FleetVmService) -> None:
        super().__init__(core)
        self.fleet = fleet

    def tenant_delete(self, ctx: ReqCtx, tenant_id: str) -> None:
        snap = self.fleet.snap()
        if any((snap.rec("vms", v) or {}).get("tenant") == tenant_id for v in snap.names("vms")):
            self._tenant(ctx, tenant_id, "tenant/delete")
            raise ApiError(409, "the tenant still has VMs in the fleet")
        super().tenant_delete(ctx, tenant_id)


def host_routes(svc: Callable[[], FleetVmService]) -> APIRouter:
    """GET /v1/hosts, POST /v1/hosts/{host}/drain and /undrain (docs/FLEET.md)."""
    r = router()

    @r.get("/hosts", response_model=list[HostOut])
    def host_list(ctx: ReqCtx = Ctx) -> Any:
        return svc().host_list(ctx)

    @r.post("/hosts/{host}/drain", response_model=HostOut)
    def host_drain(host: str, ctx: ReqCtx = Ctx) -> Any:
        return svc().host_drain(ctx, host, True)

    @r.post("/hosts/{host}/undrain", response_model=HostOut)
    def host_undrain(host: str, ctx: ReqCtx = Ctx) -> Any:
        return svc().host_drain(ctx, host, False)

    return r


class FleetDaemon(Daemon):
    """The host Daemon with `FleetVmService` behind the VM routes and `host_routes` added."""

    vm_model = FleetVmOut
    fleet: FleetVmService

    def attach_fleet(self, controller: Controller, shared: Path) -> None:
        paths = SharedPaths(self.core.paths.state_dir, shared)
        self.core.paths = self.vms.paths = self.disks.paths = paths  # each service holds core's Paths
        for sub in ("images", "disks"):
            (shared / sub).mkdir(parents=True, exist_ok=True)
        self.fleet = FleetVmService(self.core, self.vms, controller)
        self.tenants = FleetTenantService(self.core, self.fleet)

    @property
    def vm_api(self) -> Any:
        return self.fleet

    def extra_routers(self) -> list[APIRouter]:
        return [host_routes(lambda: self.fleet)]

    def fleet_event(self, kind: str, action: str, detail: dict[str, Any]) -> None:
        self.fleet.fleet_event(kind, action, detail)
