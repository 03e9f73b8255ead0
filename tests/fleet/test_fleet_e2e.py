"""The fleet end to end with real etcd, a real controller process and real agent processes (fake VM
backend here; docs/FLEET.md). Each test names the rule of docs/FLEET.md it checks."""

from __future__ import annotations

import json
import time

import pytest
from tests.fleet.kit import Fleet, NoDoubleRun, make_vm, wait

pytestmark = pytest.mark.slow


def _detail(r: dict) -> dict:
    d = r.get("detail") or {}
    return json.loads(d) if isinstance(d, str) else d


def _tenant(fleet: Fleet, name: str = "acme") -> str:
    with fleet.client() as c:
        return str(c.post("/tenants", {"name": name})["id"])


def _state(fleet: Fleet, vm: str) -> dict:
    with fleet.client() as c:
        return dict(c.get(f"/vms/{vm}"))


def test_vertical_slice_place_start_kill_reschedule(fleet: Fleet) -> None:
    """Agents register and attest, the controller places a VM on a ready host, the agent starts it under
    its fencing token; SIGKILL of that agent -> the host is lost -> the VM runs elsewhere (rule F3)."""
    fleet.start_controller()
    fleet.wait_api()
    for h in ("h1", "h2"):
        fleet.start_agent(h)
    wait(lambda: all(x["state"] == "ready" for x in fleet.hosts().values()) and len(fleet.hosts()) == 2, 30,
         "both hosts ready (attested)")
    t = _tenant(fleet)
    with fleet.client() as c:
        vm = make_vm(c, t, "web")["id"]
        c.post(f"/vms/{vm}/start", {})
    got = wait(lambda: (s := _state(fleet, vm))["state"] == "running" and s, 20, "the VM running")
    first = got["host"]
    assert vm in fleet.running_on(first)
    other = "h2" if first == "h1" else "h1"
    assert vm not in fleet.running_on(other)
    t0 = time.monotonic()
    fleet.kill_agent(first)
    got = wait(lambda: (s := _state(fleet, vm))["state"] == "running" and s["host"] == other and s, 30,
               "the VM rescheduled")
    elapsed = time.monotonic() - t0
    assert vm in fleet.running_on(other)
    assert elapsed >= fleet.ttl * 0.5  # not before the lease could have expired
    assert fleet.hosts()[first]["state"] == "lost"


def _ready_fleet(fleet: Fleet, hosts: tuple[str, ...] = ("h1", "h2"), controllers: tuple[str, ...] = ("c1",)) -> str:
    for c in controllers:
        fleet.start_controller(c)
    fleet.wait_api()
    for h in hosts:
        fleet.start_agent(h)
    wait(lambda: len(hs := fleet.hosts()) == len(hosts) and all(x["state"] == "ready" for x in hs.values()), 40,
         "every host ready (attested)")
    return _tenant(fleet)


def _running(fleet: Fleet, vm: str, host: str | None = None, timeout: float = 30) -> dict:
    return wait(lambda: (s := _state(fleet, vm))["state"] == "running" and (host is None or s["host"] == host)
                and vm in fleet.running_on(s["host"]) and s, timeout, f"{vm} running" + (f" on {host}" if host else ""))


