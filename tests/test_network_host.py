"""Tenant networks on real kernel parts (root): two tenants, two stand-in VMs each, attacks attempted.

A named namespace plays the host (so nothing here changes the real host's links, routes or rules) and an
"outside" namespace behind it plays the internet. Tenant A's network has egress; tenant B's has none and
uses the SAME IPv4 subnet, so a cross-tenant leak would be an on-link delivery, not a routing accident.
Stand-in VMs speak through the real tap fd a VMM would get (GuestStandIn, tap mode); sniffers (AF_PACKET)
in the stand-ins record every frame that arrives. Traffic only ever goes to addresses inside these
namespaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute
from pyroute2 import netns as pnetns

from bulkhead.network import host
from bulkhead.network.model import Network, Nic, attach_nic, link_local, make_network
from bulkhead.network.standin import GuestStandIn
from bulkhead.network.standin import sniffing as standin_sniffing
from bulkhead.network.state import HostConfig

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

OUTSIDE_IP, HOST_OUT_IP = "198.18.0.2", "198.18.0.1"

SEND = r"""
import socket, sys, subprocess
v4 = [a for a in sys.argv[1].split(",") if a]
v6 = [a for a in sys.argv[2].split(",") if a]
M = b"XT-" + sys.argv[3].encode()
def udp(fam, addr, port=7, bcast=False, mcast_if=None):
    s = socket.socket(fam, socket.SOCK_DGRAM)
    if bcast: s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    if mcast_if: s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(mcast_if))
    try: s.sendto(M + b"-udp", addr)
    except OSError as e: print("udp", addr, e)
    s.close()
def tcp(fam, addr):
    s = socket.socket(fam, socket.SOCK_STREAM); s.settimeout(0.7)
    try: s.connect(addr); print("TCP-CONNECTED", addr)
    except OSError: pass
    s.close()
for a in v4:
    udp(socket.AF_INET, (a, 7)); tcp(socket.AF_INET, (a, 7))
    r = subprocess.run(["busybox", "ping", "-c1", "-W1", a], capture_output=True)
    if r.returncode == 0: print("PING-OK", a)
udp(socket.AF_INET, ("255.255.255.255", 7), bcast=True)
udp(socket.AF_INET, (sys.argv[4], 7), bcast=True)
for g in ("239.1.2.3", "224.0.0.1"): udp(socket.AF_INET, (g, 7), mcast_if=sys.argv[5])
idx = socket.if_nametoindex("eth0")
for a in v6 + ["ff02::1"]:
    udp(socket.AF_INET6, (a, 7, 0, idx)); tcp(socket.AF_INET6, (a, 7, 0, idx))
    r = subprocess.run(["busybox", "ping", "-6", "-c1", "-W1", "-I", "eth0", a], capture_output=True)
    if r.returncode == 0 and a != "ff02::1": print("PING-OK", a)
