"""The daemon runs VMs in the jail (root + KVM): a VM created and started through the API runs in a jailed
worker (checked from /proc: not uid 0, seccomp filter, no_new_privs, no capabilities), pause/resume are
real vCPU pauses through the worker protocol (the process is never SIGSTOPped), a stop leaves no jail
directory, cgroup or mount, and every way a worker can end is recorded with its own reason in the VM's
events and in the audit log (a killed worker, a crash, a seccomp kill, an OOM kill, a guest poweroff).
A real guest payload runs through the API in the jail too. Stale jails are cleaned when the daemon starts.

The fake-machine tests use the sandbox's test-probe hook (BULKHEAD_TEST_PROBES=1): the worker builds a KVM
VM and touches guest RAM inside the jail, and named probes make it misbehave the way a compromised device
model would.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bulkhead.daemon.backend import BackendStatus, make_backend
from bulkhead.daemon.testkit import Harness
from bulkhead.sandbox.backend import JailedBackend
from bulkhead.sandbox.supervisor import PROBES_ENV, JailOptions, leftovers

pytestmark = [pytest.mark.root, pytest.mark.kvm, pytest.mark.timeout(180)]


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def _children(pid: int) -> list[int]:
    return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _wait(pred: Any, timeout: float = 15.0) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError("timed out")


@pytest.fixture(params=[0, 2], ids=["exec", "pool"])
def jailed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[Harness]:
    """The jail backend with exec'd workers (the default) and with the opt-in worker pool."""
    monkeypatch.setenv(PROBES_ENV, "1")
    backend = JailedBackend(status_type=BackendStatus, options=JailOptions(test_probes=True, memory_overhead_mib=64),
                            pool_size=request.param)
    h = Harness(tmp_path / "s", backend=backend)
    try:
        yield h
    finally:
        h.close()


def _vm(h: Harness, name: str = "vm", mem: int = 8) -> str:
    t = h.tenant(f"t-{uuid.uuid4().hex[:6]}")
    return h.vm(t, name, mem_mib=mem)


def _events(c: Any, vm: str) -> list[tuple[str, dict[str, Any]]]:
    return [(e["event"], json.loads(e["detail"])) for e in c.get(f"/v1/vms/{vm}/events").json()]


def _audit(c: Any, vm: str) -> list[dict[str, Any]]:
    return list(c.get("/v1/audit", params={"vm": vm, "limit": 10000}).json())


def test_root_daemon_defaults_to_the_jail(tmp_path: Path) -> None:
    assert isinstance(make_backend("auto"), JailedBackend)
    assert isinstance(make_backend("jail"), JailedBackend)


def test_a_vm_started_through_the_api_runs_jailed_and_pauses_for_real(jailed: Harness) -> None:
    h = jailed
    vm = _vm(h)
    with h.client() as c:
        got = c.post(f"/v1/vms/{vm}/start").json()
        assert got["state"] == "running"
        reaper = h.daemon.store.q1("SELECT pid FROM vms WHERE id = ?", (vm,))["pid"]
        (worker,) = _children(reaper)
        for pid in (reaper, worker):
            st = _status(pid)
            uids = st["Uid"].split()
            assert uids[0] != "0" and len(set(uids)) == 1, st["Uid"]
            assert st["Seccomp"] == "2" and st["NoNewPrivs"] == "1" and int(st["CapEff"], 16) == 0
            assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
            assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
        assert Path(f"/run/bulkhead/jail/{vm}/root").is_dir()

        assert c.post(f"/v1/vms/{vm}/pause").json()["state"] == "paused"
        assert h.backend.status(vm).state == "paused"  # the worker's own answer over the protocol
        assert _status(worker)["State"][0] != "T"  # a vCPU pause, not SIGSTOP of the process
        handle = h.backend.worker(vm)
        assert handle is not None and "paused" in [n for n, _ in handle.events]
        assert c.post(f"/v1/vms/{vm}/resume").json()["state"] == "running"
        assert h.backend.status(vm).state == "running"
        _wait(lambda: b"fake-vm: running" in c.get(f"/v1/vms/{vm}/console").json()["data"].encode())

        assert c.post(f"/v1/vms/{vm}/stop").json()["state"] == "stopped"
        assert leftovers(vm) == []
        assert not os.path.exists(f"/proc/{reaper}") or _status(reaper)["State"][0] == "Z"
        event, detail = _events(c, vm)[-1]
        assert event == "stopped" and detail["reason"] == "interrupted"
        # restartable, and deletable once stopped
        assert c.post(f"/v1/vms/{vm}/start").json()["state"] == "running"
        assert c.post(f"/v1/vms/{vm}/stop").json()["state"] == "stopped"
        assert c.delete(f"/v1/vms/{vm}").status_code == 204
    assert leftovers(vm) == []


