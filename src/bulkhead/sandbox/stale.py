"""What a crashed supervisor leaves behind: finding it (tests, audits) and removing it (daemon start).

Moved out of bulkhead.sandbox.supervisor (which re-exports both names)."""

from __future__ import annotations

import contextlib
import os

from bulkhead.sandbox.cgroups import CgroupLimits, VmCgroup
from bulkhead.sandbox.jail import IdAllocator

__all__ = ["cleanup_lost", "cleanup_stale", "leftovers", "slot_of"]


def slot_of(vm_id: str, base_dir: str = "/run/bulkhead") -> str | None:
    """The pool slot serving VM `vm_id` (its jail, cgroup and uid record carry the slot's id), or None
    when the VM has a worker of its own or none (supervisor._map_slot writes `<base>/slots/<vm id>`)."""
    try:
        with open(os.path.join(base_dir, "slots", vm_id), encoding="utf-8") as f:
            sid = f.read().strip()
    except OSError:
        return None
    return sid if sid.startswith("z") and sid[1:].isalnum() and len(sid) <= 32 else None


def leftovers(vm_id: str, base_dir: str = "/run/bulkhead", cgroup_parent: str | None = None) -> list[str]:
    """Anything of VM `vm_id` still on the host: jail dir, cgroup dirs, mounts, and, for a pooled VM, the
    slot map and its slot's jail, cgroups and mounts (for tests and audits)."""
    found = []
    slot = slot_of(vm_id, base_dir)
    if os.path.exists(os.path.join(base_dir, "slots", vm_id)):
        found.append(os.path.join(base_dir, "slots", vm_id))
    for name in (vm_id, *((slot,) if slot else ())):
        jail = os.path.join(base_dir, "jail", name)
        if os.path.exists(jail):
            found.append(jail)
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            found += [line.strip() for line in f if f"/{name}" in line]
        probe = VmCgroup(name, CgroupLimits(0, 0, 0), parent=cgroup_parent)
        found += [d for d in probe.dirs.values() if os.path.exists(d)]
    return found


def cleanup_stale(base_dir: str = "/run/bulkhead", cgroup_parent: str | None = None) -> list[str]:
    """Remove what a crashed supervisor left behind; returns the VM ids cleaned.

    A VM is stale when its uid record is missing or names a process that no longer exists. Its
    cgroup is emptied (SIGKILL) and removed, its jail directory deleted, its uid released. Call it
    when the daemon starts. Raises HostError if a cgroup cannot be removed.
    """
    jail_base = os.path.join(base_dir, "jail")
    ids = IdAllocator(os.path.join(base_dir, "ids"))
    owners: dict[str, tuple[int, int]] = {}  # vm_id -> (uid, allocating pid)
    if os.path.isdir(ids.state_dir):
        for name in os.listdir(ids.state_dir):
            try:
                with open(os.path.join(ids.state_dir, name), encoding="utf-8") as f:
                    vm, pid = f.read().split()[:2]
                owners[vm] = (int(name), int(pid))
            except (OSError, ValueError):
                continue
    cleaned = []
    for vm_id in sorted(os.listdir(jail_base)) if os.path.isdir(jail_base) else []:
        owner = owners.get(vm_id)
        if owner is not None and os.path.exists(f"/proc/{owner[1]}"):
            continue
        VmCgroup(vm_id, CgroupLimits(0, 0, 0), parent=cgroup_parent).remove()
        for d in (os.path.join(jail_base, vm_id, "root"), os.path.join(jail_base, vm_id)):
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(d)
        if owner is not None:
            ids.release(owner[0])
        cleaned.append(vm_id)
    slots = os.path.join(base_dir, "slots")  # slot maps whose slot is gone (with its jail, above)
    for name in sorted(os.listdir(slots)) if os.path.isdir(slots) else []:
        sid = slot_of(name, base_dir)
        if sid is None or not os.path.exists(os.path.join(jail_base, sid)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(slots, name))
            cleaned.append(name)
    return cleaned


def cleanup_lost(vm_id: str, base_dir: str = "/run/bulkhead", cgroup_parent: str | None = None,
                 timeout: float = 20.0) -> list[str]:
    """Remove what is left of one VM its daemon knows is dead (marked `lost` at the daemon's start: its
    worker died with the previous daemon, PR_SET_PDEATHSIG): cgroup (emptied, waiting up to `timeout` for
    dying processes), jail directory, uid record naming it. Unlike cleanup_stale it does not need the jail
    directory to find the cgroup: another daemon sharing `base_dir` may have removed the directory
    already (issue 12 soak: cgroups left behind after a daemon SIGKILL). Returns what was removed;
    raises HostError when the cgroup stays busy."""
    removed = []
    cg = VmCgroup(vm_id, CgroupLimits(0, 0, 0), parent=cgroup_parent)
    if any(os.path.isdir(d) for d in cg.dirs.values()):
        cg.remove(timeout)
        removed.append("cgroup")
    jail = os.path.join(base_dir, "jail", vm_id)
    for d in (os.path.join(jail, "root"), jail):
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(d)
            removed.append(d)
    ids = IdAllocator(os.path.join(base_dir, "ids"))
    if os.path.isdir(ids.state_dir):
        for name in os.listdir(ids.state_dir):
            with contextlib.suppress(ValueError):
                if ids.owner(int(name)) == vm_id:
                    ids.release(int(name))
                    removed.append(f"uid {name}")
    return removed
