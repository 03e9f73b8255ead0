"""`JailedBackend`: the daemon's VM backend contract (bulkhead.daemon.backend.VmBackend), on jailed workers.

The daemon swaps it in for ProcessBackend:

    from bulkhead.daemon.backend import BackendStatus
    from bulkhead.sandbox.backend import JailedBackend
    backend = JailedBackend(status_type=BackendStatus, on_security_event=audit_hook)

It takes the daemon's VmSpec duck-typed (kernel, initrd, cmdline, mem_mib, cpus, drives, nics, rng,
console_path) so the sandbox layer does not import the daemon layer. Pause/resume are real vCPU pauses
over the worker protocol (no SIGSTOP); console bytes are appended to spec.console_path; status comes
from the worker (state) or from the host-decided exit reason. Every method raises HostError when the
host cannot do it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bulkhead.config import vsock_of
from bulkhead.errors import HostError, StartRefused, VmNotRunning
from bulkhead.runtime.config import DriveConfig, NetConfig, VmConfig
from bulkhead.runtime.console import ConsoleSink
from bulkhead.sandbox.supervisor import JailOptions, WorkerExit, WorkerHandle, spawn_worker
from bulkhead.sandbox.worker import GUEST_START_EVENT, START_REFUSED_EVENT

__all__ = ["JailedBackend", "jail_id"]

_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
MAX_CONSOLE_READ = 1 << 20


def jail_id(vm_id: str) -> str:
    """The daemon's VM id if it is a valid jail id, else a stable digest of it."""
    return vm_id if _ID.match(vm_id) else "d-" + hashlib.sha256(vm_id.encode()).hexdigest()[:20]


def _net(n: Any) -> NetConfig:
    """A spec NIC: a runtime NetConfig (possibly carrying an open tap fd) or a legacy (tap, mac) pair."""
    if isinstance(n, NetConfig):
        return n
    tap, mac = n
    return NetConfig(tap, mac)


def _wait_guest_start(handle: WorkerHandle, timeout: float) -> None:
    """Return once the worker has built the VM (its guest is about to run, or has run and ended). Raises
    StartRefused (a ConfigError: the loader or the VMM refused the image or configuration) or HostError
    when the worker ends before that: a start is never reported as a success when no guest ran."""
    deadline = time.monotonic() + timeout
    while not any(name == GUEST_START_EVENT for name, _ in list(handle.events)):
        if not handle.running:
            ended = handle.wait(10)
            if any(name == GUEST_START_EVENT for name, _ in list(handle.events)):
                return  # the guest ran and ended already
            reason = ended.reason
            if reason.kind == "config-error":
                kinds = [f.get("kind") for name, f in list(handle.events) if name == START_REFUSED_EVENT]
                kind = kinds[0] if kinds and kinds[0] in ("image-invalid", "config-invalid") else "config-invalid"
                raise StartRefused(reason.detail, kind=str(kind))
            raise HostError(f"the VM's worker ended before its guest ran: {reason.kind}: {reason.detail}")
        if time.monotonic() > deadline:
            handle.kill()
            raise HostError(f"the VM was not built within {timeout} s")
        time.sleep(0.005)


DEFAULT_POOL = 2  # ready pool workers (docs/SANDBOX.md "Worker pool"; docs/PERFORMANCE.md, the start rate)


