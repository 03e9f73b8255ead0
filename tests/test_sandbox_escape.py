"""Escape suite: a compromised device model in one jailed worker attacks the host and a second VM.

Two VMs run at once. The victim holds a disk with a secret; for each probe a fresh attacker worker
(a real jailed worker, started with the test-only probe hook) tries one escape, and the test checks
the denial *and* that the victim is still running and answering status afterwards. Probes whose
system call is outside the seccomp allow-list end the attacker with a seccomp-kill security event.
A last test switches seccomp off for the attacker to show the layers underneath also hold.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.test_sandbox_jail import Vms, _inner_pid

from bulkhead.runtime.config import DriveConfig
from bulkhead.sandbox.supervisor import PROBES_ENV, WorkerHandle

pytestmark = [pytest.mark.root, pytest.mark.kvm]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Vms, WorkerHandle, Path]]:
    os.environ[PROBES_ENV] = "1"
    tmp = tmp_path_factory.mktemp("escape")
    secret = tmp / "victim.img"
    secret.write_bytes(b"VICTIM-SECRET" * 100)
    vms = Vms(tmp)
    victim = vms.spawn("victim", drives=(DriveConfig(str(secret), False),))
    try:
        yield vms, victim, secret
        assert victim.running and victim.status().state == "running"
        assert victim.stop().reason.kind == "interrupted"
    finally:
        vms.close()
        del os.environ[PROBES_ENV]


def _victim_ok(victim: WorkerHandle) -> None:
    assert victim.running, victim.exit
    assert victim.status(timeout=5).state == "running"


# (probe, arg, expected): expected is "denied" (the probe answered and was refused) or an exit kind.
def _cases(victim: WorkerHandle, secret: Path) -> dict[str, tuple[str, str, str]]:
    inner = str(_inner_pid(victim))
    return {
        "identity": ("identity", "", "denied"),  # non-root, no caps, pid 1 of its own namespace
        "victim-disk": ("open-path", str(secret), "denied"),
        "victim-disk-traversal": ("open-path", "/../../.." + str(secret), "denied"),
        "host-paths": ("open-host-paths", str(secret.parent), "denied"),
        "host-proc": ("read-host-proc", inner, "denied"),
        "dev-mem": ("dev-mem", "", "denied"),
        "own-ro-drive": ("write-readonly-drive", "/vm/kernel", "denied"),
        "kill-victim": ("kill", str(victim.pid), "seccomp-kill"),
        "tgkill-victim": ("tgkill", inner, "seccomp-kill"),
        "ptrace-victim": ("ptrace", inner, "seccomp-kill"),
        "execve": ("execve", "", "seccomp-kill"),
        "socket-inet": ("socket-inet", "", "seccomp-kill"),
        "socket-inet6": ("socket-inet6", "", "seccomp-kill"),
        "socket-netlink": ("socket-netlink", "", "seccomp-kill"),
        "mount": ("mount", "", "seccomp-kill"),
        "userns": ("userns", "", "seccomp-kill"),
        "init-module": ("init-module", "", "seccomp-kill"),
        "finit-module": ("finit-module", "", "seccomp-kill"),
        "fork": ("fork", "", "seccomp-kill"),
        "thread-bomb": ("thread-bomb", "", "denied"),
        "oom": ("oom", "", "oom-kill"),
        "oversized-message": ("send-raw", "", "protocol-violation"),
    }


CASES = ["identity", "victim-disk", "victim-disk-traversal", "host-paths", "host-proc", "dev-mem", "own-ro-drive",
         "kill-victim", "tgkill-victim", "ptrace-victim", "execve", "socket-inet", "socket-inet6",
         "socket-netlink", "mount", "userns", "init-module", "finit-module", "fork", "thread-bomb", "oom",
         "oversized-message"]


@pytest.mark.parametrize("case", CASES)
def test_escape_attempt_is_denied_and_the_other_vm_is_unaffected(
    lab: tuple[Vms, WorkerHandle, Path], case: str
) -> None:
    vms, victim, secret = lab
    probe, arg, expected = _cases(victim, secret)[case]
    attacker = vms.spawn(f"atk-{probe}")
    assert attacker.uid != victim.uid
    result = attacker.probe(probe, arg, timeout=30)
    if expected == "denied":
        assert result is not None, attacker.wait(5)
        assert result.outcome == "denied", result
        assert attacker.running  # a refused attempt does not cost the attacker its life
        if probe == "thread-bomb":
            assert "can't start new thread" in result.detail
            started = int(result.detail.split()[1])
            assert started < 33  # pids.max of the attacker's cgroup
        attacker.stop()
    else:
        assert result is None, result  # the attacker never got to answer
        exit_ = attacker.wait(30)
        assert exit_.reason.kind == expected, exit_
        if expected in ("seccomp-kill", "protocol-violation"):
            assert exit_.security_event and attacker.security_events[-1][0] == expected
    _victim_ok(victim)
    assert secret.read_bytes() == b"VICTIM-SECRET" * 100


def test_layers_below_seccomp_hold_on_their_own(lab: tuple[Vms, WorkerHandle, Path]) -> None:
    """With seccomp off (test only), namespaces, the jail and the dropped capabilities still refuse."""
    vms, victim, secret = lab
    attacker = vms.spawn("noseccomp", seccomp=False)
    inner = str(_inner_pid(victim))
    expectations = {
        ("kill", str(victim.pid)): ("ESRCH",),  # not in the attacker's PID namespace
        ("ptrace", inner): ("ESRCH",),
        ("mount", ""): ("EPERM",),  # no CAP_SYS_ADMIN
        ("init-module", ""): ("EPERM", "ENOSYS"),  # no CAP_SYS_MODULE (ENOSYS: kernel without modules)
        ("finit-module", ""): ("EPERM", "ENOSYS"),
        ("execve", ""): ("ENOENT",),  # nothing to execute in the jail
        ("execve", "/vm/kernel"): ("EACCES",),  # noexec mounts
        ("open-path", str(secret)): ("ENOENT",),
    }
    for (probe, arg), errnos in expectations.items():
        r = attacker.probe(probe, arg)
        assert r is not None and r.outcome == "denied", (probe, r)
        assert r.detail.split()[-1].split(":")[-1] in errnos, (probe, r)
    bomb = attacker.probe("fork-bomb")  # without seccomp fork works, but only up to the VM's pids limit
    assert bomb is not None and bomb.outcome == "denied" and bomb.detail.endswith("EAGAIN"), bomb
    assert 0 < int(bomb.detail.split()[1]) < 33
    assert attacker.status().state == "running"
    attacker.stop()
    _victim_ok(victim)
