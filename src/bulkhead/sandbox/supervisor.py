"""Host side of the jailed worker: spawn, talk, verify, classify the exit, clean up.

    handle = spawn_worker(config, vm_id="web-1", on_console=..., on_event=...)
    handle.start(); handle.status(); handle.pause(); handle.resume()
    result = handle.stop()            # or handle.wait(); result.reason is an ExitReason

    run_jailed(config) -> ExitReason  # blocking, what `bulkhead run` uses as root

The host trusts nothing the worker says: every message is validated (protocol.decode), the first
invalid one ends the worker (kind "protocol-violation"); the exit reason comes from the process's real
wait status and the cgroup's OOM counter, the worker's own Exit message is believed only when it
matches the process status; the sandbox is verified from /proc/<pid>/status of each worker process.
Whatever way the worker ends, its cgroup, jail directory, uid record and taps are removed.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import re
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from bulkhead.errors import ConfigError, HostError
from bulkhead.integrity.errors import CodeMismatch
from bulkhead.runtime.config import VmConfig
from bulkhead.runtime.exits import EXIT_STATUS, ExitReason
from bulkhead.sandbox.cgroups import CgroupLimits, VmCgroup
from bulkhead.sandbox.forkspawn import WaitTimeout, fork_allowed, fork_worker
from bulkhead.sandbox.jail import BindSpec, IdAllocator, JailSpec
from bulkhead.sandbox.protocol import (
    MAX_CONSOLE_CHUNK,
    SHUTDOWN_EVENT,
    WORKER_TO_HOST,
    Channel,
    Console,
    ConsoleIn,
    Event,
    Exit,
    Hello,
    IntegrityRefused,
    Message,
    Pause,
    Probe,
    ProbeResult,
    ProtocolError,
    Resume,
    SaveState,
    SecurityEvent,
    Shutdown,
    Start,
    StateSaved,
    Stats,
    Status,
    StatusReply,
    Stop,
)
from bulkhead.sandbox.stale import cleanup_stale, leftovers  # re-exported: they lived here

__all__ = [
    "PROBES_ENV",
    "SUPERVISOR_KINDS",
    "JailOptions",
    "WorkerExit",
    "WorkerHandle",
    "WorkerIntegrityError",
    "classify_exit",
    "cleanup_stale",
    "leftovers",
    "run_jailed",
    "spawn_worker",
]

PROBES_ENV = "BULKHEAD_TEST_PROBES"
# Kinds only the supervisor may decide; a worker claiming one of them is not believed.
SUPERVISOR_KINDS = frozenset({"worker-crash", "seccomp-kill", "oom-kill", "protocol-violation"})
_VM_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_JOIN_CGROUP = 'while [ "$1" != "--" ]; do printf %s "$$" > "$1" || exit 70; shift; done; shift; exec "$@"'
_TUNSETIFF = 0x400454CA
_IFF_TAP, _IFF_NO_PI, _IFF_VNET_HDR = 0x0002, 0x1000, 0x4000


class JailOptions(NamedTuple):
    """Host-side knobs. memory limit = guest RAM + memory_overhead_mib; pids = pids_base + vCPUs."""

    memory_overhead_mib: int = 64
    pids_base: int = 32
    cpu_quota_pct: int | None = None  # default: 100 per vCPU
    nofile: int = 1024
    base_dir: str = "/run/bulkhead"
    cgroup_parent: str | None = None  # default: <own cgroup>/bulkhead
    uid_base: int = 100_000
    seccomp: bool = True
    test_probes: bool = False  # refused unless BULKHEAD_TEST_PROBES=1 in this process's environment
    ready_timeout: float = 20.0
    stop_timeout: float = 5.0


class WorkerExit(NamedTuple):
    """How a worker ended. reason.kind is a VM kind, or worker-crash / seccomp-kill / oom-kill /
    protocol-violation / interrupted (decided by the host, never by the worker)."""

    reason: ExitReason
    security_event: bool
    returncode: int | None
    claimed: ExitReason | None = None
    stderr: str = ""
    memory_peak: int = 0  # bytes, from the VM's memory cgroup (0 if unknown)


def classify_exit(returncode: int | None, *, oom_kills: int, claimed: ExitReason | None,
                  violation: str | None, host_killed: bool) -> tuple[ExitReason, bool]:
    """(reason, security_event) from hard evidence first, the worker's own claim last (pure)."""
    def make(kind: str, detail: str) -> ExitReason:
        return ExitReason(kind, EXIT_STATUS.get(kind, EXIT_STATUS["worker-crash"]), detail)

    if violation is not None:
        return make("protocol-violation", violation), True
    if returncode == -signal.SIGSYS:
        return make("seccomp-kill", "the worker made a system call outside its seccomp allow-list"), True
    if oom_kills > 0:
        return make("oom-kill", f"the worker exceeded its cgroup memory limit ({oom_kills} OOM kill(s))"), False
    if host_killed:
        return make("interrupted", "killed by the host after the stop timeout"), False
    if returncode is not None and returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.Signals._value2member_map_ else str(-returncode)
        return make("worker-crash", f"the worker died of {name}"), False
    if claimed is not None and returncode is not None and claimed.kind not in SUPERVISOR_KINDS \
            and (claimed.kind in EXIT_STATUS or claimed.kind == "debug-exit") \
            and (claimed.status & 0xFF) == returncode:
        return claimed, False
    if claimed is not None:
        return make("worker-crash", f"exit status {returncode} does not match the worker's claim "
                                    f"{claimed.kind}/{claimed.status}"), True
    return make("worker-crash", f"the worker exited with status {returncode} without reporting a reason"), False