class JailedBackend:
    """One jailed worker per VM. Thread-safe."""

    def __init__(self, *, status_type: Callable[..., Any], options: JailOptions | None = None,
                 on_security_event: Callable[[str, str, str], None] | None = None,
                 on_exit: Callable[[str, WorkerExit], None] | None = None,
                 console_root: Path | None = None, pool_size: int | None = None) -> None:
        """`pool_size`: ready pool workers kept (sandbox/zygote.py, docs/SANDBOX.md "Worker pool"); default
        BULKHEAD_WORKER_POOL from the environment, else 2 (0: every worker is exec'd). A pooled VM's jail,
        cgroup and uid record carry its slot's id; `<base>/slots/<vm id>` maps the VM to it
        (stale.slot_of), and leftover checks and the stale cleanup follow that map. It starts with the
        first VM start."""
        if pool_size is None:
            raw = os.environ.get("BULKHEAD_WORKER_POOL", str(DEFAULT_POOL))
            pool_size = int(raw) if raw.isdigit() else DEFAULT_POOL
        self._pool_size = min(pool_size, 16)
        self._pool: Any = None
        self.console_root = console_root  # <root>/<vm id>/console.log: readable after a daemon restart
        self._status = status_type
        self._options = options or JailOptions()
        self._on_security_event = on_security_event
        self._on_exit = on_exit
        self._handles: dict[str, WorkerHandle] = {}
        self._consoles: dict[str, str] = {}
        self._memfds: dict[str, tuple[int, int, int]] = {}  # vm id -> (guest RAM, state, bytes): snapshots
        self._lock = threading.Lock()

    @property
    def options(self) -> JailOptions:
        return self._options

    def set_hooks(self, *, on_security_event: Callable[[str, str, str], None] | None = None,
                  on_exit: Callable[[str, WorkerExit], None] | None = None) -> None:
        """Install the owner's callbacks (the daemon is built after its backend): security events
        (vm_id, kind, detail) and worker exits (vm_id, WorkerExit), both called from worker threads."""
        self._on_security_event = on_security_event
        self._on_exit = on_exit

    def start(self, vm_id: str, spec: Any, restore: Any = None) -> int:
        """Spawn, verify and start the VM's worker; returns the worker's host pid once the VM is built (its
        guest runs). Raises StartRefused when the VMM refuses the image or configuration before the guest
        runs, WorkerIntegrityError (a HostError) when the worker's code fails the pre-import check, and
        HostError otherwise. spec.nics holds
        runtime NetConfigs; a NetConfig with tap_fd >= 0 hands an already-open tap to the worker (the
        worker gets its own duplicate; the caller keeps and closes its fd)."""
        with self._lock:
            old = self._handles.get(vm_id)
            if old is not None and old.running:
                raise HostError("the VM is already running")
        config = VmConfig(
            kernel=spec.kernel, initrd=spec.initrd, cmdline=spec.cmdline, mem_mib=spec.mem_mib, cpus=spec.cpus,
            drives=tuple(DriveConfig(p, ro) for p, ro in spec.drives),
            nets=tuple(_net(n) for n in spec.nics), rng=spec.rng, serial="stdio",
            expected_digest=getattr(spec, "expected_digest", None), vsock=vsock_of(spec),
        ) if restore is None else restore.config  # a restore: the snapshot's configuration (runtime/snapshot.py)
        fds = self._guest_memfds(vm_id, config, restore)
        path = spec.console_path
        try:
            os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
            # the one console sink (runtime/console.py), 0600; a reboot appends to the old output
            sink = ConsoleSink(path, truncate=not getattr(spec, "keep_console", False))
        except OSError as exc:
            raise HostError(f"cannot create the console file {path}: {exc.strerror}") from None
        console = sink.write

        def security(kind: str, detail: str) -> None:
            if self._on_security_event is not None:
                self._on_security_event(vm_id, kind, detail)

        def exited(result: WorkerExit) -> None:
            sink.close()  # after the last console message: the reader has ended
            self._drop_memfds(vm_id, fds)
            if self._on_exit is not None:
                self._on_exit(vm_id, result)

        try:
            handle = spawn_worker(config, vm_id=jail_id(vm_id), options=self._options, on_console=console,
                                  on_security_event=security, on_exit=exited, pool=self._worker_pool(),
                                  fork=False,  # the daemon is threaded and holds keys: never fork
                                  snapshot_fds=fds[:2] if fds else None, restore=restore is not None)
        except BaseException:
            sink.close()
            self._drop_memfds(vm_id, fds)
            raise
        with self._lock:
            self._handles[vm_id] = handle
            self._consoles[vm_id] = path
        if restore is not None:
            try:
                restore.on_built()  # the restore ledger: once the jail is verified, before the guest runs
            except BaseException:
                handle.kill()
                raise
        handle.start()
        _wait_guest_start(handle, self._options.ready_timeout)
        return handle.pid

    def _guest_memfds(self, vm_id: str, config: VmConfig, restore: Any) -> tuple[int, int, int] | None:
        """Guest RAM in a memfd the host owns, so the VM can be snapshotted while it runs (docs/SNAPSHOT.md
        "The daemon"); for a restore, the memfds the snapshot was decrypted into. VMs with virtio devices
        (and vsock) get none (not snapshottable yet: their RAM stays the worker's own)."""
        from bulkhead.runtime.snapshot import guest_memfds

        if restore is not None:
            fds = (restore.memory_fd, restore.state_fd, config.mem_bytes)
        elif config.drives or config.nets or config.rng or config.vsock:
            return None
        else:
            try:
                fds = (*guest_memfds(config.mem_bytes), config.mem_bytes)
            except OSError as exc:
                raise HostError(f"cannot create the guest memory: {exc.strerror}") from None
        with self._lock:
            self._memfds[vm_id] = fds
        return fds

    def _drop_memfds(self, vm_id: str, fds: tuple[int, int, int] | None) -> None:
        """Scrub the guest RAM memfd (the worker does not scrub memory it does not own) and close both."""
        from bulkhead.runtime.snapshot import scrub_memfd

        with self._lock:
            if fds is None or self._memfds.get(vm_id) != fds:
                return
            del self._memfds[vm_id]
        scrub_memfd(fds[0], fds[2])
        os.close(fds[0])
        os.close(fds[1])

    def snapshot(self, vm_id: str, seal: Callable[[int, int], Any], *, then: str) -> Any:
        """Snapshot the running VM (protocol SaveState): the worker pauses the vCPUs and writes its state;
        `seal(memory_fd, state_fd)` (runtime/snapshot.py seal_snapshot) runs while the guest stays paused;
        then the VM resumes (`then="resume"`), stays paused ("pause") or stops ("stop"), also when sealing
        failed (a failed snapshot resumes). Returns what seal returned. Raises VmNotRunning / HostError."""
        handle = self._handle(vm_id)
        with self._lock:
            fds = self._memfds.get(vm_id)
        if fds is None:
            raise HostError("this VM cannot be snapshotted: it has virtio devices (docs/SNAPSHOT.md \"Not yet\")")
        was_paused = handle.status().state == "paused"
        ok = False
        try:
            handle.save_state()  # the worker pauses first: a failed save must resume too (review finding)
            info = seal(fds[0], fds[1])
            ok = True
            return info
        finally:
            if ok and then == "stop":
                handle.stop()
            elif not (was_paused or (then == "pause" and ok)):
                if ok:
                    handle.resume()
                else:  # the save's own error is the one to report
                    with contextlib.suppress(Exception):
                        handle.resume()

    def _worker_pool(self) -> Any:
        """The pool of ready workers, started at the first VM start (None when the size is 0)."""
        if self._pool_size <= 0:
            return None
        with self._lock:
            if self._pool is None:
                from bulkhead.sandbox.zygote import WorkerPool

                # each pool worker exec'd afresh (its own ASLR layout, stack canary and hash seed: no
                # fork-server brute force, docs/THREAT_MODEL.md); BULKHEAD_POOL_FORK_SERVER=1 forks
                # them from one fork server instead (cheaper per VM, shared randomization)
                fork_server = os.environ.get("BULKHEAD_POOL_FORK_SERVER", "0") == "1"
                self._pool = WorkerPool(self._options, self._pool_size, fork_server=fork_server)
                self._pool.start()
            return self._pool

    @property
    def pool(self) -> Any:
        """The worker pool, if started (diagnostics, tests and benchmarks)."""
        return self._pool

    def _handle(self, vm_id: str) -> WorkerHandle:
        with self._lock:
            h = self._handles.get(vm_id)
        if h is None or not h.running:
            raise VmNotRunning("the VM is not running")
        return h

    def stop(self, vm_id: str, grace: float = 5.0) -> None:
        with self._lock:
            h = self._handles.get(vm_id)
        if h is not None and h.running:
            h.stop(grace)

    def pause(self, vm_id: str) -> None:
        self._handle(vm_id).pause()

    def resume(self, vm_id: str) -> None:
        self._handle(vm_id).resume()

    def status(self, vm_id: str) -> Any:
        with self._lock:
            h = self._handles.get(vm_id)
        if h is None:
            return self._status("absent")
        if not h.running and h.exit is not None:
            return self._status("exited", h.pid, h.exit.reason.status)
        try:
            state = h.status(timeout=2.0).state
        except HostError:
            if h.exit is not None:
                return self._status("exited", h.pid, h.exit.reason.status)
            raise
        return self._status("paused" if state == "paused" else "running", h.pid)

    def worker(self, vm_id: str) -> WorkerHandle | None:
        """The VM's current (or last) worker handle, if any (diagnostics and tests)."""
        with self._lock:
            return self._handles.get(vm_id)

    def stats(self, vm_id: str) -> dict[str, Any] | None:
        """The VM's counters, nested as `bulkhead run --stats` writes them (daemon/vmstats.py): asked of a
        running worker now (a `status` with stats), else those its worker sent when its last run ended.
        Untrusted diagnostics. None: none yet."""
        from bulkhead.runtime.stats import nest_counters

        with self._lock:
            h = self._handles.get(vm_id)
        if h is None:
            return None
        if h.running:
            with contextlib.suppress(HostError):
                h.status(timeout=2.0, stats=True)
        counters = h.counters
        return None if counters is None else nest_counters(counters)

    def exit_reason(self, vm_id: str) -> WorkerExit | None:
        """The host-decided exit of a VM's worker (kind, status, detail, security_event), if it ended."""
        with self._lock:
            h = self._handles.get(vm_id)
        return None if h is None else h.exit

    def console(self, vm_id: str, offset: int, limit: int) -> bytes:
        path = self._consoles.get(vm_id)
        if path is None and self.console_root is not None:
            path = str(self.console_root / vm_id / "console.log")  # the daemon's VM ids are checked UUIDs
        if path is None:
            return b""
        try:
            with open(path, "rb") as f:
                f.seek(max(0, offset))
                return f.read(max(0, min(limit, MAX_CONSOLE_READ)))
        except OSError:
            return b""

    def console_input(self, vm_id: str, data: bytes) -> None:
        """Bytes for the guest's COM1 receive queue, over the worker channel (protocol ConsoleIn, at most
        MAX_CONSOLE_CHUNK bytes per message; the worker hands them to Serial.enqueue_input, bounded and
        counted there). Raises VmNotRunning / HostError."""
        self._handle(vm_id).console_input(bytes(data))

    def request_shutdown(self, vm_id: str) -> str:
        """Ask the guest to shut down (protocol Shutdown -> Ctrl-Alt-Del). Returns the method the worker
        reports, "" when nothing was delivered. Raises VmNotRunning / HostError."""
        return self._handle(vm_id).request_shutdown()

    def forget(self, vm_id: str) -> None:
        with self._lock:
            h = self._handles.pop(vm_id, None)
            self._consoles.pop(vm_id, None)
        if h is not None and h.running:
            h.kill()

    def shutdown(self) -> None:
        with self._lock:
            handles = list(self._handles.values())
            pool, self._pool, self._pool_size = self._pool, None, 0
        if pool is not None:
            pool.close()
        for h in handles:
            if h.running:
                h.stop(2.0)
