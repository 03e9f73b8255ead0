"""VMs and disk images: create/list/get/delete, lifecycle operations, console, events.

Isolation rules enforced here: a VM's drives must be disks of the VM's own tenant (a disk of another
tenant is reported exactly like a missing one); a writable disk is attached to at most one VM; NICs attach
to networks of the VM's own tenant only (networks.py). Kernel and initrd are *names* of files in the daemon's image directory, never
host paths chosen by the caller. Lifecycle operations append a `vm` audit record before they act
(fail closed) and are serialized per VM.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

from fastapi import APIRouter, Query, Response

from bulkhead.control import rbac
from bulkhead.control.lifecycle import LifecycleError, next_state
from bulkhead.control.models import ConsoleOut, MeasurementOut, VmCreate, VmEventOut, VmOut
from bulkhead.control.opsmodels import VmStatsOut
from bulkhead.daemon.auditlog import now_iso
from bulkhead.daemon.backend import VmBackend, VmSpec
from bulkhead.daemon.completion import LifecycleCompletion
from bulkhead.daemon.disks import DiskService
from bulkhead.daemon.integrity import HostIntegrity
from bulkhead.daemon.launchcheck import LaunchCheck
from bulkhead.daemon.logsetup import lifecycle
from bulkhead.daemon.networks import TenantNetworkService
from bulkhead.daemon.routing import Ctx, TenantRefQuery, router
from bulkhead.daemon.service import NOT_FOUND, ApiError, Core, ReqCtx
from bulkhead.daemon.store import new_id
from bulkhead.daemon.vmstats import vm_stats
from bulkhead.errors import ConfigError, HostError, StartRefused
from bulkhead.integrity.errors import CodeMismatch

__all__ = ["VmService", "create_checks", "vm_routes"]

CONSOLE_LIMIT = 65536
_SECURITY_EXITS = ("reset", "triple-fault", "internal-error", "guest-fault", "worker-crash", "seccomp-kill",
                   "oom-kill", "protocol-violation")


def security_exit_kind(status: int | None) -> str | None:
    """The security-relevant reason behind a `bulkhead run` exit status (see runtime.exits), or None.
    A process killed by SIGSYS (status 128 + 31) is a seccomp kill as well."""
    if status is None:
        return None
    if status == 128 + 31:
        return "seccomp-kill"
    from bulkhead.runtime.exits import EXIT_STATUS

    for kind in _SECURITY_EXITS:
        if EXIT_STATUS.get(kind) == status:
            return kind
    return None



def _log_exit(row: Any, exit_status: int | None, why: dict[str, Any]) -> None:
    """The lifecycle line of a VM that ended on its own (daemon/logsetup.py)."""
    lifecycle("vm.state", vm=row["id"], name=row["name"], op="exit", to="exited", exit_status=exit_status,
              **{k: v for k, v in why.items() if k == "reason"})


class VmService:
    """VMs: create/read/delete, the lifecycle (serialized per VM, audited before it acts), console and
    events. Given the shared core, the VMM backend, the tenant networks (NICs), the disks (drives) and
    the launch checks (images, measurement, the host's integrity gate)."""

    def __init__(self, core: Core, backend: VmBackend, networks: TenantNetworkService, disks: DiskService,
                 integrity: HostIntegrity) -> None:
        self.core = core
        self.store = core.store
        self.paths = core.paths
        self.backend = backend
        self.networks = networks
        self.disks = disks
        self.launch = LaunchCheck(core, integrity)
        self.completion = LifecycleCompletion(core, backend)
        self._vm_locks: dict[str, threading.Lock] = {}

    @property
    def integrity(self) -> HostIntegrity:
        return self.launch.integrity

    @integrity.setter
    def integrity(self, gate: HostIntegrity) -> None:
        self.launch.integrity = gate

    def vm_lock(self, vm_id: str) -> threading.Lock:
        """The lock that serializes one VM's lifecycle (operations, exits noticed, integrity stops)."""
        with self.store.lock:
            return self._vm_locks.setdefault(vm_id, threading.Lock())

    def _vm(self, ctx: ReqCtx, vm_id: str, action: str) -> Any:
        ctx.vm = vm_id
        return self.core.owned_row(ctx, "vm", vm_id, action)

    def refresh(self, row: Any) -> Any:
        """Notice a VMM process that ended on its own: running/paused -> exited (audited)."""
        if row["state"] not in ("running", "paused"):
            return row
        try:
            st = self.backend.status(row["id"])
        except HostError:  # e.g. a jailed worker that does not answer in time: report the stored state
            return row
        if st.state in ("running", "paused"):
            return row
        why, reported = self.exit_reason(row["id"])  # the jailed worker's host-decided reason, if any
        try:
            self.core.event("vm", "vm.exit", vm=row["id"], scope=rbac.vm_scope(row["tenant"], row["id"]),
                       result=str(st.exit_status), detail={"from": row["state"], "to": "exited", **why})
        except ApiError:
            return row  # not audited -> not recorded; try again later
        try:
            self.store.set_vm_state(row["id"], "exited", exit_status=st.exit_status)
        except sqlite3.Error:
            return row  # a full or locked state database: noticed again at the next read
        _log_exit(row, st.exit_status, why)
        self.core.note_vm_event(row["id"], "exited", {"status": st.exit_status, **why})
        kind = why.get("reason") if why else security_exit_kind(st.exit_status)
        if kind in _SECURITY_EXITS and not reported:  # stopped for a security reason: a security event too
            try:
                self.core.security_event(row["id"], str(kind), {"exit_status": st.exit_status, "source": "vmm exit status",
                                                           **why})
            except ApiError:
                pass  # the vm.exit record above already holds the status
        return self.store.q1("SELECT * FROM vms WHERE id = ?", (row["id"],))

    # ------------------------------------------------------------------ create / read / delete
    def vm_create(self, ctx: ReqCtx, body: Any) -> dict[str, Any]:
        tenant, _ = create_checks(self, ctx, body)
        vm_id = new_id()
        ctx.vm = vm_id
        ctx.detail["vm_name"] = body.name
        now = now_iso()
        with self.core.mutation(ctx, "201") as c:  # checks and insert in one transaction: no races
            drives, nics = self._attachments(tenant, body, c, vm_id)
            if self.store.q1("SELECT 1 FROM vms WHERE tenant = ? AND name = ?", (tenant, body.name)):
                raise ApiError(409, f"a VM named {body.name!r} already exists in this tenant")
            spec = {"kernel": body.kernel, "initrd": body.initrd, "cmdline": body.cmdline, "mem_mib": body.mem_mib,
                    "cpus": body.cpus, "drives": drives, "nics": nics, "rng": body.rng}
            if getattr(body, "expected_digest", None):  # integrity: the launch digest this VM must have
                spec["expected_digest"] = body.expected_digest
            if body.vsock_cid is not None:
                spec["vsock"] = vsock_spec(c, self.paths.vms, vm_id, body.vsock_cid)
            c.execute("INSERT INTO vms VALUES (?,?,?,?,?,NULL,NULL,?,?)",
                      (vm_id, tenant, body.name, "stopped", json.dumps(spec, sort_keys=True), now, now))
            c.execute("INSERT INTO vm_events(vm, time, event, detail) VALUES (?,?,?,?)",
                      (vm_id, now, "created", json.dumps({"by": ctx.caller.id})))
        if body.nics:  # guard rules and DHCP entries for the new NICs (taps come at start)
            self.networks.net_sync_quietly("vm create")
        row = self.store.q1("SELECT * FROM vms WHERE id = ?", (vm_id,))
        assert row is not None
        return self.store.vm_out(row)

    def _attachments(self, tenant: str, body: Any, c: Any, vm_id: str) -> tuple[list[dict[str, Any]],
                                                                                list[dict[str, Any]]]:
        """Drives (disks of this tenant only; writable ones exclusive) and NICs (networks of this tenant
        only; rows inserted with `c`). Raises ApiError 422/409. Called inside the create transaction."""
        drives = []
        seen: set[str] = set()
        for d in body.drives:
            disk_id = str(d.disk)
            disk = self.store.q1("SELECT * FROM disks WHERE id = ? AND tenant = ?", (disk_id, tenant))
            if disk is None:
                raise ApiError(422, f"disk {disk_id} was not found in tenant {tenant}")
            if disk_id in seen:
                raise ApiError(422, f"disk {disk_id} is listed twice")
            seen.add(disk_id)
            if not d.read_only and self.disks.users(disk_id, writable_only=False):
                raise ApiError(409, f"disk {disk_id} is attached to another VM; attach it read-only")
            if self.disks.users(disk_id, writable_only=True):
                raise ApiError(409, f"disk {disk_id} is attached writable to another VM")
            drives.append({"disk": disk_id, "read_only": d.read_only})
        return drives, self.networks.attach_nics(c, vm_id, tenant, body.nics)

    def _image(self, name: str, what: str) -> Any:
        path = self.paths.images / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise ApiError(422, f"{what} image {name!r} is not in the daemon's image directory "
                           f"{self.paths.images} (add it with `bulkhead image import FILE --name {name}`)")
        return path

    def vm_get(self, ctx: ReqCtx, vm_id: str) -> dict[str, Any]:
        row = self._vm(ctx, vm_id, "vm/read")
        return self.store.vm_out(self.refresh(row))

    def vm_list(self, ctx: ReqCtx, tenant: str | None = None) -> list[dict[str, Any]]:
        ctx.action, ctx.scope, ctx.decision = "vm/read", rbac.tenant_scope(tenant) if tenant else "/", "allow"
        if tenant:
            rows = self.store.q("SELECT * FROM vms WHERE tenant = ? ORDER BY created", (tenant,))
        else:
            rows = self.store.q("SELECT * FROM vms ORDER BY created")
        return [self.store.vm_out(self.refresh(r)) for r in self.core.visible_rows(ctx, "vm", rows)]

    def vm_delete(self, ctx: ReqCtx, vm_id: str) -> None:
        row = self._vm(ctx, vm_id, "vm/delete")
        with self.vm_lock(vm_id):
            row = self.refresh(self.store.q1("SELECT * FROM vms WHERE id = ?", (vm_id,)))
            if row is None:
                raise ApiError(404, NOT_FOUND)
            try:
                next_state(row["state"], "delete")
            except LifecycleError as exc:
                raise ApiError.of(exc) from None
            with self.core.mutation(ctx, "204") as c:
                c.execute("DELETE FROM vms WHERE id = ?", (vm_id,))
                c.execute("DELETE FROM vm_events WHERE vm = ?", (vm_id,))
                vs = rbac.vm_scope(row["tenant"], vm_id)
                c.execute("DELETE FROM assignments WHERE scope = ?", (vs,))
                had_nics = c.execute("DELETE FROM nics WHERE vm = ?", (vm_id,)).rowcount > 0
                self.core.rbac_changed()
            self.backend.forget(vm_id)
            shutil.rmtree(self.paths.vms / vm_id, ignore_errors=True)
            if had_nics:  # its taps, guard rules and DHCP entries go
                self.networks.net_sync_quietly("vm delete")

    # ------------------------------------------------------------------ lifecycle
    def begin_op(self, ctx: ReqCtx, vm_id: str, op: str, **detail: Any) -> tuple[Any, str]:
        """Under the VM's lock: the fresh row, the lifecycle check (409), and the `vm.<op>` intent record
        with the principal, written before the change happens (fail closed: 503). Returns (row, new state).
        Used by vm_op and by power.py (shutdown, reboot)."""
        row = self.refresh(self.store.q1("SELECT * FROM vms WHERE id = ?", (vm_id,)))
        if row is None:
            raise ApiError(404, NOT_FOUND)
        try:
            new = next_state(row["state"], op)
        except LifecycleError as exc:
            raise ApiError.of(exc) from None
        self.core.event("vm", f"vm.{op}", vm=vm_id, scope=ctx.scope, principal=ctx.caller.id, result="intent",
                        request_id=ctx.request_id, detail={"from": row["state"], "to": new, **detail})
        return row, new

    def vm_op(self, ctx: ReqCtx, vm_id: str, op: str) -> dict[str, Any]:
        self._vm(ctx, vm_id, f"vm/{op}")
        with self.vm_lock(vm_id):
            row, new = self.begin_op(ctx, vm_id, op)
            pid = row["pid"]
            try:
                if op == "start":
                    spec = self._spec(row)
                    digest = self.launch.check_start(ctx, row, spec)  # integrity gate + measurement; ApiError refuses
                    spec = dataclasses.replace(spec, expected_digest=digest)  # the VMM re-checks its bytes
                    pid = self.networks.start_with_nics(self.backend, vm_id, spec)  # NICs: taps made in the tenant namespace
                elif op == "stop":
                    self.backend.stop(vm_id)
                    pid = None
                elif op == "pause":
                    self.backend.pause(vm_id)
                elif op == "resume":
                    self.backend.resume(vm_id)
            except StartRefused as exc:  # the loader or the VMM refused it before the guest ran: the caller's input
                self.core.note_vm_event(vm_id, f"{op}-refused", {"kind": exc.kind, "error": str(exc)})
                ctx.detail.update(error=str(exc), kind=exc.kind)
                raise ApiError.of(exc, f"cannot {op} the VM: {exc}") from None
            except CodeMismatch as exc:  # the worker's pre-import gate refused bulkhead's own code
                self.launch.code_mismatch(ctx, vm_id, exc)
            except HostError as exc:
                self.core.note_vm_event(vm_id, f"{op}-failed", {"error": str(exc)})
                ctx.detail["error"] = str(exc)
                raise ApiError.of(exc, f"cannot {op} the VM: {exc}") from None
            # the new state and this request's audit record in one transaction, or the change undone
            self.completion.complete(ctx, vm_id, op, new, pid, self.exit_reason(vm_id)[0] if op == "stop" else None)
            lifecycle("vm.state", vm=vm_id, name=row["name"], op=op, to=new, by=ctx.caller.name)
            final = self.store.q1("SELECT * FROM vms WHERE id = ?", (vm_id,))
            assert final is not None
            return self.store.vm_out(final)

    def _spec(self, row: Any) -> VmSpec:
        spec = json.loads(row["spec"])
        drives = []
        for d in spec.get("drives", []):
            disk = self.store.q1("SELECT path FROM disks WHERE id = ? AND tenant = ?", (d["disk"], row["tenant"]))
            if disk is None:
                raise ApiError(409, f"disk {d['disk']} no longer exists")
            drives.append((disk["path"], bool(d["read_only"])))
        console = self.paths.vms / row["id"] / "console.log"
        if spec.get("vsock"):  # the socket's directory, root's only (0700): docs/VSOCK.md "The daemon"
            (self.paths.vms / row["id"] / "vsock").mkdir(mode=0o700, parents=True, exist_ok=True)
        return VmSpec(
            kernel=str(self.paths.images / spec["kernel"]),
            initrd=str(self.paths.images / spec["initrd"]) if spec.get("initrd") else None,
            cmdline=spec.get("cmdline", ""), mem_mib=spec["mem_mib"], cpus=spec["cpus"], drives=tuple(drives),
            nics=self.networks.nic_configs(row["id"]), rng=bool(spec.get("rng")),
            console_path=str(console),
            vsock=(spec["vsock"]["socket"], int(spec["vsock"]["cid"])) if spec.get("vsock") else None,
        )

    def exit_reason(self, vm_id: str) -> tuple[dict[str, Any], bool]:
        """({reason, detail} of the backend's host-decided exit, or {}), and whether the backend has already
        reported it as a security event (jailed workers: seccomp kill, protocol violation)."""
        get = getattr(self.backend, "exit_reason", None)
        res = get(vm_id) if get is not None else None
        if res is None:
            return {}, False
        return {"reason": res.reason.kind, "detail": res.reason.detail[:512]}, bool(res.security_event)

    def vm_measurement(self, ctx: ReqCtx, vm_id: str) -> dict[str, Any]:
        """The VM's launch digest computed now (LaunchCheck.measurement). Raises ApiError 404/403
        (access), 409 (a disk is gone), 503 (an image cannot be read)."""
        row = self._vm(ctx, vm_id, "vm/read")
        return self.launch.measurement(vm_id, row, self._spec(row))

    def monitor_once(self) -> None:
        """Notice VMMs that ended on their own (audited as vm.exit, plus a security event when the exit
        status says why), without waiting for someone to read the VM."""
        for row in self.store.q("SELECT * FROM vms WHERE state IN ('running', 'paused')"):
            with self.vm_lock(row["id"]):
                fresh = self.store.q1("SELECT * FROM vms WHERE id = ?", (row["id"],))
                if fresh is not None:
                    self.refresh(fresh)

    def stop_all_untrusted(self, reasons: list[str]) -> list[str]:
        """Policy `running_vms_when_untrusted: stop`: stop every running/paused VM, each audited first."""
        stopped = []
        for row in self.store.q("SELECT * FROM vms WHERE state IN ('running', 'paused')"):
            with self.vm_lock(row["id"]):
                fresh = self.store.q1("SELECT * FROM vms WHERE id = ?", (row["id"],))
                if fresh is None or fresh["state"] not in ("running", "paused"):
                    continue
                try:
                    self.core.event("vm", "vm.stop", vm=row["id"], scope=rbac.vm_scope(row["tenant"], row["id"]),
                               result="intent", detail={"from": fresh["state"], "to": "stopped",
                                                        "reason": "host untrusted", "reasons": reasons[:8]})
                except ApiError:
                    continue  # not audited -> not done; the next round retries
                try:
                    self.backend.stop(row["id"])
                except HostError:
                    continue
                self.store.set_vm_state(row["id"], "stopped", pid=None, exit_status=None)
                self.store.vm_event(row["id"], "stopped", {"op": "stop", "by": "integrity gate"})
                stopped.append(row["id"])
        return stopped

    def vm_console(self, ctx: ReqCtx, vm_id: str, offset: int, limit: int) -> dict[str, Any]:
        self._vm(ctx, vm_id, "vm/console/read")
        data = self.backend.console(vm_id, offset, min(limit, CONSOLE_LIMIT))
        return {"offset": offset, "next_offset": offset + len(data), "data": data.decode("utf-8", "replace")}

    def vm_events(self, ctx: ReqCtx, vm_id: str) -> list[dict[str, Any]]:
        self._vm(ctx, vm_id, "vm/events/read")
        rows = self.store.q("SELECT time, event, detail FROM vm_events WHERE vm = ? ORDER BY id", (vm_id,))
        return [dict(r) for r in rows]

    def mark_lost_on_startup(self) -> list[str]:
        """Restart policy: VMs recorded as running or paused did not survive the daemon (their VMM
        processes die with it, PR_SET_PDEATHSIG): mark them `lost`, audited. They are not restarted
        automatically; `vm start` starts them again."""
        lost = []
        for row in self.store.q("SELECT * FROM vms WHERE state IN ('running', 'paused')"):
            self.core.event("vm", "vm.lost", vm=row["id"], scope=rbac.vm_scope(row["tenant"], row["id"]),
                       result="lost", detail={"from": row["state"], "pid": row["pid"], "reason": "daemon restart"})
            self.store.set_vm_state(row["id"], "lost")
            self.store.vm_event(row["id"], "lost", {"reason": "daemon restart"})
            lost.append(row["id"])
        return lost


def vsock_spec(c: Any, vms_dir: Path, vm_id: str, cid: int) -> dict[str, Any]:
    """The VM's vsock: its CID, unique among this host's VMs (a guest addresses the host and is
    addressed by its CID, vsock(7)), and its host-side socket under the VM's own state directory."""
    if c.execute("SELECT 1 FROM vms WHERE json_extract(spec, '$.vsock.cid') = ?", (cid,)).fetchone():
        raise ApiError(409, f"vsock CID {cid} is already used by another VM on this host")
    # its own directory: the jail binds the socket's directory (for `<path>_<port>` listeners), and
    # nothing else of the VM's state (console.log) may be in the worker's view
    sock = str(vms_dir / vm_id / "vsock" / "v.sock")
    if len(sock.encode()) > 90:  # sun_path holds 108 bytes, and `<path>_<port>` listeners need room
        raise ApiError(409, f"the state directory's path is too long for a vsock socket ({sock})")
    return {"cid": cid, "socket": sock}


def create_checks(svc: VmService, ctx: ReqCtx, body: Any) -> tuple[str, Any]:
    """`vm create`'s checks, before any change (the fleet's too): tenant, RBAC, images, config."""
    tenant = svc.core.tenant_ref(str(body.tenant))  # a tenant id or name (docs/API.md)
    svc.core.authorize_in_tenant(ctx, "vm/write", tenant)
    kernel = svc._image(body.kernel, "kernel")
    initrd = svc._image(body.initrd, "initrd") if body.initrd else None
    try:  # the runtime's own validation, so an accepted VM is one `bulkhead run` accepts
        from bulkhead.runtime.config import VmConfig

        config = VmConfig(kernel=str(kernel), initrd=str(initrd) if initrd else None, cmdline=body.cmdline,
                          mem_mib=body.mem_mib, cpus=body.cpus, serial="console.log", rng=bool(body.rng))
    except ConfigError as exc:
        raise ApiError.of(exc) from None
    svc.launch.check_images(ctx, config, len(body.drives), len(body.nics))
    return tenant, config


def vm_routes(svc: Callable[[], Any], model: Any = VmOut) -> APIRouter:
    """The VM routes; `svc` gives the service with VmService's method names (the fleet's keeps VMs in
    etcd) and `model` its answer (the fleet's VMs also name their host, docs/FLEET.md)."""
    r = router()

    @r.post("/vms", response_model=model, status_code=201)
    def vm_create(body: VmCreate, ctx: ReqCtx = Ctx) -> Any:
        return svc().vm_create(ctx, body)

    @r.get("/vms", response_model=list[model])
    def vm_list(tenant: UUID | TenantRefQuery | None = None, ctx: ReqCtx = Ctx) -> Any:
        return svc().vm_list(ctx, svc().core.tenant_ref(str(tenant)) if tenant else None)  # tenant id or name

    @r.get("/vms/{vm_id}", response_model=model)
    def vm_get(vm_id: UUID, ctx: ReqCtx = Ctx) -> Any:
        return svc().vm_get(ctx, str(vm_id))

    @r.delete("/vms/{vm_id}", status_code=204)
    def vm_delete(vm_id: UUID, ctx: ReqCtx = Ctx) -> Response:
        svc().vm_delete(ctx, str(vm_id))
        return Response(status_code=204)

    def _op(op: str) -> None:
        def handler(vm_id: UUID, ctx: ReqCtx = Ctx) -> Any:
            return svc().vm_op(ctx, str(vm_id), op)

        handler.__name__ = f"vm_{op}"
        r.post(f"/vms/{{vm_id}}/{op}", response_model=model, name=f"vm_{op}")(handler)

    for op in ("start", "stop", "pause", "resume"):
        _op(op)

    @r.get("/vms/{vm_id}/console", response_model=ConsoleOut)
    def vm_console(
        vm_id: UUID, offset: int = Query(0, ge=0, le=1 << 40), limit: int = Query(65536, ge=1, le=65536),
        ctx: ReqCtx = Ctx,
    ) -> Any:
        return svc().vm_console(ctx, str(vm_id), offset, limit)

    @r.get("/vms/{vm_id}/events", response_model=list[VmEventOut])
    def vm_events(vm_id: UUID, ctx: ReqCtx = Ctx) -> Any:
        return svc().vm_events(ctx, str(vm_id))

    @r.get("/vms/{vm_id}/measurement", response_model=MeasurementOut)
    def vm_measurement(vm_id: UUID, ctx: ReqCtx = Ctx) -> Any:
        return svc().vm_measurement(ctx, str(vm_id))

    @r.get("/vms/{vm_id}/stats", response_model=VmStatsOut, name="vm_stats",
           summary="per-VM counters (exits, device I/O, faults, throttling)")
    def vm_stats_route(vm_id: UUID, ctx: ReqCtx = Ctx) -> Any:
        vms = svc()
        return vm_stats(vms.core, vms.backend, ctx, str(vm_id))  # daemon/vmstats.py

    return r
