"""Per-VM cgroups: memory, pids and CPU limits, OOM-kill accounting, kill-all and removal.

cgroup v2 where the host offers memory, pids and cpu in a unified hierarchy, v1 otherwise (one
directory per controller), as Firecracker's jailer does. The host side (supervisor) creates the
group before the worker starts, the worker joins it by writing its own pid into `procs_files`
(before it unshares anything), and the host removes it after the worker is gone.

Parent: by default the group is created under ``<the supervisor's own cgroup>/bulkhead`` in each
hierarchy, so VMs stay inside whatever accounting the host already applies to bulkhead; override with
``parent=`` (an absolute cgroup path such as ``/bulkhead``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from typing import NamedTuple

from bulkhead.errors import HostError

__all__ = ["CgroupLimits", "VmCgroup", "detect_version"]

_CONTROLLERS = ("memory", "pids", "cpu")


class CgroupLimits(NamedTuple):
    memory_bytes: int
    pids_max: int
    cpu_quota_us: int  # per cpu_period_us; 0 = no quota
    cpu_period_us: int = 100_000


def _mounts(mountinfo: str) -> list[tuple[str, str, set[str]]]:
    """(mount point, fstype, super options) of every cgroup/cgroup2 mount."""
    out = []
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        parts, rparts = left.split(), right.split()
        if len(parts) < 5 or len(rparts) < 3:
            continue
        if rparts[0] in ("cgroup", "cgroup2"):
            out.append((parts[4], rparts[0], set(rparts[2].split(","))))
    return out


def _read(path: str) -> str:
    with open(path, encoding="ascii") as f:
        return f.read()


def _write(path: str, value: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(value)


def detect_version(mountinfo: str | None = None) -> tuple[int, dict[str, str]]:
    """(2, {"unified": mount}) or (1, {controller: mount}). Raises HostError if neither has our controllers."""
    text = _read("/proc/self/mountinfo") if mountinfo is None else mountinfo
    v1: dict[str, str] = {}
    for point, fstype, opts in _mounts(text):
        if fstype == "cgroup2":
            try:
                have = set(_read(os.path.join(point, "cgroup.controllers")).split())
            except OSError:
                continue
            if set(_CONTROLLERS) <= have:
                return 2, {"unified": point}
        else:
            for c in _CONTROLLERS:
                if c in opts and c not in v1:
                    v1[c] = point
    if set(v1) == set(_CONTROLLERS):
        return 1, v1
    raise HostError("no cgroup hierarchy with the memory, pids and cpu controllers is mounted")


def _own_path(hierarchy: str, v2: bool) -> str:
    """This process's cgroup path in a v1 controller hierarchy (or v2 when hierarchy == "")."""
    for line in _read("/proc/self/cgroup").splitlines():
        hid, ctrls, path = line.split(":", 2)
        if v2 and hid == "0":
            return path
        if not v2 and hierarchy in ctrls.split(","):
            return path
    return "/"


