"""The worker's seccomp "vsock" group (sandbox/seccomp/worker.json): only a VM with a vsock device may create
sockets, and then only AF_UNIX ones. Attempted in a forked child under the real filter: a forbidden call
must die of SIGSYS."""

from __future__ import annotations

import ctypes
import os
import signal

import pytest

from bulkhead.sandbox import bpf, policy

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86_64 syscall numbers")]
SYS_SOCKET = 41
AF_UNIX, AF_INET, AF_NETLINK = 1, 2, 16


def _try_socket(family: int, *, vsock: bool) -> int:
    prog = bpf.program_for("worker", vsock=vsock, self_pid=1, cache_dir=None)
    pid = os.fork()
    if pid == 0:
        try:
            bpf.load_program(prog)
            fd = ctypes.CDLL(None).syscall(SYS_SOCKET, family, 1, 0)
            os._exit(0 if fd >= 0 else 3)
        finally:
            os._exit(4)
    _, status = os.waitpid(pid, 0)
    return status


def test_vsock_rules_are_only_in_the_vsock_group() -> None:
    plain = {r.syscall for r in policy.build_rules("worker")}
    assert not plain & {"socket", "connect", "accept4", "shutdown", "getsockname"}
    rules = [r for r in policy.build_rules("worker", vsock=True) if r.syscall == "socket"]
    assert len(rules) == 1 and [(a.index, a.op, a.value) for a in rules[0].args] == [(0, "eq", AF_UNIX)]


@pytest.mark.skipif(os.geteuid() != 0, reason="loads a seccomp filter in a forked child (as the jail does)")
def test_only_unix_sockets_and_only_with_vsock() -> None:
    ok = _try_socket(AF_UNIX, vsock=True)
    assert os.WIFEXITED(ok) and os.WEXITSTATUS(ok) == 0, ok
    for family in (AF_INET, AF_NETLINK):  # the attack: a network or netlink socket from the worker
        st = _try_socket(family, vsock=True)
        assert os.WIFSIGNALED(st) and os.WTERMSIG(st) == signal.SIGSYS, (family, st)
    st = _try_socket(AF_UNIX, vsock=False)
    assert os.WIFSIGNALED(st) and os.WTERMSIG(st) == signal.SIGSYS, st