def _kill_worker(h: Harness, vm: str) -> None:
    reaper = h.daemon.store.q1("SELECT pid FROM vms WHERE id = ?", (vm,))["pid"]
    (worker,) = _children(reaper)
    os.kill(worker, signal.SIGKILL)


@pytest.mark.parametrize("how, kind, security", [
    ("kill", "worker-crash", True),       # the host-side view: the worker died of SIGKILL
    ("crash", "worker-crash", True),      # SIGSEGV inside the worker
    ("execve", "seccomp-kill", True),     # a system call outside the allow-list
    ("oom", "oom-kill", True),            # over the memory cgroup limit
    ("send-raw", "protocol-violation", True),  # an oversized datagram on the worker channel
    ("shutdown", "poweroff", False),      # the guest powered off: not a security event
])
def test_each_way_a_worker_ends_is_recorded_with_its_reason(jailed: Harness, how: str, kind: str,
                                                           security: bool) -> None:
    h = jailed
    vm = _vm(h, f"end-{how}")
    with h.client() as c:
        assert c.post(f"/v1/vms/{vm}/start").json()["state"] == "running"
        if how == "kill":
            _kill_worker(h, vm)
        else:
            handle = h.backend.worker(vm)
            assert handle is not None
            handle.probe(how, timeout=30)
        # recorded by the worker's exit callback, without anyone reading the VM
        row = _wait(lambda: (r := h.daemon.store.q1("SELECT * FROM vms WHERE id = ?", (vm,)))["state"] == "exited"
                    and r, timeout=40)
        assert leftovers(vm) == []
        event, detail = _events(c, vm)[-1]
        assert event == "exited" and detail["reason"] == kind, detail
        assert detail["status"] == row["exit_status"]
        recs = _audit(c, vm)
        exits = [r for r in recs if r["action"] == "vm.exit"]
        assert len(exits) == 1 and json.loads(exits[0]["detail"])["reason"] == kind
        sec = [r for r in recs if r["kind"] == "security" and r["action"] == f"security/{kind}"]
        assert len(sec) == (1 if security else 0), [r["action"] for r in recs]
        assert all(r["scope"] == exits[0]["scope"] for r in sec)
        got = c.get(f"/v1/vms/{vm}").json()
        assert (got["state"], got["exit_status"]) == ("exited", row["exit_status"])
        assert c.delete(f"/v1/vms/{vm}").status_code == 204


