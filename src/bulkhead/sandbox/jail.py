"""The jail: namespaces, pivot_root, idmapped bind mounts, device nodes, uid/gid, capabilities,
no_new_privs, rlimits and seccomp (the worker side), plus the host-side id allocator.

Order of the steps (see docs/SANDBOX.md for why each one is there), run by `bulkhead worker`:

  1. close_fds()            every inherited fd except the channel and the passed taps
  2. join the VM's cgroup   (host created it; the worker writes its own pid)
  3. enter_namespaces()     unshare mount, PID, IPC, UTS, network
  4. build_root()           tmpfs root with idmapped binds of kernel/initrd/disks (ro where asked)
                            and per-VM device nodes; pivot_root into it; host root detached
  5. fork                   the child is pid 1 of the new PID namespace (the worker proper);
                            the parent stays outside only to wait and mirror its exit status
  6. drop_privileges()      rlimits, setgroups([]), setresgid/setresuid to the VM's ids, bounding
                            and ambient capability sets empty, capabilities zero, not dumpable,
                            no_new_privs
  7. install_seccomp()      the role's allow-list from sandbox/seccomp/*.json, default kill-process

All raise HostError (with the failing step) when the kernel refuses a step.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import stat
import sys
import time
from typing import Any, NamedTuple

from bulkhead.errors import ConfigError, HostError
from bulkhead.sandbox.policy import Rule

__all__ = [
    "CLONE_NEWIPC",
    "CLONE_NEWNET",
    "CLONE_NEWNS",
    "CLONE_NEWPID",
    "CLONE_NEWUTS",
    "DEVICES",
    "BindSpec",
    "IdAllocator",
    "JailSpec",
    "build_root",
    "capabilities",
    "close_fds",
    "drop_privileges",
    "enter_namespaces",
    "enter_pid_namespace",
    "install_seccomp",
    "load_pyseccomp",
    "make_idmap_userns",
]

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
MNT_DETACH = 2

PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP = 1, 4, 24
PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 28, 38, 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
# SECBIT_NOROOT, SECBIT_KEEP_CAPS (off) and SECBIT_NO_CAP_AMBIENT_RAISE, each with its lock bit
SECUREBITS_LOCKED = 0x01 | 0x02 | 0x20 | 0x40 | 0x80

_SYS_PIVOT_ROOT, _SYS_CAPGET, _SYS_CAPSET = 155, 125, 126
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_MOUNT_SETATTR = 428, 429, 442
OPEN_TREE_CLONE, AT_EMPTY_PATH, MOVE_MOUNT_F_EMPTY_PATH = 1, 0x1000, 0x4
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC = 0x1, 0x2, 0x4, 0x8
MOUNT_ATTR_IDMAP = 0x00100000
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# In-jail device nodes: name -> (major, minor). /dev/net/tun only for a VM with a NIC.
DEVICES = {"kvm": (10, 232), "urandom": (1, 9), "net/tun": (10, 200)}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.unshare.argtypes = (ctypes.c_int,)
_libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
_libc.sethostname.argtypes = (ctypes.c_char_p, ctypes.c_size_t)


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise HostError(f"jail: {what} failed: {os.strerror(err)}")
    return ret


def _b(path: str | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(_b(src), _b(target), _b(fstype), flags, _b(data)), f"mount {target}")


def prctl(option: int, a2: int = 0, a3: int = 0, a4: int = 0, a5: int = 0) -> int:
    return _check(_libc.prctl(option, a2, a3, a4, a5), f"prctl({option})")


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


# --- the specification the host hands to the worker -------------------------------------------------


class BindSpec(NamedTuple):
    """A host file bind-mounted at `target` (absolute, inside the jail); read-only unless read_only=False."""

    source: str
    target: str
    read_only: bool = True


class JailSpec(NamedTuple):
    """Everything the worker needs to build its jail. Travels as JSON in the worker's argv."""

    vm_id: str
    root: str  # host directory the jail's tmpfs root is mounted on (mode 0700, created by the host)
    uid: int
    gid: int
    binds: tuple[BindSpec, ...] = ()
    devices: tuple[str, ...] = ("kvm", "urandom")
    cgroup_procs: tuple[str, ...] = ()
    nofile: int = 1024
    nproc: int = 64
    seccomp: bool = True
    nic: bool = False
    config: dict[str, object] | None = None  # the VmConfig with in-jail paths (None: {})
    vsock: bool = False  # a virtio-vsock device: the seccomp "vsock" group (policy.build_rules)

    def to_json(self) -> str:
        raw = {**self._asdict(), "binds": [b._asdict() for b in self.binds], "config": self.config or {}}
        return json.dumps(raw, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> JailSpec:
        """Raises ConfigError on malformed input."""
        try:
            raw = json.loads(text)
            raw["binds"] = tuple(BindSpec(**b) for b in raw["binds"])
            raw["devices"] = tuple(raw["devices"])
            raw["cgroup_procs"] = tuple(raw["cgroup_procs"])
            spec = cls(**raw)
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"worker: malformed jail spec ({exc})") from None
        for d in spec.devices:
            if d not in DEVICES:
                raise ConfigError(f"worker: unknown device {d!r}")
        for b in spec.binds:
            if not b.target.startswith("/") or ".." in b.target.split("/"):
                raise ConfigError(f"worker: bind target {b.target!r} must be absolute without '..'")
        if spec.uid < 1 or spec.gid < 1:
            raise ConfigError("worker: the VM's uid and gid must not be root")
        return spec


