"""The jailed worker for real: namespaces, pivot_root, ids, capabilities, seccomp, cgroups, lifecycle.

Root only (real namespaces, cgroups and seccomp). Every test checks afterwards that nothing of its
VMs is left on the host: no jail directory, no cgroup directory, no mount, no uid record.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bulkhead.errors import HostError
from bulkhead.runtime.config import DriveConfig, NetConfig, VmConfig
from bulkhead.sandbox.supervisor import PROBES_ENV, JailOptions, WorkerHandle, leftovers, spawn_worker

pytestmark = [pytest.mark.root, pytest.mark.kvm]

IDS_DIR = "/run/bulkhead/ids"


class Vms:
    """Spawns test workers and proves, at teardown, that each left nothing behind."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.handles: list[WorkerHandle] = []
        self.kernel = tmp / "kernel"
        self.kernel.write_bytes(b"KERNEL-" + os.urandom(64))

    def spawn(self, name: str = "vm", *, drives: tuple[DriveConfig, ...] = (), nets: tuple[NetConfig, ...] = (),
              mem_mib: int = 8, probes: bool = True, start: bool = True, **opts: object) -> WorkerHandle:
        vm_id = f"t-{name}-{uuid.uuid4().hex[:8]}"
        cfg = VmConfig(kernel=str(self.kernel), mem_mib=mem_mib, drives=drives, nets=nets)
        options = JailOptions(test_probes=probes, memory_overhead_mib=64, **opts)  # type: ignore[arg-type]
        h = spawn_worker(cfg, vm_id=vm_id, options=options)
        self.handles.append(h)
        if start:
            h.start()
            deadline = time.monotonic() + 10
            while (state := h.status().state) != "running":
                assert state == "starting" and time.monotonic() < deadline, state
                time.sleep(0.005)
        return h

    def close(self) -> None:
        for h in self.handles:
            if h.running:
                h.kill()
        for h in self.handles:
            h.wait(10)
            assert leftovers(h.vm_id) == [], f"{h.vm_id} left {leftovers(h.vm_id)}"
            assert not os.path.exists(os.path.join(IDS_DIR, str(h.uid))), "uid record not released"


@pytest.fixture
def vms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Vms]:
    monkeypatch.setenv(PROBES_ENV, "1")
    v = Vms(tmp_path)
    try:
        yield v
    finally:
        v.close()


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, val = line.partition(":")
        out[k] = val.strip()
    return out


def _inner_pid(h: WorkerHandle) -> int:
    assert h.cgroup is not None
    procs = {int(x) for d in h.cgroup.dirs.values() for x in Path(d, "cgroup.procs").read_text().split()}
    (inner,) = procs - {h.pid}
    return inner


def test_the_host_sees_the_sandbox_in_proc(vms: Vms) -> None:
    h = vms.spawn(start=False)
    inner = _inner_pid(h)
    host_ns = {n: os.readlink(f"/proc/self/ns/{n}") for n in ("mnt", "pid", "net", "ipc", "uts")}
    for pid in (h.pid, inner):
        st = _status(pid)
        assert st["Uid"].split() == [str(h.uid)] * 4 and st["Gid"].split() == [str(h.uid)] * 4
        assert st["Groups"] == ""
        for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(st[cap], 16) == 0, cap
        assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"
        for n in ("mnt", "net", "ipc", "uts"):
            assert os.readlink(f"/proc/{pid}/ns/{n}") != host_ns[n]
    assert _status(inner)["NSpid"].split() == [str(inner), "1"]  # pid 1 of its own PID namespace
    assert os.readlink(f"/proc/{inner}/root") == "/" and os.stat(f"/proc/{inner}/root/vm/kernel").st_size > 0
    assert sorted(os.listdir(f"/proc/{inner}/root")) == ["dev", "vm"]
    assert sorted(os.listdir(f"/proc/{inner}/root/dev")) == ["kvm", "urandom"]
    limits = Path(f"/proc/{inner}/limits").read_text()
    assert "Max core file size        0" in limits and "Max open files            1024" in limits
    assert h.cgroup is not None and h.cgroup.version == 1
    assert Path(h.cgroup.dirs["memory"], "memory.limit_in_bytes").read_text().strip() == str((8 + 64) << 20)
    assert Path(h.cgroup.dirs["pids"], "pids.max").read_text().strip() == "33"
    assert Path(h.cgroup.dirs["cpu"], "cpu.cfs_quota_us").read_text().strip() == "100000"
    assert Path(IDS_DIR, str(h.uid)).read_text().split()[0] == h.vm_id


