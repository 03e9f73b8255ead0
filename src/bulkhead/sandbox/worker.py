"""The per-VM worker: `bulkhead worker --channel-fd N --spec JSON [--test-probes] [--no-jail] [--pool]`.

Started only by bulkhead.sandbox.supervisor (as root, with an empty environment). It builds its own
jail (bulkhead.sandbox.jail, steps 1-7), says Hello, and only then runs the VM when the host sends
Start. Every module the VM needs is imported *before* pivot_root: after it, the host's Python
installation is no longer reachable.

Process layout inside the jail:
  reaper (host PID namespace, VM uid, seccomp "reaper")  -- waits, then exits exactly as the worker did
   `- worker (pid 1 of a new PID namespace, VM uid, seccomp "worker") -- channel reader thread + VM

--pool: a pool worker (sandbox/zygote.py, docs/SANDBOX.md "Worker pool"). Its --spec names only the
slot (id, root, uid, gid, cgroups, seccomp): it joins the cgroups, enters its mount, IPC, UTS and network
namespaces and imports the VM path, says PoolReady, then takes one Assign (the VM's full spec, which must
name the same slot) and continues exactly as an exec'd worker: idmap, PID namespace, reaper, root, uid,
seccomp, hello. It serves that one VM and exits.

--test-probes (refused by the supervisor unless BULKHEAD_TEST_PROBES=1 in the host's environment)
replaces the VM with bulkhead.sandbox.probes.FakeMachine and lets the host run named escape probes.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from typing import Any

from bulkhead.errors import BulkheadError, ConfigError, HostError, StartRefused
from bulkhead.sandbox import bpf, jail
from bulkhead.sandbox.protocol import (
    HOST_TO_WORKER,
    MAX_CONSOLE_CHUNK,
    MAX_NAME,
    MAX_TEXT,
    PROTOCOL_VERSION,
    SHUTDOWN_EVENT,
    U63,
    Channel,
    Console,
    ConsoleIn,
    Event,
    Exit,
    Hello,
    Pause,
    Probe,
    ProbeResult,
    ProtocolError,
    Resume,
    SaveState,
    Shutdown,
    Start,
    StateSaved,
    Stats,
    Status,
    StatusReply,
    Stop,
)

__all__ = ["GUEST_START_EVENT", "SHUTDOWN_EVENT", "START_REFUSED_EVENT", "main", "sanitize_event"]

# Events of the worker itself (not the runtime's): the VM is built and its guest is about to run; or the
# VM was refused before its guest ran (field kind: image-invalid | config-invalid).
GUEST_START_EVENT = "worker.guest-start"
START_REFUSED_EVENT = "worker.start-refused"

# Exit codes of the worker process before a VM ran (the host maps them to worker-crash + detail).
EXIT_SETUP_FAILED = 70
EARLY_INPUT = 64 * 1024  # console input kept while the VM is still being built
EXIT_HOST_GONE = 130


def _parse(argv: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"channel_fd": -1, "spec": "", "tap_fds": [], "test_probes": False, "no_jail": False,
                           "vsock_fd": -1,
                           "memory_fd": -1, "state_fd": -1, "restore": False, "snapshot": False, "pool": False}
    it = iter(argv)
    for a in it:
        if a == "--channel-fd":
            out["channel_fd"] = int(next(it))
        elif a == "--spec":
            out["spec"] = next(it)
        elif a == "--tap-fd":
            out["tap_fds"].append(int(next(it)))
        elif a == "--vsock-fd":  # the VM's vsock listening socket, bound by the supervisor
            out["vsock_fd"] = int(next(it))
        elif a == "--test-probes":
            out["test_probes"] = True
        elif a == "--no-jail":
            out["no_jail"] = True
        elif a == "--pool":
            out["pool"] = True
        elif a in ("--memory-fd", "--state-fd"):  # snapshots: the host's memfds (runtime/snapshot.py)
            out[a[2:].replace("-", "_")] = int(next(it))
        elif a in ("--restore", "--snapshot"):
            out[a[2:]] = True
        else:
            raise ConfigError(f"bulkhead worker: unknown argument {a!r} (internal command)")
    if (out["restore"] or out["snapshot"]) and (out["memory_fd"] < 3 or out["state_fd"] < 3):
        raise ConfigError("bulkhead worker: --restore/--snapshot need --memory-fd and --state-fd")
    if out["channel_fd"] < 3 or not out["spec"]:
        raise ConfigError("bulkhead worker is internal: started by the supervisor with --channel-fd and --spec")
    return out


def _preimport(test_probes: bool) -> None:
    """Import everything the VM path may import lazily; after pivot_root nothing new can be imported."""
    import importlib
    import pkgutil

    for name in ("encodings.utf_8", "encodings.latin_1", "encodings.ascii", "json", "base64", "binascii",
                 "ctypes", "fcntl", "mmap", "select", "struct", "errno", "resource", "traceback",
                 "bulkhead.sandbox.policy", "bulkhead.integrity.launch"):  # pyseccomp: only on a bpf cache miss
        importlib.import_module(name)
    import bulkhead

    for pkg in ("bulkhead.runtime", "bulkhead.hypervisor", "bulkhead.devices", "bulkhead.boot",
                "bulkhead.memory"):
        try:
            mod = importlib.import_module(pkg)
        except ImportError:
            continue
        for info in pkgutil.walk_packages(mod.__path__, prefix=pkg + "."):
            if info.name.endswith((".cli", ".build")):
                continue
            try:
                importlib.import_module(info.name)
            except Exception:  # noqa: S112 - optional pieces (and their optional deps) may be missing
                continue
    for name in ("bulkhead.bus", "bulkhead.errors"):
        importlib.import_module(name)
    if test_probes:
        importlib.import_module("bulkhead.sandbox.probes")
    del bulkhead


def sanitize_event(name: str, detail: dict[str, Any]) -> Event:
    """Make any runtime event fit the protocol's Event schema (the runtime's events are free-form)."""
    allowed = set("abcdefghijklmnopqrstuvwxyz0123456789_.:-")
    clean = "".join(ch if ch in allowed else "-" for ch in name.lower())[:MAX_NAME] or "event"
    fields: dict[str, int | str | bool | None] = {}
    for k, v in list(detail.items())[:32]:
        key = "".join(ch if ch in allowed else "_" for ch in str(k).lower())[:MAX_NAME] or "key"
        if v is None or isinstance(v, bool) or (isinstance(v, int) and -U63 <= v <= U63):
            fields[key] = v
        else:
            fields[key] = str(v)[:MAX_TEXT]
    return Event(clean, fields)


class _Service:
    """The jailed worker's protocol loop: a reader thread for host messages, the VM in the main thread."""

    def __init__(self, channel: Channel, spec: jail.JailSpec, test_probes: bool, seccomp: bool,
                 snap: dict[str, Any] | None = None) -> None:
        self.ch = channel
        self.snap = snap or {"memory_fd": -1, "state_fd": -1, "restore": False, "snapshot": False}
        self.spec = spec
        self.test_probes = test_probes
        self.seccomp = seccomp
        self.send_lock = threading.Lock()
        self.started = threading.Event()
        self.state = "ready"
        self.t0 = time.monotonic()
        self.machine: Any = None
        self.stop_requested = False
        self.built = False
        self.state_lock = threading.Lock()  # state, built and pause/resume calls change together
        self.stats_lock = threading.Lock()  # no `stats` message after the final one (it precedes `exit`)
        self.stats_final = False
        self.early_input = bytearray()

    def send(self, msg: Any) -> None:
        with self.send_lock:
            try:
                self.ch.send(msg)
            except OSError:
                pass  # the host is gone; the reader notices EOF and ends the worker

    def console(self, data: bytes) -> None:
        for i in range(0, len(data), MAX_CONSOLE_CHUNK):
            self.send(Console(bytes(data[i : i + MAX_CONSOLE_CHUNK])))

    def event(self, name: str, detail: dict[str, Any]) -> None:
        self.send(sanitize_event(name, detail))

    def _exit_reason(self, kind: str, detail: str) -> Any:
        from bulkhead.runtime.exits import ExitReason

        return ExitReason.of(kind, detail)

    def reader(self) -> None:
        while True:
            try:
                msg = self.ch.recv()
            except (ProtocolError, OSError):
                msg = None
            if msg is None:  # host gone (or talking nonsense): stop now
                if self.machine is not None:
                    self.machine.request_stop(self._exit_reason("interrupted", "the host closed the channel"))
                    self.started.set()
                    return
                os._exit(EXIT_HOST_GONE)
            self.handle(msg)

    def handle(self, msg: Any) -> None:
        if isinstance(msg, Start):
            if self.state == "ready":
                self.state = "starting"  # "running" once the VM is built
                self.started.set()
        elif isinstance(msg, Pause):
            with self.state_lock:  # a pause while the VM is still being built applies when it is built
                if self.state in ("running", "starting"):
                    if self.built:
                        self.machine.pause()
                    self.state = "paused"
        elif isinstance(msg, Resume):
            with self.state_lock:
                if self.state == "paused":
                    if self.built:
                        self.machine.resume()
                    self.state = "running" if self.built else "starting"
        elif isinstance(msg, Stop):
            self.stop_requested = True
            if self.machine is None:
                self.send(Exit("interrupted", 130, "stopped before start"))
                os._exit(130)
            self.state = "stopping"
            self.machine.request_stop(self._exit_reason("interrupted", "stopped by the host"))
        elif isinstance(msg, Status):
            uptime = int((time.monotonic() - self.t0) * 1000)
            if msg.stats:
                with self.stats_lock:
                    if self.built and not self.stats_final:
                        self._send_stats()  # counters so far (GET /vms/{id}/stats, /metrics)
            self.send(StatusReply(msg.seq, self.state, uptime))
        elif isinstance(msg, Shutdown):
            method = ""
            with self.state_lock:
                if self.built and self.state == "running":
                    from bulkhead.runtime.shutdown import request_shutdown

                    method = request_shutdown(self.machine)
            self.event(SHUTDOWN_EVENT, {"method": method})
        elif isinstance(msg, ConsoleIn):
            with self.state_lock:
                serial = getattr(self.machine, "serial", None) if self.built else None
                if serial is None:  # typed before the VM is built: kept (bounded like the UART's queue)
                    self.early_input += msg.data[: EARLY_INPUT - len(self.early_input)]
                    return
            serial.enqueue_input(msg.data)
        elif isinstance(msg, SaveState):
            ok, detail = self._save_state()
            self.send(StateSaved(msg.seq, ok, detail[:MAX_TEXT]))
        elif isinstance(msg, Probe):
            if not self.test_probes:
                os._exit(EXIT_SETUP_FAILED)  # a probe request without --test-probes: refuse hard
            from bulkhead.sandbox import probes

            outcome, detail = probes.run(msg.name, msg.arg, self)
            self.send(ProbeResult(msg.name, outcome, detail[:MAX_TEXT]))

    def _save_state(self) -> tuple[bool, str]:
        """protocol SaveState: pause, quiesce and write the state document (runtime/snapshot.py
        save_paused_state); the VM stays paused for the host to seal and then resume or stop it."""
        with self.state_lock:
            if self.snap["state_fd"] < 3 or self.snap["memory_fd"] < 3:
                return False, "this VM was started without the host's memfds: it cannot be snapshotted"
            if not self.built or self.state not in ("running", "paused"):
                return False, f"the VM is {self.state}, not running or paused"
            from bulkhead.runtime.snapshot import save_paused_state

            self.machine.pause()
            self.state = "paused"
            try:
                save_paused_state(self.machine, self.snap["state_fd"])
            except (BulkheadError, OSError) as exc:
                return False, str(exc)
        return True, "state saved; the VM is paused"

    def _send_stats(self) -> None:
        """The VM's counters for `bulkhead run --stats` (one `stats` message, before `exit`)."""
        stats = getattr(self.machine, "stats", None)
        if stats is not None:
            from bulkhead.runtime.stats import flatten_counters

            for _ in range(3):  # while the VM runs, a device may add a counter as they are read: retry
                try:
                    counters = {k: v for k, v in stats().items() if k not in ("exit", "events")}  # the host has both
                    break
                except RuntimeError:
                    continue
            else:
                return
            self.send(Stats(dict(flatten_counters(counters))))

    def run(self) -> int:
        self.send(Hello(PROTOCOL_VERSION, os.getuid(), os.getgid(), os.getpid(), self.seccomp, self.test_probes))
        threading.Thread(target=self.reader, name="channel", daemon=True).start()
        self.started.wait()
        config = _config_from_dict(self.spec.config or {})
        if self.test_probes:
            from bulkhead.sandbox.probes import FakeMachine

            self.machine = FakeMachine(config, console=self.console, on_event=self.event)
        else:
            from bulkhead.runtime.vm import Machine

            self.machine = Machine(config, console=self.console, on_event=self.event, console_input=False,
                                   memory_fd=self.snap["memory_fd"])
        try:
            if self.snap["restore"]:
                from bulkhead.runtime.snapshot import load_restore_state, restore_machine

                restore_machine(self.machine, *load_restore_state(self.snap["state_fd"]))
            else:
                self.machine.build()
            if self.stop_requested:
                reason = self._exit_reason("interrupted", "stopped by the host")
            else:
                with self.state_lock:
                    self.built = True
                    if self.early_input and getattr(self.machine, "serial", None) is not None:
                        self.machine.serial.enqueue_input(bytes(self.early_input))
                        self.early_input.clear()
                    if self.state == "paused":
                        self.machine.pause()
                    elif self.state == "starting":
                        self.state = "running"
                self.event(GUEST_START_EVENT, {})  # the host's start succeeds only from here on
                reason = self.machine.run()
                if self.snap["snapshot"] and reason.kind == "interrupted":
                    from bulkhead.runtime.snapshot import save_state

                    save_state(self.machine, self.snap["state_fd"])  # the host checks it, then seals the file
                    reason = self._exit_reason("snapshotted", "state saved for the host")
                with self.stats_lock:
                    self._send_stats()
                    self.stats_final = True
        except ConfigError as exc:
            if not self.built:  # refused before the guest ran: say by type whether the image was the cause
                self.event(START_REFUSED_EVENT, {"kind": StartRefused.of(exc).kind})
            reason = self._exit_reason("config-error", str(exc))
        except HostError as exc:
            reason = self._exit_reason("host-error", str(exc))
        except BulkheadError as exc:
            reason = self._exit_reason("internal-error", f"{type(exc).__name__}: {exc}")
        finally:
            try:
                self.machine.close()
            except Exception:  # noqa: S110 - teardown is best effort; the process exits next
                pass
        self.state = "stopped"
        self.send(Exit(reason.kind, reason.status & 0xFFFF, reason.detail[:MAX_TEXT]))
        return int(reason.status) & 0xFF