"""


@dataclass
class World:
    cfg: HostConfig
    nets: list[Network]
    nics: list[Nic]
    g: list[GuestStandIn]  # A1, A2, B1, B2
    host_ns: str
    out_ns: str


def _snap(ns: str | None) -> dict[str, list[str]]:
    pre = ["nsenter", f"--net=/run/netns/{ns}", "--"] if ns else []
    out = {}
    for key, argv in (("link", ["ip", "-o", "link"]), ("netns", ["ip", "netns"]), ("nft", ["nft", "list", "ruleset"]),
                      ("addr", ["ip", "-o", "addr"]), ("route", ["ip", "route"])):
        r = subprocess.run(pre + argv, capture_output=True, text=True, timeout=30, check=False)
        # interface indices and veth peer suffixes differ harmlessly; keep names, flags and addresses
        out[key] = sorted(line.split(": ", 1)[-1] for line in r.stdout.splitlines())
    # `ip netns` lists the machine's namespaces whatever ns is: other tests (in the other pytest-xdist
    # process) add and remove theirs meanwhile, so only this test's own (named by its prefix) count
    prefix = (ns or "")[:3]
    out["netns"] = [n for n in out["netns"] if prefix and n.startswith(prefix)]
    return out


def _ns_cmd(ns: str, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "--", *argv], capture_output=True, text=True,
                          timeout=30, check=False, **kw)


@contextlib.contextmanager
def fake_host(prefix: str) -> Iterator[tuple[str, str]]:
    """A namespace that plays the host, with a veth to an 'outside' namespace (198.18.0.0/24)."""
    hns, ons = f"{prefix}host", f"{prefix}out"
    pnetns.create(hns)
    pnetns.create(ons)
    try:
        for ns in (hns, ons):
            for key in ("net.ipv6.conf.all.disable_ipv6", "net.ipv6.conf.default.disable_ipv6"):
                host._sysctl(ns, HostConfig(), key, "1")
        with IPRoute(netns=hns) as ipr:
            ipr.link("add", ifname="wan0", kind="veth", peer="wan1")
            ipr.link("set", index=ipr.link_lookup(ifname="wan1")[0], net_ns_fd=ons)
            i = ipr.link_lookup(ifname="wan0")[0]
            ipr.addr("add", index=i, address=HOST_OUT_IP, prefixlen=24)
            ipr.link("set", index=i, state="up")
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        with IPRoute(netns=ons) as ipr:
            i = ipr.link_lookup(ifname="wan1")[0]
            ipr.addr("add", index=i, address=OUTSIDE_IP, prefixlen=24)
            ipr.link("set", index=i, state="up")
        yield hns, ons
    finally:
        for ns in (hns, ons):
            with contextlib.suppress(Exception):
                pnetns.remove(ns)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    prefix = "q" + secrets.token_hex(1)
    real_before = _snap(None)
    with fake_host(prefix) as (hns, ons):
        cfg = HostConfig(prefix=prefix, state_dir=f"/run/bulkhead-test-{prefix}", host_netns=hns)
        fake_before = _snap(hns)
        stands: list[GuestStandIn] = []
        try:
            a = make_network("net-a", "tenant-a", "a", "10.0.0.0/24", "fd00:a::/64", egress=True)
            b = make_network("net-b", "tenant-b", "b", "10.0.0.0/24", "fd00:b::/64")
            nics: list[Nic] = []
            for vm, t, n, ip in (("a1", "tenant-a", a, None), ("a2", "tenant-a", a, None),
                                 ("b1", "tenant-b", b, "10.0.0.4"), ("b2", "tenant-b", b, "10.0.0.5")):
                nics.append(attach_nic(vm, t, 0, n, nics, ipv4=ip))
            host.reconcile([a, b], nics, cfg)
            for nic in nics:
                g = GuestStandIn(nic, a if nic.network_id == "net-a" else b, cfg)
                stands.append(g)
                g.open()
            yield World(cfg, [a, b], nics, stands, hns, ons)
        finally:
            for g in stands:
                g.close()
            host.teardown(cfg)
            fake_after = _snap(hns)
        assert fake_after == fake_before, "the host namespace is not as it was before the networks existed"
    real_after = _snap(None)
    for key in real_before:
        changed = set(real_before[key]) ^ set(real_after[key])
        assert not [line for line in changed if prefix in line], (key, changed)
    assert not os.path.exists(cfg.state_dir)


@contextlib.contextmanager
def sniffing(*guests: GuestStandIn, seconds: float = 60.0) -> Iterator[dict[str, list[bytes]]]:
    """Record every frame arriving at each guest's eth0 while the with-body runs."""
    with standin_sniffing({g.nic.vm_id: (g.netns, "eth0") for g in guests}, seconds) as seen:
        yield seen


def _mac(s: str) -> bytes:
    return bytes.fromhex(s.replace(":", ""))


def _from(frames: list[bytes], macs: set[bytes]) -> list[bytes]:
    return [f for f in frames if f[6:12] in macs]


# --- reachability and segmentation ----------------------------------------------------------------------

def test_same_network_reaches_ipv4_and_ipv6(world: World) -> None:
    a1, a2 = world.g[0], world.g[1]
    r = a1.run(["busybox", "ping", "-c1", "-W2", str(a2.nic.ipv4)])
    assert r.returncode == 0, r.stdout + r.stderr
    r = a1.run(["busybox", "ping", "-6", "-c1", "-W2", str(a2.nic.ipv6)])
    assert r.returncode == 0, r.stdout + r.stderr
    r = world.g[2].run(["busybox", "ping", "-c1", "-W2", str(world.g[3].nic.ipv4)])
    assert r.returncode == 0, r.stdout + r.stderr


