"""Pure network core: validation, MACs, IPAM, desired state, reconcile plan, nftables text (no root)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bulkhead.errors import ConfigError
from bulkhead.network.model import (
    MAX_NICS_PER_VM,
    NicRate,
    allocate_ipv4,
    attach_nic,
    eui64_address,
    link_local,
    make_network,
    nic_mac,
    parse_mac,
)
from bulkhead.network.rules import render
from bulkhead.network.state import HostConfig, HostState, desired_state, plan

CFG = HostConfig(prefix="bt", state_dir="/tmp/x")


def net(nid: str = "n1", tenant: str = "t1", name: str = "a", v4: str = "10.0.0.0/24", v6: str | None = None,
        egress: bool = False, existing=()):
    return make_network(nid, tenant, name, v4, v6, egress=egress, existing=existing)


# --- networks ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("v4", ["10.0.0.1/24", "8.8.8.0/24", "127.0.0.0/24", "169.254.1.0/24", "10.0.0.0/30",
                                "10.0.0.0/8", "224.0.0.0/24", "bogus", "10.0.0.0/15", "fd00::/64"])
def test_bad_ipv4_subnets_are_refused(v4: str) -> None:
    with pytest.raises(ConfigError, match="IPv4 subnet"):
        net(v4=v4)


@pytest.mark.parametrize("v6", ["fe80::/64", "ff02::/64", "fd00::/48", "fd00::1/64", "::1/128", "::ffff:0:0/96",
                                "10.0.0.0/24"])
def test_bad_ipv6_prefixes_are_refused(v6: str) -> None:
    with pytest.raises(ConfigError, match="IPv6 prefix"):
        net(v6=v6)


@pytest.mark.parametrize("name", ["", "A", "-x", "x" * 64, "a b", "a_b", "é"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(ConfigError, match="network name"):
        net(name=name)


def test_overlap_rules_apply_within_a_tenant_only() -> None:
    a = net("n1", "t1", "a", "10.0.0.0/24", "fd00:1::/64")
    with pytest.raises(ConfigError, match="overlaps"):
        net("n2", "t1", "b", "10.0.0.128/25", existing=[a])
    with pytest.raises(ConfigError, match="overlaps"):
        net("n2", "t1", "b", "10.0.1.0/24", "fd00:1::/64", existing=[a])
    with pytest.raises(ConfigError, match="named"):
        net("n2", "t1", "a", "10.0.1.0/24", existing=[a])
    # another tenant may reuse the very same subnet and name
    b = net("n2", "t2", "a", "10.0.0.0/24", "fd00:1::/64", existing=[a])
    assert b.ipv4 == a.ipv4
    # re-validating a network against the list that contains it is fine
    assert net("n1", "t1", "a", "10.0.0.0/24", existing=[a]).id == "n1"


def test_reserved_uplink_pool_cannot_be_used() -> None:
    with pytest.raises(ConfigError, match="reserves"):
        make_network("n", "t", "a", "100.127.3.0/24", reserved=[CFG.uplink_pool])


def test_gateway_and_resource_shape() -> None:
    n = net(v6="fd00:1::/64", egress=True)
    assert n.gateway4 == IPv4Address("10.0.0.1")
    assert n.to_dict() == {"id": "n1", "tenant": "t1", "name": "a", "ipv4_subnet": "10.0.0.0/24",
                           "ipv4_gateway": "10.0.0.1", "ipv6_prefix": "fd00:1::/64", "egress": True}


# --- MACs and addresses ----------------------------------------------------------------------------------

@given(st.text(min_size=1, max_size=40), st.integers(0, MAX_NICS_PER_VM - 1))
def test_nic_mac_is_locally_administered_unicast_and_stable(vm: str, idx: int) -> None:
    mac = nic_mac(vm, idx)
    raw = parse_mac(mac)
    assert raw[0] & 0x01 == 0 and raw[0] & 0x02 == 2
    assert nic_mac(vm, idx) == mac
    assert nic_mac(vm, idx) != nic_mac(vm + "x", idx)


def test_parse_mac_refuses_multicast_zero_and_garbage() -> None:
    for bad, why in (("01:00:5e:00:00:01", "is a multicast address"), ("00:00:00:00:00:00", "is not usable"),
                     ("zz:00:00:00:00:00", "is not a MAC address"), ("02:00:00:00:00", "is not a MAC address"),
                     ("0200.0000.0001", "is not a MAC address")):
        with pytest.raises(ConfigError, match=why):
            parse_mac(bad)


def test_eui64_matches_rfc4291() -> None:
    assert link_local("52:54:00:12:34:56") == IPv6Address("fe80::5054:ff:fe12:3456")
    n = net(v6="fd00:1::/64")
    assert n.ipv6 is not None
    assert eui64_address(n.ipv6, "02:00:00:00:00:01") == IPv6Address("fd00:1::ff:fe00:1")


def test_ipam_lowest_free_never_reserved_or_held() -> None:
    n = net(v4="10.0.0.0/29")  # .0 network, .1 gateway, .7 broadcast: .2-.6 usable
    held: list[IPv4Address] = []
    for _ in range(5):
        held.append(allocate_ipv4(n, held))
    assert [str(a) for a in held] == ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]
    with pytest.raises(ConfigError, match="no free"):
        allocate_ipv4(n, held)
    # a released address is free again, the others are not
    held.remove(IPv4Address("10.0.0.4"))
    assert allocate_ipv4(n, held) == IPv4Address("10.0.0.4")


@pytest.mark.parametrize(("req", "why"), [("10.0.0.0", "is reserved"), ("10.0.0.1", "is reserved"),
                                          ("10.0.0.255", "is reserved"), ("10.0.1.5", "is not in network 'a'"),
                                          ("10.0.0.9", "is already held by another NIC"),
                                          ("x", "'x' is not an IPv4 address")])
def test_ipam_requested_address_is_checked(req: str, why: str) -> None:
    n = net()
    with pytest.raises(ConfigError, match=why):
        allocate_ipv4(n, [IPv4Address("10.0.0.9")], req)


@settings(max_examples=200)
@given(st.integers(16, 29), st.lists(st.integers(0, 1 << 16), max_size=40))
def test_ipam_property(prefixlen: int, offsets: list[int]) -> None:
    n = make_network("n", "t", "a", str(IPv4Network(f"10.0.0.0/{prefixlen}")))
    held = {IPv4Address(int(n.ipv4.network_address) + o % n.ipv4.num_addresses) for o in offsets}
    try:
        a = allocate_ipv4(n, held)
    except ConfigError:
        assert len(held - {n.ipv4.network_address, n.gateway4, n.ipv4.broadcast_address}) >= n.ipv4.num_addresses - 3
        return
    assert a in n.ipv4 and a not in held
    assert a not in (n.ipv4.network_address, n.gateway4, n.ipv4.broadcast_address)


def test_attach_nic_rules() -> None:
    n = net(v6="fd00:1::/64")
    a = attach_nic("vm1", "t1", 0, n, [])
    assert a.mac == nic_mac("vm1", 0) and a.ipv4 == IPv4Address("10.0.0.2")
    assert a.ipv6 == eui64_address(n.ipv6, a.mac)  # type: ignore[arg-type]
    b = attach_nic("vm2", "t1", 0, n, [a], rate=NicRate(1_000_000, 100))
    assert b.ipv4 == IPv4Address("10.0.0.3")
    assert b.to_dict()["rate"] == {"bytes_per_sec": 1_000_000, "ops_per_sec": 100}
    with pytest.raises(ConfigError, match="does not exist"):  # foreign network looks missing
        attach_nic("vm3", "t2", 0, n, [a, b])
    with pytest.raises(ConfigError, match="already has"):
        attach_nic("vm1", "t1", 0, n, [a, b])
    with pytest.raises(ConfigError, match="already used"):
        attach_nic("vm3", "t1", 0, n, [a, b], mac=a.mac)
    with pytest.raises(ConfigError, match="already held"):
        attach_nic("vm3", "t1", 0, n, [a, b], ipv4="10.0.0.2")
    with pytest.raises(ConfigError, match="index"):
        attach_nic("vm3", "t1", MAX_NICS_PER_VM, n, [a, b])
    with pytest.raises(ConfigError, match=r"NIC rate bytes_per_sec must be an integer from 0 to 2\^40-1"):
        NicRate(-1, 0)


# --- desired state and plan ----------------------------------------------------------------------------

def scenario(egress: bool = True):
    a = net("na", "ta", "a", "10.0.0.0/24", "fd00:1::/64", egress=egress)
    b = net("nb", "tb", "b", "10.0.0.0/24")
    nics = []
    for vm, t, n in (("v1", "ta", a), ("v2", "ta", a), ("v3", "tb", b), ("v4", "tb", b)):
        nics.append(attach_nic(vm, t, 0, n, nics))
    return [a, b], nics


def test_desired_state_shape() -> None:
    nets, nics = scenario()
    d = desired_state(nets, nics, CFG)
    assert d.namespaces == {CFG.netns("ta"), CFG.netns("tb")}
    assert {b.name for b in d.bridges} == {CFG.bridge("na"), CFG.bridge("nb")}
    assert {t.name for t in d.taps} == {CFG.tap(f"v{i}", 0) for i in range(1, 5)}
    assert all(len(x) <= 15 for x in [b.name for b in d.bridges] + [t.name for t in d.taps])
    assert len(d.uplinks) == 1 and next(iter(d.uplinks)).netns == CFG.netns("ta")
    assert {(t.netns, t.family, t.name) for t in d.tables} == {
        (CFG.netns("ta"), "bridge", "bt_guard"), (CFG.netns("ta"), "inet", "bt_tenant"),
        (CFG.netns("tb"), "bridge", "bt_guard"), (CFG.netns("tb"), "inet", "bt_tenant"), ("", "inet", "bt_host")}
    dh = {x.network_id: x for x in d.dhcp}
    assert "option:router,10.0.0.1" in dh["na"].config and "option:router\n" in dh["nb"].config
    assert dh["na"].hosts.splitlines() == [f"{n.mac},{n.ipv4}" for n in nics[:2]]
    assert d.forwarding == {CFG.netns("ta"), ""}
    assert desired_state(nets, nics, CFG) == d  # deterministic


def test_no_egress_means_no_uplink_and_no_host_table() -> None:
    nets, nics = scenario(egress=False)
    d = desired_state(nets, nics, CFG)
    assert not d.uplinks and not any(t.netns == "" for t in d.tables) and not d.forwarding
    tenant = next(t for t in d.tables if t.name == "bt_tenant" and t.netns == CFG.netns("ta"))
    assert "masquerade" not in tenant.body and "oifname" not in tenant.body


def test_nic_on_unknown_network_is_refused() -> None:
    nets, nics = scenario()
    with pytest.raises(ConfigError, match="NIC v3/0 refers to network 'nb', which does not exist"):
        desired_state(nets[:1], nics, CFG)


def test_plan_from_nothing_then_idempotent_then_back_to_nothing() -> None:
    nets, nics = scenario()
    d = desired_state(nets, nics, CFG)
    ops = [a.op for a in plan(HostState(), d)]
    assert ops[:2] == ["netns_create", "netns_create"]
    assert ops.count("bridge_create") == 2 and ops.count("nft_apply") == 5 and ops.count("dhcp_start") == 2
    assert "tap_attach" not in ops  # taps are created by the daemon when a VM starts
    assert plan(d, d) == []
    down = plan(d, HostState())
    assert [a.op for a in down] == ["dhcp_stop", "dhcp_stop", "nft_delete", "uplink_delete", "netns_delete",
                                      "netns_delete"]


def test_plan_removing_a_nic_reloads_dhcp_replaces_rules_deletes_its_tap() -> None:
    nets, nics = scenario()
    before = desired_state(nets, nics, CFG)
    after = desired_state(nets, nics[1:], CFG)
    ops = {(a.op, str(a)) for a in plan(before, after)}
    assert ("tap_delete", f"tap_delete {CFG.tap('v1', 0)}") in ops
    assert ("dhcp_reload", f"dhcp_reload {CFG.bridge('na')}") in ops
    assert ("nft_apply", "nft_apply bt_guard") in ops
    assert not any(op in ("netns_delete", "bridge_delete", "dhcp_start") for op, _ in ops)


def test_plan_deleting_a_network_of_a_tenant_with_two() -> None:
    nets, nics = scenario()
    c = net("nc", "ta", "c", "10.9.0.0/24", existing=nets)
    before = desired_state([*nets, c], nics, CFG)
    after = desired_state(nets, nics, CFG)
    acts = plan(before, after)
    assert {(a.op, str(a)) for a in acts} >= {("bridge_delete", f"bridge_delete {CFG.bridge('nc')}"),
                                            ("dhcp_stop", f"dhcp_stop {CFG.bridge('nc')}")}
    assert not any(a.op.startswith("netns") for a in acts)


def test_plan_reattaches_taps_when_their_bridge_is_recreated() -> None:
    nets, nics = scenario()
    d = desired_state(nets, nics, CFG)
    broken = HostState(d.namespaces, d.forwarding, frozenset(b for b in d.bridges if b.network_id != "na"), d.taps,
                       d.uplinks, d.tables, d.dhcp)
    ops = [str(a) for a in plan(broken, d)]
    assert f"bridge_create {CFG.bridge('na')}" in ops
    assert {f"tap_attach {CFG.tap('v1', 0)}", f"tap_attach {CFG.tap('v2', 0)}"} <= set(ops)
    assert f"dhcp_start {CFG.bridge('na')}" in ops


def test_plan_never_switches_host_forwarding_off() -> None:
    nets, nics = scenario()
    d = desired_state(nets, nics, CFG)
    assert not any(a.op == "forwarding" and a.target == "" for a in plan(d, HostState(forwarding=frozenset({""}))))
    assert not any(a.op == "forwarding" and a.target == "" for a in plan(HostState(forwarding=frozenset({""})),
                                                                        HostState()))


def test_names_are_owned_by_prefix_only() -> None:
    assert CFG.owns_netns(CFG.netns("x")) and not CFG.owns_netns("bt-zz") and not CFG.owns_netns("other")
    assert CFG.owns_link(CFG.tap("v", 0)) and CFG.owns_link(CFG.bridge("n")) and not CFG.owns_link("eth0")
    with pytest.raises(ConfigError, match="network prefix 'toolong' must be 1-4 of a-z, 0-9, starting"):
        HostConfig(prefix="toolong")
    with pytest.raises(ConfigError, match="network prefix '1a' must be 1-4 of a-z, 0-9, starting with"):
        HostConfig(prefix="1a")


def test_guard_rules_pin_every_address_of_the_nic() -> None:
    nets, nics = scenario()
    d = desired_state(nets, nics, CFG)
    guard = next(t for t in d.tables if t.name == "bt_guard" and t.netns == CFG.netns("ta"))
    tap = CFG.tap("v1", 0)
    nic = nics[0]
    body = guard.body
    assert f"ether saddr != {nic.mac} counter name \"{tap}_mac\" drop" in body
    assert f"ip saddr != {nic.ipv4} counter name \"{tap}_ip\" drop" in body
    assert f"arp saddr ether != {nic.mac}" in body and f"0.0.0.0, {nic.ipv4}" in body
    assert str(link_local(nic.mac)) in body and str(nic.ipv6) in body
    assert f"@th,208,48 != 0x{nic.mac.replace(':', '')}" in body
    text = render(guard, {f"{tap}_mac": (7, 700)})
    assert f"counter {tap}_mac {{ packets 7 bytes 700 }}" in text
    assert text.startswith("table bridge bt_guard\ndelete table bridge bt_guard\n")
    assert f"chain digest_{guard.digest}" in text


# --- plan is correct: applying it (symbolically) yields the desired state -----------------------------

def _simulate(s: HostState, actions) -> HostState:  # type: ignore[no-untyped-def]
    ns, fwd = set(s.namespaces), set(s.forwarding)
    br = {(b.netns, b.name): b for b in s.bridges}
    taps = {(t.netns, t.name): t for t in s.taps}
    ups = {(u.netns, u.inner): u for u in s.uplinks}
    tabs = {(t.netns, t.family, t.name): t for t in s.tables}
    dh = {(d.netns, d.network_id): d for d in s.dhcp}
    for a in actions:
        t = a.target
        if a.op == "netns_create":
            ns.add(t)
        elif a.op == "netns_delete":
            ns.discard(t)
            fwd.discard(t)
            for m in (br, taps, ups, tabs, dh):
                for k in [k for k in m if k[0] == t]:
                    assert m is not dh, "dnsmasq must be stopped before its namespace goes"
                    del m[k]
        elif a.op == "forwarding":
            (fwd.add if a.detail else fwd.discard)(t)
        elif a.op == "bridge_create":
            assert t.netns in ns
            br[(t.netns, t.name)] = t
            for k, tp in list(taps.items()):
                if tp.netns == t.netns and tp.bridge == t.name:
                    taps[k] = type(tp)(tp.netns, tp.name, "")
        elif a.op == "bridge_delete":
            del br[(t.netns, t.name)]
            for k, tp in list(taps.items()):
                if tp.netns == t.netns and tp.bridge == t.name:
                    taps[k] = type(tp)(tp.netns, tp.name, "")
        elif a.op == "tap_delete":
            del taps[(t.netns, t.name)]
        elif a.op == "tap_attach":
            assert (t.netns, t.bridge) in br
            taps[(t.netns, t.name)] = t
        elif a.op == "uplink_create":
            assert t.netns in ns
            ups[(t.netns, t.inner)] = t
        elif a.op == "uplink_delete":
            ups.pop((t.netns, t.inner), None)
        elif a.op == "nft_apply":
            assert t.netns == "" or t.netns in ns
            tabs[(t.netns, t.family, t.name)] = t
        elif a.op == "nft_delete":
            del tabs[(t.netns, t.family, t.name)]
        elif a.op in ("dhcp_start", "dhcp_reload"):
            assert (t.netns, t.bridge) in br
            dh[(t.netns, t.network_id)] = t
        elif a.op == "dhcp_stop":
            dh = {k: v for k, v in dh.items() if v.bridge != t.bridge}
        else:
            raise AssertionError(a.op)
    return HostState(frozenset(ns), frozenset(fwd), frozenset(br.values()), frozenset(taps.values()),
                     frozenset(ups.values()), frozenset(tabs.values()), frozenset(dh.values()))


_scenario = st.fixed_dictionaries({
    "nets": st.lists(st.tuples(st.sampled_from(["t1", "t2", "t3"]), st.booleans()), max_size=4),
    "nics": st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3)), max_size=6),
})


def _build(sc):  # type: ignore[no-untyped-def]
    nets = []
    for i, (tenant, egress) in enumerate(sc["nets"]):
        nets.append(make_network(f"n{i}", tenant, f"net{i}", f"10.{i}.0.0/24", egress=egress))
    nics = []
    for vm, ni in sc["nics"]:
        if ni < len(nets) and not any(n.vm_id == f"vm{vm}" for n in nics):
            nics.append(attach_nic(f"vm{vm}", nets[ni].tenant, 0, nets[ni], nics))
    return desired_state(nets, nics, CFG)


@settings(max_examples=150, deadline=None)
@given(_scenario, _scenario)
def test_plan_applied_reaches_the_desired_state(a, b) -> None:  # type: ignore[no-untyped-def]
    before, after = _build(a), _build(b)
    result = _simulate(before, plan(before, after))
    kept_taps = {t for t in after.taps if any((o.netns, o.name) == (t.netns, t.name) for o in before.taps)}
    assert result.taps == kept_taps  # taps are only created when a VM starts
    for f in ("namespaces", "bridges", "uplinks", "tables", "dhcp"):
        assert getattr(result, f) == getattr(after, f), f
    assert result.forwarding - {""} == after.forwarding - {""}
    assert ("" in after.forwarding) <= ("" in result.forwarding)
    assert plan(result, after) == [] or all(a.op == "forwarding" and a.target == "" for a in plan(result, after))
