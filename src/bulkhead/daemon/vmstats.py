"""Per-VM stats (`GET /v1/vms/{vm_id}/stats`, `bulkhead vm stats NAME`), like virsh domstats.

The counters are the VMM's own (runtime/stats.py, the `bulkhead run --stats` file): with the jailed
backend, the worker's `stats` message (sandbox/protocol.py; untrusted diagnostics, nothing is decided on
them); with the process backend, the `--stats` file its `bulkhead run` child writes when it ends; the
fake backend holds what a test gives it. A backend exposes them as `stats(vm_id) -> nested dict | None`.
The worker sends its counters when its VM stops, so a running VM reports the last run's counters
(`source` says which). `summarize` turns the nested counters into the families /metrics exposes.
Authorized as `vm/read` on the VM (a caller who may not read it gets 404). The route is declared with
the other VM routes (vms.vm_routes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bulkhead.daemon.backend import VmBackend
    from bulkhead.daemon.service import Core, ReqCtx

__all__ = ["summarize", "vm_counters", "vm_stats"]

_IO_KEYS = {"rx_bytes": "rx", "tx_bytes": "tx", "read_bytes": "read", "write_bytes": "write"}
_THROTTLE_KEYS = {"throttled": "all", "rx_throttled": "rx", "tx_throttled": "tx"}


def vm_counters(backend: VmBackend, vm_id: str) -> dict[str, Any] | None:
    """The backend's nested counters of the VM's current or last run, or None (none known)."""
    fn = getattr(backend, "stats", None)
    if fn is None:
        return None
    try:
        res = fn(vm_id)
    except Exception:
        return None
    return res if isinstance(res, dict) else None


def _int(v: Any) -> int:
    return v if type(v) is int and v >= 0 else 0


def summarize(stats: dict[str, Any]) -> dict[str, Any]:
    """Nested --stats counters -> {exits: [per vCPU], io_bytes: {dev: {dir: n}}, virtqueue_faults: {dev:
    {reason: n}}, throttled: {dev: {dir: n}}, contained_accesses: {pio|mmio: {read|write: n}}}."""
    raw_exits = stats.get("vcpu_exits")
    if isinstance(raw_exits, dict):  # nest_counters keeps a list; be lenient with a dict of indices
        raw_exits = [raw_exits[k] for k in sorted(raw_exits, key=lambda k: int(k) if str(k).isdigit() else 0)]
    exits = [_int(n) for n in raw_exits] if isinstance(raw_exits, list) else []
    io: dict[str, dict[str, int]] = {}
    faults: dict[str, dict[str, int]] = {}
    thr: dict[str, dict[str, int]] = {}
    devices = stats.get("devices")
    for dev, counters in (devices.items() if isinstance(devices, dict) else ()):
        if not isinstance(counters, dict):
            continue
        for key, n in counters.items():
            if key in _IO_KEYS:
                io.setdefault(str(dev), {})[_IO_KEYS[key]] = _int(n)
            elif key in _THROTTLE_KEYS:
                thr.setdefault(str(dev), {})[_THROTTLE_KEYS[key]] = _int(n)
            elif isinstance(key, str) and key.startswith("fault."):
                faults.setdefault(str(dev), {})[key[len("fault."):]] = _int(n)
    contained: dict[str, dict[str, int]] = {}
    for bus in ("pio", "mmio"):
        un = stats.get(f"{bus}_unclaimed")
        if isinstance(un, dict):
            contained[bus] = {"read": _int(un.get("reads")), "write": _int(un.get("writes"))}
    return {"exits": exits, "io_bytes": io, "virtqueue_faults": faults, "throttled": thr,
            "contained_accesses": contained}


def vm_stats(core: Core, backend: VmBackend, ctx: ReqCtx, vm_id: str) -> dict[str, Any]:
    """GET /v1/vms/{vm_id}/stats (VmService's core and backend). Raises ApiError 404 (absent or
    invisible) / 403."""
    ctx.vm = vm_id
    row = core.owned_row(ctx, "vm", vm_id, "vm/read")
    counters = vm_counters(backend, vm_id)
    tenant = core.store.q1("SELECT name FROM tenants WHERE id = ?", (row["tenant"],))
    out: dict[str, Any] = {"id": vm_id, "name": row["name"], "tenant": row["tenant"],
                           "tenant_name": tenant["name"] if tenant else None, "state": row["state"],
                           "available": counters is not None}
    if counters is not None:
        s = summarize(counters)
        out.update(s)
        out["exits_total"] = sum(s["exits"])
        out["counters"] = {k: v for k, v in counters.items() if k not in ("events", "exit")}
    return out