def _popen_timeout() -> type[BaseException]:
    """subprocess.TimeoutExpired when a worker was exec'd (subprocess is then imported), else WaitTimeout."""
    sub = sys.modules.get("subprocess")
    return sub.TimeoutExpired if sub is not None else WaitTimeout


def _read_status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


_LIVE: set[WorkerHandle] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _kill_live_workers() -> None:
    """A host process that exits (even without stopping its VMs) still removes every trace of them."""
    with _LIVE_LOCK:
        live = list(_LIVE)
    for h in live:
        with contextlib.suppress(Exception):
            h.kill()


def _remove_traces(files: tuple[str, ...], jail_dir: str | None) -> None:
    """A gone worker's host-side files: its (empty) jail directory and parent, then its VM's files (the
    slot map last, so that whatever is left of a slot can still be found by the VM's id)."""
    if jail_dir is not None:
        for d in (jail_dir, os.path.dirname(jail_dir)):
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(d)
    for path in files:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _map_slot(base_dir: str, vm_id: str, slot: Any) -> str:
    """`<base>/slots/<vm id>` names the pool slot that serves VM `vm_id`: a pooled worker's jail, cgroup
    and uid record were made before its VM was known and carry the slot's id (cgroup v2 cannot rename a
    group), so audits, leftover checks and operators find them through this file (stale.slot_of).
    Raises HostError when the VM id is in use."""
    d = os.path.join(base_dir, "slots")
    os.makedirs(d, mode=0o700, exist_ok=True)
    path = os.path.join(d, vm_id)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        slot.kill()
        slot.discard()
        raise HostError(f"VM id {vm_id!r} is already in use (a pool slot serves it)") from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(slot.slot_id + "\n")
    return path


