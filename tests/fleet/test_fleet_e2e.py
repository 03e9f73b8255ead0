"""The fleet end to end with real etcd, a real controller process and real agent processes (fake VM
backend here; docs/FLEET.md). Each test names the rule of docs/FLEET.md it checks."""

from __future__ import annotations

import time

import pytest

from tests.fleet.kit import Fleet, make_vm, wait

pytestmark = pytest.mark.slow


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
