"""Cross-host tenant networks on real kernel parts (root): three namespace "hosts" on one underlay bridge.

Each host is a named network namespace with a veth to a test "switch" namespace (the underlay,
198.19.7.0/24) and its own HostConfig prefix (so its tenant namespaces do not collide with the other
hosts' in the shared /run/netns). The overlay is the real thing: wireguard-go (these machines have no
WireGuard module) + wg from wireguard-tools, VXLAN devices whose sockets live in the host namespace,
the single-host guard rules, and the overlay's nftables tables (docs/NETWORK.md, "Overlay").
Tenant A (VNI 100) and tenant B (VNI 200) use the SAME subnet. Every attack is attempted:
plain VXLAN injected on the underlay, a MAC/IP spoof by a VM, a frame claiming a remote VM's MAC sent by
an authenticated peer host; each with a positive control that shows the attack packet is well formed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from bulkhead.errors import HostError
from bulkhead.network import host, overlay
from bulkhead.network.model import Network, Nic, attach_nic, make_network
from bulkhead.network.overlay_model import OverlayNetwork, OverlayPeer, OverlaySpec, make_overlay, wg_name
from bulkhead.network.standin import GuestStandIn, sniffing
from bulkhead.network.state import HostConfig

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

if os.geteuid() != 0 or not all(os.path.exists(p) for p in ("/usr/bin/wg", "/usr/bin/wireguard-go")):
    pytest.skip("needs root, wireguard-go and wireguard-tools (install.sh installs them)", allow_module_level=True)

UNDERLAY = "198.19.7.{}"
ATTACKER = UNDERLAY.format(66)
VNI_A, VNI_B = 100, 200

SEND_UDP = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
for dst in sys.argv[2:]:
    s.sendto(sys.argv[1].encode(), (dst, 7))
"""