class WorkerHandle:
    """One running worker. Thread-safe. Methods raise HostError when the worker is gone."""

    def __init__(self, vm_id: str, proc: Any, channel: Channel, *, cgroup: VmCgroup | None = None,
                 uid: int = 0, ids: IdAllocator | None = None, jail_dir: str | None = None,
                 test_probes: bool = False, stop_timeout: float = 5.0,
                 on_console: Callable[[bytes], None] | None = None,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None,
                 on_security_event: Callable[[str, str], None] | None = None,
                 on_exit: Callable[[WorkerExit], None] | None = None, files: tuple[str, ...] = ()) -> None:
        self.vm_id, self.proc, self.ch, self.cgroup = vm_id, proc, channel, cgroup
        self.files = files  # the VM's host-side files (vsock socket, slot map): removed with the worker
        self.uid, self.ids, self.jail_dir = uid, ids, jail_dir
        self.test_probes, self.stop_timeout = test_probes, stop_timeout
        self.on_console, self.on_event, self.on_exit = on_console, on_event, on_exit
        self.on_security_event = on_security_event
        self.hello: Hello | None = None
        self.security_events: list[tuple[str, str]] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.exit: WorkerExit | None = None
        self._claimed: ExitReason | None = None
        self.counters: dict[str, Any] | None = None  # the worker's `stats` message (untrusted diagnostics)
        self._stats_asked = 0  # status requests with stats=true not yet answered by a `stats` message
        self._stats_final = False
        self._violation: str | None = None
        self._integrity: IntegrityRefused | None = None
        self._host_killed = False
        self._cond = threading.Condition()
        self._replies: dict[int, StatusReply | StateSaved | None] = {}  # None: asked, not answered
        self._probe: ProbeResult | None = None
        self._seq = 0
        self._send_lock = threading.Lock()
        self._stderr = bytearray()
        self._done = threading.Event()
        with _LIVE_LOCK:
            _LIVE.add(self)
        self._reader = threading.Thread(target=self._read_loop, name=f"worker-{vm_id}", daemon=True)
        self._reader.start()
        stderr = getattr(proc, "stderr", None)
        if stderr is not None:
            threading.Thread(target=self._drain_stderr, args=(stderr,), daemon=True).start()

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    # -- inbound --------------------------------------------------------------------------------------
    def _drain_stderr(self, stream: Any) -> None:
        while chunk := stream.read1(4096) if hasattr(stream, "read1") else stream.read(4096):
            self._stderr += chunk
            del self._stderr[:-4096]  # keep the tail only: a worker cannot flood host memory

    def _security(self, kind: str, detail: str) -> None:
        self.security_events.append((kind, detail))
        if self.on_security_event is not None:
            with contextlib.suppress(Exception):
                self.on_security_event(kind, detail)

    def _dispatch(self, msg: Message) -> None:
        if isinstance(msg, IntegrityRefused):
            if self.hello is not None or self._integrity is not None:
                raise ProtocolError("integrity refusal after hello")  # only the pre-import gate sends it
            self._integrity = msg
        elif isinstance(msg, Hello):
            if self.hello is not None:
                raise ProtocolError("second hello")
            if msg.probes and not self.test_probes:
                raise ProtocolError("worker claims test probes that were not enabled")
            self.hello = msg
        elif self.hello is None:
            raise ProtocolError(f"{msg.TYPE!r} before hello")
        elif isinstance(msg, Console):
            if self.on_console is not None:
                with contextlib.suppress(Exception):
                    self.on_console(msg.data)
        elif isinstance(msg, Event):
            fields = dict(msg.fields or {})
            if len(self.events) < 1000:
                self.events.append((msg.name, fields))
            if msg.name == "guest-fault":
                self._security("guest-fault", str(fields)[:1024])
            if self.on_event is not None:
                with contextlib.suppress(Exception):
                    self.on_event(msg.name, fields)
        elif isinstance(msg, SecurityEvent):
            self._security(f"worker:{msg.kind}", msg.detail)
        elif isinstance(msg, Exit):
            if self._claimed is not None:
                raise ProtocolError("second exit message")
            self._claimed = ExitReason(msg.kind, msg.status, msg.detail)
        elif isinstance(msg, Stats):
            # one answer per `status` that asked for stats, and one unasked copy (the final counters, before
            # `exit`); anything else, or anything after the exit claim, breaks the protocol
            if self._claimed is not None:
                raise ProtocolError("stats sent after exit")
            with self._cond:
                if self._stats_asked > 0:
                    self._stats_asked -= 1
                elif self._stats_final:
                    raise ProtocolError("stats sent twice unasked")
                else:
                    self._stats_final = True
            self.counters = dict(msg.counters or {})  # replaces the last (bounded: one message's worth)
        elif isinstance(msg, StatusReply | StateSaved):
            with self._cond:  # kept only as the answer to a request still waiting (a late or unasked one is
                if msg.seq in self._replies and self._replies[msg.seq] is None:  # dropped: the dict stays bounded)
                    self._replies[msg.seq] = msg
                self._cond.notify_all()
        elif isinstance(msg, ProbeResult):
            if not self.test_probes:
                raise ProtocolError("probe result from a worker without test probes")
            with self._cond:
                self._probe = msg
                self._cond.notify_all()

    def _read_loop(self) -> None:
        try:
            while True:
                try:
                    msg = self.ch.recv()
                except ProtocolError as exc:
                    self._violation = str(exc)
                    break
                except OSError:
                    break
                if msg is None:
                    break
                try:
                    self._dispatch(msg)
                except ProtocolError as exc:
                    self._violation = str(exc)
                    break
        finally:
            self._finish()

    def _finish(self) -> None:
        if self._violation is not None:
            self._kill()
        else:
            try:
                self.proc.wait(timeout=self.stop_timeout)
            except (WaitTimeout, _popen_timeout()):
                self._host_killed = True
                self._kill()
        rc = self.proc.wait()
        oom = self.cgroup.oom_kills() if self.cgroup is not None else 0
        peak = self.cgroup.memory_peak() if self.cgroup is not None else 0
        reason, sec = classify_exit(rc, oom_kills=oom, claimed=self._claimed, violation=self._violation,
                                    host_killed=self._host_killed)
        if sec:
            self._security(reason.kind, reason.detail)
        self._cleanup()
        with _LIVE_LOCK:
            _LIVE.discard(self)
        self.exit = WorkerExit(reason, sec, rc, self._claimed, bytes(self._stderr).decode("utf-8", "replace"), peak)
        self._done.set()
        with self._cond:
            self._cond.notify_all()
        if self.on_exit is not None:
            with contextlib.suppress(Exception):
                self.on_exit(self.exit)

    def _kill(self) -> None:
        if self.cgroup is not None:
            self.cgroup.kill_all()
        with contextlib.suppress(ProcessLookupError, OSError):
            self.proc.kill()

    def _cleanup(self) -> None:
        errors = []
        with contextlib.suppress(OSError):
            self.ch.close()
        if self.cgroup is not None:
            try:
                self.cgroup.remove()
            except HostError as exc:
                errors.append(str(exc))
        _remove_traces(self.files, self.jail_dir)  # before wait() returns: no socket outlives its VM
        if self.ids is not None:
            self.ids.release(self.uid)
        if errors:
            self._security("cleanup-failed", "; ".join(errors))

    # -- outbound -------------------------------------------------------------------------------------
    def _send(self, msg: Message) -> None:
        if self._done.is_set():
            raise HostError(f"VM {self.vm_id}: the worker has exited ({self.exit and self.exit.reason.kind})")
        with self._send_lock:
            try:
                self.ch.send(msg)
            except OSError as exc:
                raise HostError(f"VM {self.vm_id}: cannot reach the worker: {exc.strerror}") from None

    @property
    def integrity_refusal(self) -> IntegrityRefused | None:
        """The pre-import gate's refusal, when the worker's exit status confirms it (else None)."""
        from bulkhead._boot import EXIT_INTEGRITY  # lazily: the gate runs by path, not as bulkhead._boot

        if self._integrity is None or self.exit is None or self.exit.returncode != EXIT_INTEGRITY:
            return None
        return self._integrity

    def wait_ready(self, timeout: float) -> Hello:
        """Block until the worker's hello (sandbox in place). Raises WorkerIntegrityError when the worker's
        code failed the pre-import check, HostError if it dies first for another reason."""
        deadline = time.monotonic() + timeout
        while self.hello is None:
            if self._done.wait(0.01):
                assert self.exit is not None
                refused = self.integrity_refusal
                if refused is not None:
                    raise WorkerIntegrityError(refused.detail, path=refused.path)
                raise HostError(f"VM {self.vm_id}: the worker failed before it was ready: "
                                f"{self.exit.reason.detail}; {self.exit.stderr.strip()[-400:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise HostError(f"VM {self.vm_id}: the worker was not ready within {timeout} s")
        return self.hello

    def start(self) -> None:
        self._send(Start())

    def pause(self) -> None:
        self._send(Pause())

    def resume(self) -> None:
        self._send(Resume())

    def console_input(self, data: bytes) -> None:
        for i in range(0, len(data), MAX_CONSOLE_CHUNK):
            self._send(ConsoleIn(data[i : i + MAX_CONSOLE_CHUNK]))

    def request_shutdown(self, timeout: float = 5.0) -> str:
        """Ask the guest to shut down (protocol Shutdown). Returns the method the worker reports
        ("ctrl-alt-del"), or "" when it could not deliver it or did not answer in time. Raises HostError
        when the worker is gone. The worker's answer is a claim: the host still force-stops on timeout."""
        with self._cond:
            seen = sum(1 for name, _ in self.events if name == SHUTDOWN_EVENT)
        self._send(Shutdown())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._done.is_set():
            answers = [f for name, f in list(self.events) if name == SHUTDOWN_EVENT]
            if len(answers) > seen:
                method = answers[-1].get("method")
                return method if method in ("ctrl-alt-del", "acpi-power-button") else ""
            time.sleep(0.01)
        return ""

    def status(self, timeout: float = 2.0, stats: bool = False) -> StatusReply:
        """The worker's state (with `stats`, self.counters is fresh on return). HostError if no answer in time."""
        reply = _ask(self, lambda seq: Status(seq, stats), timeout, "status request", stats=stats)
        if not isinstance(reply, StatusReply):
            raise HostError(f"VM {self.vm_id}: the worker answered a status request with {reply.TYPE!r}")
        return reply

    def save_state(self, timeout: float = 10.0) -> None:
        """protocol SaveState: the worker pauses the VM and writes its state into the host's state memfd.
        The host checks the document itself (runtime/snapshot.py seal_snapshot). Raises HostError."""
        reply = _ask(self, SaveState, timeout, "snapshot request")
        if not isinstance(reply, StateSaved) or not reply.ok:
            raise HostError(f"VM {self.vm_id}: the worker could not save its state: {getattr(reply, 'detail', '')}")

    def probe(self, name: str, arg: str = "", timeout: float = 20.0) -> ProbeResult | None:
        """TEST ONLY: run an escape probe; None when the worker died instead of answering."""
        if not self.test_probes:
            raise HostError("probes are only available in workers spawned with test_probes")
        with self._cond:
            self._probe = None
        self._send(Probe(name, arg))
        with self._cond:
            self._cond.wait_for(lambda: self._probe is not None or self._done.is_set(), timeout)
            return self._probe

    def wait(self, timeout: float | None = None) -> WorkerExit:
        """Block until the worker has exited and been cleaned up. Raises HostError on timeout."""
        if not self._done.wait(timeout):
            raise HostError(f"VM {self.vm_id}: still running after {timeout} s")
        assert self.exit is not None
        return self.exit

    def stop(self, timeout: float | None = None) -> WorkerExit:
        """Ask the VM to stop; kill the worker if it has not exited within the timeout."""
        timeout = self.stop_timeout if timeout is None else timeout
        with contextlib.suppress(HostError):
            self._send(Stop())
        if not self._done.wait(timeout):
            self._host_killed = True
            self._kill()
        return self.wait(timeout + 5)

    def kill(self) -> WorkerExit:
        self._host_killed = True
        self._kill()
        return self.wait(10)

    @property
    def running(self) -> bool:
        return not self._done.is_set()


# --- spawning ------------------------------------------------------------------------------------------


def _ask(h: WorkerHandle, make: Callable[[int], Message], timeout: float, what: str, *, stats: bool = False) -> Message:
    """Send a request with a fresh seq and wait for the worker's reply with that seq. HostError if none in time."""
    with h._cond:
        h._seq = seq = (h._seq + 1) & 0xFFFFFFFF
        h._stats_asked += 1 if stats else 0
        h._replies[seq] = None
    try:
        h._send(make(seq))
        with h._cond:
            h._cond.wait_for(lambda: h._replies.get(seq) is not None or h._done.is_set(), timeout)
    finally:
        with h._cond:
            reply = h._replies.pop(seq, None)
    if reply is None:
        raise HostError(f"VM {h.vm_id}: the worker exited" if h._done.is_set() else
                        f"VM {h.vm_id}: no answer to the {what} within {timeout} s")
    return reply


def _open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", name.encode(), _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR))
    except OSError as exc:
        os.close(fd)
        raise HostError(f"cannot attach tap {name!r}: {exc.strerror}") from None
    return fd


def _regular_file(path: str, what: str) -> str:
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror}") from None
    if not os.path.isfile(real) or st.st_nlink < 1:
        raise ConfigError(f"{what} {path} is not a regular file")
    return real


