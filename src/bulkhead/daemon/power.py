"""Graceful lifecycle: `vm shutdown` (ask the guest, force-stop after a timeout) and `vm reboot`.

- shutdown (POST /v1/vms/{id}/shutdown?timeout=S, action `vm/shutdown`): the guest is asked to power
  off (runtime/shutdown.py request_shutdown, in the worker): the ACPI power button where the guest has ACPI (the
  hardware-reduced FADT has no fixed power button, so it is the Generic Event Device's power-down event,
  ACPI 6.5 §5.6.9, devices/ged.py, as QEMU microvm and Cloud Hypervisor do), else (`acpi=off`)
  Ctrl-Alt-Del through the i8042, as Firecracker's SendCtrlAltDel (devices/i8042.py). If the VMM has not
  ended within `timeout` seconds it is stopped by force (what `vm stop` does). The answer says which
  happened (`shutdown.graceful`, `shutdown.method`).
- reboot (POST /v1/vms/{id}/reboot, action `vm/reboot`): the VMM is stopped and a fresh one starts for the
  same VM (new worker, new guest memory, the launch measured and checked by the integrity gate again,
  like `vm start`); the console file is kept, so attached console sessions see the new boot output.
  This is a reset, as `virsh reset` / Cloud Hypervisor's `vm.reboot`, not a request to the guest.

Both append a `vm` audit record with the principal before they act (fail closed) and a second one with
the outcome; the VM's events record who asked. The wait happens outside the VM's lock so the monitor and
other VMs are not held up.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

from fastapi import APIRouter, Query

from bulkhead.control.models import VmOut, VmShutdownOut
from bulkhead.daemon.routing import Ctx, router
from bulkhead.daemon.service import NOT_FOUND, ApiError, Core, ReqCtx
from bulkhead.daemon.vms import VmService
from bulkhead.errors import HostError, StartRefused, VmNotRunning
from bulkhead.integrity.errors import CodeMismatch

__all__ = ["DEFAULT_SHUTDOWN_TIMEOUT", "MAX_SHUTDOWN_TIMEOUT", "PowerService", "power_routes"]

DEFAULT_SHUTDOWN_TIMEOUT = 30.0
MAX_SHUTDOWN_TIMEOUT = 600.0


class PowerService:
    """Shutdown and reboot, on the VM service's lifecycle machinery (its per-VM locks, refresh, spec,
    launch checks and NIC-aware start)."""

    def __init__(self, core: Core, vms: VmService) -> None:
        self.core = core
        self.store = core.store
        self.vms = vms
        self.backend = vms.backend

    def vm_shutdown(self, ctx: ReqCtx, vm_id: str, timeout: float = DEFAULT_SHUTDOWN_TIMEOUT) -> dict[str, Any]:
        """Ask the guest to power off, force-stop after `timeout` s. Raises ApiError 404/403, 409 (not
        running), 422 (bad timeout), 503 (audit or host failure)."""
        if not 0 <= timeout <= MAX_SHUTDOWN_TIMEOUT:
            raise ApiError(422, f"timeout must be between 0 and {MAX_SHUTDOWN_TIMEOUT:.0f} seconds")
        self.vms._vm(ctx, vm_id, "vm/shutdown")
        with self.vms.vm_lock(vm_id):
            self.vms.begin_op(ctx, vm_id, "shutdown", timeout=timeout)
            try:
                method = self.backend.request_shutdown(vm_id)
            except VmNotRunning:
                method = ""  # it ended just now: the wait below sees it
            except HostError as exc:
                ctx.detail["signal_error"] = str(exc)
                method = ""
        graceful, status = False, None
        deadline = time.monotonic() + (timeout if method else 0.0)
        while True:
            try:
                st = self.backend.status(vm_id)
            except HostError:
                st = None
            if st is not None and st.state in ("exited", "absent"):
                graceful, status = True, st.exit_status
                break
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        with self.vms.vm_lock(vm_id):
            if not graceful:
                try:
                    self.backend.stop(vm_id)
                except HostError as exc:
                    ctx.detail["error"] = str(exc)
                    raise ApiError.of(exc, f"cannot stop the VM: {exc}") from None
            outcome = {"op": "shutdown", "by": ctx.caller.id, "method": method or None, "graceful": graceful,
                       "exit_status": status, "timeout": timeout}
            ctx.detail.update(method=method or None, graceful=graceful)
            self.core.event("vm", "vm.shutdown", vm=vm_id, scope=ctx.scope, principal=ctx.caller.id,
                       result="graceful" if graceful else "forced", request_id=ctx.request_id, detail=outcome)
            if self.store.q1("SELECT 1 FROM vms WHERE id = ?", (vm_id,)) is not None:
                self.store.set_vm_state(vm_id, "stopped", pid=None, exit_status=status)
                self.store.vm_event(vm_id, "stopped", outcome)
            out = self._vm_out(vm_id)
        out["shutdown"] = {"graceful": graceful, "method": method or None, "exit_status": status}
        return out

    def vm_reboot(self, ctx: ReqCtx, vm_id: str) -> dict[str, Any]:
        """Stop the VMM and start a fresh one for the same VM (console kept). Raises ApiError 404/403,
        409 (not running; integrity refusal), 422 (the image is refused now), 503."""
        self.vms._vm(ctx, vm_id, "vm/reboot")
        with self.vms.vm_lock(vm_id):
            row, new = self.vms.begin_op(ctx, vm_id, "reboot")
            try:
                self.backend.stop(vm_id)
            except HostError as exc:
                ctx.detail["error"] = str(exc)
                raise ApiError.of(exc, f"cannot reboot the VM: {exc}") from None
            try:
                spec = self.vms._spec(row)
                digest = self.vms.launch.check_start(ctx, row, spec)
                spec = dataclasses.replace(spec, expected_digest=digest, keep_console=True)
                pid = self.vms.networks.start_with_nics(self.backend, vm_id, spec)
            except ApiError:
                self._stopped_by_reboot(vm_id, ctx)
                raise
            except StartRefused as exc:
                self._stopped_by_reboot(vm_id, ctx, str(exc))
                raise ApiError.of(exc, f"cannot reboot the VM: {exc}") from None
            except CodeMismatch as exc:
                self._stopped_by_reboot(vm_id, ctx, str(exc))
                self.vms.launch.code_mismatch(ctx, vm_id, exc)
            except HostError as exc:
                self._stopped_by_reboot(vm_id, ctx, str(exc))
                raise ApiError.of(exc, f"cannot reboot the VM: {exc}") from None
            self.store.set_vm_state(vm_id, new, pid=pid, exit_status=None)
            self.store.vm_event(vm_id, "rebooted", {"op": "reboot", "by": ctx.caller.id})
            return self._vm_out(vm_id)

    def _stopped_by_reboot(self, vm_id: str, ctx: ReqCtx, error: str | None = None) -> None:
        """The old VMM is gone and no new one runs: the VM is stopped (its events say why)."""
        if error:
            ctx.detail["error"] = error
        self.store.set_vm_state(vm_id, "stopped", pid=None, exit_status=None)
        self.store.vm_event(vm_id, "reboot-failed", {"by": ctx.caller.id, "error": error or ctx.detail.get("error")})

    def _vm_out(self, vm_id: str) -> dict[str, Any]:
        row = self.store.q1("SELECT * FROM vms WHERE id = ?", (vm_id,))
        if row is None:
            raise ApiError(404, NOT_FOUND)
        out: dict[str, Any] = self.store.vm_out(row)
        return out


def power_routes(svc: Callable[[], PowerService]) -> APIRouter:
    r = router()

    @r.post("/vms/{vm_id}/shutdown", response_model=VmShutdownOut)
    def vm_shutdown(vm_id: UUID, timeout: float = Query(30.0, ge=0, le=600), ctx: ReqCtx = Ctx) -> Any:
        return svc().vm_shutdown(ctx, str(vm_id), timeout)

    @r.post("/vms/{vm_id}/reboot", response_model=VmOut)
    def vm_reboot(vm_id: UUID, ctx: ReqCtx = Ctx) -> Any:
        return svc().vm_reboot(ctx, str(vm_id))

    return r