def test_nothing_crosses_tenants(world: World) -> None:
    a1, a2, b1, b2 = world.g
    a_macs = {_mac(a1.nic.mac), _mac(a2.nic.mac)}
    b_v4 = f"{b1.nic.ipv4},{b2.nic.ipv4}"
    b_v6 = f"{link_local(b1.nic.mac)},{link_local(b2.nic.mac)},{b1.nic.ipv6}"
    with sniffing(a2, b1, b2) as seen:
        out = a1.run([sys.executable, "-c", SEND, b_v4 + f",{a2.nic.ipv4}", b_v6, "a1", "10.0.0.255",
                      str(a1.nic.ipv4)], timeout=60)
    assert out.returncode == 0, out.stderr
    assert "TCP-CONNECTED" not in out.stdout and "PING-OK 10.0.0.4" not in out.stdout, out.stdout
    assert "PING-OK fe80" not in out.stdout and "PING-OK fd00:b" not in out.stdout, out.stdout
    # positive control: the same sends reach A2 (unicast, broadcast, multicast, ARP, IPv6)
    got = _from(seen["a2"], {_mac(a1.nic.mac)})
    kinds = {f[12:14] for f in got}
    assert {b"\x08\x00", b"\x08\x06", b"\x86\xdd"} <= kinds, kinds
    markers = [f for f in got if b"XT-a1-udp" in f]
    assert any(f[:6] == b"\xff" * 6 for f in markers), "broadcast did not reach the same network"
    assert any(f[0] & 1 and f[:6] != b"\xff" * 6 for f in markers), "multicast did not reach the same network"
    for vm in ("b1", "b2"):
        leaked = _from(seen[vm], a_macs) + [f for f in seen[vm] if b"XT-a1" in f]
        assert not leaked, f"{vm} received {len(leaked)} frames from tenant A"
        assert seen[vm] == [] or all(f[6:12] not in a_macs for f in seen[vm])


def test_dhcp_serves_pinned_addresses_per_network(world: World, tmp_path: Path) -> None:
    script = tmp_path / "udhcpc.sh"
    script.write_text('#!/bin/sh\n[ "$1" = bound ] && echo "LEASE $ip $router $subnet $serverid"\nexit 0\n')
    script.chmod(0o755)
    for g, router in ((world.g[1], "10.0.0.1"), (world.g[3], "")):
        r = g.run(["busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-t", "4", "-T", "1", "-s", str(script)],
                  timeout=30)
        lease = [ln for ln in r.stdout.splitlines() if ln.startswith("LEASE")]
        assert lease, r.stdout + r.stderr
        parts = lease[0].split()
        assert parts[1] == str(g.nic.ipv4)
        assert parts[-1] == "10.0.0.1"
        assert (router in parts) if router else len(parts) == 4, parts  # no router without egress


# --- anti-spoofing ----------------------------------------------------------------------------------------

def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def udp4(src_mac: str, dst_mac: str, src: str, dst: str, payload: bytes, sport: int = 40000,
         dport: int = 7) -> bytes:
    u = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(u), 1, 0, 64, 17, 0, socket.inet_aton(src),
                     socket.inet_aton(dst))
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    return _mac(dst_mac) + _mac(src_mac) + b"\x08\x00" + ip + u


def arp(src_mac: str, sha: str, spa: str, tpa: str, op: int = 2, htype: int = 1) -> bytes:
    body = struct.pack("!HHBBH6s4s6s4s", htype, 0x0800, 6, 4, op, _mac(sha), socket.inet_aton(spa), b"\xff" * 6,
                       socket.inet_aton(tpa))
    return b"\xff" * 6 + _mac(src_mac) + b"\x08\x06" + body


def icmp6(src_mac: str, src: str, dst: str, icmp: bytes, dst_mac: bytes = b"\x33\x33\x00\x00\x00\x01") -> bytes:
    s, d = socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)
    pseudo = s + d + struct.pack("!I3xB", len(icmp), 58)
    icmp = icmp[:2] + struct.pack("!H", _csum(pseudo + icmp[:2] + b"\0\0" + icmp[4:])) + icmp[4:]
    ip6 = struct.pack("!IHBB", 6 << 28, len(icmp), 58, 255) + s + d
    return dst_mac + _mac(src_mac) + b"\x86\xdd" + ip6 + icmp