def _config_from_dict(raw: dict[str, Any]) -> Any:
    from bulkhead.config import VsockConfig
    from bulkhead.runtime.config import DriveConfig, NetConfig, RateLimit, VmConfig

    drives = tuple(DriveConfig(d["path"], d["read_only"], d["drive_id"], RateLimit(**d["rate"]))
                   for d in raw.get("drives", ()))
    nets = tuple(NetConfig(n["tap"], n["mac"], RateLimit(**n["rate"]), n["tap_fd"]) for n in raw.get("nets", ()))
    v = raw.get("vsock")
    vsock = VsockConfig(v["path"], v["guest_cid"], v["listen_fd"], v["connect_prefix"]) if v else None
    rest = {k: v for k, v in raw.items() if k not in ("drives", "nets", "vsock")}
    return VmConfig(**rest, drives=drives, nets=nets, vsock=vsock)


def _reap(child: int) -> int:
    """The outer process: wait for the worker (pid 1 inside) and leave exactly the way it did."""
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def main(argv: list[str]) -> int:
    """Entry point of `bulkhead worker`. Exits the process; returns only on a usage error."""
    try:
        args = _parse(argv)
    except (ConfigError, ValueError, StopIteration) as exc:
        print(f"bulkhead worker: {exc}", file=sys.stderr)
        return 2
    snap = {k: args[k] for k in ("memory_fd", "state_fd", "restore", "snapshot")}
    snap_fds = [fd for fd in (args["memory_fd"], args["state_fd"], args["vsock_fd"]) if fd >= 3]
    jail.close_fds({args["channel_fd"], *args["tap_fds"], *snap_fds})  # step 1
    step = ["integrity"]  # where setup is, for the one-line failure report
    try:
        from bulkhead.integrity.manifest import require_integrity

        require_integrity("worker")  # before the jail: after pivot_root the package and manifest are unreachable
        step[0] = "spec"
        spec = jail.JailSpec.from_json(args["spec"])
        sock = socket.socket(fileno=args["channel_fd"])
        channel = Channel(sock, HOST_TO_WORKER)
        if args["no_jail"]:
            _preimport(args["test_probes"])
            service = _Service(channel, spec, args["test_probes"], seccomp=False, snap=snap)
            os._exit(service.run())
        step[0] = "cgroup"
        for path in spec.cgroup_procs:  # step 2
            with open(path, "w", encoding="ascii") as f:
                f.write(str(os.getpid()))
        with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as f:
            cap_last = int(f.read())
        step[0] = "policy"
        # compiled (or read from the root-only cache) now, as root: the reaper loads it after its uid drop
        reaper_prog = bpf.program_for("reaper", self_pid=os.getpid()) if spec.seccomp else b""
        step[0] = "idmap"
        oom_fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
        os.write(oom_fd, b"1000")  # inherited by the worker: under memory pressure it is the victim
        if args["pool"]:  # the spec-independent steps first, then wait for the VM (docs/SANDBOX.md "Worker pool")
            step[0] = "namespaces"
            jail.enter_namespaces(f"vm-{spec.vm_id}", pid=False)  # step 3, but for the PID namespace
            step[0] = "spec"
            _preimport(args["test_probes"])
            step[0] = "assign"
            spec, snap_fds = _await_assign(sock, spec, snap)  # the host's memfds may come with it
            step[0] = "idmap"
            userns = _idmap_namespaces(spec)  # still in the host's PID namespace: /proc names the helper
            step[0] = "namespaces"
            jail.enter_pid_namespace()
        else:
            userns = _idmap_namespaces(spec)
            step[0] = "namespaces"
            jail.enter_namespaces(f"vm-{spec.vm_id}")  # step 3
        gate_r, gate_w = os.pipe2(os.O_CLOEXEC)  # the reaper closes gate_w once it is sandboxed too
        # Step 5 comes before the VM path's imports: the reaper, which only waits, never holds them
        # (issue 16.5). The worker imports them, then builds the root; its pivot_root moves the reaper's
        # root and cwd too (one mount namespace), before the worker says hello.
        child = os.fork()  # step 5
        if child == 0:
            os.close(oom_fd)
            os.close(gate_w)
            _worker_child(args, spec, channel, userns, gate_r, cap_last, snap, step)
        step[0] = "reaper privileges"
        os.close(gate_r)
        for fd in userns.values():
            os.close(fd)
        _lower_oom_score(oom_fd)
        sock.close()
        for fd in (*args["tap_fds"], *snap_fds):
            os.close(fd)
        jail.drop_privileges(spec.uid, spec.gid, cap_last=cap_last, nofile=16, nproc=spec.nproc)
        if spec.seccomp:
            bpf.load_program(reaper_prog)
        os.close(gate_w)
        _reap(child)
    except (BulkheadError, OSError) as exc:
        try:
            print(f"bulkhead worker: setup failed at step {step[0]!r}: {exc}", file=sys.stderr, flush=True)
        finally:
            os._exit(EXIT_SETUP_FAILED)
    return EXIT_SETUP_FAILED