# --- step 1: fd hygiene ----------------------------------------------------------------------------


def close_fds(keep: set[int]) -> None:
    """Close every fd >= 3 that is not in `keep` (close_range over the gaps)."""
    low = 3
    for fd in sorted(k for k in keep if k >= 3):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)


# --- step 3: namespaces ----------------------------------------------------------------------------


def enter_namespaces(hostname: str, *, pid: bool = True) -> None:
    """Unshare mount, PID (for children), IPC, UTS and network namespaces; stop mount propagation.
    pid=False leaves the PID namespace to enter_pid_namespace() (a pool worker: its idmap helpers must
    still be forked into the host's PID namespace, docs/SANDBOX.md "Worker pool")."""
    flags = CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWNET | (CLONE_NEWPID if pid else 0)
    _check(_libc.unshare(flags), "unshare(mnt|pid|ipc|uts|net)" if pid else "unshare(mnt|ipc|uts|net)")
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates back to the host
    name = hostname.encode()[:64]
    _check(_libc.sethostname(name, len(name)), "sethostname")


def enter_pid_namespace() -> None:
    """Unshare the PID namespace: the next child is pid 1 of a new one."""
    _check(_libc.unshare(CLONE_NEWPID), "unshare(pid)")


# --- step 4: the root --------------------------------------------------------------------------------


def make_idmap_userns(host_uid: int, host_gid: int, vm_uid: int, vm_gid: int) -> int:
    """An fd of a user namespace mapping (host_uid, host_gid) -> (vm_uid, vm_gid), for idmapped mounts.

    Forks a child that unshares a user namespace and waits; the parent writes the maps and opens
    /proc/<child>/ns/user. Must be called while single-threaded and before pivot_root.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(w)
        ok = _libc.unshare(CLONE_NEWUSER) == 0
        os.read(r, 1)
        os._exit(0 if ok else 1)
    os.close(r)
    try:
        deadline = time.monotonic() + 5
        while True:  # wait until the child is in its own user namespace
            if os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user"):
                break
            if time.monotonic() > deadline:
                raise HostError("jail: the idmap helper did not create a user namespace")
            time.sleep(0.001)
        with open(f"/proc/{pid}/uid_map", "w", encoding="ascii") as f:
            f.write(f"{host_uid} {vm_uid} 1\n")
        with open(f"/proc/{pid}/gid_map", "w", encoding="ascii") as f:
            f.write(f"{host_gid} {vm_gid} 1\n")
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.write(w, b"x")
        os.close(w)
        os.waitpid(pid, 0)


def _idmapped_bind(source: str, target: str, userns_fd: int, read_only: bool) -> None:
    """Bind `source` at `target` so its owner appears as the VM's uid/gid (host file unchanged)."""
    fd = _check(_libc.syscall(_SYS_OPEN_TREE, -100, _b(source), OPEN_TREE_CLONE | os.O_CLOEXEC),
                f"open_tree {source}")
    try:
        attr = MOUNT_ATTR_IDMAP | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC
        if read_only:
            attr |= MOUNT_ATTR_RDONLY
        ma = _MountAttr(attr, 0, 0, userns_fd)
        _check(_libc.syscall(_SYS_MOUNT_SETATTR, fd, b"", AT_EMPTY_PATH, ctypes.byref(ma), ctypes.sizeof(ma)),
               f"mount_setattr(idmap) {source}")
        _check(_libc.syscall(_SYS_MOVE_MOUNT, fd, b"", -100, _b(target), MOVE_MOUNT_F_EMPTY_PATH),
               f"move_mount {target}")
    finally:
        os.close(fd)