def _verify_sandbox(handle: WorkerHandle, uid: int) -> None:
    """Check from the host, in /proc, what the worker claims: ids, capabilities, no_new_privs, seccomp,
    namespaces. Raises HostError (and the worker is killed) on any mismatch."""
    assert handle.cgroup is not None
    pids = handle.cgroup.pids()
    if handle.pid not in pids or len(pids) < 2:
        raise HostError(f"worker processes {sorted(pids)} (reaper {handle.pid}) are not all in the VM's cgroup")
    own = {ns: os.readlink(f"/proc/self/ns/{ns}") for ns in ("mnt", "net", "ipc", "uts", "pid")}
    for pid in pids:
        try:
            st = _read_status(pid)
            ns = {n: os.readlink(f"/proc/{pid}/ns/{n}") for n in own}
        except OSError:
            continue  # a thread or process that just ended
        bad = []
        if st.get("Uid", "").split() != [str(uid)] * 4 or st.get("Gid", "").split() != [str(uid)] * 4:
            bad.append(f"ids {st.get('Uid')}/{st.get('Gid')}")
        for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            if int(st.get(cap, "1"), 16) != 0:
                bad.append(f"{cap}={st.get(cap)}")
        if st.get("NoNewPrivs") != "1":
            bad.append("no_new_privs unset")
        if handle.hello is not None and handle.hello.seccomp and st.get("Seccomp") != "2":
            bad.append("no seccomp filter")
        for n in ("mnt", "net", "ipc", "uts"):
            if ns[n] == own[n]:
                bad.append(f"shares the host's {n} namespace")
        if pid != handle.pid and ns["pid"] == own["pid"]:
            bad.append("the worker shares the host's PID namespace")
        if bad:
            raise HostError(f"sandbox verification failed for pid {pid}: {', '.join(bad)}")