def na(target: str, lladdr: str) -> bytes:
    return struct.pack("!BBHI", 136, 0, 0, 0x20000000) + socket.inet_pton(socket.AF_INET6, target) + \
        b"\x02\x01" + _mac(lladdr)


def test_spoofed_frames_are_dropped_and_counted(world: World) -> None:
    a1, a2 = world.g[0], world.g[1]
    tap = world.cfg.tap("a1", 0)
    n1, n2 = a1.nic, a2.nic
    evil_mac = "02:66:66:66:66:66"
    ll1 = str(link_local(n1.mac))
    bad = {
        "mac": [udp4(evil_mac, n2.mac, str(n1.ipv4), str(n2.ipv4), b"SPOOF-mac")],
        "ip": [udp4(n1.mac, n2.mac, "10.0.0.77", str(n2.ipv4), b"SPOOF-ip4"),
               udp4(n1.mac, n2.mac, "10.0.0.1", str(n2.ipv4), b"SPOOF-gw"),
               icmp6(n1.mac, str(n2.ipv6), str(n2.ipv6), struct.pack("!BBHHH", 128, 0, 0, 1, 1) + b"SPOOF-ip6")],
        "arp": [arp(n1.mac, n1.mac, str(n2.ipv4), str(n2.ipv4)),      # claims A2's IP (ARP poisoning)
                arp(n1.mac, evil_mac, str(n1.ipv4), str(n2.ipv4)),    # sender MAC is not ours
                arp(n1.mac, n1.mac, str(n1.ipv4), str(n2.ipv4), htype=6)],
        "nd": [icmp6(n1.mac, ll1, "ff02::1", na(str(n2.ipv6), n1.mac)),  # claims A2's address
               icmp6(n1.mac, ll1, "ff02::1", na(str(n1.ipv6), evil_mac)),  # our target, someone else's MAC
               icmp6(n1.mac, ll1, "ff02::1", struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0))],  # RA
        "proto": [_mac(n2.mac) + _mac(n1.mac) + b"\x81\x00\x00\x05\x08\x00" + b"SPOOF-vlan".ljust(46, b"\0"),
                  _mac(n2.mac) + _mac(n1.mac) + b"\x88\xb5" + b"SPOOF-proto".ljust(46, b"\0"),
                  udp4(n1.mac, "ff:ff:ff:ff:ff:ff", str(n1.ipv4), "255.255.255.255", b"SPOOF-dhcpd", 67, 68)],
    }
    good = [udp4(n1.mac, n2.mac, str(n1.ipv4), str(n2.ipv4), b"GOOD-udp"),
            arp(n1.mac, n1.mac, str(n1.ipv4), str(n2.ipv4)),
            icmp6(n1.mac, ll1, "ff02::1", na(str(n1.ipv6), n1.mac))]
    before = host.read_counters(world.cfg, "tenant-a")
    with sniffing(a2) as seen:
        for frames in bad.values():
            for f in frames:
                a1.send_raw(f)
        for f in good:
            a1.send_raw(f)
    after = host.read_counters(world.cfg, "tenant-a")
    for reason, frames in bad.items():
        delta = after[f"{tap}_{reason}"][0] - before[f"{tap}_{reason}"][0]
        assert delta == len(frames), (reason, delta)
    frames = seen["a2"]
    for f in good:
        assert any(x[:len(f)] == f for x in frames), f"a good frame was dropped: {f[12:40].hex()}"
    for reason, bad_frames in bad.items():
        for f in bad_frames:
            assert not any(x[:len(f)] == f for x in frames), f"{reason} spoof reached A2: {f[12:40].hex()}"


