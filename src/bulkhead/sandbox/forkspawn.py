"""The fork path of the jailed worker: the already-imported, already-verified host process forks into the
jail instead of exec'ing a second interpreter (docs/SANDBOX.md "Fork path", docs/INTEGRITY.md "The fork
path needs no second check").

    if fork_allowed(): proc = fork_worker(args, cgroup_procs, env, keep_fds, test_probes=...)

Allowed only when
  * this process is single-threaded (/proc/self/task has one entry): fork() of a threaded process copies
    locks held by threads that do not exist in the child; and
  * its code is vouched for exactly as much as an exec'd worker's would be: it started through the
    pre-import gate and the gate verified it (bulkhead_boot.RESULT verified), or the environment carries
    the explicit development skip (the exec'd worker would skip its check too).
Otherwise the supervisor execs the worker through the gate, as before (the daemon is multi-threaded and
holds keys: it always execs).

The child then runs bulkhead.sandbox.worker.main, the very code the exec'd worker runs: jail steps 1-7
(fds, cgroup, namespaces, pivot_root, uid, no caps, no_new_privs, rlimits, seccomp) are not duplicated.
Before that it rebuilds what exec would have given it: it joins the VM's cgroups first, stdin/stdout on
/dev/null and stderr on the supervisor's pipe, every signal handler at SIG_DFL and no signal blocked,
cwd /, and only the worker's environment (the initial environment block the kernel keeps at the top of
the stack, which /proc/<pid>/environ shows, is zeroed too).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Any

__all__ = ["ForkedWorker", "WaitTimeout", "fork_allowed", "fork_worker", "serve"]

# The shell of the exec path exits 70 when it cannot join the cgroup; the fork path uses the same code.
_EXIT_SETUP_FAILED = 70
# The handlers a freshly exec'd CPython installs; every other signal is SIG_DFL.
_FRESH: dict[int, Any] = {signal.SIGINT: signal.default_int_handler, signal.SIGPIPE: signal.SIG_IGN,
                          signal.SIGXFSZ: signal.SIG_IGN}


def _single_threaded() -> bool:
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def _verified_by_gate() -> bool:
    boot = sys.modules.get("bulkhead_boot")
    result = getattr(boot, "RESULT", None)
    return isinstance(result, dict) and result.get("verified") is True


def fork_allowed(env: dict[str, str]) -> bool:
    """True when forking this process into the jail proves as much as exec'ing a gated worker would."""
    if os.environ.get("BULKHEAD_NO_FORK_WORKER") == "1":  # operator's switch back to the exec path
        return False
    vouched = _verified_by_gate() or env.get("BULKHEAD_DEV_SKIP_INTEGRITY") == "1"
    return vouched and _single_threaded()


class WaitTimeout(Exception):
    """ForkedWorker.wait(timeout) ran out (subprocess.TimeoutExpired's role; subprocess stays off the
    fork path's imports)."""


class ForkedWorker:
    """The subset of subprocess.Popen the supervisor uses, for a forked (not exec'd) worker."""

    def __init__(self, pid: int, stderr: Any) -> None:
        self.pid, self.stderr = pid, stderr
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if timeout is None:
            while self.returncode is None:
                try:
                    _, status = os.waitpid(self.pid, 0)
                except InterruptedError:
                    continue
                self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode
        import time

        deadline = time.monotonic() + timeout
        delay = 0.0005
        while self.poll() is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeout(f"the worker is still running after {timeout} s")
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.05)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _scrub_initial_environment() -> None:
    """Zero the argument and environment blocks exec left at the top of the stack (arg_start..arg_end,
    env_start..env_end: fields 48-51 of /proc/self/stat, proc(5)), then write "bulkhead worker" into the
    argument block: the forked worker carries neither the host user's environment nor the host command
    line, and /proc/<pid>/cmdline (ps) names it as the exec'd worker is named."""
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()  # [0] is field 3
    arg_start, arg_end, env_start, env_end = (int(x) for x in fields[45:49])
    for start, end in ((env_start, env_end), (arg_start, arg_end)):
        if 0 < start < end:
            ctypes.memset(start, 0, end - start)
    title = b"bulkhead\0worker\0"
    if arg_start > 0 and arg_end - arg_start >= len(title):
        ctypes.memmove(arg_start, title, len(title))


