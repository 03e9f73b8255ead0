"""The worker pool (sandbox/zygote.py, docs/SANDBOX.md "Worker pool") for real: root, KVM, namespaces,
cgroups, seccomp.

The claims, each attacked:
  * a pool worker ends up in the same sandbox as an exec'd worker: the whole escape suite runs with the
    attacker taken from the pool (the victim is an ordinary worker) and every attempt fails the same way;
  * each pool worker is its own: uid, PID, mount and network namespaces differ between two pool VMs, and
    a pool worker serves one VM and exits, leaving nothing behind;
  * an assignment cannot move a pool worker to another uid, root, cgroup or seccomp setting, nor to root;
  * a pool worker whose code fails the pre-import gate never serves: the pool stops, and the start falls
    back to an exec'd worker that reports the refusal.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.test_sandbox_escape import CASES, _cases, _victim_ok
from tests.test_sandbox_jail import IDS_DIR, Vms

from bulkhead.errors import HostError
from bulkhead.runtime.config import DriveConfig, VmConfig
from bulkhead.sandbox.jail import JailSpec
from bulkhead.sandbox.supervisor import PROBES_ENV, JailOptions, WorkerHandle, leftovers, spawn_worker
from bulkhead.sandbox.zygote import WorkerPool, make_slot

pytestmark = [pytest.mark.root, pytest.mark.kvm]

OPTS = JailOptions(test_probes=True, memory_overhead_mib=64)


class PoolVms(Vms):
    """Vms whose workers come from a pool (same teardown proof: nothing of any VM left behind)."""

    def __init__(self, tmp: Path, pool: WorkerPool) -> None:
        super().__init__(tmp)
        self.pool = pool

    def spawn_pooled(self, *, start: bool = True) -> WorkerHandle:
        assert self.pool.wait_ready(1, 60), self.pool.last_error
        h = spawn_worker(VmConfig(kernel=str(self.kernel), mem_mib=8), options=OPTS, pool=self.pool, fork=False)
        self.handles.append(h)
        assert h.vm_id.startswith("z"), "the VM did not come from the pool"
        if start:
            h.start()
            deadline = time.monotonic() + 10
            while (state := h.status().state) != "running":
                assert state == "starting" and time.monotonic() < deadline, state
                time.sleep(0.005)
        return h


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PoolVms, WorkerHandle, Path]]:
    os.environ[PROBES_ENV] = "1"
    tmp = tmp_path_factory.mktemp("zygote")
    secret = tmp / "victim.img"
    secret.write_bytes(b"VICTIM-SECRET" * 100)
    pool = WorkerPool(OPTS, size=1)
    pool.start()
    vms = PoolVms(tmp, pool)
    victim = vms.spawn("victim", drives=(DriveConfig(str(secret), False),))
    try:
        yield vms, victim, secret
        assert victim.running and victim.status().state == "running"
    finally:
        pool.close()
        vms.close()
        os.environ.pop(PROBES_ENV, None)


@pytest.mark.parametrize("case", CASES)
def test_escape_from_a_pool_worker_is_denied(lab: tuple[PoolVms, WorkerHandle, Path], case: str) -> None:
    vms, victim, secret = lab
    probe, arg, expected = _cases(victim, secret)[case]
    attacker = vms.spawn_pooled()
    assert attacker.uid != victim.uid
    result = attacker.probe(probe, arg, timeout=30)
    if expected == "denied":
        assert result is not None, attacker.wait(5)
        assert result.outcome == "denied", result
        attacker.stop()
    else:
        assert result is None, result
        exit_ = attacker.wait(30)
        assert exit_.reason.kind == expected, exit_
    _victim_ok(victim)
    assert secret.read_bytes() == b"VICTIM-SECRET" * 100


def _ns(pid: int, name: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{name}")


def test_two_pool_vms_share_no_uid_or_namespace_and_each_worker_serves_once(
        lab: tuple[PoolVms, WorkerHandle, Path]) -> None:
    vms = lab[0]
    a = vms.spawn_pooled()
    b = vms.spawn_pooled()
    inner_a, inner_b = (max(h.cgroup.pids() - {h.pid}) for h in (a, b))  # type: ignore[union-attr]
    assert a.uid != b.uid and a.vm_id != b.vm_id
    for ns in ("mnt", "net", "pid", "ipc", "uts"):
        assert _ns(inner_a, ns) != _ns(inner_b, ns), ns
    pid_a, id_a = a.pid, a.vm_id
    assert a.stop().reason.kind == "interrupted"
    with pytest.raises(ProcessLookupError):
        os.kill(pid_a, 0)  # the pool worker is gone with its VM
    assert leftovers(id_a) == []
    assert not os.path.exists(os.path.join(IDS_DIR, str(a.uid)))
    c = vms.spawn_pooled()
    assert c.pid != pid_a and c.vm_id != id_a
    b.stop()
    c.stop()


@pytest.mark.parametrize("field, value", [("uid", 0), ("uid", "other"), ("root", "/"), ("cgroup_procs", ()),
                                          ("seccomp", False), ("vm_id", "victim")])
def test_an_assignment_cannot_move_the_worker_out_of_its_slot(
        lab: tuple[PoolVms, WorkerHandle, Path], field: str, value: object) -> None:
    vms, victim = lab[0], lab[1]
    slot = make_slot(OPTS)
    try:
        if value == "other":
            value = victim.uid
        spec = JailSpec(slot.slot_id, slot.jail_dir, slot.uid, slot.uid, (), ("kvm", "urandom"),
                        tuple(slot.cgroup.procs_files), 1024, 33, True, False,
                        {"kernel": "/vm/kernel", "mem_mib": 8})._replace(**{field: value})
        if field == "uid":
            spec = spec._replace(gid=value)
        slot.assign(spec)
        assert slot.proc.wait(10) == 70  # setup failed: the worker refuses and ends
        err = slot.proc.stderr.read().decode()
        assert "assign" in err or "root" in err, err
    finally:
        slot.discard()
    assert leftovers(slot.slot_id) == []
    _victim_ok(victim)
    del vms


def test_a_pool_worker_whose_code_fails_the_gate_never_serves(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PROBES_ENV, "1")
    monkeypatch.delenv("BULKHEAD_DEV_SKIP_INTEGRITY", raising=False)
    monkeypatch.setenv("BULKHEAD_MANIFEST", str(tmp_path / "no-such-manifest.json"))
    pool = WorkerPool(OPTS, size=1)
    pool.start()
    try:
        deadline = time.monotonic() + 120
        while not pool.disabled:
            assert time.monotonic() < deadline, "the pool kept starting workers that fail the gate"
            assert pool.ready_count() == 0, "a pool worker that fails the gate became ready"
            time.sleep(0.05)
        kernel = tmp_path / "kernel"
        kernel.write_bytes(b"KERNEL")
        with pytest.raises(HostError):  # the exec'd fallback refuses too, and says so
            spawn_worker(VmConfig(kernel=str(kernel), mem_mib=8), options=OPTS, pool=pool, fork=False)
    finally:
        pool.close()


def _first_map(pid: int, needle: str) -> str:
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        if needle in line:
            return line.split()[0]
    raise AssertionError(f"no {needle} mapping in {pid}")


def test_the_default_pool_execs_each_worker_and_maps_each_vm_to_its_slot(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon's default pool (JailedBackend: exec'd pool workers, not forks of one fork server):
    two pool workers do not share their address-space layout (fresh ASLR per worker, so a guest that
    crashes workers one after another cannot brute-force one layout), and a pooled VM is found by its
    own id (`<base>/slots/<vm id>`, stale.slot_of), by the leftover check too, until nothing is left."""
    from bulkhead.sandbox.stale import slot_of

    monkeypatch.setenv(PROBES_ENV, "1")
    pool = WorkerPool(OPTS, size=2, fork_server=False)
    pool.start()
    vms = PoolVms(tmp_path, pool)
    try:
        assert pool.wait_ready(2, 120), pool.last_error
        names = [f"t-slotmap-{os.urandom(3).hex()}" for _ in range(2)]
        hs = []
        for name in names:
            h = spawn_worker(VmConfig(kernel=str(vms.kernel), mem_mib=8), vm_id=name, options=OPTS, pool=pool,
                             fork=False)
            vms.handles.append(h)
            hs.append(h)
            assert h.vm_id.startswith("z") and slot_of(name) == h.vm_id
            assert any(h.vm_id in p for p in leftovers(name))  # the slot's jail and cgroup, found by the VM id
        a, b = (max(h.cgroup.pids() - {h.pid}) for h in hs)  # type: ignore[union-attr]
        assert _first_map(a, "libc") != _first_map(b, "libc")  # each worker exec'd: its own layout
        assert _first_map(a, "[stack]") != _first_map(b, "[stack]")
        for name, h in zip(names, hs, strict=True):
            h.kill()
            h.wait(30)
            assert leftovers(name) == [] and slot_of(name) is None
    finally:
        pool.close()
        vms.close()