DHCP_CLIENT = r"""
import os, socket, struct, sys, time
chaddr, htype, hlen = bytes.fromhex(sys.argv[1].replace(":", "")), int(sys.argv[2]), int(sys.argv[3])
xid = int.from_bytes(os.urandom(4), "big")
# RFC 2131 §2 (Figure 1): op htype hlen hops xid secs flags ciaddr yiaddr siaddr giaddr chaddr sname file
bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, htype, hlen, 0, xid, 0, 0x8000, bytes(4), bytes(4),
                    bytes(4), bytes(4), chaddr.ljust(16, b"\0"), bytes(64), bytes(128))
msg = bootp + b"\x63\x82\x53\x63" + b"\x35\x01\x01" + b"\xff"  # magic cookie, DHCPDISCOVER, end
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
s.bind(("0.0.0.0", 68))
s.settimeout(0.5)
end = time.time() + float(sys.argv[4])
while time.time() < end:
    s.sendto(msg, ("255.255.255.255", 67))
    try:
        data, _ = s.recvfrom(4096)
    except socket.timeout:
        continue
    if len(data) >= 240 and data[0] == 2 and int.from_bytes(data[4:8], "big") == xid:
        print("OFFER", socket.inet_ntoa(data[16:20]), data[28:34].hex(), flush=True)
        break
else:
    print("NO-OFFER", flush=True)
"""


def test_dhcp_is_pinned_to_the_ports_own_mac(world: World) -> None:
    """Issue 12, hole 4: a DHCP discover from A1's port carrying A2's MAC in BOOTP chaddr (RFC 2131 §2) was
    offered A2's address. Now the guard drops it (and a wrong htype/hlen) as `<tap>_dhcp-chaddr`; the
    same client with its own MAC is offered its own pinned address."""
    a1, a2 = world.g[0], world.g[1]
    tap = world.cfg.tap("a1", 0)
    counter = f"{tap}_dhcp-chaddr"

    def discover(chaddr: str, htype: int = 1, hlen: int = 6, seconds: float = 3) -> tuple[list[str], int]:
        before = host.read_counters(world.cfg, "tenant-a")[counter][0]
        r = a1.run([sys.executable, "-c", DHCP_CLIENT, chaddr, str(htype), str(hlen), str(seconds)], timeout=30)
        assert r.returncode == 0, r.stderr
        return r.stdout.split(), host.read_counters(world.cfg, "tenant-a")[counter][0] - before

    out, dropped = discover(a2.nic.mac)  # the attack: another NIC's lease
    assert out == ["NO-OFFER"] and dropped >= 1, (out, dropped)
    out, dropped = discover(a1.nic.mac, htype=6)  # own MAC, but not declared as Ethernet
    assert out == ["NO-OFFER"] and dropped >= 1, (out, dropped)
    # raw frames on the tap: a BOOTP header cut short, and a first fragment (chaddr could follow later)
    short = udp4(a1.nic.mac, "ff:ff:ff:ff:ff:ff", str(a1.nic.ipv4), "255.255.255.255", bytes(40), 68, 67)
    frag = bytearray(udp4(a1.nic.mac, "ff:ff:ff:ff:ff:ff", str(a1.nic.ipv4), "255.255.255.255", bytes(16), 68, 67))
    frag[20:22] = b"\x20\x00"  # IPv4 flags: more fragments, offset 0
    frag[24:26] = b"\0\0"
    frag[24:26] = struct.pack("!H", _csum(bytes(frag[14:34])))
    before = host.read_counters(world.cfg, "tenant-a")[counter][0]
    a1.send_raw(short)
    a1.send_raw(bytes(frag))
    assert host.read_counters(world.cfg, "tenant-a")[counter][0] - before == 2
    out, dropped = discover(a1.nic.mac, seconds=10)  # positive control: the port's own MAC
    assert out == ["OFFER", str(a1.nic.ipv4), a1.nic.mac.replace(":", "")] and dropped == 0, (out, dropped)