def _child(args: list[str], cgroup_procs: tuple[str, ...], env: dict[str, str], stderr_w: int) -> None:
    """In the forked child: become what the exec'd worker would be, then run the worker's own main."""
    status = _EXIT_SETUP_FAILED
    try:
        for path in cgroup_procs:  # first, as the exec path's shell does (pages from now on are the VM's)
            with open(path, "w", encoding="ascii") as f:
                f.write(str(os.getpid()))
        devnull = os.open("/dev/null", os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.dup2(stderr_w, 2)
        # fresh standard streams on fds 0-2 (the host's may be wrappers over other fds, e.g. a capture file)
        sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace",  # noqa: SIM115
                          buffering=1, closefd=False)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        for sig in signal.valid_signals():  # what a fresh interpreter starts with (Python/pylifecycle.c)
            if sig in (signal.SIGKILL, signal.SIGSTOP):
                continue
            handler: Any = _FRESH.get(sig, signal.SIG_DFL)
            try:
                signal.signal(sig, handler)
            except (OSError, ValueError):
                continue
        os.chdir("/")
        os.environ.clear()
        os.environ.update(env)
        _scrub_initial_environment()
        sys.argv = ["bulkhead", *args]
        from bulkhead.sandbox import worker

        status = worker.main(args[1:])  # exits the process itself; returns only on a usage error
    except BaseException as exc:  # nothing may unwind into the host's code in the child
        try:
            os.write(2, f"bulkhead worker: setup failed at step 'fork': {exc}\n".encode(errors="replace"))
        except OSError:
            pass
    finally:
        os._exit(status)


def fork_worker(args: list[str], cgroup_procs: tuple[str, ...], env: dict[str, str], *,
                test_probes: bool) -> ForkedWorker:
    """Fork the worker (`args` = ["worker", "--channel-fd", ...]); the fds named in args must be open and
    inheritable-or-not (fork keeps them all; the worker's step 1 closes all but those)."""
    from bulkhead.sandbox import worker

    worker._preimport(test_probes)  # before the fork: both the host and every later worker share the pages
    stderr_r, stderr_w = os.pipe2(os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(stderr_r)
        _child(args, cgroup_procs, env, stderr_w)
    os.close(stderr_w)
    return ForkedWorker(pid, os.fdopen(stderr_r, "rb"))


def serve(argv: list[str]) -> int:
    """`bulkhead zygote --control-fd N [--test-probes]`: the daemon's fork server (docs/SANDBOX.md
    "Worker pool"). Exec'd through the pre-import gate once, so its code is verified once; it imports the
    VM path once, then forks one pool worker per request and never runs a VM itself. Single-threaded,
    holds no key and no other VM's data (what makes the fork path sound, docs/INTEGRITY.md "The fork path
    needs no second check"). A request is one datagram (a slot's JailSpec JSON) with exactly two fds
    (the worker's channel end, its stderr); the answer is the pool worker's pid. The pool worker is forked
    twice so that it is the daemon's child (the daemon is a child subreaper) and runs worker.main --pool."""
    import json
    import socket

    from bulkhead.errors import ConfigError
    from bulkhead.integrity.manifest import require_integrity
    from bulkhead.sandbox import worker
    from bulkhead.sandbox.jail import JailSpec

    test_probes = "--test-probes" in argv
    try:
        control_fd = int(argv[argv.index("--control-fd") + 1])
    except (ValueError, IndexError):
        print("bulkhead zygote: needs --control-fd", file=sys.stderr)
        return 2
    require_integrity("worker")
    worker._preimport(test_probes)
    sock = socket.socket(fileno=control_fd)
    env = dict(os.environ)
    while True:
        try:
            data, fds, _flags, _ = socket.recv_fds(sock, 64 * 1024, 2)
        except OSError:
            os._exit(0)
        if not data:
            os._exit(0)  # the daemon is gone
        try:
            if len(fds) != 2:
                raise ConfigError("a request carries exactly two fds")
            pre = JailSpec.from_json(data.decode())
            pid = _fork_pool_worker(pre, fds, env, test_probes)
            reply: dict[str, Any] = {"pid": pid}
        except (ConfigError, OSError, UnicodeDecodeError) as exc:
            reply = {"error": str(exc)[:500]}
        for fd in fds:
            os.close(fd)
        sock.send(json.dumps(reply).encode())


def _fork_pool_worker(pre: Any, fds: list[int], env: dict[str, str], test_probes: bool) -> int:
    """Fork (twice) the pool worker for slot `pre`; returns its pid once its intermediate parent is gone."""
    channel_fd, stderr_fd = fds
    args = ["worker", "--pool", "--channel-fd", str(channel_fd), "--spec", pre.to_json()]
    if test_probes:
        args.append("--test-probes")
    r, w = os.pipe2(os.O_CLOEXEC)
    middle = os.fork()
    if middle == 0:
        try:
            os.close(r)
            pid = os.fork()
            if pid == 0:
                os.close(w)
                _child(args, tuple(pre.cgroup_procs), env, stderr_fd)
            os.write(w, str(pid).encode())
        finally:
            os._exit(0)
    os.close(w)
    out = os.read(r, 32)
    os.close(r)
    os.waitpid(middle, 0)
    if not out:
        raise OSError("the pool worker could not be forked")
    return int(out)
