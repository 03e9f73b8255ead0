"""The daemon's pool of pre-started workers (a zygote, as Android's and crosvm's forked jails are), docs/SANDBOX.md
"Worker pool", issue 16.2.

    pool = WorkerPool(JailOptions(), size=2)
    pool.start()                                    # a background thread keeps `size` slots ready
    handle = spawn_worker(config, options=opts, pool=pool)  # a ready slot when one fits, else exec
    pool.close()                                    # kills and removes the idle slots

A slot is one pool worker and what the host made for it: a jail id (``z`` + 48 random bits), its own uid
from the IdAllocator, its jail directory, its cgroup(s) and its channel. The worker is exec'd through the
pre-import gate exactly as the daemon's other workers are, so its code is verified once, at its start, by
the same check against the same signed manifest. It then joins its cgroups, enters its own mount, IPC,
UTS and network namespaces, imports the VM path, and says PoolReady. At assignment the host writes the
VM's cgroup limits and sends one Assign with the VM's jail spec, which the worker validates and which
must name its own slot. From then on the worker continues exactly as an exec'd worker: idmapped binds,
PID namespace, reaper, pivot_root, uid drop, seccomp, hello, and the host verifies the sandbox from /proc
(supervisor._verify_sandbox) before the VM starts. A pool worker serves that one VM and exits: nothing
crosses from one VM to the next, because no process or resource of a slot is ever reused.

What a slot does not do before its spec (and why): the uid drop and the seccomp filter come after
pivot_root, and the root's binds (kernel, initrd, drives) are the VM's. A pool worker waiting for its
spec is root in its new namespaces, and the only input it takes is the host's Assign.

Fails closed: a slot whose worker refuses its code (IntegrityRefused), dies, or is not ready in time is
removed, and after three failures in a row the pool stops filling; spawn_worker then execs, and the exec'd
worker reports the real error (WorkerIntegrityError) to the caller.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from typing import Any

from bulkhead.errors import HostError
from bulkhead.sandbox.cgroups import CgroupLimits, VmCgroup
from bulkhead.sandbox.forkspawn import ForkedWorker
from bulkhead.sandbox.jail import IdAllocator, JailSpec
from bulkhead.sandbox.protocol import POOL_WORKER_TO_HOST, Assign, Channel, PoolReady, ProtocolError
from bulkhead.sandbox.supervisor import JailOptions, _launch, _new_jail, _worker_env, boot_argv

__all__ = ["ForkServer", "Slot", "WorkerPool", "make_slot"]

# The pool worker's memory before its VM: the interpreter and the VM path's imports (~40 MiB here).
POOL_MEMORY_MIB = 128
MAX_FAILURES = 3


class Slot:
    """One ready pool worker and its host-side resources; used once (assign) or discarded (kill)."""

    def __init__(self, slot_id: str, uid: int, ids: IdAllocator, jail_dir: str, cgroup: VmCgroup,
                 proc: Any, sock: socket.socket, options: JailOptions) -> None:
        self.slot_id, self.uid, self.ids, self.jail_dir = slot_id, uid, ids, jail_dir
        self.cgroup, self.proc, self.sock, self.options = cgroup, proc, sock, options

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def assign(self, spec: JailSpec, snapshot_fds: tuple[int, int] | None = None, *, restore: bool = False,
               snapshot: bool = False) -> None:
        """Hand the slot its VM (the caller wrote the cgroup limits), with the host's guest-memory and state
        memfds attached when it has them. Raises HostError if the worker is gone."""
        from bulkhead.sandbox.protocol import encode

        try:
            socket.send_fds(self.sock, [encode(Assign(spec.to_json(), restore, snapshot))], list(snapshot_fds or ()))
        except (OSError, ProtocolError) as exc:
            raise HostError(f"the pool worker took no assignment: {exc}") from None

    def kill(self) -> None:
        """End the worker (the caller, or discard, removes the resources)."""
        self.cgroup.kill_all()
        with contextlib.suppress(OSError):
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.wait(5)

    def discard(self) -> None:
        """Kill the worker and remove every resource of the slot."""
        self.kill()
        with contextlib.suppress(OSError):
            self.sock.close()
        with contextlib.suppress(HostError):
            self.cgroup.remove()
        for d in (self.jail_dir, os.path.dirname(self.jail_dir)):
            with contextlib.suppress(OSError):
                os.rmdir(d)
        self.ids.release(self.uid)


PR_SET_CHILD_SUBREAPER = 36


class ForkServer:
    """The host end of `bulkhead zygote` (forkspawn.serve): one exec'd, gate-verified, pre-imported
    process that forks the pool workers. This process becomes a child subreaper, so the pool workers
    (forked twice by the server) are its children and their wait status is its own to read."""

    def __init__(self, opts: JailOptions) -> None:
        import subprocess

        from bulkhead.sandbox.jail import prctl

        prctl(PR_SET_CHILD_SUBREAPER, 1)
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        args = ["zygote", "--control-fd", str(theirs.fileno())]
        if opts.test_probes:
            args.append("--test-probes")
        self.proc = subprocess.Popen(boot_argv(args), env=_worker_env(), cwd="/", stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     pass_fds=(theirs.fileno(),), close_fds=True)
        theirs.close()
        self._lock = threading.Lock()

    def spawn(self, pre: JailSpec, channel_fd: int, timeout: float) -> ForkedWorker:
        """One pool worker for slot `pre`. Raises HostError."""
        import json

        stderr_r, stderr_w = os.pipe2(os.O_CLOEXEC)
        try:
            with self._lock:
                self.sock.settimeout(timeout)
                socket.send_fds(self.sock, [pre.to_json().encode()], [channel_fd, stderr_w])
                reply = json.loads(self.sock.recv(4096) or b"{}")
        except (OSError, ValueError) as exc:
            os.close(stderr_r)
            raise HostError(f"the fork server did not answer: {exc}") from None
        finally:
            os.close(stderr_w)
        if not isinstance(reply.get("pid"), int) or reply["pid"] <= 1:
            os.close(stderr_r)
            raise HostError(f"the fork server refused: {reply.get('error', 'no answer')}")
        return ForkedWorker(reply["pid"], os.fdopen(stderr_r, "rb"))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a spawn blocked in recv; the server sees EOF
        with contextlib.suppress(OSError):
            self.sock.close()
        with contextlib.suppress(Exception):
            self.proc.wait(5)


def make_slot(opts: JailOptions, timeout: float | None = None, server: ForkServer | None = None) -> Slot:
    """Start one pool worker and wait for its PoolReady. Raises HostError (the slot is removed first);
    a worker whose code fails the gate says IntegrityRefused and is a HostError here too."""
    slot_id = "z" + os.urandom(6).hex()
    ids = IdAllocator(os.path.join(opts.base_dir, "ids"), opts.uid_base)
    uid = ids.allocate(slot_id)
    jail_dir = os.path.join(opts.base_dir, "jail", slot_id, "root")
    limits = CgroupLimits(POOL_MEMORY_MIB << 20, opts.pids_base + 1, 100_000)
    try:
        cgroup = _new_jail(slot_id, jail_dir, limits, opts)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rmdir(jail_dir)
            os.rmdir(os.path.dirname(jail_dir))
        ids.release(uid)
        raise
    sock_host, sock_worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pre = JailSpec(slot_id, jail_dir, uid, uid, (), (), tuple(cgroup.procs_files), opts.nofile,
                   limits.pids_max, opts.seccomp, False, {})
    args = ["worker", "--pool", "--channel-fd", str(sock_worker.fileno()), "--spec", pre.to_json()]
    if opts.test_probes:
        args.append("--test-probes")
    slot = Slot(slot_id, uid, ids, jail_dir, cgroup, None, sock_host, opts)
    try:
        if server is not None:
            slot.proc = server.spawn(pre, sock_worker.fileno(), opts.ready_timeout)
        else:
            slot.proc = _launch(args, pre.cgroup_procs, fork=False, test_probes=opts.test_probes,
                                pass_fds=(sock_worker.fileno(),))
        sock_worker.close()
        sock_host.settimeout(timeout if timeout is not None else opts.ready_timeout)
        try:
            msg = Channel(sock_host, POOL_WORKER_TO_HOST).recv()
        except (OSError, ProtocolError) as exc:
            raise HostError(f"the pool worker did not become ready: {exc}") from None
        sock_host.settimeout(None)
        if not isinstance(msg, PoolReady) or msg.pid != slot.proc.pid:
            raise HostError(f"the pool worker did not become ready (it sent {msg!r})")
    except BaseException:
        sock_worker.close()
        if slot.proc is None:
            slot.proc = _Gone()
        slot.discard()
        raise
    return slot


class _Gone:
    """A process that never started (make_slot's cleanup)."""

    pid = 0

    def poll(self) -> int:
        return 0

    def kill(self) -> None:
        pass

    def wait(self, timeout: float | None = None) -> int:
        return 0


class WorkerPool:
    """Up to `size` ready slots, refilled by one background thread. Thread-safe."""

    def __init__(self, options: JailOptions, size: int = 2, fork_server: bool = True) -> None:
        self.options, self.size = options, size
        self._use_server = fork_server
        self._server: ForkServer | None = None
        self._ready: list[Slot] = []
        self._cond = threading.Condition()
        self._closed = False
        self.failures = 0
        self.last_error = ""
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.size > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._fill, name="worker-pool", daemon=True)
            self._thread.start()

    @property
    def disabled(self) -> bool:
        return self.failures >= MAX_FAILURES

    def take(self, opts: JailOptions) -> Slot | None:
        """A ready slot made with exactly `opts`, or None (the caller execs a worker instead)."""
        if opts != self.options:
            return None
        with self._cond:
            while self._ready:
                slot = self._ready.pop(0)
                self._cond.notify_all()
                if slot.alive:
                    return slot
                slot.discard()
        return None

    def ready_count(self) -> int:
        with self._cond:
            return len(self._ready)

    def wait_ready(self, count: int, timeout: float) -> bool:
        """Wait until `count` slots are ready (tests and benchmarks)."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._ready) >= count or self.disabled, timeout) \
                and len(self._ready) >= count

    def _fill(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or len(self._ready) < self.size)
                if self._closed or self.disabled:
                    return
            try:
                if self._use_server and (self._server is None or self._server.proc.poll() is not None):
                    self._server = ForkServer(self.options)
                slot = make_slot(self.options, server=self._server)
            except Exception as exc:
                with self._cond:
                    self.failures += 1
                    self.last_error = str(exc)
                    self._cond.notify_all()
                continue
            with self._cond:
                if self._closed:
                    slot.discard()
                    return
                self.failures = 0
                self._ready.append(slot)
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            slots, self._ready = self._ready, []
            self._cond.notify_all()
        for slot in slots:
            slot.discard()
        if self._server is not None:
            self._server.close()  # first: a slot being made now fails at once instead of at its timeout
        if self._thread is not None:
            self._thread.join(30)  # nothing of the pool (uid records above all) outlives close()
