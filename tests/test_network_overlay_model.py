"""The overlay's pure parts (no root): validation, names, rules text, desired state and plan."""

from __future__ import annotations

import base64
import dataclasses
from ipaddress import IPv4Address

import pytest

from bulkhead.errors import ConfigError
from bulkhead.network.model import attach_nic, make_network
from bulkhead.network.overlay_model import (
    OVERLAY_POOL,
    OverlayNetwork,
    OverlayPeer,
    OverlayState,
    desired_overlay,
    make_overlay,
    overlay_address,
    plan_overlay,
    vni_for,
    wg_name,
)
from bulkhead.network.state import HostConfig, bridge_mac

K = [base64.b64encode(bytes([i]) * 32).decode() for i in range(1, 6)]
CFG = HostConfig(prefix="tq")
NET_A = make_network("net-a", "tenant-a", "a", "10.0.0.0/24")
NET_B = make_network("net-b", "tenant-b", "b", "10.0.0.0/24")


def _spec(**kw: object):
    args: dict[str, object] = {
        "host_id": "h1", "underlay": "192.0.2.1", "private_key": K[0],
        "peers": [OverlayPeer("h1", "192.0.2.1", K[1]), OverlayPeer("h2", "192.0.2.2:51821", K[2]),
                  OverlayPeer("h3", "192.0.2.3", K[3])],
        "networks": [OverlayNetwork(NET_A, 100), OverlayNetwork(NET_B, 200)],
        "local_nics": [attach_nic("vm1", "tenant-a", 0, NET_A, [])],
    }
    args.update(kw)
    return make_overlay(**args)  # type: ignore[arg-type]


def test_spec_skips_self_and_resolves_peers() -> None:
    s = _spec()
    assert [p.host_id for p in s.peers] == ["h2", "h3"]
    assert s.peers[0].port == 51821 and s.peers[1].port == 51820
    assert s.overlay_ip == overlay_address("h1") and s.overlay_ip in OVERLAY_POOL
    assert s.wg_mtu == 1420 and s.vxlan_mtu == 1500
    assert K[0] not in repr(s)  # the private key is not printed