_SLOT_FIELDS = ("vm_id", "root", "uid", "gid", "cgroup_procs", "seccomp")


def _await_assign(sock: socket.socket, slot: jail.JailSpec, snap: dict[str, Any]) -> tuple[jail.JailSpec, list[int]]:
    """A pool worker's one wait: say PoolReady, take one Assign, return its spec. The spec is parsed and
    validated as an exec'd worker's --spec is (JailSpec.from_json) and must name this worker's own slot:
    a pool worker never changes its id, root, uid, cgroups or seccomp switch. Raises ConfigError (the
    one-line setup failure); a host that goes away instead ends the worker. The Assign alone may carry
    fds: none, or exactly the two memfds (guest memory, state) of runtime/snapshot.py."""
    from bulkhead.sandbox.protocol import MAX_MESSAGE, POOL_HOST_TO_WORKER, Assign, PoolReady, decode

    Channel(sock, POOL_HOST_TO_WORKER).send(PoolReady(os.getpid()))
    try:
        data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE + 1, 2)
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(fds) not in (0, 2):
            raise ProtocolError("the assignment is truncated or carries other than 0 or 2 fds")
        msg = decode(data, POOL_HOST_TO_WORKER) if data else None
    except (ProtocolError, OSError) as exc:
        raise ConfigError(f"pool worker: no valid assignment ({exc})") from None
    if not isinstance(msg, Assign):
        os._exit(EXIT_HOST_GONE)
    spec = jail.JailSpec.from_json(msg.spec)
    for name in _SLOT_FIELDS:
        if getattr(spec, name) != getattr(slot, name):
            raise ConfigError(f"pool worker: the assignment changes the slot's {name}")
    if (msg.restore or msg.snapshot) and not fds:
        raise ConfigError("pool worker: a restore or snapshot assignment needs the host's memfds")
    if fds:  # runtime/snapshot.py: the worker's snapshot settings, as --memory-fd/--state-fd would give
        snap.update(memory_fd=fds[0], state_fd=fds[1], restore=msg.restore, snapshot=msg.snapshot)
    return spec, fds