class VmCgroup:
    """The cgroup(s) of one VM. create() makes them; remove() kills what is left and deletes them.

    Raises HostError if a directory cannot be created or a limit cannot be written.
    """

    def __init__(self, vm_id: str, limits: CgroupLimits, *, parent: str | None = None,
                 version: int | None = None, mounts: dict[str, str] | None = None) -> None:
        if version is None or mounts is None:
            version, mounts = detect_version()
        self.vm_id = vm_id
        self.limits = limits
        self.version = version
        self.dirs: dict[str, str] = {}
        self.mount_root = ""
        if version == 2:
            rel = (parent or "/bulkhead").strip("/")
            self.mount_root = mounts["unified"]
            self.parents = {"unified": os.path.join(mounts["unified"], rel)}
            self.dirs = {"unified": os.path.join(self.parents["unified"], vm_id)}
        else:
            self.parents = {}
            for c in _CONTROLLERS:
                base = parent if parent is not None else os.path.join(_own_path(c, False), "bulkhead")
                self.parents[c] = os.path.join(mounts[c], base.strip("/"))
                self.dirs[c] = os.path.join(self.parents[c], vm_id)

    # -- creation -------------------------------------------------------------------------------
    def create(self) -> None:
        """Create the group(s) and write the limits. Raises HostError; a group that already exists
        (another VM with this id) is left untouched."""
        taken = [d for d in self.dirs.values() if os.path.exists(d)]
        if taken:
            raise HostError(f"cgroup {taken[0]} already exists (VM id in use?)")
        try:
            if self.version == 2:
                self._create_v2()
            else:
                self._create_v1()
        except OSError as exc:
            self.remove()
            raise HostError(f"cannot set up the VM's cgroup: {exc}") from None

    def _create_v1(self) -> None:
        lim = self.limits
        for c, d in self.dirs.items():
            os.makedirs(self.parents[c], exist_ok=True)
            os.mkdir(d, 0o755)
        mem = self.dirs["memory"]
        _write(os.path.join(mem, "memory.limit_in_bytes"), str(lim.memory_bytes))
        memsw = os.path.join(mem, "memory.memsw.limit_in_bytes")
        if os.path.exists(memsw):  # no escape into swap
            _write(memsw, str(lim.memory_bytes))
        _write(os.path.join(mem, "memory.oom_control"), "0")  # the OOM killer acts, never pauses
        _write(os.path.join(self.dirs["pids"], "pids.max"), str(lim.pids_max))
        cpu = self.dirs["cpu"]
        _write(os.path.join(cpu, "cpu.cfs_period_us"), str(lim.cpu_period_us))
        _write(os.path.join(cpu, "cpu.cfs_quota_us"), str(lim.cpu_quota_us or -1))

    def _create_v2(self) -> None:
        lim = self.limits
        parent = self.parents["unified"]
        os.makedirs(parent, exist_ok=True)
        # Every ancestor from the mount root down to the parent must delegate our controllers.
        chain, d = [], parent
        while d != self.mount_root and d.startswith(self.mount_root):
            chain.append(d)
            d = os.path.dirname(d)
        for d in [self.mount_root, *reversed(chain)]:
            _write(os.path.join(d, "cgroup.subtree_control"), " ".join(f"+{c}" for c in _CONTROLLERS))
        d = self.dirs["unified"]
        os.mkdir(d, 0o755)
        _write(os.path.join(d, "memory.max"), str(lim.memory_bytes))
        with contextlib.suppress(OSError):
            _write(os.path.join(d, "memory.swap.max"), "0")
        with contextlib.suppress(OSError):
            _write(os.path.join(d, "memory.oom.group"), "1")
        _write(os.path.join(d, "pids.max"), str(lim.pids_max))
        quota = str(lim.cpu_quota_us) if lim.cpu_quota_us else "max"
        _write(os.path.join(d, "cpu.max"), f"{quota} {lim.cpu_period_us}")

    def set_limits(self, limits: CgroupLimits) -> None:
        """Write new limits into existing groups (a pool worker's slot takes its VM's limits when it is
        assigned, docs/SANDBOX.md "Worker pool"). Raises HostError (e.g. a memory limit below the usage)."""
        self.limits = limits
        try:
            if self.version == 2:
                d = self.dirs["unified"]
                _write(os.path.join(d, "memory.max"), str(limits.memory_bytes))
                _write(os.path.join(d, "pids.max"), str(limits.pids_max))
                quota = str(limits.cpu_quota_us) if limits.cpu_quota_us else "max"
                _write(os.path.join(d, "cpu.max"), f"{quota} {limits.cpu_period_us}")
                return
            mem = self.dirs["memory"]
            memsw = os.path.join(mem, "memory.memsw.limit_in_bytes")
            # v1 keeps memsw >= mem at every step: raise memsw first when growing, mem first when shrinking
            order = ["memory.memsw.limit_in_bytes", "memory.limit_in_bytes"] if os.path.exists(memsw) \
                else ["memory.limit_in_bytes"]
            if os.path.exists(memsw) and limits.memory_bytes < int(_read(memsw)):
                order.reverse()
            for name in order:
                _write(os.path.join(mem, name), str(limits.memory_bytes))
            _write(os.path.join(self.dirs["pids"], "pids.max"), str(limits.pids_max))
            _write(os.path.join(self.dirs["cpu"], "cpu.cfs_quota_us"), str(limits.cpu_quota_us or -1))
        except OSError as exc:
            raise HostError(f"cannot set the VM's cgroup limits: {exc}") from None

    # -- queries ------------------------------------------------------------------------------------
    @property
    def procs_files(self) -> list[str]:
        """Files the worker writes its pid into to join every hierarchy."""
        return [os.path.join(d, "cgroup.procs") for d in self.dirs.values()]

    def pids(self) -> set[int]:
        out: set[int] = set()
        for d in self.dirs.values():
            for name in ("cgroup.procs", "tasks") if self.version == 1 else ("cgroup.procs", "cgroup.threads"):
                try:
                    out.update(int(x) for x in _read(os.path.join(d, name)).split())
                except OSError:
                    pass
        return out

    def oom_kills(self) -> int:
        """How many processes the kernel OOM-killed in this VM's memory cgroup (0 if unknown)."""
        path = (os.path.join(self.dirs["unified"], "memory.events") if self.version == 2
                else os.path.join(self.dirs["memory"], "memory.oom_control"))
        try:
            for line in _read(path).splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def memory_peak(self) -> int:
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        key = "unified" if self.version == 2 else "memory"
        try:
            return int(_read(os.path.join(self.dirs[key], name)))
        except (OSError, ValueError):
            return 0

    # -- teardown -----------------------------------------------------------------------------------
    def kill_all(self) -> None:
        """SIGKILL every process left in the group (cgroup.kill on v2)."""
        if self.version == 2:
            with contextlib.suppress(OSError):
                _write(os.path.join(self.dirs["unified"], "cgroup.kill"), "1")
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def remove(self, timeout: float = 5.0) -> None:
        """Kill leftovers and delete the group's directories. Raises HostError if one stays busy."""
        deadline = time.monotonic() + timeout
        for d in self.dirs.values():
            while os.path.isdir(d):
                self.kill_all()
                try:
                    os.rmdir(d)
                except OSError as exc:
                    if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY) or time.monotonic() > deadline:
                        raise HostError(f"cannot remove cgroup {d}: {exc}") from None
                    time.sleep(0.01)
