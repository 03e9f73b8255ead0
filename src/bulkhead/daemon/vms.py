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
import threading
from typing import Any, NoReturn

from bulkhead.control import rbac
from bulkhead.control.lifecycle import LifecycleError, next_state
from bulkhead.daemon.auditlog import now_iso
from bulkhead.daemon.backend import VmSpec
from bulkhead.daemon.networks import NetworkOps
from bulkhead.daemon.service import NOT_FOUND, ApiError, ReqCtx, config_error
from bulkhead.daemon.store import new_id
from bulkhead.errors import ConfigError, HostError, StartRefused, VmNotRunning
from bulkhead.integrity.errors import CodeMismatch

__all__ = ["VmOps"]

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


class VmOps(NetworkOps):
    _vm_locks: dict[str, threading.Lock]
    integrity: Any  # bulkhead.daemon.integrity.HostIntegrity, set by Daemon.open

    def _vm_lock(self, vm_id: str) -> threading.Lock:
        with self.store.lock:
            if not hasattr(self, "_vm_locks"):
                self._vm_locks = {}
            return self._vm_locks.setdefault(vm_id, threading.Lock())

    def _vm(self, ctx: ReqCtx, vm_id: str, action: str) -> Any:
        ctx.vm = vm_id
        return self.owned_row(ctx, "vm", vm_id, action)

    def _refresh(self, row: Any) -> Any:
        """Notice a VMM process that ended on its own: running/paused -> exited (audited)."""
        if row["state"] not in ("running", "paused"):
            return row
        try:
            st = self.backend.status(row["id"])
        except HostError:  # e.g. a jailed worker that does not answer in time: report the stored state
            return row
        if st.state in ("running", "paused"):
            return row
        why, reported = self._exit_reason(row["id"])  # the jailed worker's host-decided reason, if any
        try:
            self.event("vm", "vm.exit", vm=row["id"], scope=rbac.vm_scope(row["tenant"], row["id"]),
                       result=str(st.exit_status), detail={"from": row["state"], "to": "exited", **why})
        except ApiError:
            return row  # not audited -> not recorded; try again later
        self.store.set_vm_state(row["id"], "exited", exit_status=st.exit_status)
        self.store.vm_event(row["id"], "exited", {"status": st.exit_status, **why})
        kind = why.get("reason") if why else security_exit_kind(st.exit_status)
        if kind in _SECURITY_EXITS and not reported:  # stopped for a security reason: a security event too
            try:
                self.security_event(row["id"], str(kind), {"exit_status": st.exit_status, "source": "vmm exit status",
                                                           **why})
            except ApiError:
                pass  # the vm.exit record above already holds the status
        return self.store.q1("SELECT * FROM vms WHERE id = ?", (row["id"],))

    # ------------------------------------------------------------------ create / read / delete
    def create_checks(self, ctx: ReqCtx, body: Any) -> tuple[str, Any]:
        """`vm create`'s checks before any state changes (the fleet API makes the same ones): the tenant
        exists and the caller may vm/write in it, the images are names in the image directory, the
        configuration is one `bulkhead run` accepts and the images load. Returns (tenant id, VmConfig);
        raises ApiError."""
        tenant = str(body.tenant)
        ts = rbac.tenant_scope(tenant)
        if self.store.q1("SELECT 1 FROM tenants WHERE id = ?", (tenant,)) is None:
            ctx.scope = ts
            raise self.deny_unknown(ctx, "vm/write")
        self.authorize(ctx, "vm/write", ts, visible=lambda: self.can_see_tenant(ctx.caller, tenant))
        kernel = self._image(body.kernel, "kernel")
        initrd = self._image(body.initrd, "initrd") if body.initrd else None
        try:  # the runtime's own validation, so an accepted VM is one `bulkhead run` accepts
            from bulkhead.runtime.config import VmConfig

            config = VmConfig(kernel=str(kernel), initrd=str(initrd) if initrd else None, cmdline=body.cmdline,
                              mem_mib=body.mem_mib, cpus=body.cpus, serial="console.log", rng=bool(body.rng))
        except ConfigError as exc:
            raise config_error(exc) from None
        self._check_images(ctx, config, len(body.drives), len(body.nics))
        return tenant, config

    def vm_create(self, ctx: ReqCtx, body: Any) -> dict[str, Any]:
        tenant, _ = self.create_checks(ctx, body)
        vm_id = new_id()
        ctx.vm = vm_id
        ctx.detail["vm_name"] = body.name
        now = now_iso()
        with self.mutation(ctx, "201") as c:  # checks and insert in one transaction: no races
            drives, nics = self._attachments(tenant, body, c, vm_id)
            if self.store.q1("SELECT 1 FROM vms WHERE tenant = ? AND name = ?", (tenant, body.name)):
                raise ApiError(409, f"a VM named {body.name!r} already exists in this tenant")
            spec = {"kernel": body.kernel, "initrd": body.initrd, "cmdline": body.cmdline, "mem_mib": body.mem_mib,
                    "cpus": body.cpus, "drives": drives, "nics": nics, "rng": body.rng}
            if getattr(body, "expected_digest", None):  # integrity: the launch digest this VM must have
                spec["expected_digest"] = body.expected_digest
            c.execute("INSERT INTO vms VALUES (?,?,?,?,?,NULL,NULL,?,?)",
                      (vm_id, tenant, body.name, "stopped", json.dumps(spec, sort_keys=True), now, now))
            c.execute("INSERT INTO vm_events(vm, time, event, detail) VALUES (?,?,?,?)",
                      (vm_id, now, "created", json.dumps({"by": ctx.caller.id})))
        if body.nics:  # guard rules and DHCP entries for the new NICs (taps come at start)
            self.net_sync_quietly("vm create")
        row = self.store.q1("SELECT * FROM vms WHERE id = ?", (vm_id,))
        assert row is not None
        return self.store.vm_out(row)

    def _check_images(self, ctx: ReqCtx, config: Any, drives: int, nics: int) -> None:
        """`vm create`: the loader's validation of the image, its placement and the configuration (the
        same check runs again at `vm start`, on the bytes that are then measured). Raises ApiError 422
        (kind image-invalid | config-invalid) or 503 when an image cannot be read."""
        from bulkhead.daemon.integrity import MAX_IMAGE, check_boot
        from bulkhead.runtime.config import DriveConfig, NetConfig

        images: list[bytes | None] = []
        for path in (config.kernel, config.initrd):
            if path is None:
                images.append(None)
                continue
            try:
                with open(path, "rb") as f:
                    images.append(f.read(MAX_IMAGE + 1))
            except OSError as exc:
                raise ApiError(503, f"cannot read the image {path.rsplit('/', 1)[-1]}: {exc.strerror}") from None
        # the device count decides the command-line announcements the VMM appends
        shaped = config._replace(drives=tuple(DriveConfig("/dev/null", True) for _ in range(drives)),
                                 nets=tuple(NetConfig(f"tap{i}", "") for i in range(nics)))
        try:
            check_boot(shaped, images[0] or b"", images[1])
        except ConfigError as exc:
            self._refuse_boot(ctx, None, exc, "create")

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
            if not d.read_only and self._disk_users(disk_id, writable_only=False):
                raise ApiError(409, f"disk {disk_id} is attached to another VM; attach it read-only")
            if self._disk_users(disk_id, writable_only=True):
                raise ApiError(409, f"disk {disk_id} is attached writable to another VM")
            drives.append({"disk": disk_id, "read_only": d.read_only})
        return drives, self._attach_nics(c, vm_id, tenant, body.nics)

    def _image(self, name: str, what: str) -> Any:
        path = self.paths.images / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise ApiError(422, f"{what} image {name!r} is not in the daemon's image directory")
        return path

    def _disk_users(self, disk_id: str, writable_only: bool) -> list[str]:
        users = []
        for r in self.store.q("SELECT id, spec FROM vms WHERE spec LIKE ?", (f"%{disk_id}%",)):
            for d in json.loads(r["spec"]).get("drives", []):
                if d["disk"] == disk_id and (not writable_only or not d["read_only"]):
                    users.append(r["id"])
        return users

    def vm_get(self, ctx: ReqCtx, vm_id: str) -> dict[str, Any]:
        row = self._vm(ctx, vm_id, "vm/read")
        return self.store.vm_out(self._refresh(row))

    def vm_list(self, ctx: ReqCtx, tenant: str | None = None) -> list[dict[str, Any]]:
        ctx.action, ctx.scope, ctx.decision = "vm/read", rbac.tenant_scope(tenant) if tenant else "/", "allow"
        if tenant:
            rows = self.store.q("SELECT * FROM vms WHERE tenant = ? ORDER BY created", (tenant,))
        else:
            rows = self.store.q("SELECT * FROM vms ORDER BY created")
        return [self.store.vm_out(self._refresh(r)) for r in self.visible_rows(ctx, "vm", rows)]

    def vm_delete(self, ctx: ReqCtx, vm_id: str) -> None:
        row = self._vm(ctx, vm_id, "vm/delete")
        with self._vm_lock(vm_id):
            row = self._refresh(self.store.q1("SELECT * FROM vms WHERE id = ?", (vm_id,)))
            if row is None:
                raise ApiError(404, NOT_FOUND)
            try:
                next_state(row["state"], "delete")
            except LifecycleError as exc:
                raise ApiError(409, str(exc)) from None
            with self.mutation(ctx, "204") as c:
                c.execute("DELETE FROM vms WHERE id = ?", (vm_id,))
                c.execute("DELETE FROM vm_events WHERE vm = ?", (vm_id,))
                vs = rbac.vm_scope(row["tenant"], vm_id)
                c.execute("DELETE FROM assignments WHERE scope = ?", (vs,))
                had_nics = c.execute("DELETE FROM nics WHERE vm = ?", (vm_id,)).rowcount > 0
                self.rbac_changed()
            self.backend.forget(vm_id)
            shutil.rmtree(self.paths.vms / vm_id, ignore_errors=True)
            if had_nics:  # its taps, guard rules and DHCP entries go
                self.net_sync_quietly("vm delete")

    # ------------------------------------------------------------------ lifecycle
    def vm_op(self, ctx: ReqCtx, vm_id: str, op: str) -> dict[str, Any]:
        self._vm(ctx, vm_id, f"vm/{op}")
        with self._vm_lock(vm_id):
            row = self._refresh(self.store.q1("SELECT * FROM vms WHERE id = ?", (vm_id,)))
            if row is None:
                raise ApiError(404, NOT_FOUND)
            try:
                new = next_state(row["state"], op)
            except LifecycleError as exc:
                raise ApiError(409, str(exc)) from None
            # fail closed: the lifecycle change is recorded before it happens
            self.event("vm", f"vm.{op}", vm=vm_id, scope=ctx.scope, principal=ctx.caller.id, result="intent",
                       request_id=ctx.request_id, detail={"from": row["state"], "to": new})
            pid = row["pid"]
            try:
                if op == "start":
                    spec = self._spec(row)
                    digest = self._launch_check(ctx, row, spec)  # integrity gate + measurement; ApiError refuses
                    spec = dataclasses.replace(spec, expected_digest=digest)  # the VMM re-checks its bytes
                    pid = self._start_on_backend(vm_id, spec)  # NICs: taps made in the tenant namespace
                elif op == "stop":
                    self.backend.stop(vm_id)
                    pid = None
                elif op == "pause":
                    self.backend.pause(vm_id)
                elif op == "resume":
                    self.backend.resume(vm_id)
            except StartRefused as exc:  # the loader or the VMM refused it before the guest ran: the caller's input
                self.store.vm_event(vm_id, f"{op}-refused", {"kind": exc.kind, "error": str(exc)})
                ctx.detail.update(error=str(exc), kind=exc.kind)
                raise ApiError(422, f"cannot {op} the VM: {exc}", kind=exc.kind) from None
            except CodeMismatch as exc:  # the worker's pre-import gate refused bulkhead's own code
                self._code_mismatch(ctx, vm_id, exc)
            except HostError as exc:
                self.store.vm_event(vm_id, f"{op}-failed", {"error": str(exc)})
                ctx.detail["error"] = str(exc)
                raise ApiError(409 if isinstance(exc, VmNotRunning) else 503, f"cannot {op} the VM: {exc}") from None
            self.store.set_vm_state(vm_id, new, pid=pid, exit_status=None)
            self.store.vm_event(vm_id, new, {"op": op, "by": ctx.caller.id,
                                             **(self._exit_reason(vm_id)[0] if op == "stop" else {})})
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
        return VmSpec(
            kernel=str(self.paths.images / spec["kernel"]),
            initrd=str(self.paths.images / spec["initrd"]) if spec.get("initrd") else None,
            cmdline=spec.get("cmdline", ""), mem_mib=spec["mem_mib"], cpus=spec["cpus"], drives=tuple(drives),
            nics=self._nic_configs(row["id"]), rng=bool(spec.get("rng")),
            console_path=str(console),
        )

    # ------------------------------------------------------------------ integrity
    def _launch_check(self, ctx: ReqCtx, row: Any, spec: VmSpec) -> str:
        """Measure the launch (kernel/initrd read once) and pass it through the host's integrity gate.

        Refusals are audited as security events and raise ApiError: 409 when the launch digest differs
        from the VM's expected_digest (e.g. its kernel was swapped) or is not allowed by the policy,
        503 while the host is untrusted (or the image cannot be read)."""
        from bulkhead.daemon.integrity import check_boot, measure_spec
        from bulkhead.integrity.errors import (
            HostUntrusted,
            IntegrityError,
            LaunchDigestMismatch,
            LaunchNotAllowed,
        )
        from bulkhead.integrity.launch import check_expected_digest

        vm_id = row["id"]
        expected = json.loads(row["spec"]).get("expected_digest")
        digest = None
        try:
            config, kernel, initrd, digest = measure_spec(spec, expected)
            check_expected_digest(config, digest)  # a swapped kernel is a security event before it is a bad image
            try:  # the loader's own checks on the bytes just read: a guest it refuses is never "started"
                check_boot(config, kernel, initrd)
            except ConfigError as exc:
                self._refuse_boot(ctx, vm_id, exc, "start")  # raises ApiError 422 with the kind
            self.integrity.check_vm_start(config, kernel, initrd)
        except ConfigError as exc:
            raise config_error(exc) from None
        except IntegrityError as exc:
            # by type: a changed launch 409, a launch the policy does not list 409, an untrusted host (or a
            # gate/TPM/image failure) 503
            mismatch = isinstance(exc, LaunchDigestMismatch)
            untrusted = isinstance(exc, HostUntrusted)
            kind = "launch-digest-mismatch" if mismatch else ("host-untrusted" if untrusted else "launch-refused")
            detail: dict[str, Any] = {"reason": str(exc), "digest": digest, "expected_digest": expected}
            if exc.path:
                detail["path"] = exc.path
            ctx.detail.update(error=str(exc), integrity=kind)
            self.store.vm_event(vm_id, "start-refused", {"integrity": kind, "digest": digest})
            try:
                self.security_event(vm_id, f"integrity/{kind}", detail)
            except ApiError:
                pass  # the request's own record (ctx.detail) still says why; it is written before the reply
            status = 409 if isinstance(exc, LaunchDigestMismatch | LaunchNotAllowed) else 503
            raise ApiError(status, str(exc), kind=kind) from None
        with self.store.lock:  # kept in memory (and in the request's audit record), not as a VM event
            if not hasattr(self, "_launch_digests"):
                self._launch_digests: dict[str, str] = {}
            self._launch_digests[vm_id] = str(digest)
        ctx.detail["launch_digest"] = digest
        return str(digest)

    def _code_mismatch(self, ctx: ReqCtx, vm_id: str, exc: CodeMismatch) -> NoReturn:
        """A worker refused to run because bulkhead's installed code differs from the signed manifest:
        a security event (security/integrity/code-mismatch with the path), answered 503 (the host cannot
        start a VMM; docs/API.md), the VM's events say why. Raises ApiError."""
        detail = {"reason": str(exc), "path": exc.path, "source": "worker pre-import check"}
        ctx.detail.update(error=str(exc), integrity="code-mismatch", path=exc.path)
        self.store.vm_event(vm_id, "start-refused", {"integrity": "code-mismatch", "path": exc.path})
        try:
            self.security_event(vm_id, "integrity/code-mismatch", detail)
        except ApiError:
            pass  # the request's own record (ctx.detail) still says why
        raise ApiError(503, f"cannot start the VM: bulkhead's installed code differs from the signed manifest "
                            f"({exc.path}): {exc}", kind="code-mismatch") from None

    def _refuse_boot(self, ctx: ReqCtx, vm_id: str | None, exc: ConfigError, op: str) -> NoReturn:
        refused = StartRefused.of(exc)
        ctx.detail.update(error=str(exc), kind=refused.kind)
        if vm_id is not None:
            self.store.vm_event(vm_id, f"{op}-refused", {"kind": refused.kind, "error": str(exc)})
        raise ApiError(422, f"cannot {op} the VM: {exc}", kind=refused.kind) from None

    def vm_measurement(self, ctx: ReqCtx, vm_id: str) -> dict[str, Any]:
        """The VM's launch digest computed now from its current files and configuration. Raises ApiError
        404/403 (access), 409 (a disk is gone), 503 (an image cannot be read)."""
        from bulkhead.daemon.integrity import launch_components, measure_spec
        from bulkhead.integrity.errors import IntegrityError

        row = self._vm(ctx, vm_id, "vm/read")
        expected = json.loads(row["spec"]).get("expected_digest")
        try:
            config, kernel, initrd, digest = measure_spec(self._spec(row))
        except ConfigError as exc:
            raise config_error(exc) from None
        except IntegrityError as exc:
            raise ApiError(503, str(exc)) from None
        last = getattr(self, "_launch_digests", {}).get(vm_id)
        return {"vm": vm_id, "digest": digest, "expected_digest": expected,
                "matches_expected": None if expected is None else digest == expected,
                "last_launch_digest": last,
                "components": launch_components(config, kernel, initrd)}

    def stop_all_untrusted(self, reasons: list[str]) -> list[str]:
        """Policy `running_vms_when_untrusted: stop`: stop every running/paused VM, each audited first."""
        stopped = []
        for row in self.store.q("SELECT * FROM vms WHERE state IN ('running', 'paused')"):
            with self._vm_lock(row["id"]):
                fresh = self.store.q1("SELECT * FROM vms WHERE id = ?", (row["id"],))
                if fresh is None or fresh["state"] not in ("running", "paused"):
                    continue
                try:
                    self.event("vm", "vm.stop", vm=row["id"], scope=rbac.vm_scope(row["tenant"], row["id"]),
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
            self.event("vm", "vm.lost", vm=row["id"], scope=rbac.vm_scope(row["tenant"], row["id"]),
                       result="lost", detail={"from": row["state"], "pid": row["pid"], "reason": "daemon restart"})
            self.store.set_vm_state(row["id"], "lost")
            self.store.vm_event(row["id"], "lost", {"reason": "daemon restart"})
            lost.append(row["id"])
        return lost

    # ------------------------------------------------------------------ disks
    def disk_create(self, ctx: ReqCtx, tenant: str, name: str, size_mib: int) -> dict[str, Any]:
        ts = rbac.tenant_scope(tenant)
        if self.store.q1("SELECT 1 FROM tenants WHERE id = ?", (tenant,)) is None:
            ctx.scope = ts
            raise self.deny_unknown(ctx, "disk/write")
        self.authorize(ctx, "disk/write", ts, visible=lambda: self.can_see_tenant(ctx.caller, tenant))
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
            raise ApiError(503, f"cannot create the disk image: {exc.strerror}") from None
        created = now_iso()
        try:
            with self.mutation(ctx, "201") as c:
                c.execute("INSERT INTO disks VALUES (?,?,?,?,?,?)", (disk_id, tenant, name, size_mib, str(path), created))
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return {"id": disk_id, "tenant": tenant, "name": name, "size_mib": size_mib, "created": created}

    def _disk(self, ctx: ReqCtx, disk_id: str, action: str) -> Any:
        return self.owned_row(ctx, "disk", disk_id, action)

    def disk_get(self, ctx: ReqCtx, disk_id: str) -> dict[str, Any]:
        return _disk_out(self._disk(ctx, disk_id, "disk/read"))

    def disk_list(self, ctx: ReqCtx, tenant: str) -> list[dict[str, Any]]:
        ctx.action, ctx.scope, ctx.decision = "disk/read", rbac.tenant_scope(tenant), "allow"
        rows = self.store.q("SELECT * FROM disks WHERE tenant = ? ORDER BY name", (tenant,))
        return [_disk_out(r) for r in self.visible_rows(ctx, "disk", rows)]

    def disk_delete(self, ctx: ReqCtx, disk_id: str) -> None:
        row = self._disk(ctx, disk_id, "disk/delete")
        with self.mutation(ctx, "204") as c:
            if self._disk_users(disk_id, writable_only=False):
                raise ApiError(409, "the disk is attached to a VM; delete the VM first")
            c.execute("DELETE FROM disks WHERE id = ?", (disk_id,))
        try:
            from pathlib import Path

            Path(row["path"]).unlink(missing_ok=True)
        except OSError:
            pass


def _disk_out(r: Any) -> dict[str, Any]:
    return {"id": r["id"], "tenant": r["tenant"], "name": r["name"], "size_mib": r["size_mib"], "created": r["created"]}