def test_inherited_descriptors_do_not_reach_the_worker(vms: Vms) -> None:
    leak = os.open("/etc/hostname", os.O_RDONLY)
    os.set_inheritable(leak, True)
    try:
        h = vms.spawn(start=False)
        inner = _inner_pid(h)
        for pid in (h.pid, inner):
            targets = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            assert "/etc/hostname" not in targets
            assert all(t == "/dev/null" or t.startswith(("pipe:", "socket:", "anon_inode:")) for t in targets), targets
        assert len(os.listdir(f"/proc/{inner}/fd")) == 4  # stdin, stdout, stderr, the channel
    finally:
        os.close(leak)


def test_each_vm_gets_its_own_uid(vms: Vms) -> None:
    a, b = vms.spawn("a", start=False), vms.spawn("b", start=False)
    assert a.uid != b.uid and a.uid >= 100_000 and b.uid >= 100_000


def test_lifecycle_and_the_interrupted_reason(vms: Vms) -> None:
    h = vms.spawn()
    h.pause()
    assert h.status().state == "paused"
    h.resume()
    assert h.status().state == "running"
    result = h.stop()
    assert result.reason.kind == "interrupted" and result.returncode == 130 and not result.security_event
    names = [n for n, _ in h.events if not n.startswith("worker.")]  # the worker's own start events aside
    assert names[:3] == ["fake-vm-built", "paused", "resumed"]
    assert h.events[0][1]["kvm_api"] == 12  # /dev/kvm opened and a KVM VM created inside the jail


def test_guest_shutdown_is_reported_as_such(vms: Vms) -> None:
    h = vms.spawn()
    assert h.probe("shutdown") is not None
    result = h.wait(10)
    assert result.reason.kind == "poweroff" and result.reason.status == 0 and result.returncode == 0


def test_a_crash_is_a_worker_crash(vms: Vms) -> None:
    h = vms.spawn()
    assert h.probe("crash") is None
    result = h.wait(10)
    assert result.reason.kind == "worker-crash" and "SIGSEGV" in result.reason.detail


def test_a_seccomp_kill_is_a_security_event(vms: Vms) -> None:
    h = vms.spawn()
    assert h.probe("execve") is None
    result = h.wait(10)
    assert result.reason.kind == "seccomp-kill" and result.security_event and result.returncode == -31
    assert h.security_events[-1][0] == "seccomp-kill"


def test_oom_kill_is_reported(vms: Vms) -> None:
    h = vms.spawn()
    assert h.probe("oom") is None
    result = h.wait(30)
    assert result.reason.kind == "oom-kill", result


def test_drives_are_idmapped_and_read_only_where_asked(vms: Vms, tmp_path: Path) -> None:
    ro, rw = tmp_path / "ro.img", tmp_path / "rw.img"
    ro.write_bytes(b"READONLY" * 64)
    rw.write_bytes(b"WRITABLE" * 64)
    os.chmod(ro, 0o600)
    os.chmod(rw, 0o600)  # root-only on the host: only the idmapped mount lets the VM's uid in
    h = vms.spawn(drives=(DriveConfig(str(ro), True), DriveConfig(str(rw), False)))
    built = h.events[0][1]
    assert built["drives"] == f"{(b'READONLY' * 2).hex()},{(b'WRITABLE' * 2).hex()}"
    denied = h.probe("write-readonly-drive", "/vm/drive0")
    assert denied is not None and denied.outcome == "denied" and "EROFS" in denied.detail
    allowed = h.probe("write-readonly-drive", "/vm/drive1")
    assert allowed is not None and allowed.outcome == "allowed"
    h.stop()
    assert os.stat(ro).st_uid == 0 and os.stat(rw).st_uid == 0  # the host files were never chowned
    assert os.stat(ro).st_mode & 0o777 == 0o600


def test_probes_are_refused_without_the_env_var(vms: Vms, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PROBES_ENV)
    vm_id = f"t-refused-{uuid.uuid4().hex[:8]}"
    with pytest.raises(HostError, match=PROBES_ENV):
        spawn_worker(VmConfig(kernel=str(vms.kernel)), vm_id=vm_id, options=JailOptions(test_probes=True))
    assert leftovers(vm_id) == []
    records = [Path(IDS_DIR, n).read_text() for n in os.listdir(IDS_DIR)] if os.path.isdir(IDS_DIR) else []
    assert not any(r.startswith(vm_id + " ") for r in records)


def test_a_nic_brings_its_tap_and_tun_node_and_both_go_away(vms: Vms) -> None:
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("no /dev/net/tun")
    tap = f"bhj{uuid.uuid4().hex[:8]}"
    h = vms.spawn(nets=(NetConfig(tap),))
    assert os.path.exists(f"/sys/class/net/{tap}")
    r = h.probe("dev-net-tun")
    assert r is not None and r.outcome == "allowed"
    assert h.stop().reason.kind == "interrupted"
    assert not os.path.exists(f"/sys/class/net/{tap}")
    plain = vms.spawn("plain")
    r = plain.probe("dev-net-tun")
    assert r is not None and r.outcome == "denied"