def test_host_failing_attestation_gets_nothing_and_loses_its_vms(fleet: Fleet) -> None:
    """A host whose measured configuration the policy does not allow is unattested: no VM is placed on it.
    When a ready host's policy is revoked (a measurement no longer allowed), its VMs move to a ready host."""
    t = _ready_fleet(fleet)
    fleet.start_agent("h3", enroll=False)
    fleet.enroll("h3", allowed_config="0" * 64)  # the operator's policy does not allow what h3 measured
    wait(lambda: fleet.hosts().get("h3", {}).get("trusted") is False and fleet.hosts()["h3"]["reasons"], 30,
         "h3's verdict")
    h3 = fleet.hosts()["h3"]
    assert h3["state"] == "unattested"
    assert any("not allowed" in r or "config" in r for r in h3["reasons"]), h3["reasons"]
    with fleet.client() as c:
        vms = [make_vm(c, t, f"v{i}")["id"] for i in range(4)]
        for v in vms:
            c.post(f"/vms/{v}/start", {})
    hosts = {_running(fleet, v)["host"] for v in vms}
    assert "h3" not in hosts and fleet.running_on("h3") == {}
    victim = _state(fleet, vms[0])["host"]
    fleet.enroll(victim, allowed_config="0" * 64)  # revoked: its next quote fails the policy
    survivor = "h1" if victim == "h2" else "h2"
    for v in vms:
        _running(fleet, v, survivor, timeout=40)
    assert fleet.hosts()[victim]["state"] == "unattested"
    with fleet.client() as c:
        audit = c.get("/audit", limit=10000)
    assert any(r.get("action") == "fleet.host.unattested" and _detail(r).get("host") == victim for r in audit)


def test_swapped_tpm_is_refused(fleet: Fleet) -> None:
    """The controller verifies with the AK it enrolled: a host quoting with another TPM stays unattested."""
    fleet.start_controller()
    fleet.wait_api()
    fleet.start_agent("h1")
    fleet.start_agent("h2", enroll=False)
    (fleet.ctl_dir / "hosts" / "h2").mkdir(parents=True)
    for f in ("enrollment.json", "policy.json"):  # h2 is "enrolled" with h1's TPM
        (fleet.ctl_dir / "hosts" / "h2" / f).write_text((fleet.ctl_dir / "hosts" / "h1" / f).read_text())
    wait(lambda: fleet.hosts().get("h2", {}).get("reasons"), 30, "h2's verdict")
    assert fleet.hosts()["h2"]["state"] == "unattested"
    assert fleet.hosts()["h1"]["state"] == "ready"


def test_controller_failover_keeps_every_vm(fleet: Fleet) -> None:
    """SIGKILL of the leader: the standby leads within one lease TTL (plus its poll) and every VM stays
    where it was, under the same fencing token (nothing restarted)."""
    t = _ready_fleet(fleet, controllers=("c1", "c2"))
    leader = fleet.leader()
    assert leader in ("c1", "c2")
    with fleet.client() as c:
        vms = [make_vm(c, t, f"v{i}")["id"] for i in range(3)]
        for v in vms:
            c.post(f"/vms/{v}/start", {})
    before = {v: _running(fleet, v)["host"] for v in vms}
    tokens = {h: fleet.running_on(h) for h in ("h1", "h2")}
    proc = fleet.controllers[0 if leader == "c1" else 1]
    proc.kill()
    proc.wait(10)
    t0 = time.monotonic()
    standby = "c2" if leader == "c1" else "c1"
    wait(lambda: fleet.leader() == standby, fleet.ttl + 3, "the standby leading")
    took = time.monotonic() - t0
    assert took <= fleet.ttl + 1.0, took
    fleet.wait_api(leader=standby)
    for v in vms:
        assert _state(fleet, v)["host"] == before[v]
    time.sleep(1.0)
    assert {h: fleet.running_on(h) for h in ("h1", "h2")} == tokens
    with fleet.client() as c:
        c.post(f"/vms/{vms[0]}/stop", {})
    wait(lambda: _state(fleet, vms[0])["state"] == "stopped" and vms[0] not in fleet.running_on(before[vms[0]]),
         20, "stop through the new leader")


