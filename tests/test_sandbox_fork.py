"""The fork path of the jailed worker (sandbox/forkspawn.py, docs/SANDBOX.md "Fork path"): a forked worker
is the same jail as an exec'd one, carries nothing of the host's environment, and the fork is refused
whenever it would prove less than the exec'd worker's own code check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from bulkhead.sandbox import forkspawn

_SCRIPT = textwrap.dedent("""
    import json, os, sys, uuid
    os.environ["BULKHEAD_TEST_PROBES"] = "1"
    assert os.environ["BH_HOST_SECRET"] == "s3cret-host-token"  # in the block exec left on the stack
    from bulkhead.runtime.config import VmConfig
    from bulkhead.sandbox.forkspawn import ForkedWorker
    from bulkhead.sandbox.supervisor import JailOptions, spawn_worker
    kernel = sys.argv[1]
    h = spawn_worker(VmConfig(kernel=kernel, mem_mib=8), vm_id="fork-" + uuid.uuid4().hex[:8],
                     options=JailOptions(test_probes=True))  # returns only after the host's /proc checks
    try:
        procs = {}
        for pid in sorted(h.cgroup.pids()):
            try:
                procs[pid] = {"environ": open(f"/proc/{pid}/environ", "rb").read().decode(errors="replace"),
                              "cmdline": open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace"),
                              "root": sorted(os.listdir(f"/proc/{pid}/root/"))}
            except OSError:
                continue
        h.start()
        ident = h.probe("identity")  # from inside: pid 1, not root, no capability, no groups
        print(json.dumps({"forked": isinstance(h.proc, ForkedWorker), "procs": procs,
                          "identity": None if ident is None else [ident.outcome, ident.detail]}))
    finally:
        h.kill()
""")


@pytest.mark.root
@pytest.mark.kvm
def test_a_forked_worker_is_jailed_and_carries_no_host_environment(tmp_path: Path) -> None:
    """Attack: a secret in the environment of the root `bulkhead run` that forks into the jail. Neither
    the reaper nor the worker may show it (/proc/<pid>/environ reads the stack block exec left), both
    are rooted in the jail, and spawn_worker's own /proc verification (uid, caps, no_new_privs,
    seccomp, namespaces) has passed for the forked processes."""
    kernel = tmp_path / "kernel"
    kernel.write_bytes(b"KERNEL-" + os.urandom(64))
    env = {**os.environ, "BULKHEAD_DEV_SKIP_INTEGRITY": "1", "BH_HOST_SECRET": "s3cret-host-token"}
    out = subprocess.run([sys.executable, "-c", _SCRIPT, str(kernel)], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["forked"] is True, "a single-threaded, dev-skip supervisor takes the fork path"
    assert len(got["procs"]) >= 2
    for pid, p in got["procs"].items():
        assert "s3cret-host-token" not in p["environ"], f"pid {pid} carries the host's environment"
        assert "BH_HOST_SECRET" not in p["environ"]
        assert p["root"] == ["dev", "vm"], f"pid {pid} is not rooted in the jail: {p['root']}"
        assert "worker" in p["cmdline"] and "-c" not in p["cmdline"].split("\0"), p["cmdline"]
    assert got["identity"] is not None and got["identity"][0] == "denied", got["identity"]


def test_an_unverified_supervisor_never_forks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not started through the gate (no verified bulkhead_boot.RESULT) and no dev skip: the worker must
    be exec'd through the gate, which checks the code itself."""
    monkeypatch.delitem(sys.modules, "bulkhead_boot", raising=False)
    assert forkspawn.fork_allowed({}) is False
    fake = type(sys)("bulkhead_boot")
    fake.RESULT = {"verified": False}  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "bulkhead_boot", fake)
    assert forkspawn.fork_allowed({}) is False
    fake.RESULT = {"verified": True}  # type: ignore[attr-defined]
    if len(os.listdir("/proc/self/task")) == 1:
        assert forkspawn.fork_allowed({}) is True
    monkeypatch.setenv("BULKHEAD_NO_FORK_WORKER", "1")
    assert forkspawn.fork_allowed({"BULKHEAD_DEV_SKIP_INTEGRITY": "1"}) is False


def test_a_threaded_supervisor_never_forks() -> None:
    """fork() of a threaded process copies locks other threads hold: with a second thread alive the
    fork path is refused even for a verified process."""
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, daemon=True)
    t.start()
    try:
        assert forkspawn.fork_allowed({"BULKHEAD_DEV_SKIP_INTEGRITY": "1"}) is False
    finally:
        stop.set()
        t.join()
