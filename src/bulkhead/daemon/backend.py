"""How the daemon runs VMs: a small backend interface and its implementations.

`VmBackend` is the contract (bulkhead.sandbox.backend.JailedBackend implements it too):
  start(vm_id, spec) / stop / pause / resume / status -> BackendStatus / console(vm_id, offset, limit).

`ProcessBackend` (development and non-root hosts only: NO jail) runs each VM as a child process
`python -m bulkhead run ... --serial <console file>`. Stop sends SIGTERM, then SIGKILL after a grace
period. Pause/resume send SIGSTOP/SIGCONT to the VMM process (it freezes the whole VMM, devices
included; the jailed backend pauses the vCPUs through the worker protocol instead). Children get PR_SET_PDEATHSIG(SIGKILL), so no VM outlives a crashed
daemon; on restart the daemon marks such VMs `lost` (see docs/API.md).

`FakeBackend` is the test double used where the API is tested: it records calls and writes console text,
and holds a duplicate of each tap fd it is handed while the fake VM "runs" (so a tap lives exactly as long
as it would with a real worker).

The daemon's default backend as root is `bulkhead.sandbox.backend.JailedBackend` (one jailed worker per
VM, real vCPU pause/resume over the worker protocol); see daemon.make_backend.
Every method raises HostError when the host cannot do it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bulkhead.errors import HostError, VmNotRunning
from bulkhead.runtime.config import NetConfig

__all__ = ["BACKENDS", "BackendStatus", "FakeBackend", "ProcessBackend", "VmBackend", "VmSpec", "make_backend"]

BACKENDS = ("auto", "jail", "process", "fake")
PROCESS_WARNING = (
    "WARNING: VMs run WITHOUT the jail (--backend process): every VMM is a plain child process of the daemon "
    "with its privileges, no namespaces, no seccomp, no cgroup limits. Development only; never host "
    "untrusted guests this way."
)

MAX_CONSOLE_READ = 1 << 20


@dataclass(frozen=True)
class VmSpec:
    """What a backend needs to run a VM: host paths already resolved and checked by the daemon."""

    kernel: str
    initrd: str | None
    cmdline: str
    mem_mib: int
    cpus: int
    drives: tuple[tuple[str, bool], ...]  # (path, read_only)
    nics: tuple[NetConfig, ...]  # tap name, MAC, rate; tap_fd >= 0 when the daemon opened the tap
    rng: bool
    console_path: str
    netns: str = ""  # the tenant network namespace holding the NICs' taps ("" = the daemon's own)
    # The launch digest the daemon measured and the gate allowed: a backend passes it to the VMM as
    # VmConfig.expected_digest, and the VMM refuses to build from bytes with another digest (no TOCTOU).
    expected_digest: str | None = None
    # `vm reboot`: the new VMM appends to the console file instead of starting it afresh, so readers
    # attached to the console (docs/API.md, console WebSocket) see the new boot after the old output.
    keep_console: bool = False
    vsock: tuple[str, int] | None = None  # (host-side unix socket, guest CID): docs/VSOCK.md

    def run_args(self) -> list[str]:
        args = ["--kernel", self.kernel, "--mem", str(self.mem_mib), "--cpus", str(self.cpus)]
        if self.initrd:
            args += ["--initrd", self.initrd]
        if self.cmdline:
            args += ["--cmdline", self.cmdline]
        args += ["--serial", self.console_path]
        for path, ro in self.drives:
            args += ["--drive", path + (",ro" if ro else "")]
        for n in self.nics:
            net = f"tap={n.tap}" + (f",mac={n.mac}" if n.mac else "")
            if n.rate.bytes_per_sec:
                net += f",bw={n.rate.bytes_per_sec}"
            if n.rate.ops_per_sec:
                net += f",ops={n.rate.ops_per_sec}"
            args += ["--net", net]
        if self.rng:
            args.append("--rng")
        if self.vsock is not None:
            args += ["--vsock", f"{self.vsock[0]},cid={self.vsock[1]}"]
        if getattr(self, "expected_digest", None):
            args += ["--expected-digest", str(self.expected_digest)]
        return args


@dataclass(frozen=True)
class BackendStatus:
    state: str  # running | paused | exited | absent
    pid: int | None = None
    exit_status: int | None = None


class VmBackend(Protocol):
    def start(self, vm_id: str, spec: VmSpec) -> int: ...  # returns a pid (or 0)
    def stop(self, vm_id: str, grace: float = 5.0) -> None: ...
    def pause(self, vm_id: str) -> None: ...
    def resume(self, vm_id: str) -> None: ...
    def status(self, vm_id: str) -> BackendStatus: ...
    def console(self, vm_id: str, offset: int, limit: int) -> bytes: ...
    def console_input(self, vm_id: str, data: bytes) -> None: ...  # to the guest's COM1 receive queue
    def request_shutdown(self, vm_id: str) -> str: ...  # the method used ("ctrl-alt-del"), "" = none
    def forget(self, vm_id: str) -> None: ...
    def shutdown(self) -> None: ...


def _read_console(path: str, offset: int, limit: int) -> bytes:
    limit = max(0, min(limit, MAX_CONSOLE_READ))
    try:
        with open(path, "rb") as f:
            f.seek(max(0, offset))
            return f.read(limit)
    except FileNotFoundError:
        return b""
    except OSError as exc:
        raise HostError(f"cannot read console output: {exc}") from None


def _pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except OSError:
        pass


INTEGRITY_ENV = ("BULKHEAD_MANIFEST", "BULKHEAD_RELEASE_KEY", "BULKHEAD_DEV_SKIP_INTEGRITY")


def _gated_argv(python: str, args: list[str]) -> list[str]:
    """`bulkhead <args>` through the pre-import integrity gate (bulkhead/_boot.py): the VMM process verifies
    the code before importing any of it, with this process's package and site directories."""
    boot: Any = sys.modules.get("bulkhead_boot")
    if boot is None or not hasattr(boot, "worker_argv"):
        from bulkhead import _boot as boot
    return list(boot.worker_argv(python, args))