class WorkerIntegrityError(CodeMismatch, HostError):
    """The worker's code does not match the signed manifest (the pre-import gate refused). `path` names the
    first differing file. A security event: the daemon audits it as security/integrity/code-mismatch."""


_INTEGRITY_ENV = ("BULKHEAD_MANIFEST", "BULKHEAD_RELEASE_KEY", "BULKHEAD_DEV_SKIP_INTEGRITY")


def boot_argv(args: list[str]) -> list[str]:
    """`python -I -S -B <bulkhead/_boot.py> ... -- <args>`: the same package and site directories as this
    process (the launcher's, when it started through the gate)."""
    boot: Any = sys.modules.get("bulkhead_boot")
    if boot is None or not hasattr(boot, "worker_argv"):
        from bulkhead import _boot as boot
    return list(boot.worker_argv(sys.executable, args))


def _worker_env() -> dict[str, str]:
    """The worker starts from a clean environment; only where to find the signed manifest (or the explicit,
    loud development skip of the code check) is passed on."""
    return {k: os.environ[k] for k in _INTEGRITY_ENV if k in os.environ}


def spawn_worker(config: VmConfig, *, vm_id: str | None = None, options: JailOptions | None = None,
                 on_console: Callable[[bytes], None] | None = None,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None,
                 on_security_event: Callable[[str, str], None] | None = None,
                 on_exit: Callable[[WorkerExit], None] | None = None, fork: bool = True,
                 snapshot_fds: tuple[int, int] | None = None, restore: bool = False,
                 snapshot: bool = False, pool: Any = None) -> WorkerHandle:
    """Start a jailed worker for `config` and return once its sandbox is in place and verified; the VM runs
    at handle.start(). Forked into the jail or exec'd through the gate (_launch, docs/SANDBOX.md "Fork
    path"), or, with `pool` (sandbox/zygote.py WorkerPool, docs/SANDBOX.md "Worker pool"), handed to a
    ready pool worker when one fits (no NIC; the jail's id is then the slot's). `snapshot_fds`
    (memory, state): the host's memfds (runtime/snapshot.py); with `restore` the
    worker rebuilds the VM from them, with `snapshot` a host stop makes it write its state there.
    Raises ConfigError (bad id or image path), HostError (not root, no cgroups/jail, worker not ready)."""
    opts = options or JailOptions()
    vm_id = _checked_spawn(vm_id, opts, (restore or snapshot) and snapshot_fds is None)
    binds, drives = _image_binds(config, restore=restore)
    slot = pool.take(opts) if pool is not None and not config.nets and config.vsock is None else None
    files = _vm_sockets(config)
    if slot is not None:
        files += (_map_slot(opts.base_dir, vm_id, slot),)  # the VM's name for its slot: removed with it
        vm_id, ids, uid, jail_dir = slot.slot_id, slot.ids, slot.uid, slot.jail_dir
    else:
        ids = IdAllocator(os.path.join(opts.base_dir, "ids"), opts.uid_base)
        uid = ids.allocate(vm_id)
        jail_dir = os.path.join(opts.base_dir, "jail", vm_id, "root")
    cgroup: VmCgroup | None = None
    taps: list[int] = []
    socks: list[Any] = []
    try:
        quota_pct = opts.cpu_quota_pct if opts.cpu_quota_pct is not None else 100 * config.cpus
        limits = CgroupLimits((config.mem_mib + opts.memory_overhead_mib) << 20, opts.pids_base + config.cpus,
                              quota_pct * 1000)
        if slot is not None:
            cgroup = slot.cgroup
            cgroup.set_limits(limits)
        else:
            cgroup = _new_jail(vm_id, jail_dir, limits, opts)
        nets, vsock = _open_taps(config, taps), _vsock_listener(config, binds, taps)  # vsock's fd after the taps
        inner = config._replace(kernel="/vm/kernel", initrd="/vm/initrd" if config.initrd else None,
                                serial="stdio", drives=tuple(drives), nets=tuple(nets), vsock=vsock)
        devices = ("kvm", "urandom") + (("net/tun",) if nets else ())
        spec = JailSpec(vm_id, jail_dir, uid, uid, tuple(binds), devices, tuple(cgroup.procs_files),
                        opts.nofile, limits.pids_max, opts.seccomp, bool(nets), inner.to_dict(), bool(vsock))
        if slot is not None:
            socks.append(slot.sock)
            proc = slot.proc
            slot.assign(spec, snapshot_fds, restore=restore, snapshot=snapshot)
        else:
            proc = _start_process(spec, taps, snapshot_fds, restore=restore, snapshot=snapshot, opts=opts,
                                  fork=fork, socks=socks, vsock_fd=vsock.listen_fd if vsock else -1)
    except BaseException:
        if slot is not None:
            slot.kill()
        _undo_spawn(taps, tuple(socks), cgroup, jail_dir)
        _undo_vsock(config, taps)
        ids.release(uid)
        raise
    for sock in socks[1:]:
        sock.close()  # the worker's end
    for fd in taps:
        os.close(fd)  # the worker holds the only reference: the tap (if not persistent) dies with it
    handle = WorkerHandle(vm_id, proc, Channel(socks[0], WORKER_TO_HOST), cgroup=cgroup, uid=uid, ids=ids,
                          jail_dir=jail_dir, test_probes=opts.test_probes, stop_timeout=opts.stop_timeout,
                          on_console=on_console, on_event=on_event, on_security_event=on_security_event,
                          on_exit=on_exit, files=files)
    hello = handle.wait_ready(opts.ready_timeout)
    try:
        if hello.uid != uid or hello.gid != uid:
            raise HostError(f"worker reports uid/gid {hello.uid}/{hello.gid}, expected {uid}")
        _verify_sandbox(handle, uid)
    except HostError:
        handle.kill()
        raise
    return handle