def _idmap_namespaces(spec: Any) -> dict[tuple[int, int], int]:
    """One id-mapped user namespace per (uid, gid) owning a bind source (jail.make_idmap_userns)."""
    userns: dict[tuple[int, int], int] = {}
    for b in spec.binds:
        st = os.stat(b.source)
        if (st.st_uid, st.st_gid) not in userns:
            userns[(st.st_uid, st.st_gid)] = jail.make_idmap_userns(st.st_uid, st.st_gid, spec.uid, spec.gid)
    return userns


def _worker_child(args: dict[str, Any], spec: Any, channel: Channel, userns: dict[tuple[int, int], int],
                  gate_r: int, cap_last: int, snap: dict[str, Any], step: list[str]) -> None:
    """Steps 4, 6 and 7 in the forked worker (pid 1 of the new PID namespace), then the VM; never returns.
    Errors propagate to main's one-line report, with `step` saying where."""
    step[0] = "spec"
    if not args["pool"]:  # a pool worker imported the VM path before its assignment
        _preimport(args["test_probes"])
    step[0] = "policy"
    worker_prog = (bpf.program_for("worker", nic=spec.nic, vsock=spec.vsock, self_pid=1)  # pid 1
                   if spec.seccomp else b"")
    step[0] = "root"
    jail.build_root(spec, userns)  # step 4
    for fd in userns.values():
        os.close(fd)
    step[0] = "worker privileges"
    jail.prctl(jail.PR_SET_PDEATHSIG, signal.SIGKILL)
    jail.drop_privileges(spec.uid, spec.gid, cap_last=cap_last, nofile=spec.nofile,  # step 6
                         nproc=spec.nproc)
    if spec.seccomp:
        bpf.load_program(worker_prog)  # step 7
    while os.read(gate_r, 1):  # say hello only when both processes are in the sandbox
        pass
    os.close(gate_r)
    service = _Service(channel, spec, args["test_probes"], seccomp=spec.seccomp, snap=snap)
    os._exit(service.run())


def _lower_oom_score(oom_fd: int) -> None:
    """The reaper goes back down (-1000 needs CAP_SYS_RESOURCE; 0 otherwise)."""
    for value in (b"-1000", b"0"):
        try:
            os.write(oom_fd, value)
            break
        except OSError:
            continue
    os.close(oom_fd)