def test_a_real_guest_runs_in_the_jail_through_the_api(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.vmrun import payload

    img = payload("exit_code")
    h = Harness(tmp_path / "s", backend=make_backend("jail"))
    try:
        (h.root / "images" / "exit-code").write_bytes(img.read_bytes())
        t = h.tenant("real")
        with h.client() as c:
            vm = c.post("/v1/vms", json={"tenant": t, "name": "g", "kernel": "exit-code", "cmdline": "code=0x21",
                                         "mem_mib": 16}).json()["id"]
            assert c.post(f"/v1/vms/{vm}/start").json()["state"] == "running"
            got = _wait(lambda: (g := c.get(f"/v1/vms/{vm}").json())["state"] == "exited" and g, timeout=120)
            assert got["exit_status"] == (0x21 << 1) | 1
            assert "EXIT 33" in c.get(f"/v1/vms/{vm}/console").json()["data"]
            event, detail = _events(c, vm)[-1]
            assert event == "exited" and detail["reason"] == "debug-exit"
            assert not [r for r in _audit(c, vm) if r["kind"] == "security"]
        assert leftovers(vm) == []
    finally:
        h.close()


def test_stale_jails_are_cleaned_when_the_daemon_starts(tmp_path: Path) -> None:
    base = tmp_path / "run"
    stale = f"t-stale-{uuid.uuid4().hex[:8]}"
    (base / "jail" / stale / "root").mkdir(parents=True)  # no uid record: its supervisor is gone
    h = Harness(tmp_path / "s", backend=JailedBackend(status_type=BackendStatus, options=JailOptions(
        base_dir=str(base))))
    try:
        assert leftovers(stale, str(base)) == []
        with h.client() as c:
            recs = [r for r in c.get("/v1/audit", params={"limit": 1000}).json() if r["action"] == "sandbox.cleanup"]
        assert json.loads(recs[-1]["detail"])["vms"] == [stale]
    finally:
        h.close()


@pytest.mark.parametrize("kind", ["jail", "process"])
def test_a_guest_on_a_tenant_network_through_the_api(tmp_path: Path, kind: str) -> None:
    """The whole path: network and VM created through the API, the daemon makes the tap inside the tenant
    namespace and hands its fd to the jailed worker (jail), or makes a persistent tap and runs `bulkhead
    run` under nsenter in the tenant namespace (process); the real virtio-net guest's 0x88b5 broadcast is
    dropped at the bridge and shows up in GET /networks/{id}/counters; a frame from the bridge reaches the
    guest; after the guest exits the jailed tap is gone (the persistent one goes with the VM), and deleting
    everything leaves no namespace."""
    import secrets

    from pyroute2 import netns as pnetns

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.test_network_guest import bridge_sender
    from tests.virtio_payloads import build_virtio

    from bulkhead.network import host
    from bulkhead.network.service import NetworkService
    from bulkhead.network.state import HostConfig

    image = build_virtio("virtio_net")
    prefix = "j" + secrets.token_hex(1)
    hns = f"{prefix}host"
    pnetns.create(hns)
    cfg = HostConfig(prefix=prefix, state_dir=f"/run/bulkhead-test-{prefix}", host_netns=hns)
    h = Harness(tmp_path / "s", backend=make_backend(kind), net=NetworkService(cfg))
    try:
        (h.root / "images" / "virtio-net").write_bytes(image.read_bytes())
        t = h.tenant("netted")
        with h.client() as c:
            net = c.post(f"/v1/tenants/{t}/networks", json={"name": "lan", "ipv4_subnet": "10.5.0.0/24"}).json()
            vm = c.post("/v1/vms", json={"tenant": t, "name": "g", "kernel": "virtio-net", "mem_mib": 32,
                                         "cmdline": "seed=7 net_timeout_ms=20000",
                                         "nics": [{"network": net["id"]}]}).json()
            mac, tap, ns = vm["nics"][0]["mac"], cfg.tap(vm["id"], 0), cfg.netns(t)
            before = c.get(f"/v1/networks/{net['id']}/counters").json()["counters"][f"{mac}/proto"]["packets"]
            with bridge_sender(ns, cfg.bridge(net["id"]), mac, b"bulkhead-pong 7"):
                assert c.post(f"/v1/vms/{vm['id']}/start").json()["state"] == "running"
                assert Path(f"/run/netns/{ns}").exists()
                got = _wait(lambda: (g := c.get(f"/v1/vms/{vm['id']}").json())["state"] == "exited" and g,
                            timeout=150)
            console = c.get(f"/v1/vms/{vm['id']}/console").json()["data"]
            assert got["exit_status"] == 1, console  # debug-exit 0: the guest saw its pong
            assert any(line.startswith("NET tx ") and "result=1" in line for line in console.splitlines()), console
            rx = [line for line in console.splitlines() if line.startswith("NET rx len=")]
            assert rx and "bulkhead-pong" in rx[0] and mac in rx[0], console
            after = c.get(f"/v1/networks/{net['id']}/counters").json()["counters"]
            assert after[f"{mac}/proto"]["packets"] - before >= 1  # the guest's broadcast, dropped and counted
            assert after[f"{mac}/mac"]["packets"] == 0
            links = subprocess_links(ns)
            assert cfg.bridge(net["id"]) in links
            if kind == "jail":
                assert tap not in links  # the tap died with the worker
                assert leftovers(vm["id"]) == []
            else:
                assert tap in links  # persistent until the VM is deleted
            assert c.delete(f"/v1/vms/{vm['id']}").status_code == 204
            assert tap not in subprocess_links(ns)
            assert c.delete(f"/v1/networks/{net['id']}").status_code == 204
        assert not Path(f"/run/netns/{ns}").exists()
    finally:
        h.close()
        host.teardown(cfg)
        pnetns.remove(hns)


def subprocess_links(ns: str) -> set[str]:
    import subprocess

    out = subprocess.run(["ip", "-n", ns, "-o", "link"], capture_output=True, text=True, check=False).stdout
    return {line.split(": ")[1].split("@")[0] for line in out.splitlines() if ": " in line}
