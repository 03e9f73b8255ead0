"""Real VMs in the fleet: three host agents, each in its own network namespace with its own state dir,
running real jailed VMMs (KVM, the per-VM jail) from the shared directory. The guest idles in `sti; hlt`
(no CPU use). SIGKILL of the agent that runs the VM: its VMM dies with it (PR_SET_PDEATHSIG), the VM is
restarted on another host, and at no sample do two processes on this machine hold its writable disk
open (checked by device and inode through /proc/PID/fd, whatever mount namespace each process sees)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.fleet.kit import Fleet, Underlay, make_vm, underlay_fleet_of, wait

from bulkhead.boot.craft import make_elf

pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.kvm]
IDLE_GUEST = make_elf([(0x100000, b"\xfb\xf4\xeb\xfd", 0x1000)], 0x100000)  # sti; hlt; jmp back to hlt


def holders(disk: Path) -> set[int]:
    """Pids of the processes that hold `disk` open (by device + inode)."""
    st = disk.stat()
    out = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    s = os.stat(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if s.st_ino == st.st_ino and s.st_dev == st.st_dev:
                    out.add(int(pid))
        except OSError:
            continue
    return out


@pytest.fixture
def jailed_fleet(tmp_path: Path) -> Iterator[tuple[Fleet, Underlay]]:
    if os.geteuid() != 0 or not os.path.exists("/dev/kvm") or shutil.which("etcd") is None:
        pytest.skip("needs root, /dev/kvm and etcd (jailed VMs on namespace hosts)")
    def clean(fleet: Fleet) -> None:
        for h in fleet.agents:  # what the killed agent left: its VM's cgroup and jail
            clean_host(fleet.root / f"jail-{h}", h)

    with underlay_fleet_of(tmp_path, clean) as pair:
        yield pair


def clean_host(jail_dir: Path, host: str) -> None:
    from bulkhead.sandbox.cgroups import detect_version
    from bulkhead.sandbox.supervisor import cleanup_stale

    if jail_dir.is_dir():
        cleanup_stale(str(jail_dir), f"/bulkhead-fleet/{host}")
    _, mounts = detect_version()
    for m in set(mounts.values()):
        for d in (Path(m) / "bulkhead-fleet" / host, Path(m) / "bulkhead-fleet"):
            try:
                d.rmdir()
            except OSError:
                pass


def test_jailed_vm_moves_on_agent_kill_and_its_disk_is_never_held_twice(jailed_fleet: tuple[Fleet, Underlay]) -> None:
    fleet, u = jailed_fleet
    (fleet.shared / "images" / "idle.elf").write_bytes(IDLE_GUEST)
    fleet.start_controller()
    fleet.wait_api()
    for i, h in enumerate(("h1", "h2", "h3")):
        fleet.start_agent(h, netns=u.add_host(h), backend="jail",
                          extra=["--jail-dir", str(fleet.root / f"jail-{h}"), "--uid-base", str(300_000 + 10_000 * i)])
    wait(lambda: len(hs := fleet.hosts()) == 3 and all(x["state"] == "ready" for x in hs.values()), 60, "hosts ready")
    with fleet.client() as c:
        t = c.post("/tenants", {"name": "acme"})["id"]
        disk_id = c.post(f"/tenants/{t}/disks", {"name": "data", "size_mib": 1})["id"]
        vm = make_vm(c, t, "idle", kernel="idle.elf", drives=[{"disk": disk_id, "read_only": False}])["id"]
        c.post(f"/vms/{vm}/start", {})
    disk = fleet.shared / "disks" / f"{disk_id}.img"

    def state() -> dict:
        with fleet.client() as c:
            return dict(c.get(f"/vms/{vm}"))

    first = wait(lambda: (s := state())["state"] == "running" and holders(disk) and s["host"], 60, "the jailed VM up")
    pids = holders(disk)
    assert len(pids) == 1, pids
    seen_twice: list[set[int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            h = holders(disk)
            if len(h) > 1:
                seen_twice.append(h)
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        fleet.kill_agent(first)
        wait(lambda: not (holders(disk) & pids), 10, "the killed agent's VMM gone with it")
        second = wait(lambda: (s := state())["state"] == "running" and s["host"] != first and holders(disk)
                      and s["host"], 60, "the VM running on another host")
    finally:
        stop.set()
        th.join(5)
    assert second in ("h1", "h2", "h3") and second != first
    assert not seen_twice, seen_twice
    assert holders(disk) and not (holders(disk) & pids)