def test_a_vm_cannot_reach_host_addresses(world: World) -> None:
    a1 = world.g[0]
    up = next(iter(host.observe(world.cfg).uplinks))
    before_t = host.read_counters(world.cfg, "tenant-a")
    before_h = host.read_counters(world.cfg)
    targets = [str(world.nets[0].gateway4), str(up.inner_addr.ip), str(up.outer_addr.ip), HOST_OUT_IP]
    for t in targets:
        r = a1.run(["busybox", "ping", "-c1", "-W1", t])
        assert r.returncode != 0, f"VM reached host address {t}"
        r = a1.run([sys.executable, "-c", "import socket,sys; s=socket.create_connection((sys.argv[1], 22), 1)", t])
        assert r.returncode != 0, f"VM connected to host address {t}"
    after_t = host.read_counters(world.cfg, "tenant-a")
    after_h = host.read_counters(world.cfg)
    assert after_t["to_host"][0] - before_t["to_host"][0] >= 4  # gateway and tenant-side uplink address
    assert after_h["to_host"][0] - before_h["to_host"][0] >= 4  # host-side uplink and the host's WAN address
    # no egress network: not even a route out
    assert world.g[2].run(["busybox", "ping", "-c1", "-W1", OUTSIDE_IP]).returncode != 0