class ProcessBackend:
    """Each VM is a `bulkhead run` child process (NOT jailed: development and non-root hosts only).

    A VMM process opens its taps by name, so the daemon gives it persistent taps and the process runs in
    the tenant's network namespace (`nsenter --net=/run/netns/<ns>`, spec.netns) where they live."""

    opens_taps_by_name = True

    def __init__(self, python: str | None = None, console_root: Path | None = None) -> None:
        self._python = python or sys.executable
        self.console_root = console_root  # <root>/<vm id>/console.log: readable after a daemon restart
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._consoles: dict[str, str] = {}
        self._paused: set[str] = set()
        self._lock = threading.Lock()

    def start(self, vm_id: str, spec: VmSpec) -> int:
        with self._lock:
            old = self._procs.get(vm_id)
            if old is not None and old.poll() is None:
                raise HostError("the VM is already running")
            Path(spec.console_path).parent.mkdir(parents=True, exist_ok=True)
            if not spec.keep_console:
                Path(spec.console_path).write_bytes(b"")
            stats_path = str(Path(spec.console_path).with_name("stats.json"))
            Path(stats_path).unlink(missing_ok=True)
            cmd = _gated_argv(self._python, ["run", *spec.run_args(), "--stats", stats_path])
            if spec.nics and spec.netns:
                cmd = ["nsenter", f"--net=/run/netns/{spec.netns}", *cmd]
            try:
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=open(spec.console_path + ".stdout", "wb"),  # noqa: SIM115 - the child owns it
                    stderr=subprocess.STDOUT,
                    preexec_fn=_pdeathsig,
                    close_fds=True,
                    env={
                        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                        "PYTHONPATH": os.pathsep.join(sys.path),
                        # where the signed manifest is (or the explicit, loud development skip of the check)
                        **{k: os.environ[k] for k in INTEGRITY_ENV if k in os.environ},
                    },
                )
            except OSError as exc:
                raise HostError(f"cannot start the VMM process: {exc}") from None
            self._procs[vm_id] = proc
            self._consoles[vm_id] = spec.console_path
            self._paused.discard(vm_id)
            return proc.pid

    def stats(self, vm_id: str) -> dict[str, Any] | None:
        """The counters `bulkhead run --stats` wrote when the VM's last run ended (daemon/vmstats.py)."""
        import json

        path = self._consoles.get(vm_id)
        if path is None:
            return None
        try:
            data = json.loads(Path(path).with_name("stats.json").read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _proc(self, vm_id: str) -> subprocess.Popen[bytes] | None:
        with self._lock:
            return self._procs.get(vm_id)

    def stop(self, vm_id: str, grace: float = 5.0) -> None:
        proc = self._proc(vm_id)
        if proc is None or proc.poll() is not None:
            return
        try:
            proc.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        except ProcessLookupError:
            pass
        with self._lock:
            self._paused.discard(vm_id)

    def _signal(self, vm_id: str, sig: int) -> None:
        proc = self._proc(vm_id)
        if proc is None or proc.poll() is not None:
            raise VmNotRunning("the VM process is not running")
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            raise VmNotRunning("the VM process is not running") from None

    def pause(self, vm_id: str) -> None:
        self._signal(vm_id, signal.SIGSTOP)
        with self._lock:
            self._paused.add(vm_id)

    def resume(self, vm_id: str) -> None:
        self._signal(vm_id, signal.SIGCONT)
        with self._lock:
            self._paused.discard(vm_id)

    def status(self, vm_id: str) -> BackendStatus:
        proc = self._proc(vm_id)
        if proc is None:
            return BackendStatus("absent")
        rc = proc.poll()
        if rc is not None:
            return BackendStatus("exited", proc.pid, rc if rc >= 0 else 128 - rc)
        return BackendStatus("paused" if vm_id in self._paused else "running", proc.pid)

    def console(self, vm_id: str, offset: int, limit: int) -> bytes:
        path = self._consoles.get(vm_id)
        if path is None and self.console_root is not None:
            path = str(self.console_root / vm_id / "console.log")  # vm_id is a UUID checked by the API
        return _read_console(path, offset, limit) if path else b""

    def console_input(self, vm_id: str, data: bytes) -> None:
        """Not available: the unjailed VMM has no channel to the daemon. Raises HostError."""
        raise HostError("console input needs the jailed backend (this daemon runs VMs with --backend process)")

    def request_shutdown(self, vm_id: str) -> str:
        """No channel to the unjailed VMM: nothing is delivered (`vm shutdown` force-stops at once)."""
        if self._proc(vm_id) is None:
            raise VmNotRunning("the VM process is not running")
        return ""

    def forget(self, vm_id: str) -> None:
        with self._lock:
            self._procs.pop(vm_id, None)
            self._consoles.pop(vm_id, None)
            self._paused.discard(vm_id)

    def shutdown(self) -> None:
        for vm_id in list(self._procs):
            self.stop(vm_id, grace=2.0)


class FakeBackend:
    """Test double: no processes. `exit(vm_id, status)` simulates the guest ending on its own."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self._state: dict[str, BackendStatus] = {}
        self._console: dict[str, bytearray] = {}
        self._lock = threading.Lock()
        self.fail_start = False
        self._pid = 40000
        self._taps: dict[str, list[int]] = {}  # dups of the tap fds a "running" fake VM holds
        self.specs: dict[str, VmSpec] = {}
        self.inputs: dict[str, bytearray] = {}  # console input received per VM (echoed to its console)
        self.honours_shutdown = True  # whether a fake guest powers off (status 0) on request_shutdown
        self.counters: dict[str, dict[str, Any]] = {}  # vm id -> nested counters a test plays as the VMM's

    def stats(self, vm_id: str) -> dict[str, Any] | None:
        """The counters a test set for the VM (the shape of `bulkhead run --stats`; daemon/vmstats.py)."""
        with self._lock:
            return self.counters.get(vm_id)

    def start(self, vm_id: str, spec: VmSpec) -> int:
        with self._lock:
            self.calls.append(("start", vm_id))
            if self.fail_start:
                raise HostError("injected start failure")
            self._pid += 1
            self._state[vm_id] = BackendStatus("running", self._pid)
            self.specs[vm_id] = spec
            self._release(vm_id)
            self._taps[vm_id] = [os.dup(n.tap_fd) for n in spec.nics if n.tap_fd >= 0]
            boot = f"booting {os.path.basename(spec.kernel)} at {time.time():.0f}\n".encode()
            if spec.keep_console:
                self._console.setdefault(vm_id, bytearray()).extend(boot)
            else:
                self._console[vm_id] = bytearray(boot)
            return self._pid

    def stop(self, vm_id: str, grace: float = 5.0) -> None:
        with self._lock:
            self.calls.append(("stop", vm_id))
            if vm_id in self._state:
                self._state[vm_id] = BackendStatus("exited", None, 130)
            self._release(vm_id)

    def _release(self, vm_id: str) -> None:
        for fd in self._taps.pop(vm_id, []):
            os.close(fd)

    def pause(self, vm_id: str) -> None:
        with self._lock:
            self.calls.append(("pause", vm_id))
            st = self._state.get(vm_id)
            if st is None or st.state != "running":
                raise VmNotRunning("the VM process is not running")
            self._state[vm_id] = BackendStatus("paused", st.pid)

    def resume(self, vm_id: str) -> None:
        with self._lock:
            self.calls.append(("resume", vm_id))
            st = self._state.get(vm_id)
            if st is None or st.state != "paused":
                raise VmNotRunning("the VM process is not paused")
            self._state[vm_id] = BackendStatus("running", st.pid)

    def exit(self, vm_id: str, status: int) -> None:
        with self._lock:
            self._state[vm_id] = BackendStatus("exited", None, status)
            self._release(vm_id)

    def status(self, vm_id: str) -> BackendStatus:
        with self._lock:
            return self._state.get(vm_id, BackendStatus("absent"))

    def console(self, vm_id: str, offset: int, limit: int) -> bytes:
        with self._lock:
            data = bytes(self._console.get(vm_id, b""))
        return data[max(0, offset) : max(0, offset) + max(0, min(limit, MAX_CONSOLE_READ))]

    def console_input(self, vm_id: str, data: bytes) -> None:
        """The fake guest echoes its input to its console. Raises VmNotRunning when it is not running."""
        with self._lock:
            st = self._state.get(vm_id)
            if st is None or st.state not in ("running", "paused"):
                raise VmNotRunning("the VM process is not running")
            self.inputs.setdefault(vm_id, bytearray()).extend(data)
            self._console.setdefault(vm_id, bytearray()).extend(data)

    def request_shutdown(self, vm_id: str) -> str:
        """Records the request; a fake guest that honours it exits with status 0 at once."""
        with self._lock:
            self.calls.append(("shutdown", vm_id))
            st = self._state.get(vm_id)
            if st is None or st.state not in ("running", "paused"):
                raise VmNotRunning("the VM process is not running")
            if self.honours_shutdown:
                self._state[vm_id] = BackendStatus("exited", None, 0)
                self._release(vm_id)
            return "ctrl-alt-del"

    def forget(self, vm_id: str) -> None:
        with self._lock:
            self._state.pop(vm_id, None)
            self._console.pop(vm_id, None)
            self._release(vm_id)

    def shutdown(self) -> None:
        with self._lock:
            for vm_id in list(self._taps):
                self._release(vm_id)


def describe(backend: Any) -> str:
    return type(backend).__name__


def make_backend(kind: str = "auto", console_root: Path | None = None, options: Any = None) -> Any:
    """The daemon's VM backend. `auto`: the jail (bulkhead.sandbox.backend.JailedBackend) when running
    as root, else ProcessBackend with a loud warning on stderr; `jail` (root only), `process` (warns),
    `fake` (no VMs). `options` is a sandbox JailOptions. Raises ConfigError for an unknown kind and
    HostError for `jail` without root."""
    from bulkhead.errors import ConfigError

    if kind not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, not {kind!r}")
    if kind == "auto":
        kind = "jail" if os.geteuid() == 0 else "process"
    if kind == "fake":
        return FakeBackend()
    if kind == "process":
        print(f"bulkheadd: {PROCESS_WARNING}", file=sys.stderr, flush=True)
        return ProcessBackend(console_root=console_root)
    if os.geteuid() != 0:
        raise HostError("--backend jail needs root (use --backend process for development, without the jail)")
    from bulkhead.sandbox.backend import JailedBackend

    return JailedBackend(status_type=BackendStatus, options=options, console_root=console_root)
