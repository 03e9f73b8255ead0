"""Cached seccomp programs (sandbox/bpf.py, docs/SANDBOX.md "Compiled filters").

The cached program must be the very program libseccomp compiles for the same rules, and it must still kill:
a process that loads it and then makes a forbidden system call dies of SIGSYS. A cache entry someone other
than root could have written is not believed.
"""

from __future__ import annotations

import json
import os
import signal
import struct
from pathlib import Path

import pytest

from bulkhead.sandbox import bpf, jail
from bulkhead.sandbox.policy import build_rules

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the seccomp cache is used as root only")

CASES = [("reaper", False), ("worker", False), ("worker", True)]
PIDS = [1, 2, 77, 4096, 65535, 123457, 4194303]


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    d = tmp_path / "seccomp"
    d.mkdir(mode=0o700)
    return d


@pytest.mark.parametrize(("role", "nic"), CASES)
def test_the_cached_program_is_the_program_libseccomp_compiles(cache_dir: Path, role: str, nic: bool) -> None:
    first = bpf.program_for(role, nic=nic, self_pid=PIDS[0], cache_dir=str(cache_dir))
    entries = list(cache_dir.iterdir())
    assert len(entries) == 1 and entries[0].stat().st_mode & 0o777 == 0o600
    assert first == jail.compile_program(build_rules(role, nic=nic, self_pid=PIDS[0]))
    for pid in PIDS:  # every later start: from the cache
        assert bpf.program_for(role, nic=nic, self_pid=pid, cache_dir=str(cache_dir)) == \
            jail.compile_program(build_rules(role, nic=nic, self_pid=pid)), pid
    if role == "reaper":  # its own pid is in its rules: the template has slots for it
        assert json.loads(entries[0].read_text())["slots"]


def _run_filtered(cache_dir: Path, forbidden: bool) -> int:
    """Fork; the child loads the cached reaper program for its own pid, then (if `forbidden`) calls
    socket(2), which the reaper's allow-list lacks. Returns the child's wait status."""
    bpf.program_for("reaper", self_pid=1, cache_dir=str(cache_dir))  # fill the cache first
    pid = os.fork()
    if pid == 0:
        try:
            prog = bpf.program_for("reaper", self_pid=os.getpid(), cache_dir=str(cache_dir))
            bpf.load_program(prog)
            if forbidden:
                import ctypes

                ctypes.CDLL(None).syscall(41, 1, 1, 0)  # socket(AF_UNIX, SOCK_STREAM, 0) on x86_64
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return status


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="syscall number of socket(2) is x86_64's")
def test_a_forbidden_syscall_still_kills_under_the_cached_program(cache_dir: Path) -> None:
    status = _run_filtered(cache_dir, forbidden=True)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS, status
    control = _run_filtered(cache_dir, forbidden=False)  # loading alone and exiting is allowed
    assert os.WIFEXITED(control) and os.WEXITSTATUS(control) == 0, control


ALLOW_ALL = struct.pack("=HBBI", 0x06, 0, 0, 0x7FFF0000)  # BPF_RET | BPF_K, SECCOMP_RET_ALLOW


@pytest.mark.parametrize("weakness", ["file-mode-0644", "directory-writable-by-others", "symlink"])
def test_a_forged_allow_everything_entry_others_could_write_is_ignored(cache_dir: Path, weakness: str) -> None:
    bpf.program_for("reaper", self_pid=5, cache_dir=str(cache_dir))
    (entry,) = cache_dir.iterdir()
    entry.write_text(json.dumps({"program": ALLOW_ALL.hex(), "slots": []}))
    if weakness == "file-mode-0644":
        entry.chmod(0o644)
    elif weakness == "directory-writable-by-others":
        cache_dir.chmod(0o777)
    else:
        real = cache_dir.parent / "elsewhere.json"
        entry.rename(real)
        entry.symlink_to(real)
    got = bpf.program_for("reaper", self_pid=5, cache_dir=str(cache_dir))
    assert got == jail.compile_program(build_rules("reaper", self_pid=5)) != ALLOW_ALL


def test_control_the_same_forgery_in_a_root_only_file_is_believed(cache_dir: Path) -> None:
    """Control of the test above: writing a root-only file under /run takes root (the boundary stated in
    docs/SANDBOX.md), so such an entry is believed."""
    bpf.program_for("reaper", self_pid=5, cache_dir=str(cache_dir))
    (entry,) = cache_dir.iterdir()
    entry.write_text(json.dumps({"program": ALLOW_ALL.hex(), "slots": []}))
    assert bpf.program_for("reaper", self_pid=5, cache_dir=str(cache_dir)) == ALLOW_ALL


def test_a_policy_change_is_a_different_entry(cache_dir: Path) -> None:
    bpf.program_for("worker", nic=False, cache_dir=str(cache_dir))
    bpf.program_for("worker", nic=True, cache_dir=str(cache_dir))
    assert len(list(cache_dir.iterdir())) == 2  # the key covers the rules themselves


def test_a_program_that_is_not_bpf_is_refused() -> None:
    from bulkhead.errors import HostError

    with pytest.raises(HostError, match="not a BPF program"):
        bpf.load_program(b"\x00" * 7)
