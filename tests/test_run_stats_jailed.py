"""`bulkhead run --stats FILE` keeps the jail (issue 14): a flag that only asks for counters never weakens
the sandbox. The counters travel from the jailed worker to the host in one `stats` protocol message.

Root only: the run must spawn a jailed worker (own namespaces, unprivileged uid), and FILE must hold the
counters the unjailed run writes (vCPU exits, unclaimed accesses, resident guest bytes, devices). The echo
guest is used because it polls its UART for a while before it exits: time to look at the worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.vmrun import payload

pytestmark = [pytest.mark.root, pytest.mark.kvm]


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process (one pass over /proc)."""
    out = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            out[int(p)] = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return out


def _uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


def test_stats_keep_the_jail_and_carry_the_counters(tmp_path: Path) -> None:
    stats = tmp_path / "stats.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bulkhead", "run", "--kernel", str(payload("echo")), "--stats", str(stats)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    host_ns = {n: os.readlink(f"/proc/self/ns/{n}") for n in ("mnt", "pid", "net", "ipc", "uts")}
    jailed: dict[str, object] | None = None
    deadline = time.monotonic() + 30
    try:
        while jailed is None and proc.poll() is None and time.monotonic() < deadline:
            # the run's child is the worker's reaper; its child (pid 1 of the new PID namespace) runs the VM
            parents = _parents()
            reapers = {p for p, pp in parents.items() if pp == proc.pid}
            for worker in (p for p, pp in parents.items() if pp in reapers):
                try:
                    ns = {n: os.readlink(f"/proc/{worker}/ns/{n}") for n in host_ns}
                    uid = _uid(worker)
                except OSError:
                    continue
                if uid != 0:  # privileges dropped: the sandbox is in place
                    jailed = {"ns": ns, "uid": uid}
            time.sleep(0.005)
        assert jailed is not None, "no jailed worker appeared under `bulkhead run --stats`"
        out, err = proc.communicate(timeout=60)  # the echo guest gives up waiting for input and exits
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert all(jailed["ns"][n] != host_ns[n] for n in host_ns), jailed  # type: ignore[index]
    assert b"READY" in out, out + err
    assert b"warning" not in err, err  # no "running unjailed" warning
    got = json.loads(stats.read_text())
    assert got["exit"]["kind"] == "debug-exit" and got["exit"]["status"] == proc.returncode
    assert isinstance(got["vcpu_exits"], list) and sum(got["vcpu_exits"]) > 0
    assert got["guest_resident_bytes"] > 0
    assert set(got["pio_unclaimed"]) == {"reads", "writes"} and "devices" in got
    assert any(e["event"] == "vm-started" for e in got["events"])