def build_root(spec: JailSpec, userns_fds: dict[tuple[int, int], int]) -> None:
    """Mount a tmpfs on spec.root, populate it, pivot_root into it and detach the host's root.

    `userns_fds` maps a source file's (uid, gid) to an idmap user namespace fd (make_idmap_userns).
    """
    root = spec.root
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64k,nr_inodes=64,mode=0755")
    for b in spec.binds:
        dst = root + b.target
        os.makedirs(os.path.dirname(dst), mode=0o755, exist_ok=True)
        st = os.stat(b.source)
        if stat.S_ISDIR(st.st_mode):  # the vsock socket directory (sandbox/supervisor.py)
            os.mkdir(dst, 0o700)
        else:
            os.close(os.open(dst, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))
        _idmapped_bind(b.source, dst, userns_fds[(st.st_uid, st.st_gid)], b.read_only)
    if spec.devices:
        dev = root + "/dev"
        os.mkdir(dev, 0o755)
        mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "size=4k,nr_inodes=16,mode=0755")
        for name in spec.devices:
            major, minor = DEVICES[name]
            path = os.path.join(dev, name)
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            os.mknod(path, 0o600 | 0o020000, os.makedev(major, minor))
            os.chown(path, spec.uid, spec.gid)
        mount(None, dev, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC)
    os.chdir(root)
    _check(_libc.syscall(_SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "umount old root")  # the host's tree is gone from here on
    os.chdir("/")
    mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)


# --- step 6: privileges ----------------------------------------------------------------------------


def capabilities() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) capability masks of the calling thread."""
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.syscall(_SYS_CAPGET, ctypes.byref(hdr), data), "capget")
    def mask(name: str) -> int:
        return int(getattr(data[0], name)) | (int(getattr(data[1], name)) << 32)
    return mask("effective"), mask("permitted"), mask("inheritable")


def drop_privileges(uid: int, gid: int, *, cap_last: int, nofile: int, nproc: int) -> None:
    """Switch to uid/gid for good, with no capability left anywhere and no way to regain one."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    for cap in range(cap_last + 1):  # bounding set: needs CAP_SETPCAP, so before setuid
        prctl(PR_CAPBSET_DROP, cap)
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    prctl(PR_SET_SECUREBITS, SECUREBITS_LOCKED)  # uid 0 would no longer mean "all capabilities"
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    zero = (_CapData * 2)()
    _check(_libc.syscall(_SYS_CAPSET, ctypes.byref(hdr), zero), "capset(0)")
    prctl(PR_SET_DUMPABLE, 0)  # no core dumps, no ptrace attach by same-uid processes
    prctl(PR_SET_NO_NEW_PRIVS, 1)  # execve can never grant privileges (setuid bits, file caps)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) or os.getgroups():
        raise HostError("jail: the uid/gid switch did not take")
    if any(capabilities()):
        raise HostError("jail: capabilities remain after the drop")


# --- step 7: seccomp -----------------------------------------------------------------------------------


_SONAMES = {"c": "libc.so.6", "seccomp": "libseccomp.so.2"}  # glibc's and libseccomp's stable sonames


