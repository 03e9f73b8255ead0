"""TEST-ONLY escape probes and a stand-in VM, run inside a fully sandboxed worker.

Reachable only when the worker was started with --test-probes, which the supervisor refuses unless the
host process has BULKHEAD_TEST_PROBES=1 in its environment. Each probe acts like a compromised device
model would and reports ("denied" | "allowed" | "error", detail). Probes whose syscall is not on the
seccomp allow-list never report: the kernel kills the worker and the host records a seccomp-kill.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from bulkhead.runtime.config import VmConfig
from bulkhead.runtime.exits import ExitReason

__all__ = ["PROBES", "FakeMachine", "run"]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _EchoSerial:
    """Host console input arrives here (as on the real serial port) and is echoed to the console."""

    def __init__(self, console: Callable[[bytes], None]) -> None:
        self.console = console

    def enqueue_input(self, data: bytes) -> int:
        self.console(b"echo:" + data)
        return len(data)


class FakeMachine:
    """Stands in for bulkhead.runtime.vm.Machine in probe mode: same lifecycle methods, no guest code.

    build() does what a VM build does at the sandbox boundary: reads the kernel and every drive through
    the jail's paths, opens /dev/kvm and creates a KVM VM (KVM ioctls through the seccomp filter),
    and maps and touches guest RAM (charged to the VM's memory cgroup).
    """

    def __init__(self, config: VmConfig, *, console: Callable[[bytes], None] | None = None,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self.config = config
        self.console = console or (lambda data: None)
        self.on_event = on_event or (lambda name, detail: None)
        self.serial = _EchoSerial(self.console)
        self._stop = threading.Event()
        self._reason: ExitReason | None = None
        self._fds: list[int] = []
        self.ram: mmap.mmap | None = None

    def build(self) -> None:
        with open(self.config.kernel, "rb") as f:
            head = f.read(16)
        drives = []
        for d in self.config.drives:
            fd = os.open(d.path, os.O_RDONLY if d.read_only else os.O_RDWR)
            drives.append(os.read(fd, 16).hex())
            os.close(fd)
        kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        self._fds.append(kvm)
        import fcntl

        api = fcntl.ioctl(kvm, 0xAE00)  # KVM_GET_API_VERSION
        vm = fcntl.ioctl(kvm, 0xAE01, 0)  # KVM_CREATE_VM
        self._fds.append(vm)
        self.ram = mmap.mmap(-1, self.config.mem_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        for off in range(0, self.config.mem_bytes, 4096):
            self.ram[off] = 0
        self.on_event("fake-vm-built", {"kvm_api": api, "kernel_head": head.hex(), "drives": ",".join(drives)})

    def run(self) -> ExitReason:
        self.console(b"fake-vm: running\n")
        self._stop.wait()
        assert self._reason is not None
        return self._reason

    def request_stop(self, reason: ExitReason) -> None:
        if self._reason is None:
            self._reason = reason
        self._stop.set()

    def pause(self) -> None:
        self.on_event("paused", {})

    def resume(self) -> None:
        self.on_event("resumed", {})

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        if self.ram is not None:
            self.ram.close()
            self.ram = None


def _try_open(paths: list[str]) -> tuple[str, str]:
    got = []
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError as exc:
            got.append(f"{p}:{errno.errorcode.get(exc.errno or 0, exc.errno)}")
            continue
        os.close(fd)
        return "allowed", f"opened {p}"
    return "denied", " ".join(got)


def _open_host_paths(arg: str, svc: Any) -> tuple[str, str]:
    paths = ["/etc/passwd", "/etc/shadow", "/root", "/proc/1/environ", "/sys/fs/cgroup/memory",
             "/../../../etc/hostname", "/work", "/tmp", "/run/bulkhead", "/dev/vda", "/dev/sda"]
    return _try_open(paths + ([arg] if arg else []))


def _open_path(arg: str, svc: Any) -> tuple[str, str]:
    return _try_open([arg])


def _read_proc(arg: str, svc: Any) -> tuple[str, str]:
    try:
        names = os.listdir("/proc")
    except OSError as exc:
        return _try_open(["/proc/1/status", "/proc/self/status", f"/proc/{arg or 1}/cmdline"])[0], \
            f"listdir /proc: {errno.errorcode.get(exc.errno or 0)}"
    return "allowed", f"/proc lists {len(names)} entries"


def _dev_mem(arg: str, svc: Any) -> tuple[str, str]:
    return _try_open(["/dev/mem", "/dev/kmem", "/dev/port"])


def _rw_readonly_drive(arg: str, svc: Any) -> tuple[str, str]:
    try:
        fd = os.open(arg, os.O_RDWR)
    except OSError as exc:
        return "denied", f"O_RDWR {arg}: {errno.errorcode.get(exc.errno or 0)}"
    os.close(fd)
    return "allowed", f"opened {arg} read-write"


def _identity(arg: str, svc: Any) -> tuple[str, str]:
    from bulkhead.sandbox.jail import capabilities

    caps = capabilities()
    uid, gid, pid = os.getuid(), os.getgid(), os.getpid()
    detail = f"uid={uid} gid={gid} pid={pid} caps={caps} groups={os.getgroups()} host={os.uname().nodename}"
    ok = uid != 0 and gid != 0 and not any(caps) and pid == 1 and not os.getgroups()
    return ("denied" if ok else "allowed"), detail


def _syscall(nr: int, *args: int) -> tuple[str, str]:
    ret = _libc.syscall(nr, *[ctypes.c_long(a) for a in args])
    if ret < 0:
        return "denied", f"syscall {nr}: {errno.errorcode.get(ctypes.get_errno())}"
    return "allowed", f"syscall {nr} returned {ret}"


def _kill(arg: str, svc: Any) -> tuple[str, str]:
    os.kill(int(arg or "1"), 0)  # kill(2) is not on the allow-list: the kernel kills us here
    return "allowed", "kill returned"


def _tgkill(arg: str, svc: Any) -> tuple[str, str]:
    pid = int(arg or "1")
    return _syscall(234, pid, pid, 0)


def _ptrace(arg: str, svc: Any) -> tuple[str, str]:
    return _syscall(101, 16, int(arg or "1"), 0, 0)  # PTRACE_ATTACH


def _execve(arg: str, svc: Any) -> tuple[str, str]:
    path = ctypes.create_string_buffer((arg or "/bin/sh").encode())
    return _syscall(59, ctypes.addressof(path), 0, 0)


def _socket(family: int) -> Callable[[str, Any], tuple[str, str]]:
    def probe(arg: str, svc: Any) -> tuple[str, str]:
        try:
            s = socket.socket(family, socket.SOCK_RAW if family == socket.AF_NETLINK else socket.SOCK_STREAM)
        except OSError as exc:
            return "denied", f"socket: {errno.errorcode.get(exc.errno or 0)}"
        s.close()
        return "allowed", "socket created"
    return probe


def _mount(arg: str, svc: Any) -> tuple[str, str]:
    src, dst, fstype = (ctypes.create_string_buffer(x) for x in (b"proc", b"/dev", b"proc"))
    return _syscall(165, ctypes.addressof(src), ctypes.addressof(dst), ctypes.addressof(fstype), 0, 0)


def _userns(arg: str, svc: Any) -> tuple[str, str]:
    return _syscall(272, 0x10000000)  # unshare(CLONE_NEWUSER)


def _init_module(arg: str, svc: Any) -> tuple[str, str]:
    return _syscall(175, 0, 0, 0)


def _finit_module(arg: str, svc: Any) -> tuple[str, str]:
    return _syscall(313, 0, 0, 0)


def _fork(arg: str, svc: Any) -> tuple[str, str]:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    return "allowed", f"forked {pid}"


def _fork_bomb(arg: str, svc: Any) -> tuple[str, str]:
    r, w = os.pipe()
    kids: list[int] = []
    error = ""
    for _ in range(int(arg or "10000")):
        try:
            pid = os.fork()
        except OSError as exc:
            error = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            break
        if pid == 0:  # pragma: no cover - child: wait for the parent to let go, then leave
            os.close(w)
            os.read(r, 1)
            os._exit(0)
        kids.append(pid)
    os.close(w)
    for pid in kids:
        os.waitpid(pid, 0)
    os.close(r)
    return ("denied" if error else "allowed"), f"forked {len(kids)} children; then: {error or 'no limit hit'}"


def _thread_bomb(arg: str, svc: Any) -> tuple[str, str]:
    stop = threading.Event()
    threads = []
    error = ""
    for _ in range(int(arg or "10000")):
        t = threading.Thread(target=stop.wait, daemon=True)
        try:
            t.start()
        except RuntimeError as exc:
            error = str(exc)
            break
        threads.append(t)
    stop.set()
    for t in threads:
        t.join()
    return ("denied" if error else "allowed"), f"started {len(threads)} threads; then: {error or 'no limit hit'}"


def _oom(arg: str, svc: Any) -> tuple[str, str]:
    hoard = []
    for _ in range(int(arg or "65536")):  # MiB
        chunk = bytearray(1 << 20)
        for off in range(0, len(chunk), 4096):
            chunk[off] = 1
        hoard.append(chunk)
    return "allowed", f"allocated {len(hoard)} MiB without being stopped"


def _crash(arg: str, svc: Any) -> tuple[str, str]:
    byte = ctypes.c_char.from_address(8).value  # SIGSEGV: a NULL-page read
    return "allowed", f"survived a NULL read ({byte!r})"


def _shutdown(arg: str, svc: Any) -> tuple[str, str]:
    if svc.machine is None:
        return "error", "no VM running"
    svc.machine.request_stop(ExitReason.of("poweroff", "fake guest powered off"))
    return "denied", "guest shutdown requested"


def _send_raw(arg: str, svc: Any) -> tuple[str, str]:
    data = arg.encode() if arg else b"\xff" * 70000
    with svc.send_lock:
        try:
            svc.ch.sock.send(data)
        except OSError as exc:
            return "denied", f"send: {errno.errorcode.get(exc.errno or 0)}"
    return "allowed", f"sent {len(data)} raw bytes"


def _net(arg: str, svc: Any) -> tuple[str, str]:
    with open("/dev/net/tun", "rb"):
        pass
    return "allowed", "/dev/net/tun is present"


PROBES: dict[str, Callable[[str, Any], tuple[str, str]]] = {
    "identity": _identity,
    "open-host-paths": _open_host_paths,
    "open-path": _open_path,
    "write-readonly-drive": _rw_readonly_drive,
    "read-host-proc": _read_proc,
    "dev-mem": _dev_mem,
    "kill": _kill,
    "tgkill": _tgkill,
    "ptrace": _ptrace,
    "execve": _execve,
    "socket-inet": _socket(socket.AF_INET),
    "socket-inet6": _socket(socket.AF_INET6),
    "socket-netlink": _socket(socket.AF_NETLINK),
    "mount": _mount,
    "userns": _userns,
    "init-module": _init_module,
    "finit-module": _finit_module,
    "fork": _fork,
    "fork-bomb": _fork_bomb,
    "thread-bomb": _thread_bomb,
    "oom": _oom,
    "crash": _crash,
    "shutdown": _shutdown,
    "send-raw": _send_raw,
    "dev-net-tun": _net,
}


def run(name: str, arg: str, svc: Any) -> tuple[str, str]:
    """Run one probe. Unknown names report "error"."""
    probe = PROBES.get(name)
    if probe is None:
        return "error", f"unknown probe {name!r}"
    try:
        return probe(arg, svc)
    except OSError as exc:
        return "denied", f"{type(exc).__name__}: {errno.errorcode.get(exc.errno or 0, exc.errno)}"
    except Exception as exc:
        return "error", f"{type(exc).__name__}: {exc}"