def _new_jail(vm_id: str, jail_dir: str, limits: CgroupLimits, opts: JailOptions) -> VmCgroup:
    """The VM's empty jail directory and its cgroup(s). Raises HostError (id in use, no cgroups)."""
    try:
        os.makedirs(os.path.dirname(jail_dir), mode=0o700, exist_ok=True)
        os.mkdir(jail_dir, 0o700)
    except FileExistsError:
        raise HostError(f"VM id {vm_id!r} is already in use (jail directory exists)") from None
    cgroup = VmCgroup(vm_id, limits, parent=opts.cgroup_parent)
    cgroup.create()
    return cgroup


def _checked_spawn(vm_id: str | None, opts: JailOptions, fds_missing: bool) -> str:
    """spawn_worker's preconditions; returns the VM id (48 random bits when none is given)."""
    if os.geteuid() != 0:
        raise HostError("the jail needs root (run as root, or use --no-jail for development)")
    if opts.test_probes and os.environ.get(PROBES_ENV) != "1":
        raise HostError(f"test probes are refused unless {PROBES_ENV}=1 is set in the host's environment")
    vm_id = vm_id or os.urandom(6).hex()  # 48 random bits, as uuid4().hex[:12] had
    if not _VM_ID.match(vm_id):
        raise ConfigError(f"VM id {vm_id!r} must be 1-63 characters of a-z, 0-9 and '-'")
    if fds_missing:
        raise HostError("a snapshot or restore needs the host's memfds")
    return vm_id