def test_egress_reaches_outside_masqueraded(world: World) -> None:
    a1 = world.g[0]
    srv = subprocess.Popen(["nsenter", f"--net=/run/netns/{world.out_ns}", "--", sys.executable, "-c",
                            "import socket; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1);"
                            "s.bind(('198.18.0.2', 8080)); s.listen(); print('ready', flush=True);"
                            "c, a = s.accept(); print(a[0], flush=True); c.sendall(b'hi'); c.close()"],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        r = a1.run([sys.executable, "-c", "import socket; s=socket.create_connection(('198.18.0.2', 8080), 3);"
                    "print(s.recv(2).decode())"])
        assert r.stdout.strip() == "hi", r.stderr
        assert srv.stdout.readline().strip() == HOST_OUT_IP  # the outside sees the host, not the VM
    finally:
        srv.kill()
        srv.wait()


# --- lifecycle: reconcile, restart, deletion ---------------------------------------------------------------

def _cmdline(pid: int) -> bytes:
    """The process's /proc cmdline; empty once it exited (zombie) or vanished."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return b""


def _wait_until(pred: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return False


def _tenant_links(cfg: HostConfig, tenant: str) -> set[str]:
    r = _ns_cmd(cfg.netns(tenant), ["ip", "-o", "link"])
    return {line.split(": ")[1].split("@")[0] for line in r.stdout.splitlines()}


def test_reconcile_is_idempotent_and_repairs_damage(world: World) -> None:
    cfg = world.cfg
    assert host.reconcile(world.nets, world.nics, cfg) == []
    ns_a = cfg.netns("tenant-a")
    # damage: a rule table dropped, a stray tap, a bridge gone (taps fall off), dnsmasq killed
    _ns_cmd(ns_a, ["nft", "delete", "table", "bridge", f"{cfg.prefix}_guard"])
    _ns_cmd(ns_a, ["ip", "tuntap", "add", "dev", f"{cfg.prefix}nstray", "mode", "tap"])
    _ns_cmd(cfg.netns("tenant-b"), ["ip", "link", "del", cfg.bridge("net-b")])
    pid = int(Path(cfg.state_dir, cfg.bridge("net-a") + ".pid").read_text())
    os.kill(pid, 9)
    assert _wait_until(lambda: not _cmdline(pid)), "dnsmasq did not die"  # what reconcile checks
    ops = sorted(str(a) for a in host.reconcile(world.nets, world.nics, cfg))
    assert f"tap_delete {cfg.prefix}nstray" in ops and f"bridge_create {cfg.bridge('net-b')}" in ops
    assert f"dhcp_start {cfg.bridge('net-a')}" in ops and f"nft_apply {cfg.prefix}_guard" in ops
    assert {f"tap_attach {cfg.tap('b1', 0)}", f"tap_attach {cfg.tap('b2', 0)}"} <= set(ops)
    assert host.reconcile(world.nets, world.nics, cfg) == []
    assert f"{cfg.prefix}nstray" not in _tenant_links(cfg, "tenant-a")
    r = world.g[2].run(["busybox", "ping", "-c1", "-W2", str(world.g[3].nic.ipv4)])
    assert r.returncode == 0, "B's VMs lost their network after the repair"


def test_counters_survive_a_rule_refresh(world: World) -> None:
    cfg = world.cfg
    a1 = world.g[0]
    tap = cfg.tap("a1", 0)
    a1.send_raw(udp4("02:66:66:66:66:67", a1.nic.mac, "10.0.0.99", "10.0.0.2", b"x"))
    before = host.read_counters(cfg, "tenant-a")[f"{tap}_mac"][0]
    assert before >= 1
    extra = attach_nic("a3", "tenant-a", 0, world.nets[0], world.nics)
    ops = [str(a) for a in host.reconcile(world.nets, [*world.nics, extra], cfg)]
    assert f"nft_apply {cfg.prefix}_guard" in ops and f"dhcp_reload {cfg.bridge('net-a')}" in ops
    assert host.read_counters(cfg, "tenant-a")[f"{tap}_mac"][0] == before
    hosts = Path(cfg.state_dir, cfg.bridge("net-a") + ".hosts").read_text()
    assert f"{extra.mac},{extra.ipv4}" in hosts
    host.reconcile(world.nets, world.nics, cfg)
    assert extra.mac not in Path(cfg.state_dir, cfg.bridge("net-a") + ".hosts").read_text()


def test_deleting_a_vm_nic_and_a_network_leaves_nothing(world: World) -> None:
    """Runs last: removes B2's NIC, then all of tenant B."""
    cfg = world.cfg
    b1, b2 = world.g[2], world.g[3]
    b2.close()  # the VM stops: its tap vanishes with the fd
    assert cfg.tap("b2", 0) not in _tenant_links(cfg, "tenant-b")
    nics = [n for n in world.nics if n.vm_id != "b2"]
    host.reconcile(world.nets, nics, cfg)
    ruleset = _ns_cmd(cfg.netns("tenant-b"), ["nft", "list", "ruleset"]).stdout
    assert cfg.tap("b2", 0) not in ruleset and cfg.tap("b1", 0) in ruleset
    assert b2.nic.mac not in Path(cfg.state_dir, cfg.bridge("net-b") + ".hosts").read_text()
    b1.close()
    nics = [n for n in nics if n.tenant != "tenant-b"]
    ops = [str(a) for a in host.reconcile(world.nets[:1], nics, cfg)]
    assert ops == [f"dhcp_stop {cfg.bridge('net-b')}", f"netns_delete {cfg.netns('tenant-b')}"]
    assert not os.path.exists(f"/run/netns/{cfg.netns('tenant-b')}")
    assert not Path(cfg.state_dir, cfg.bridge("net-b") + ".pid").exists()
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert cfg.bridge("net-b") not in ps
    world.nets[:] = world.nets[:1]
    world.nics[:] = nics


HOST_SELF = r"""
import json, subprocess, sys
from bulkhead.network import host
from bulkhead.network.model import attach_nic, make_network
from bulkhead.network.state import HostConfig
cfg = HostConfig(prefix=sys.argv[1], state_dir="/run/bulkhead-test-" + sys.argv[1])  # host = our own netns
net = make_network("n-self", "t-self", "s", "10.9.0.0/24", egress=True)
nic = attach_nic("vm-self", "t-self", 0, net, [])
out = {}
try:
    host.reconcile([net], [nic], cfg)
    out["again"] = [str(a) for a in host.reconcile([net], [nic], cfg)]
    out["links"] = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
    out["nft"] = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    out["fwd"] = open("/proc/sys/net/ipv4/ip_forward").read().strip()
finally:
    host.teardown(cfg)
out["links_after"] = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
out["nft_after"] = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
print(json.dumps(out))
"""


def test_the_daemons_own_namespace_as_host() -> None:
    """host_netns=None (what the daemon uses): run in a private, unnamed namespace so the real host is
    untouched; the uplink's host end and the host table appear there and go with teardown."""
    prefix = "s" + secrets.token_hex(1)
    r = subprocess.run(["unshare", "--net", "--", sys.executable, "-c", HOST_SELF, prefix], capture_output=True,
                       text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    cfg = HostConfig(prefix=prefix)
    outer = cfg.uplink("t-self")[1]
    assert out["again"] == []
    assert any(outer in line and "inet 100.127." in line for line in out["links"].splitlines()), out["links"]
    assert f"table inet {prefix}_host" in out["nft"] and out["fwd"] == "1"
    assert outer not in out["links_after"] and prefix not in out["nft_after"]
    assert not os.path.exists(f"/run/netns/{cfg.netns('t-self')}")