SEND_RAW_UDP = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(bytes.fromhex(sys.argv[3]), (sys.argv[1], int(sys.argv[2])))
"""


@dataclass
class HostBox:
    name: str  # host id
    netns: str  # the namespace playing the host
    cfg: HostConfig
    underlay: str
    priv: str
    pub: str
    nics: list[Nic]
    spec: OverlaySpec | None = None


@dataclass
class Fleet:
    hosts: list[HostBox]
    nets: list[Network]
    g: dict[str, GuestStandIn]  # vm id -> stand-in
    switch: str
    attacker: str


def _sh(ns: str | None, *argv: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    pre = ["nsenter", f"--net=/run/netns/{ns}", "--"] if ns else []
    r = subprocess.run([*pre, *argv], capture_output=True, text=True, timeout=60, check=False, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{argv}: {r.stderr}")
    return r


def _snap(ns: str) -> dict[str, list[str]]:
    out = {}
    for key, argv in (("link", ["ip", "-o", "link"]), ("addr", ["ip", "-o", "addr"]),
                      ("route", ["ip", "route"]), ("nft", ["nft", "list", "ruleset"])):
        # an IPv6 link-local address may still be "tentative" (DAD) in the first snapshot
        out[key] = sorted(ln.split(": ", 1)[-1].replace(" tentative", "") for ln in _sh(ns, *argv).stdout.splitlines())
    return out


B_HOSTS = frozenset({"host-1", "host-2"})  # tenant B's network is carried by hosts 1 and 2 only


def _carried(h: HostBox, nets: list[Network]) -> list[Network]:
    return [n for n in nets if n.tenant == "tenant-a" or h.name in B_HOSTS]


def _overlay_spec(h: HostBox, hosts: list[HostBox], nets: list[Network]) -> OverlaySpec:
    peers = [OverlayPeer(o.name, f"{o.underlay}:51820", o.pub) for o in hosts]
    ovn = [OverlayNetwork(n, VNI_A) if n.tenant == "tenant-a" else OverlayNetwork(n, VNI_B, B_HOSTS)
           for n in _carried(h, nets)]
    return make_overlay(h.name, h.underlay, h.priv, peers, ovn, local_nics=h.nics)


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    tag = secrets.token_hex(1)
    sw, atk = f"o{tag}sw", f"o{tag}atk"
    nss = [sw, atk] + [f"o{tag}h{i}" for i in (1, 2, 3)]
    for ns in nss:
        host.netns_create(ns)
    stands: dict[str, GuestStandIn] = {}
    hosts: list[HostBox] = []
    before: dict[str, dict[str, list[str]]] = {}
    try:
        _sh(sw, "ip", "link", "add", "br0", "type", "bridge")
        _sh(sw, "ip", "link", "set", "br0", "up")
        for i, ns in [(66, atk), (1, nss[2]), (2, nss[3]), (3, nss[4])]:
            _sh(sw, "ip", "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _sh(sw, "ip", "link", "set", f"p{i}", "master", "br0", "up")
            _sh(ns, "ip", "addr", "add", f"{UNDERLAY.format(i)}/24", "dev", "eth0")
            _sh(ns, "ip", "link", "set", "eth0", "up")
            _sh(ns, "ip", "link", "set", "lo", "up")
        a = make_network("net-a", "tenant-a", "a", "10.20.0.0/24")
        b = make_network("net-b", "tenant-b", "b", "10.20.0.0/24")  # the same subnet
        nics: list[Nic] = []
        placement = {"a1": (1, a), "a2": (2, a), "a3": (3, a), "b1": (1, b), "b2": (2, b)}
        # fleet-wide IPAM is the controller's job; B's addresses are not A's, so a reply would be a leak
        for vm, (_, net) in placement.items():
            nics.append(attach_nic(vm, net.tenant, 0, net, nics, ipv4={"b1": "10.20.0.20", "b2": "10.20.0.21"}.get(vm)))
        for i in (1, 2, 3):
            ns = nss[i + 1]
            before[ns] = _snap(ns)
            priv, pub = overlay.generate_keypair()
            cfg = HostConfig(prefix=f"o{tag}{i}", state_dir=f"/run/bulkhead-test-o{tag}{i}", host_netns=ns)
            local = [n for n in nics if placement[n.vm_id][0] == i]
            hosts.append(HostBox(f"host-{i}", ns, cfg, UNDERLAY.format(i), priv, pub, local))
        for h in hosts:
            host.reconcile(_carried(h, [a, b]), h.nics, h.cfg)
            h.spec = _overlay_spec(h, hosts, [a, b])
            overlay.reconcile(h.spec, h.cfg)
        for h in hosts:
            for nic in h.nics:
                mode = "tap" if nic.vm_id == "a1" else "veth"  # a1 speaks through a real tap fd, as a VMM does
                g = GuestStandIn(nic, a if nic.network_id == "net-a" else b, h.cfg, mode=mode)
                stands[nic.vm_id] = g
                g.open()
        yield Fleet(hosts, [a, b], stands, sw, atk)
    finally:
        for g in stands.values():
            g.close()
        for h in hosts:
            with contextlib.suppress(Exception):
                overlay.teardown(h.cfg)
            with contextlib.suppress(Exception):
                host.teardown(h.cfg)
        after = {h.netns: _snap(h.netns) for h in hosts}
        for ns in nss:
            host.netns_remove(ns)
    for h in hosts:
        assert after[h.netns] == before[h.netns], f"{h.name}'s namespace is not as it was before the overlay"
        assert overlay._userspace_pid(wg_name(h.cfg, h.name), h.cfg) is None
        assert not os.path.exists(f"{overlay.WG_RUN_DIR}/{wg_name(h.cfg, h.name)}.sock")
        assert not [n for n in os.listdir("/run/netns") if n.startswith(h.cfg.prefix)]
        assert not os.path.exists(h.cfg.state_dir)


def _guest(f: Fleet, vm: str) -> tuple[str, str]:
    return f.g[vm].netns, "eth0"


def _with(frames: list[bytes], marker: bytes) -> list[bytes]:
    return [x for x in frames if marker in x]


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _frame(src_mac: str, src_ip: str, payload: bytes, dst_mac: str = "ff:ff:ff:ff:ff:ff",
           dst_ip: str = "10.20.0.255") -> bytes:
    """An Ethernet + IPv4 + UDP (port 7) frame."""
    udp = struct.pack("!HHHH", 40000, 7, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                     socket.inet_aton(src_ip), socket.inet_aton(dst_ip))
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    return bytes.fromhex(dst_mac.replace(":", "") + src_mac.replace(":", "")) + b"\x08\x00" + ip + udp


def _vxlan(vni: int, frame: bytes) -> bytes:
    """RFC 7348 §5: flags (I bit), 24 reserved bits, VNI, 8 reserved bits, then the inner frame."""
    return struct.pack("!B3xI", 0x08, vni << 8) + frame


# --- bring-up -------------------------------------------------------------------------------------------

def test_overlay_is_up_and_reconcile_is_idempotent(fleet: Fleet) -> None:
    for h in fleet.hosts:
        assert h.spec is not None
        assert overlay.reconcile(h.spec, h.cfg) == []
        st = overlay.status(h.cfg)
        assert st["backend"] == "userspace"  # no WireGuard module on these machines
        assert st["interface"] == wg_name(h.cfg, h.name) and st["overlay_ip"] == str(h.spec.overlay_ip)
        assert set(st["peers"]) == {o.pub for o in fleet.hosts if o is not h}
    # damage: a VXLAN device deleted, the host table deleted, an FDB entry gone -> repaired, then []
    h = fleet.hosts[1]
    assert h.spec is not None
    vx = f"{h.cfg.prefix}x"
    tenant_ns = h.cfg.netns("tenant-b")
    name = next(ln.split(": ")[1].split("@")[0] for ln in _sh(tenant_ns, "ip", "-o", "link").stdout.splitlines()
                if ln.split(": ")[1].startswith(vx))
    _sh(tenant_ns, "ip", "link", "del", name)
    _sh(h.netns, "nft", "delete", "table", "inet", f"{h.cfg.prefix}_ovl")
    ops = [str(a) for a in overlay.reconcile(h.spec, h.cfg)]
    assert f"vxlan_create {name}" in ops and f"nft_apply {h.cfg.prefix}_ovl" in ops, ops
    assert overlay.reconcile(h.spec, h.cfg) == []


# --- reachability and segmentation ----------------------------------------------------------------------

def test_a_vm_reaches_its_network_on_the_other_hosts(fleet: Fleet) -> None:
    a1 = fleet.g["a1"]
    for vm in ("a2", "a3"):
        r = a1.run(["busybox", "ping", "-c2", "-W3", str(fleet.g[vm].nic.ipv4)], timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr
    r = fleet.g["b1"].run(["busybox", "ping", "-c2", "-W3", str(fleet.g["b2"].nic.ipv4)], timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_underlay_carries_only_wireguard(fleet: Fleet) -> None:
    marker = b"CLEARTEXT-" + secrets.token_hex(8).encode()
    with sniffing({"wire": (fleet.switch, "p1")}) as seen:  # host 1's port on the underlay switch
        fleet.g["a1"].run([sys.executable, "-c", SEND_UDP, marker.decode(), str(fleet.g["a2"].nic.ipv4),
                           "10.20.0.255"])
        time.sleep(0.5)
    wire = seen["wire"]
    assert wire, "nothing crossed the underlay"
    assert not _with(wire, marker), "a tenant payload crossed the underlay in clear"
    udp = [x for x in wire if x[12:14] == b"\x08\x00" and x[23] == 17]
    dports = {struct.unpack("!H", x[14 + (x[14] & 0xF) * 4 + 2:][:2])[0] for x in udp}
    assert 4789 not in dports and 51820 in dports, dports


def test_tenant_b_cannot_reach_tenant_a_across_hosts(fleet: Fleet) -> None:
    marker = b"B-TO-A-" + secrets.token_hex(6).encode()
    with sniffing({"a2": _guest(fleet, "a2"), "a3": _guest(fleet, "a3"), "b2": _guest(fleet, "b2")}) as seen:
        r = fleet.g["b1"].run(["busybox", "ping", "-c1", "-W2", str(fleet.g["a2"].nic.ipv4)], timeout=30)
        fleet.g["b1"].run([sys.executable, "-c", SEND_UDP, marker.decode(), str(fleet.g["a2"].nic.ipv4),
                           str(fleet.g["a3"].nic.ipv4), "10.20.0.255"])
    assert r.returncode != 0, "tenant B pinged tenant A's address across hosts"
    b1_mac = bytes.fromhex(fleet.g["b1"].nic.mac.replace(":", ""))
    for vm in ("a2", "a3"):
        assert not _with(seen[vm], marker) and not [x for x in seen[vm] if x[6:12] == b1_mac], vm
    assert _with(seen["b2"], marker), "control: B's broadcast did not reach B on the other host"


# --- attacks ------------------------------------------------------------------------------------------

def _inject(fleet: Fleet, dst: str, marker: bytes) -> None:
    frame = _frame("02:66:66:66:66:66", "10.20.0.66", marker)
    _sh(fleet.attacker, sys.executable, "-c", SEND_RAW_UDP, dst, "4789", _vxlan(VNI_A, frame).hex())


def test_plain_vxlan_injected_on_the_underlay_is_not_delivered(fleet: Fleet) -> None:
    h2 = fleet.hosts[1]
    assert h2.spec is not None
    # the attacker routes the overlay pool to host 2 so it can also aim at host 2's overlay address
    _sh(fleet.attacker, "ip", "route", "replace", str(h2.spec.pool), "via", h2.underlay)
    table = f"{h2.cfg.prefix}_ovl"
    before = overlay.read_counters(h2.cfg)["underlay_vxlan"][0]
    m1, m2 = (b"INJECT-" + secrets.token_hex(6).encode() for _ in range(2))
    with sniffing({"a2": _guest(fleet, "a2")}) as seen:
        _inject(fleet, h2.underlay, m1)
        _inject(fleet, str(h2.spec.overlay_ip), m2)
    assert not _with(seen["a2"], m1) and not _with(seen["a2"], m2), "plain VXLAN from the underlay was delivered"
    assert overlay.read_counters(h2.cfg)["underlay_vxlan"][0] >= before + 2
    # positive control: without the overlay table the very same datagram IS delivered (the attack is real)
    _sh(h2.netns, "nft", "delete", "table", "inet", table)
    try:
        m3 = b"INJECT-" + secrets.token_hex(6).encode()
        with sniffing({"a2": _guest(fleet, "a2")}) as seen:
            _inject(fleet, h2.underlay, m3)
        assert _with(seen["a2"], m3), "control: the injected frame is not well formed"
    finally:
        ops = [str(a) for a in overlay.reconcile(h2.spec, h2.cfg)]
    assert ops == [f"nft_apply {table}"], ops
    m4 = b"INJECT-" + secrets.token_hex(6).encode()
    with sniffing({"a2": _guest(fleet, "a2")}) as seen:
        _inject(fleet, h2.underlay, m4)
    assert not _with(seen["a2"], m4)


def test_spoofed_mac_and_ip_do_not_cross_the_overlay(fleet: Fleet) -> None:
    a1, a2 = fleet.g["a1"], fleet.g["a2"]
    h1 = fleet.hosts[0]
    good, bad_mac, bad_ip = (b"SPOOF-" + secrets.token_hex(6).encode() for _ in range(3))
    guard0 = host.read_counters(h1.cfg, "tenant-a")
    tap = h1.cfg.tap("a1", 0)
    with sniffing({"a2": _guest(fleet, "a2"), "a3": _guest(fleet, "a3")}) as seen:
        a1.send_raw(_frame(a1.nic.mac, str(a1.nic.ipv4), good))  # control: the well-formed frame
        a1.send_raw(_frame("02:99:99:99:99:99", str(a1.nic.ipv4), bad_mac))
        a1.send_raw(_frame(a1.nic.mac, str(a2.nic.ipv4), bad_ip))
        a1.send_raw(_frame(a2.nic.mac, str(a2.nic.ipv4), bad_ip))  # impersonating the remote VM
    for vm in ("a2", "a3"):
        assert _with(seen[vm], good), f"control: the well-formed frame did not reach {vm}"
        assert not _with(seen[vm], bad_mac) and not _with(seen[vm], bad_ip), vm
    guard1 = host.read_counters(h1.cfg, "tenant-a")
    assert guard1[f"{tap}_mac"][0] >= guard0[f"{tap}_mac"][0] + 2
    assert guard1[f"{tap}_ip"][0] >= guard0[f"{tap}_ip"][0] + 1


def test_a_peer_host_cannot_claim_a_remote_vms_mac_or_the_gateway(fleet: Fleet) -> None:
    """Host 3 is an authenticated WireGuard peer gone bad: it sends VXLAN to host 2 through the tunnel
    with frames claiming host 2's VM, and the gateway. Host 2 drops them (ovl_in_mac / ovl_in_gw)."""
    h2, h3 = fleet.hosts[1], fleet.hosts[2]
    assert h2.spec is not None
    a2 = fleet.g["a2"]
    gw = str(fleet.nets[0].gateway4)
    c0 = overlay.read_counters(h2.cfg, "tenant-a")
    ok, claim, gwip = (b"PEER-" + secrets.token_hex(6).encode() for _ in range(3))
    frames = [(_frame("02:77:77:77:77:77", "10.20.0.77", ok), ok),
              (_frame(a2.nic.mac, "10.20.0.77", claim), claim),
              (_frame("02:77:77:77:77:78", gw, gwip), gwip)]
    with sniffing({"a2": _guest(fleet, "a2")}) as seen:
        for fr, _ in frames:
            _sh(h3.netns, sys.executable, "-c", SEND_RAW_UDP, str(h2.spec.overlay_ip), "4789", _vxlan(VNI_A, fr).hex())
    assert _with(seen["a2"], ok), "control: a well-formed frame from a peer host was not delivered"
    assert not _with(seen["a2"], claim) and not _with(seen["a2"], gwip)
    c1 = overlay.read_counters(h2.cfg, "tenant-a")
    assert c1["ovl_in_mac"][0] >= c0["ovl_in_mac"][0] + 1
    assert c1["ovl_in_gw"][0] >= c0["ovl_in_gw"][0] + 1