@pytest.mark.parametrize(("kw", "msg"), [
    ({"private_key": "short"}, "private key"),
    ({"peers": [OverlayPeer("h2", "192.0.2.2", "x")]}, "public key of host 'h2'"),
    ({"peers": [OverlayPeer("h2", "192.0.2.2", K[1]), OverlayPeer("h3", "192.0.2.3", K[1])]}, "same WireGuard key"),
    ({"peers": [OverlayPeer("h2", "192.0.2.2", K[1]), OverlayPeer("h2", "192.0.2.3", K[2])]}, "listed twice"),
    ({"peers": [OverlayPeer("h2", "nowhere", K[1])]}, "endpoint 'nowhere'"),
    ({"peers": [OverlayPeer("h2", "192.0.2.2:0", K[1])]}, "usable unicast"),
    ({"peers": [OverlayPeer("bad id!", "192.0.2.2", K[1])]}, "peer host id"),
    ({"peers": [OverlayPeer("h2", "192.0.2.2", K[1], overlay_ip=str(overlay_address("h1")))]}, "same overlay address"),
    ({"peers": [OverlayPeer("h2", "192.0.2.2", K[1], overlay_ip="10.1.1.1")]}, "not a host address"),
    ({"networks": [OverlayNetwork(NET_A, 7), OverlayNetwork(NET_B, 7)]}, "same VNI 7"),
    ({"networks": [OverlayNetwork(NET_A, 0)]}, "VNI of network"),
    ({"networks": [OverlayNetwork(NET_A, 1 << 24)]}, "VNI of network"),
    ({"networks": [OverlayNetwork(NET_A, 1), OverlayNetwork(NET_A, 2)]}, "listed twice"),
    ({"host_id": ""}, "host id"),
    ({"underlay": "::1"}, "endpoint"),
    ({"listen_port": 70000}, "listen port"),
    ({"underlay_mtu": 1000}, "underlay MTU"),
])
def test_bad_input_is_one_sentence(kw: dict[str, object], msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        _spec(**kw)


def test_vni_and_address_defaults_are_deterministic() -> None:
    assert vni_for("net-a") == vni_for("net-a") and 1 <= vni_for("net-a") < 1 << 24
    assert overlay_address("h1") != overlay_address("h2")
    assert overlay_address("h1") not in (OVERLAY_POOL.network_address, OVERLAY_POOL.broadcast_address)


def test_desired_state_and_rules() -> None:
    d = desired_overlay(_spec(), CFG)
    assert d.link is not None and d.conf is not None
    assert d.link.name == wg_name(CFG, "h1") and len(d.link.name) <= 15 and d.link.mtu == 1420
    assert {p[2] for p in d.conf.peers} == {f"{overlay_address(h)}/32" for h in ("h2", "h3")}
    assert {v.vni for v in d.vxlans} == {100, 200}
    assert all(v.remotes == {overlay_address("h2"), overlay_address("h3")} for v in d.vxlans)
    assert {v.netns for v in d.vxlans} == {CFG.netns("tenant-a"), CFG.netns("tenant-b")}
    host_t = next(t for t in d.tables if t.netns == "")
    w = d.link.name
    assert f'iifname != "{w}" udp dport 4789 counter name "underlay_vxlan" drop' in host_t.body
    assert f'ip daddr {OVERLAY_POOL} oifname != "{w}" counter name "cleartext_out" drop' in host_t.body
    ta = next(t for t in d.tables if t.netns == CFG.netns("tenant-a"))
    nic_mac = _spec().local_nics[0].mac
    assert nic_mac in ta.body and bridge_mac("net-a") in ta.body  # remote frames may not claim them
    tb = next(t for t in d.tables if t.netns == CFG.netns("tenant-b"))
    assert nic_mac not in tb.body  # tenant A's NICs are not tenant B's business


def test_plan_from_nothing_then_idempotent() -> None:
    d = desired_overlay(_spec(), CFG)
    ops = [a.op for a in plan_overlay(OverlayState(), d)]
    assert ops[:3] == ["wg_create", "wg_configure", "wg_address"]
    assert ops[3] == "nft_apply"  # the host table before any VXLAN exists
    assert ops.count("vxlan_create") == 2 and ops.count("fdb_set") == 2 and ops[-2:] == ["nft_apply", "nft_apply"]
    assert plan_overlay(d, d) == []


def test_plan_repairs_changes() -> None:
    d = desired_overlay(_spec(), CFG)
    va = next(v for v in d.vxlans if v.vni == 100)
    moved = dataclasses.replace(d, vxlans=(d.vxlans - {va}) | {dataclasses.replace(va, bridge="")})
    assert [str(a) for a in plan_overlay(moved, d)] == [f"vxlan_attach {va.name}"]
    fewer = dataclasses.replace(d, vxlans=(d.vxlans - {va}) | {dataclasses.replace(va, remotes=frozenset())})
    assert [a.op for a in plan_overlay(fewer, d)] == ["fdb_set"]
    other_vni = dataclasses.replace(d, vxlans=(d.vxlans - {va}) | {dataclasses.replace(va, vni=5)})
    assert [a.op for a in plan_overlay(other_vni, d)] == ["vxlan_delete", "vxlan_create", "fdb_set"]
    rekeyed = dataclasses.replace(d, conf=dataclasses.replace(d.conf, private_key=K[4]))  # type: ignore[type-var]
    assert [a.op for a in plan_overlay(rekeyed, d)] == ["wg_configure"]
    # a network leaves the overlay: its VXLAN goes; its tenant's table goes too
    only_b = desired_overlay(_spec(networks=[OverlayNetwork(NET_B, 200)]), CFG)
    ops = [(a.op, getattr(a.target, "vni", None)) for a in plan_overlay(d, only_b)]
    assert sorted(ops, key=str) == [("nft_delete", None), ("vxlan_delete", 100)]  # the host table is unchanged
    # teardown: everything goes, the WireGuard interface last
    down = [a.op for a in plan_overlay(d, OverlayState())]
    assert down[-1] == "wg_delete" and down.count("vxlan_delete") == 2 and down.count("nft_delete") == 3


def test_peer_change_rewrites_config_fdb_and_host_table() -> None:
    d = desired_overlay(_spec(), CFG)
    d2 = desired_overlay(_spec(peers=[OverlayPeer("h2", "192.0.2.2:51821", K[2])]), CFG)
    ops = [a.op for a in plan_overlay(d, d2)]
    assert sorted(ops) == sorted(["wg_configure", "nft_apply", "fdb_set", "fdb_set"])
    assert all(v.remotes == {IPv4Address(overlay_address("h2"))} for v in d2.vxlans)


def test_a_network_carried_by_some_hosts_only() -> None:
    s = _spec(networks=[OverlayNetwork(NET_A, 100), OverlayNetwork(NET_B, 200, frozenset({"h1", "h2"}))])
    d = desired_overlay(s, CFG)
    vb = next(v for v in d.vxlans if v.vni == 200)
    va = next(v for v in d.vxlans if v.vni == 100)
    assert vb.remotes == {overlay_address("h2")} and va.remotes == {overlay_address("h2"), overlay_address("h3")}
    host_t = next(t for t in d.tables if t.netns == "")
    rule = f"@th,96,24 200 ip saddr != {{ {overlay_address('h2')} }} counter name \"overlay_vni\" drop"
    assert rule in host_t.body and "@th,96,24 100" not in host_t.body
    assert host_t.body.index(rule) < host_t.body.index("udp dport 4789 accept")
    with pytest.raises(ConfigError, match="names host 'h9', which is not a peer"):
        _spec(networks=[OverlayNetwork(NET_A, 100, frozenset({"h9"}))])