def load_pyseccomp() -> Any:
    """Import pyseccomp without the two `ldconfig -p` processes its `ctypes.util.find_library` calls
    spawn (~6 ms each, far more on a loaded host): the stable sonames are tried first, and find_library
    only when one does not load (docs/PERFORMANCE.md "Jailed start"). Call before pivot_root."""
    import ctypes.util
    import importlib

    if "pyseccomp" in sys.modules:
        return sys.modules["pyseccomp"]
    real = ctypes.util.find_library

    def find(name: str) -> str | None:
        so = _SONAMES.get(name)
        if so is not None:
            try:
                ctypes.CDLL(so)
                return so
            except OSError:
                pass
        return real(name)

    ctypes.util.find_library = find
    try:
        return importlib.import_module("pyseccomp")
    finally:
        ctypes.util.find_library = real


def _filter(rules: list[Rule]) -> Any:
    sc = load_pyseccomp()
    ops = {"eq": sc.EQ, "ne": sc.NE, "masked_eq": sc.MASKED_EQ}
    flt = sc.SyscallFilter(sc.KILL_PROCESS)
    flt.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)  # x32 / i386 entry points: kill
    flt.set_attr(sc.Attr.CTL_TSYNC, 1)  # every thread gets the filter
    for rule in rules:
        action = sc.ALLOW if rule.action == "allow" else sc.ERRNO(rule.errno)
        args = [sc.Arg(a.index, ops[a.op], a.mask if a.op == "masked_eq" else a.value,
                       a.value if a.op == "masked_eq" else 0) for a in rule.args]
        flt.add_rule(action, rule.syscall, *args)
    return flt


def compile_program(rules: list[Rule]) -> bytes:
    """libseccomp's BPF program (struct sock_filter[]) for an allow-list from policy.build_rules, default
    action kill-process: exactly what libseccomp's own load would install (seccomp_export_bpf)."""
    flt = _filter(rules)
    fd = os.memfd_create("bulkhead-bpf", os.MFD_CLOEXEC)
    try:
        class _Fd:
            def fileno(self) -> int:
                return fd

        flt.export_bpf(_Fd())
        size = os.lseek(fd, 0, os.SEEK_END)
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


def install_seccomp(rules: list[Rule]) -> int:
    """Load an allow-list from policy.build_rules (default action: kill the process) through libseccomp.
    Returns its size. The start path uses sandbox/bpf.py (cached program, same bytes) instead.

    Build the rules before pivot_root: the policy data is read from the package's files.
    """
    _filter(rules).load()
    return len(rules)


# --- host side: unique uid/gid per VM --------------------------------------------------------------


class IdAllocator:
    """Hands out a uid/gid pair unique to one VM: base + index, recorded as a lock file per id.

    The record (O_EXCL file named after the id, holding vm_id and the allocating pid) makes the
    allocation safe across concurrent supervisors; a record whose allocating process is gone is
    reclaimed. The range must be reserved for bulkhead on the host (no passwd entries in it).
    Raises HostError when the range is exhausted.
    """

    def __init__(self, state_dir: str = "/run/bulkhead/ids", base: int = 100_000, count: int = 65_536) -> None:
        self.state_dir, self.base, self.count = state_dir, base, count

    def allocate(self, vm_id: str) -> int:
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        for index in range(self.count):
            uid = self.base + index
            path = os.path.join(self.state_dir, str(uid))
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                if self._stale(path):
                    os.unlink(path)
                    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
                else:
                    continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(f"{vm_id} {os.getpid()}\n")
            return uid
        raise HostError(f"no free VM uid left in [{self.base}, {self.base + self.count})")

    @staticmethod
    def _stale(path: str) -> bool:
        try:
            with open(path, encoding="utf-8") as f:
                pid = int(f.read().split()[1])
        except (OSError, ValueError, IndexError):
            return False
        return not os.path.exists(f"/proc/{pid}")

    def release(self, uid: int) -> None:
        try:
            os.unlink(os.path.join(self.state_dir, str(uid)))
        except FileNotFoundError:
            pass

    def owner(self, uid: int) -> str | None:
        try:
            with open(os.path.join(self.state_dir, str(uid)), encoding="utf-8") as f:
                return f.read().split()[0]
        except (OSError, IndexError):
            return None