def test_dhcp_and_the_gateway_stay_local(fleet: Fleet, tmp_path: Any) -> None:
    """Every host answers DHCP for its own VMs; a VM's DHCP request never reaches another host."""
    script = tmp_path / "udhcpc.sh"
    script.write_text('#!/bin/sh\n[ "$1" = bound ] && echo "LEASE $ip $serverid"\nexit 0\n')
    script.chmod(0o755)
    h1 = fleet.hosts[0]
    c0 = overlay.read_counters(h1.cfg, "tenant-a")
    a3 = fleet.g["a3"]
    with sniffing({"a2": _guest(fleet, "a2")}) as seen:
        r = a3.run(["busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-t", "3", "-T", "1", "-s", str(script)],
                   timeout=30)
    lease = [ln for ln in r.stdout.splitlines() if ln.startswith("LEASE")]
    assert lease and lease[0].split()[1] == str(a3.nic.ipv4), r.stdout + r.stderr
    a3_mac = bytes.fromhex(a3.nic.mac.replace(":", ""))
    dhcp = [x for x in seen["a2"] if x[6:12] == a3_mac and x[12:14] == b"\x08\x00" and x[23] == 17]
    assert not dhcp, "a DHCP request crossed the overlay"
    del c0


def test_a_peer_host_cannot_reach_a_network_it_does_not_carry(fleet: Fleet) -> None:
    """Host 3 is a WireGuard peer but does not carry tenant B's network: its VXLAN with B's VNI is
    dropped by host 2 (overlay_vni); the same datagram from host 1, which carries B, is delivered."""
    h1, h2, h3 = fleet.hosts
    assert h2.spec is not None
    b2 = fleet.g["b2"]
    c0 = overlay.read_counters(h2.cfg)["overlay_vni"][0]
    m_h3, m_h1 = (b"VNI-" + secrets.token_hex(6).encode() for _ in range(2))
    with sniffing({"b2": _guest(fleet, "b2")}) as seen:
        for ns, m in ((h3.netns, m_h3), (h1.netns, m_h1)):
            fr = _frame("02:55:55:55:55:55", "10.20.0.55", m)
            _sh(ns, sys.executable, "-c", SEND_RAW_UDP, str(h2.spec.overlay_ip), "4789", _vxlan(VNI_B, fr).hex())
    assert not _with(seen["b2"], m_h3), "a host that does not carry the network injected into it"
    assert _with(seen["b2"], m_h1), "control: the carrying host's frame was not delivered"
    assert overlay.read_counters(h2.cfg)["overlay_vni"][0] >= c0 + 1
    assert b2.nic.network_id == "net-b"


def test_an_overlay_before_its_networks_is_a_clear_error(fleet: Fleet) -> None:
    """Host 3 does not carry tenant B: an overlay spec that names B there fails with one sentence and
    leaves no VXLAN device behind; the host's own spec still reconciles to nothing."""
    h3 = fleet.hosts[2]
    assert h3.spec is not None
    wrong = make_overlay(h3.name, h3.underlay, h3.priv, [OverlayPeer(o.name, o.underlay, o.pub) for o in fleet.hosts],
                         [OverlayNetwork(fleet.nets[0], VNI_A), OverlayNetwork(fleet.nets[1], VNI_B)],
                         local_nics=h3.nics)
    with pytest.raises(HostError, match=r"does not exist: reconcile the tenant networks \(host.reconcile\) before"):
        overlay.reconcile(wrong, h3.cfg)
    assert f"{h3.cfg.prefix}x" not in _sh(h3.netns, "ip", "-o", "link").stdout
    assert [str(a) for a in overlay.reconcile(h3.spec, h3.cfg)] == []