def _start_process(spec: JailSpec, taps: list[int], snapshot_fds: tuple[int, int] | None, *, restore: bool,
                   snapshot: bool, opts: JailOptions, fork: bool, socks: list[Any], vsock_fd: int = -1) -> Any:
    """Fork or exec the worker for `spec`; appends (host end, worker end) of its channel to `socks`.
    `taps` holds the NICs' fds and, last, the vsock listener's (`vsock_fd`) when the VM has vsock."""
    sock_host, sock_worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    socks += [sock_host, sock_worker]
    worker_args = ["worker", "--channel-fd", str(sock_worker.fileno()), "--spec", spec.to_json()]
    for fd in taps:
        worker_args += ["--vsock-fd" if fd == vsock_fd else "--tap-fd", str(fd)]
    if snapshot_fds is not None:  # the host's memfds (runtime/snapshot.py)
        worker_args += ["--memory-fd", str(snapshot_fds[0]), "--state-fd", str(snapshot_fds[1])]
        worker_args += (["--restore"] if restore else []) + (["--snapshot"] if snapshot else [])
    if opts.test_probes:
        worker_args.append("--test-probes")
    return _launch(worker_args, spec.cgroup_procs, fork=fork, test_probes=opts.test_probes,
                   pass_fds=(sock_worker.fileno(), *taps, *(snapshot_fds or ())))


def _open_taps(config: VmConfig, taps: list[int]) -> list[Any]:
    """The NICs with the fds the worker gets (appended to `taps` as they open, for the caller's cleanup).
    A tap the caller already opened (e.g. the daemon's, inside a tenant namespace) is duplicated;
    otherwise the tap is opened here by name."""
    nets = []
    for n in config.nets:
        fd = os.dup(n.tap_fd) if n.tap_fd >= 0 else _open_tap(n.tap)
        taps.append(fd)
        nets.append(n._replace(tap_fd=fd))
    return nets


def _undo_vsock(config: VmConfig, fds: list[int]) -> None:
    """A failed spawn that bound the vsock socket (its fd follows the taps in `fds`) removes it."""
    if config.vsock is not None and len(fds) > len(config.nets):
        with contextlib.suppress(OSError):
            os.unlink(os.path.abspath(config.vsock.path))


def _vm_sockets(config: VmConfig) -> tuple[str, ...]:
    """The VM's host-side sockets that go with its worker: the vsock socket (none without vsock)."""
    return () if config.vsock is None else (os.path.abspath(config.vsock.path),)


def _vsock_listener(config: VmConfig, binds: list[BindSpec], fds: list[int]) -> Any:
    """The vsock device as the worker sees it: the supervisor binds the VM's socket at config.vsock.path (as
    the host's user: host programs connect there) and passes the listening fd (appended to `fds`); PATH's
    directory is bound read-only at /vm/vsock for guest-initiated streams to `<path>_<port>`, idmapped like
    the images, so the worker sees that directory and nothing else of the host. Raises ConfigError."""
    if config.vsock is None:
        return None
    from bulkhead.runtime.vsock import bind_listener

    path = os.path.abspath(config.vsock.path)
    directory, name = os.path.split(path)
    if not os.path.isdir(directory):
        raise ConfigError(f"--vsock {path}: {directory} is not a directory")
    fd = bind_listener(path).detach()
    fds.append(fd)
    binds.append(BindSpec(directory, "/vm/vsock", True))
    inner = f"/vm/vsock/{name}"
    return config.vsock._replace(path=inner, listen_fd=fd, connect_prefix=inner)


def _undo_spawn(taps: list[int], socks: tuple[Any, ...], cgroup: VmCgroup | None, jail_dir: str) -> None:
    """Undo a spawn that failed before the worker ran: fds, sockets, cgroup, jail directory."""
    for fd in taps:
        os.close(fd)
    for sock in socks:
        if sock is not None:
            sock.close()
    if cgroup is not None:
        cgroup.remove()
    with contextlib.suppress(OSError):
        os.rmdir(jail_dir)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(jail_dir))


def _image_binds(config: VmConfig, *, restore: bool) -> tuple[list[BindSpec], list[Any]]:
    """Read-only binds of kernel and initrd (none for a restore: the VM comes from the host's memfds) and
    the drives, with the drives' paths as the worker sees them. Raises ConfigError for a bad path."""
    binds = [] if restore else [BindSpec(_regular_file(config.kernel, "kernel"), "/vm/kernel", True)]
    if config.initrd and not restore:
        binds.append(BindSpec(_regular_file(config.initrd, "initrd"), "/vm/initrd", True))
    drives = []
    for i, d in enumerate(config.drives):
        binds.append(BindSpec(_regular_file(d.path, "drive"), f"/vm/drive{i}", d.read_only))
        drives.append(d._replace(path=f"/vm/drive{i}"))
    return binds, drives