def test_etcd_member_down_fleet_goes_on(fleet: Fleet) -> None:
    """One of three etcd members stopped: hosts stay ready (no lease lost), VMs start and stop.

    When the stopped member was etcd's leader, renewals wait on etcd's election, and the controller may
    depose itself (its renewal deadline, TTL - margin, passed: rule F4 fails closed). Its lease outlives
    the election, so it resumes the leadership at once (Controller.reclaim) and serves again: the API
    is back within two TTLs, led by the same controller, and no other controller led meanwhile."""
    t = _ready_fleet(fleet)
    fleet.etcd.stop_member(0)
    time.sleep(fleet.ttl + 1)
    fleet.wait_api(timeout=2 * fleet.ttl + 5, leader="c1")
    hosts = fleet.hosts()
    assert all(h["state"] == "ready" for h in hosts.values()), hosts
    with fleet.client() as c:
        v = make_vm(c, t, "during")["id"]
        c.post(f"/vms/{v}/start", {})
    _running(fleet, v)
    fleet.etcd.start_member(0)


def test_drain_moves_vms_and_writable_disk_follows_with_a_higher_token(fleet: Fleet) -> None:
    """`bulkhead fleet drain HOST` (the CLI) moves its VMs; a VM's writable disk is attached by one VM
    fleet-wide (a second writable attachment is refused at create) and its storage fence token rises."""
    import subprocess
    import sys

    from bulkhead.fleet.storage import DiskFence

    t = _ready_fleet(fleet)
    with fleet.client() as c:
        disk = c.post(f"/tenants/{t}/disks", {"name": "data", "size_mib": 1})["id"]
        v = make_vm(c, t, "db", drives=[{"disk": disk, "read_only": False}])["id"]
        from bulkhead.daemon.client import ClientError

        with pytest.raises(ClientError) as exc:
            make_vm(c, t, "db2", drives=[{"disk": disk, "read_only": False}])
        assert exc.value.status == 409
        c.post(f"/vms/{v}/start", {})
    first = _running(fleet, v)["host"]
    fence = DiskFence(fleet.shared / "disks")
    tok1 = fence.current(disk)
    assert tok1 > 0
    cli = [sys.executable, "-m", "bulkhead", "fleet", "drain", first, "--state-dir", str(fleet.ctl_dir),
           "--cert", str(fleet.ctl_dir / "admin.pem"), "--key", str(fleet.ctl_dir / "admin.key")]
    other = "h2" if first == "h1" else "h1"
    with NoDoubleRun(fleet) as check:
        out = subprocess.run(cli, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "draining" in out.stdout
        _running(fleet, v, other)
    assert not check.violations and check.samples > 10
    assert fence.current(disk) > tok1
    listing = subprocess.run([*cli[:4], "hosts", *cli[6:], "--json"], capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    assert {h["host"]: h["state"] for h in json.loads(listing.stdout)}[first] == "draining"


def test_controller_killed_mid_reschedule(fleet: Fleet) -> None:
    """An agent dies, then the leading controller is SIGKILLed while the lost host's VMs wait out the
    grace: the standby (its observations of the lost host start afresh, rule F3) finishes the job, each
    VM once, never on two hosts."""
    t = _ready_fleet(fleet, hosts=("h1", "h2", "h3"), controllers=("c1", "c2"))
    with fleet.client() as c:
        vms = [make_vm(c, t, f"v{i}")["id"] for i in range(4)]
        for v in vms:
            c.post(f"/vms/{v}/start", {})
    hosts = {v: _running(fleet, v)["host"] for v in vms}
    victim = hosts[vms[0]]
    leader = fleet.leader()
    with NoDoubleRun(fleet) as check:
        fleet.kill_agent(victim)
        time.sleep(fleet.ttl * 0.8)  # the lease is about to expire: the leader is about to reschedule
        proc = fleet.controllers[0 if leader == "c1" else 1]
        proc.kill()
        proc.wait(10)
        fleet.wait_api(leader="c2" if leader == "c1" else "c1")
        for v in vms:
            s = _running(fleet, v, timeout=40)
            assert s["host"] != victim
    assert not check.violations, check.violations
    assert fleet.leader() not in (None, leader)
    moved = [v for v in vms if hosts[v] == victim]
    for v in vms:
        if v not in moved:
            assert _state(fleet, v)["host"] == hosts[v]  # the others were left alone