def test_a_real_vm_runs_in_the_jail(tmp_path: Path) -> None:
    from bulkhead.sandbox.supervisor import run_jailed

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.vmrun import payload

    img = payload("exit_code")
    out: list[bytes] = []
    vm_id = f"t-real-{uuid.uuid4().hex[:8]}"
    reason = run_jailed(VmConfig(kernel=str(img), cmdline="code=0x21", mem_mib=16), console=out.append, vm_id=vm_id)
    assert (reason.kind, reason.status) == ("debug-exit", (0x21 << 1) | 1), reason
    assert b"EXIT 33" in b"".join(out)
    assert leftovers(vm_id) == []


def test_bulkhead_run_as_root_uses_the_jail(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.vmrun import payload

    img = payload("exit_code")
    proc = subprocess.Popen([sys.executable, "-m", "bulkhead", "run", "--kernel", str(img), "--cmdline", "code=5",
                             "--mem", "16"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    seen_worker = False
    while proc.poll() is None and not seen_worker:  # the run's child must be a jailed `bulkhead worker`
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if int(stat[1]) == proc.pid and b"worker" in cmd:
                seen_worker = True
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == (5 << 1) | 1, err
    assert b"EXIT 5" in out and b"warning" not in err
    assert seen_worker


def test_stale_leftovers_of_a_crashed_supervisor_are_cleaned(tmp_path: Path) -> None:
    from bulkhead.sandbox.cgroups import CgroupLimits, VmCgroup
    from bulkhead.sandbox.jail import IdAllocator
    from bulkhead.sandbox.supervisor import cleanup_stale

    base = tmp_path / "run"
    vm_id = f"t-stale-{uuid.uuid4().hex[:8]}"
    (base / "jail" / vm_id / "root").mkdir(parents=True)
    cg = VmCgroup(vm_id, CgroupLimits(64 << 20, 8, 0))
    cg.create()
    ids = IdAllocator(str(base / "ids"), base=300_000)
    live = f"t-live-{uuid.uuid4().hex[:8]}"
    (base / "jail" / live / "root").mkdir(parents=True)
    ids.allocate(live)  # owned by this (live) process: must survive
    uid = ids.allocate(vm_id)
    Path(base / "ids" / str(uid)).write_text(f"{vm_id} 999999999\n")  # the supervisor died
    sleeper = subprocess.Popen(["sleep", "60"])
    Path(cg.dirs["pids"], "cgroup.procs").write_text(str(sleeper.pid))  # an orphan still in the group
    assert cleanup_stale(str(base)) == [vm_id]
    assert sleeper.wait(5) == -9
    assert leftovers(vm_id, str(base)) == [] and not (base / "ids" / str(uid)).exists()
    assert (base / "jail" / live).exists()


def test_a_lost_vms_cgroup_is_removed_even_when_its_jail_dir_is_gone(tmp_path: Path) -> None:
    """Issue 12 soak: after a daemon SIGKILL, another daemon sharing the base dir removed the jail dir but
    not the cgroup; cleanup_stale (it finds VMs by jail dir) then never saw it. cleanup_lost, for the
    daemon's own lost VMs, removes the cgroup (killing what is still in it), the dirs and the uid record."""
    from bulkhead.sandbox.cgroups import CgroupLimits, VmCgroup
    from bulkhead.sandbox.jail import IdAllocator
    from bulkhead.sandbox.stale import cleanup_lost
    from bulkhead.sandbox.supervisor import cleanup_stale

    base = tmp_path / "run"
    vm_id = f"t-lost-{uuid.uuid4().hex[:8]}"
    cg = VmCgroup(vm_id, CgroupLimits(64 << 20, 8, 0))
    cg.create()
    ids = IdAllocator(str(base / "ids"), base=300_100)
    uid = ids.allocate(vm_id)
    Path(base / "ids" / str(uid)).write_text(f"{vm_id} 999999999\n")  # its daemon died
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        Path(cg.dirs["pids"], "cgroup.procs").write_text(str(sleeper.pid))
        assert cleanup_stale(str(base)) == []  # no jail dir: the old sweep cannot see it
        assert any(Path(d).is_dir() for d in cg.dirs.values())
        assert cleanup_lost(vm_id, str(base))
        assert sleeper.wait(5) == -9
        assert leftovers(vm_id, str(base)) == [] and not (base / "ids" / str(uid)).exists()
        assert cleanup_lost(vm_id, str(base)) == []  # nothing left: a no-op
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
        with contextlib.suppress(Exception):
            cg.remove()


def test_jailed_backend_implements_the_daemon_contract(vms: Vms, tmp_path: Path) -> None:
    from types import SimpleNamespace

    from bulkhead.sandbox.backend import JailedBackend, jail_id

    backend_mod = pytest.importorskip("bulkhead.daemon.backend")
    events: list[tuple[str, str]] = []
    backend = JailedBackend(status_type=backend_mod.BackendStatus,
                            options=JailOptions(test_probes=True, memory_overhead_mib=64),
                            on_security_event=lambda vm, kind, detail: events.append((vm, kind)))
    spec = SimpleNamespace(kernel=str(vms.kernel), initrd=None, cmdline="", mem_mib=8, cpus=1, drives=(), nics=(),
                           rng=False, console_path=str(tmp_path / "console.log"))
    vm = f"Tenant A/vm {uuid.uuid4().hex[:8]}"  # not a valid jail id: mapped to a stable digest
    pid = backend.start(vm, spec)
    try:
        _backend_lifecycle(backend, backend_mod.BackendStatus, vm, pid)
    finally:
        backend.shutdown()
    assert leftovers(jail_id(vm)) == [] and events == []


def _backend_lifecycle(backend: Any, status: Any, vm: str, pid: int) -> None:
    from bulkhead.sandbox.backend import jail_id

    assert pid > 0 and jail_id(vm).startswith("d-") and jail_id(vm) == jail_id(vm[:])
    deadline = time.monotonic() + 10
    while backend.status(vm).state != "running":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    backend.pause(vm)
    assert backend.status(vm) == status("paused", pid)
    backend.resume(vm)
    assert backend.status(vm).state == "running"
    deadline = time.monotonic() + 5
    while b"fake-vm: running" not in backend.console(vm, 0, 100):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    backend.stop(vm)
    assert backend.status(vm) == status("exited", pid, 130)
    exit_ = backend.exit_reason(vm)
    assert exit_ is not None and exit_.reason.kind == "interrupted"
    assert backend.status("nope").state == "absent"


def test_console_input_reaches_the_guest_serial(vms: Vms) -> None:
    got: list[bytes] = []
    h = vms.spawn()
    h.on_console = got.append
    h.console_input(b"ping")
    deadline = time.monotonic() + 5
    while b"echo:ping" not in b"".join(got):
        assert time.monotonic() < deadline, got
        time.sleep(0.01)


def test_a_host_process_that_exits_without_stopping_leaves_nothing(vms: Vms) -> None:
    vm_id = f"t-atexit-{uuid.uuid4().hex[:8]}"
    script = (
        "from bulkhead.runtime.config import VmConfig\n"
        "from bulkhead.sandbox.supervisor import spawn_worker\n"
        f"h = spawn_worker(VmConfig(kernel={str(vms.kernel)!r}), vm_id={vm_id!r})\n"
        "print(h.pid, flush=True)\n"
    )  # exits at once, the worker still running
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout)
    assert not os.path.exists(f"/proc/{pid}")
    assert leftovers(vm_id) == []


def test_virtio_blk_and_rng_guests_run_in_the_jail(tmp_path: Path) -> None:
    from bulkhead.sandbox.supervisor import run_jailed

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.virtio_payloads import build_virtio

    rw, ro = tmp_path / "rw.img", tmp_path / "ro.img"
    with open(rw, "wb") as f:
        f.truncate(4 << 20)
    ro_content = os.urandom(1 << 20)
    ro.write_bytes(ro_content)
    os.chmod(rw, 0o600)
    os.chmod(ro, 0o400)
    out: list[bytes] = []
    vm_id = f"t-blk-{uuid.uuid4().hex[:8]}"
    cfg = VmConfig(kernel=str(build_virtio("virtio_blk")), cmdline="seed=3", mem_mib=32,
                   drives=(DriveConfig(str(rw), False), DriveConfig(str(ro), True)))
    reason = run_jailed(cfg, console=out.append, vm_id=vm_id)
    text = b"".join(out).decode(errors="replace")
    assert (reason.kind, reason.status) == ("debug-exit", 1), text
    assert "PASS" in text.splitlines()
    assert ro.read_bytes() == ro_content and rw.read_bytes().strip(b"\0")  # written through the jail
    assert leftovers(vm_id) == []
    out.clear()
    reason = run_jailed(VmConfig(kernel=str(build_virtio("virtio_rng")), mem_mib=32, rng=True), console=out.append)
    assert reason.status == 1 and "PASS" in b"".join(out).decode().splitlines()