def _launch(worker_args: list[str], procs_files: tuple[str, ...], *, fork: bool, test_probes: bool,
            pass_fds: tuple[int, ...]) -> Any:
    """Start worker.main: forked into the jail from this verified process where allowed
    (sandbox/forkspawn.py), else exec'd through the gate."""
    if fork and fork_allowed(_worker_env()):
        return fork_worker(worker_args, procs_files, _worker_env(), test_probes=test_probes)
    # A shell joins the cgroup first and then execs Python, so every page of the worker (interpreter
    # included) is charged to the VM's memory cgroup (v1 does not move charges on a later move).
    # The worker goes through the pre-import gate (bulkhead/_boot.py): the code is verified before
    # any bulkhead module is imported, and imports come only from the verified tree.
    argv = ["/bin/sh", "-c", _JOIN_CGROUP, "bulkhead-worker", *procs_files, "--", *boot_argv(worker_args)]
    import subprocess

    return subprocess.Popen(argv, env=_worker_env(), cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, pass_fds=pass_fds, close_fds=True)


def _forward_stdin(handle: WorkerHandle) -> None:
    """Host stdin -> the guest's serial port (as `bulkhead run` does unjailed)."""
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, ValueError, OSError):
        return
    while handle.running:
        try:
            data = os.read(fd, 4096)
        except OSError:
            return
        if not data:
            return
        try:
            handle.console_input(data)
        except HostError:
            return


def run_jailed(config: VmConfig, *, options: JailOptions | None = None,
               console: Callable[[bytes], None] | None = None, vm_id: str | None = None,
               stats_path: str | None = None, snapshot: Any = None, restore: Any = None) -> ExitReason:
    """Run one VM in a jailed worker until it stops (what `bulkhead run` does as root).

    Console output goes to `console`, else to config.serial (stdio, none, or a file). SIGINT/SIGTERM
    stop the VM. With `stats_path`, the counters the worker sent (runtime/stats.py) are written there,
    with the host's exit reason and the events it received. Raises ConfigError/HostError like run_vm.
    `snapshot` (runtime/snapshot.py SnapshotTarget) and `restore` (RestoreSource) as in run_vm: the
    jailed worker runs the VM, the host authenticates, decrypts, checks and seals.
    """
    launch_digest = None
    if snapshot is not None and restore is None:
        from bulkhead.integrity.launch import launch_digest_for_config

        launch_digest = launch_digest_for_config(config)  # the host measures: the worker's word is not taken
    elif restore is not None:
        launch_digest = restore.header["launch_digest"]
    fds = restore if restore is not None else snapshot
    snap_kw: dict[str, Any] = {}
    if fds is not None:
        snap_kw = {"snapshot_fds": (fds.memory_fd, fds.state_fd), "restore": restore is not None,
                   "snapshot": snapshot is not None}
    out = None
    if console is None:
        from bulkhead.runtime.console import open_serial

        out = open_serial(config.serial)  # the one console sink (runtime/console.py): ConfigError if unopenable
    sink = console if out is None else out.write
    handle = spawn_worker(config, vm_id=vm_id, options=options, on_console=sink, **snap_kw)
    if restore is not None:
        try:
            restore.on_built()  # the restore ledger, once the jail is verified and before the guest runs
        except BaseException:
            handle.kill()
            raise
    stop = threading.Event()
    old: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, lambda s, f: stop.set())
    if console is None and config.serial == "stdio":
        threading.Thread(target=_forward_stdin, args=(handle,), daemon=True).start()
    try:
        handle.start()
        while handle.running and not stop.is_set():
            handle._done.wait(0.1)  # the worker's end wakes this at once; a signal within 0.1 s
        result = handle.stop() if handle.running else handle.wait()
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
        if handle.running:
            handle.kill()
        if out is not None:
            out.close()
    reason = result.reason
    if snapshot is not None and reason.kind == "snapshotted":
        from bulkhead.runtime.snapshot import seal_snapshot

        info = seal_snapshot(snapshot, config=config, launch_digest=launch_digest)
        reason = ExitReason.of("snapshotted", f"saved to {info['path']} ({info['pages']} pages, {info['bytes']} "
                               f"bytes, snapshot {info['snapshot_id']})")
    if stats_path:
        _write_stats(stats_path, handle, reason)
    return reason


def _write_stats(path: str, handle: WorkerHandle, reason: ExitReason) -> None:
    from bulkhead.runtime.stats import nest_counters, write_stats

    stats = {"exit": reason._asdict(), **nest_counters(handle.counters or {}),
             "events": [{"event": name, **fields} for name, fields in handle.events]}
    stats.setdefault("devices", {})
    write_stats(path, stats)

