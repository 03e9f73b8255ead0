"""The fleet's pure core (docs/FLEET.md "Scheduling", "Host states", "Fencing"), property-tested."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bulkhead.errors import ConfigError
from bulkhead.fleet.model import (
    FleetTiming,
    HostView,
    VmDemand,
    decode,
    fence_deadline,
    host_state,
    lost_reschedulable,
    place,
    valid_host_id,
)

NOW = 1_000_000.0

hosts_st = st.lists(st.builds(
    HostView, name=st.sampled_from([f"h{i}" for i in range(8)]), alive=st.booleans(),
    mem_mib=st.integers(0, 4096), vcpus=st.integers(0, 8), slots=st.integers(0, 6), trusted=st.booleans(),
    attested_at=st.one_of(st.none(), st.floats(NOW - 40, NOW + 1)), drained=st.booleans()),
    max_size=8, unique_by=lambda h: h.name)
vms_st = st.lists(st.builds(VmDemand, id=st.uuids().map(str), tenant=st.sampled_from(["a", "b", "c"]),
                            mem_mib=st.integers(16, 1024), cpus=st.integers(1, 2)), max_size=30, unique_by=lambda v: v.id)


@settings(max_examples=300, deadline=None)
@given(hosts_st, vms_st, st.frozensets(st.sampled_from(["a", "b", "c"])))
def test_place_respects_every_rule(hosts: list[HostView], vms: list[VmDemand], dedicated: frozenset[str]) -> None:
    plan = place(vms, hosts, {}, now=NOW, max_age=15.0, dedicated=dedicated)
    by = {h.name: h for h in hosts}
    assert set(plan.assigned) | set(plan.unplaced) == {v.id for v in vms}
    assert not set(plan.assigned) & set(plan.unplaced)
    demand = {v.id: v for v in vms}
    for host in set(plan.assigned.values()):
        h = by[host]
        assert host_state(h, NOW, 15.0) == "ready"  # only attested, alive, undrained hosts
        mine = [demand[v] for v, x in plan.assigned.items() if x == host]
        assert sum(d.mem_mib for d in mine) <= h.mem_mib
        assert sum(d.cpus for d in mine) <= h.vcpus
        assert len(mine) <= h.slots
        tenants = {d.tenant for d in mine}
        if tenants & dedicated:
            assert len(tenants) == 1  # a dedicated tenant never shares a host
    # same policy every time: the input order does not matter
    again = place(list(reversed(vms)), list(reversed(hosts)), {}, now=NOW, max_age=15.0, dedicated=dedicated)
    assert again.assigned == plan.assigned


def _ready(name: str, mem: int = 1024) -> HostView:
    return HostView(name, True, mem, 8, 8, True, NOW)


def test_place_spreads_a_tenant_and_counts_running_vms() -> None:
    vms = [VmDemand(f"v{i}", "a", 64, 1) for i in range(4)]
    plan = place(vms, [_ready("h1"), _ready("h2")], {}, now=NOW, max_age=15)
    assert sorted(plan.assigned.values()) == ["h1", "h1", "h2", "h2"]
    full = {"x": ("h1", VmDemand("x", "b", 1000, 1))}
    plan = place([VmDemand("v", "a", 64, 1)], [_ready("h1"), _ready("h2", 100)], full, now=NOW, max_age=15)
    assert plan.assigned == {"v": "h2"}


def test_place_without_ready_hosts_says_why() -> None:
    stale = HostView("h1", True, 1024, 8, 8, True, NOW - 100)
    plan = place([VmDemand("v", "a", 64, 1)], [stale], {}, now=NOW, max_age=15)
    assert plan.assigned == {} and "no host is ready" in plan.unplaced["v"]


@pytest.mark.parametrize(("view", "state"), [
    (HostView("h", False, trusted=True, attested_at=NOW), "lost"),
    (HostView("h", True, trusted=True, attested_at=NOW, drained=True), "draining"),
    (HostView("h", True, trusted=False, attested_at=NOW), "unattested"),
    (HostView("h", True, trusted=True, attested_at=NOW - 16), "unattested"),
    (HostView("h", True, trusted=True, attested_at=None), "unattested"),
    (HostView("h", True, trusted=True, attested_at=NOW - 1), "ready"),
])
def test_host_state_table(view: HostView, state: str) -> None:
    assert host_state(view, NOW, 15.0) == state


@given(st.floats(0, 1e6), st.floats(1, 60), st.floats(0.01, 0.99))
def test_fence_deadline_is_before_the_earliest_expiry(sent: float, ttl: float, frac: float) -> None:
    """F2: the agent stops its VMs strictly before the lease can expire (sent + ttl)."""
    assert fence_deadline(sent, ttl, ttl * frac) < sent + ttl
    assert lost_reschedulable(sent, 1.0) > sent


def test_timing_and_ids_are_validated() -> None:
    with pytest.raises(ConfigError):
        FleetTiming(ttl=3, keepalive=3)
    with pytest.raises(ConfigError):
        FleetTiming(ttl=0.5)
    for bad in ("", "-a", "A", "a/b", "x" * 64):
        with pytest.raises(ConfigError):
            valid_host_id(bad)
    assert valid_host_id("host-1") == "host-1"


@given(st.binary(max_size=64))
def test_decode_never_raises(data: bytes) -> None:
    v = decode(data)
    assert v is None or isinstance(v, dict)
