"""Cross-host tenant networks as values: the overlay spec, its validation, desired state and plan (pure).

Issue 18, "Networks" (docs/NETWORK.md, "Overlay"). Every host has one WireGuard interface in its host
namespace (the underlay socket and the tunnel), with one overlay IPv4 address per host; each tenant network
that spans hosts gets one VXLAN device (one VNI, RFC 7348) whose UDP socket lives in the host namespace
and whose device sits in the tenant's namespace on the network's bridge. VXLAN packets go to the peers'
overlay addresses, which are routed only through the WireGuard interface, so on the wire they are
WireGuard messages (authenticated and encrypted: WireGuard whitepaper §5, cryptokey routing §2 — a peer
may only send inner packets from its own overlay address).

    spec = make_overlay(host_id, underlay, private_key, peers, networks, local_nics=...)   # ConfigError
    desired = desired_overlay(spec, config)     # OverlayState
    plan_overlay(observed, desired)             # [Action], removals first

nftables (text, replaced atomically like `rules.py`):
- `inet <p>_ovl` in the host namespace: VXLAN's UDP port is accepted only from the WireGuard interface
  and only from peer overlay addresses, and a VNI only from the peers that carry that network
  (`overlay_vni`, when the network lists its hosts); a VXLAN datagram arriving on any other interface (plain VXLAN
  injected on the underlay) is dropped and counted (`underlay_vxlan`); nothing else from the overlay
  reaches the host (`overlay_other`) or is routed (`overlay_forward`); nothing addressed to the overlay
  pool leaves by any other interface (`cleartext_out`: a missing tunnel fails closed, never in clear).
- `bridge <p>_ovl` in each tenant namespace with overlay networks: frames from a VXLAN port may not claim
  a local NIC's MAC or the gateway's MAC or address, carry only IPv4/ARP/IPv6, no DHCP and no router
  advertisements (`ovl_in_*`); frames to a VXLAN port carry no DHCP and nothing from the gateway, which is
  local on every host (`ovl_out_*`). The per-NIC anti-spoofing guard (`rules.guard_table`) is untouched:
  a VM's frames are checked on its own host before they can reach the overlay.

Raises ConfigError (one sentence) for bad input and nothing else.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from bulkhead.errors import ConfigError
from bulkhead.network.model import Network, Nic
from bulkhead.network.rules import NftTable, repr_
from bulkhead.network.state import Action, HostConfig, bridge_mac

__all__ = [
    "DEFAULT_WG_PORT",
    "OVERLAY_POOL",
    "VXLAN_PORT",
    "OverlayNetwork",
    "OverlayPeer",
    "OverlaySpec",
    "OverlayState",
    "VxlanSpec",
    "WgConf",
    "WgLink",
    "desired_overlay",
    "make_overlay",
    "overlay_address",
    "overlay_tables",
    "parse_key",
    "plan_overlay",
    "vni_for",
    "vxlan_name",
    "wg_name",
]

DEFAULT_WG_PORT = 51820
VXLAN_PORT = 4789  # IANA (RFC 7348 §5)
OVERLAY_POOL = IPv4Network("100.126.0.0/16")
WG_OVERHEAD = 80  # outer IPv6 40 + UDP 8 + WireGuard data header 16 + tag 16 (whitepaper §5.4.6): 1500 -> 1420
VXLAN_OVERHEAD = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
MAX_VNI = (1 << 24) - 1
_HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
HOST_COUNTERS = ("underlay_vxlan", "overlay_vni", "overlay_other", "overlay_forward", "cleartext_out")
_VNI_BITS = (8 + 4) * 8  # the VNI: bytes 4-6 of the VXLAN header after the UDP header (RFC 7348 §5), in @th bits
TENANT_COUNTERS = ("ovl_in_mac", "ovl_in_proto", "ovl_in_dhcp", "ovl_in_gw", "ovl_in_nd", "ovl_out_dhcp", "ovl_out_gw")


def parse_key(key: str, what: str = "WireGuard key") -> bytes:
    """A WireGuard key (base64 of 32 bytes, `wg genkey` format) -> bytes. Raises ConfigError."""
    try:
        raw = base64.b64decode(key, validate=True) if isinstance(key, str) else b""
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ConfigError(f"{what} must be 44 characters of base64 (32 bytes), as `wg genkey` prints")
    return raw


def overlay_address(host_id: str, pool: IPv4Network = OVERLAY_POOL) -> IPv4Address:
    """The default overlay address of a host: a hash of its id into `pool` (never the network or
    broadcast address). Collisions among a fleet's hosts are refused by make_overlay."""
    n = int.from_bytes(hashlib.sha256(f"bulkhead-overlay\0{host_id}".encode()).digest()[:8], "big")
    return pool.network_address + 1 + n % (pool.num_addresses - 2)


def vni_for(network_id: str) -> int:
    """A deterministic default VNI (1..2^24-1) for a network id; the controller may allocate instead."""
    return 1 + int.from_bytes(hashlib.sha256(f"bulkhead-vni\0{network_id}".encode()).digest()[:4], "big") % MAX_VNI


def wg_name(config: HostConfig, host_id: str) -> str:
    """The WireGuard interface of a host: `<p>w<hash>` (unique per host, so the userspace daemons' control
    sockets /var/run/wireguard/<name>.sock of test hosts sharing one filesystem never collide)."""
    return f"{config.prefix}w{hashlib.sha256(('w' + host_id).encode()).hexdigest()[:14 - len(config.prefix)]}"


def vxlan_name(config: HostConfig, network_id: str) -> str:
    """The VXLAN device of a network: `<p>x<hash>` (not a name `host.reconcile` owns, so it leaves it)."""
    return f"{config.prefix}x{hashlib.sha256(('x' + network_id).encode()).hexdigest()[:14 - len(config.prefix)]}"


@dataclass(frozen=True)
class OverlayPeer:
    """Another host: its id, underlay endpoint "ip[:port]", WireGuard public key, optional overlay IP."""

    host_id: str
    endpoint: str
    public_key: str
    overlay_ip: str | None = None


@dataclass(frozen=True)
class OverlayNetwork:
    """A tenant network that spans hosts, its VXLAN network identifier, and the ids of the other hosts
    that carry it (None: every peer). Only those hosts get this network's frames, and VXLAN of this VNI
    from any other peer is dropped in the host table (`overlay_vni`): a peer host can reach only the
    tenant networks it carries itself."""

    network: Network
    vni: int
    hosts: frozenset[str] | None = None


@dataclass(frozen=True)
class ResolvedPeer:
    host_id: str
    ip: IPv4Address
    port: int
    public_key: str
    overlay_ip: IPv4Address


@dataclass(frozen=True)
class OverlaySpec:
    """A validated overlay for one host (build it with make_overlay)."""

    host_id: str
    underlay: IPv4Address
    private_key: str = field(repr=False)
    listen_port: int
    overlay_ip: IPv4Address
    pool: IPv4Network
    peers: tuple[ResolvedPeer, ...]
    networks: tuple[OverlayNetwork, ...]
    local_nics: tuple[Nic, ...]
    wg_mtu: int
    vxlan_mtu: int
    vxlan_port: int


def _endpoint(text: str, host: str) -> tuple[IPv4Address, int]:
    ip, _, port = text.partition(":") if isinstance(text, str) else ("", "", "")
    try:
        addr = IPv4Address(ip)
        num = int(port) if port else DEFAULT_WG_PORT
    except ValueError:
        raise ConfigError(f"endpoint {text!r} of host {host!r} is not an IPv4 address with an optional :port") from None
    if not 1 <= num <= 65535 or addr.is_unspecified or addr.is_multicast:
        raise ConfigError(f"endpoint {text!r} of host {host!r} is not a usable unicast address and port")
    return addr, num


def _overlay_ip(text: str | None, host: str, pool: IPv4Network) -> IPv4Address:
    if text is None:
        return overlay_address(host, pool)
    try:
        a = IPv4Address(text)
    except ValueError:
        raise ConfigError(f"overlay address {text!r} of host {host!r} is not an IPv4 address") from None
    if a not in pool or a in (pool.network_address, pool.broadcast_address):
        raise ConfigError(f"overlay address {a} of host {host!r} is not a host address of {pool}")
    return a


def make_overlay(host_id: str, underlay: str, private_key: str, peers: Iterable[OverlayPeer],
                 networks: Iterable[OverlayNetwork], *, local_nics: Iterable[Nic] = (),
                 listen_port: int = DEFAULT_WG_PORT, overlay_ip: str | None = None,
                 pool: IPv4Network = OVERLAY_POOL, underlay_mtu: int = 1500, vxlan_mtu: int = 1500,
                 vxlan_port: int = VXLAN_PORT) -> OverlaySpec:
    """Validate and build the overlay of host `host_id`.

    Host ids are 1-63 of letters, digits, '_', '.', '-' and unique; keys are WireGuard keys (base64 of 32
    bytes), public keys unique; overlay addresses (default `overlay_address(id)`)
    lie in `pool` and are unique (a hash collision names both hosts: set `overlay_ip`); VNIs are 1..2^24-1
    and unique, one per network, networks unique. A peer listed with our own host id is skipped (the agent
    may pass the whole fleet). The WireGuard MTU is underlay_mtu - 80; the VXLAN device keeps `vxlan_mtu`
    (1500: guests need no MTU change; larger inner packets are fragmented outside or answered with
    ICMP "fragmentation needed" by the kernel's bridged-tunnel PMTU check). Raises ConfigError.
    """
    if not isinstance(host_id, str) or not _HOST_RE.match(host_id):
        raise ConfigError("host id must be 1-63 characters of letters, digits, '_', '.' and '-'")
    own_ip, _ = _endpoint(underlay, host_id)
    parse_key(private_key, "private key")
    for what, port in (("listen port", listen_port), ("VXLAN port", vxlan_port)):
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise ConfigError(f"{what} must be 1 to 65535")
    if not isinstance(underlay_mtu, int) or not 1280 <= underlay_mtu <= 65535:
        raise ConfigError("underlay MTU must be 1280 to 65535")
    if not isinstance(vxlan_mtu, int) or not 576 <= vxlan_mtu <= 9000:
        raise ConfigError("VXLAN MTU must be 576 to 9000")
    me = _overlay_ip(overlay_ip, host_id, pool)
    seen_ip: dict[IPv4Address, str] = {me: host_id}
    seen_key: dict[str, str] = {}
    resolved: list[ResolvedPeer] = []
    for p in peers:
        if not isinstance(p, OverlayPeer):
            raise ConfigError("peers must be OverlayPeer values")
        if p.host_id == host_id:
            continue
        if not isinstance(p.host_id, str) or not _HOST_RE.match(p.host_id):
            raise ConfigError(f"peer host id {p.host_id!r} must be 1-63 characters of letters, digits, '_', '.' and '-'")
        if any(r.host_id == p.host_id for r in resolved):
            raise ConfigError(f"host {p.host_id!r} is listed twice")
        ip, port = _endpoint(p.endpoint, p.host_id)
        parse_key(p.public_key, f"public key of host {p.host_id!r}")
        if p.public_key in seen_key:
            raise ConfigError(f"hosts {seen_key[p.public_key]!r} and {p.host_id!r} have the same WireGuard key")
        seen_key[p.public_key] = p.host_id
        oip = _overlay_ip(p.overlay_ip, p.host_id, pool)
        if oip in seen_ip:
            raise ConfigError(f"hosts {seen_ip[oip]!r} and {p.host_id!r} have the same overlay address {oip}; "
                              "set overlay_ip for one of them")
        seen_ip[oip] = p.host_id
        resolved.append(ResolvedPeer(p.host_id, ip, port, p.public_key, oip))
    nets: list[OverlayNetwork] = []
    vnis: dict[int, str] = {}
    for on in networks:
        if not isinstance(on, OverlayNetwork) or not isinstance(on.network, Network):
            raise ConfigError("networks must be OverlayNetwork(network, vni) values")
        if not isinstance(on.vni, int) or isinstance(on.vni, bool) or not 1 <= on.vni <= MAX_VNI:
            raise ConfigError(f"VNI of network {on.network.id!r} must be 1 to {MAX_VNI}")
        if any(n.network.id == on.network.id for n in nets):
            raise ConfigError(f"network {on.network.id!r} is listed twice")
        if on.vni in vnis:
            raise ConfigError(f"networks {vnis[on.vni]!r} and {on.network.id!r} have the same VNI {on.vni}")
        vnis[on.vni] = on.network.id
        if on.hosts is not None:
            hosts = frozenset(on.hosts) - {host_id}
            unknown = sorted(hosts - {r.host_id for r in resolved})
            if unknown:
                raise ConfigError(f"network {on.network.id!r} names host {unknown[0]!r}, which is not a peer")
            on = OverlayNetwork(on.network, on.vni, hosts)
        nets.append(on)
    return OverlaySpec(host_id, own_ip, private_key, listen_port, me, pool,
                       tuple(sorted(resolved, key=lambda r: r.host_id)), tuple(sorted(nets, key=lambda n: n.network.id)),
                       tuple(local_nics), underlay_mtu - WG_OVERHEAD, vxlan_mtu, vxlan_port)


# --- desired state -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WgLink:
    """The WireGuard interface as a link (host namespace)."""

    name: str
    address: IPv4Interface
    mtu: int
    up: bool = True


@dataclass(frozen=True)
class WgConf:
    """The WireGuard interface's configuration (`wg show <if> dump` shape): peers are
    (public key, "ip:port", allowed IP) triples."""

    name: str
    listen_port: int
    private_key: str = field(repr=False)
    peers: frozenset[tuple[str, str, str]] = frozenset()


@dataclass(frozen=True)
class VxlanSpec:
    netns: str
    name: str
    vni: int
    local: IPv4Address
    port: int
    mtu: int
    bridge: str
    remotes: frozenset[IPv4Address] = frozenset()  # head-end replication: all-zero FDB entries


@dataclass(frozen=True)
class OverlayState:
    link: WgLink | None = None
    conf: WgConf | None = None
    vxlans: frozenset[VxlanSpec] = frozenset()
    tables: frozenset[NftTable] = frozenset()


def _digest_table(netns: str, family: str, name: str, counters: tuple[str, ...], body: str) -> NftTable:
    h = hashlib.sha256(f"{family}\0{name}\0{','.join(counters)}\0{body}".encode()).hexdigest()[:16]
    return NftTable(netns, family, name, h, counters, body)


def host_overlay_table(config: HostConfig, wg: str, peers: Iterable[IPv4Address], pool: IPv4Network,
                       vxlan_port: int, vni_peers: Mapping[int, Iterable[IPv4Address]] | None = None) -> NftTable:
    """`inet <p>_ovl` in the host namespace (see the module docstring). `vni_peers`: for a VNI, the only
    peers whose VXLAN of that VNI is accepted."""
    ips = sorted(peers)
    w = repr_(wg)
    accept = []
    for vni, allowed in sorted((vni_peers or {}).items()):
        a = sorted(allowed)
        cond = f"ip saddr != {{ {', '.join(str(i) for i in a)} }} " if a else ""
        accept.append(f'    iifname {w} udp dport {vxlan_port} @th,{_VNI_BITS},24 {vni} {cond}counter name "overlay_vni" drop')
    if ips:
        s = "{ " + ", ".join(str(i) for i in ips) + " }"
        accept += [f"    iifname {w} ip saddr {s} udp dport {vxlan_port} accept",
                   f"    iifname {w} ip saddr {s} icmp type {{ echo-request, echo-reply, destination-unreachable, "
                   "time-exceeded } accept"]
    body = "\n".join([
        "  chain input {", "    type filter hook input priority -20; policy accept;",
        f'    iifname != {w} udp dport {vxlan_port} counter name "underlay_vxlan" drop',
        *accept,
        f'    iifname {w} counter name "overlay_other" drop', "  }",
        "  chain forward {", "    type filter hook forward priority -20; policy accept;",
        f'    iifname {w} counter name "overlay_forward" drop',
        f'    oifname {w} counter name "overlay_forward" drop', "  }",
        "  chain output {", "    type filter hook output priority -20; policy accept;",
        f'    ip daddr {pool} oifname != {w} counter name "cleartext_out" drop', "  }"])
    return _digest_table("", "inet", f"{config.prefix}_ovl", HOST_COUNTERS, body)


def tenant_overlay_table(config: HostConfig, netns: str, vxlans: Iterable[tuple[str, Network]],
                         local_macs: Iterable[str]) -> NftTable:
    """`bridge <p>_ovl` in a tenant namespace for its (VXLAN device, network) pairs."""
    pairs = sorted(vxlans, key=lambda p: p[0])
    names = "{ " + ", ".join(repr_(v) for v, _ in pairs) + " }"
    gw_macs = sorted({bridge_mac(n.id) for _, n in pairs})
    gw_ips = sorted({str(n.gateway4) for _, n in pairs})
    claimed = "{ " + ", ".join(sorted(set(local_macs) | set(gw_macs))) + " }"
    c = {n: f'counter name "{n}"' for n in TENANT_COUNTERS}
    body = f"""  chain prerouting {{
    type filter hook prerouting priority -190; policy accept;
    iifname {names} jump from_overlay
  }}
  chain forward {{
    type filter hook forward priority -190; policy accept;
    oifname {names} jump to_overlay
  }}
  chain output {{
    type filter hook output priority -190; policy accept;
    oifname {names} jump to_overlay
  }}
  chain from_overlay {{
    ether saddr {claimed} {c['ovl_in_mac']} drop
    ether type != {{ ip, arp, ip6 }} {c['ovl_in_proto']} drop
    arp saddr ip {{ {', '.join(gw_ips)} }} {c['ovl_in_gw']} drop
    ip saddr {{ {', '.join(gw_ips)} }} {c['ovl_in_gw']} drop
    udp dport {{ 67, 68, 546, 547 }} {c['ovl_in_dhcp']} drop
    icmpv6 type {{ nd-router-advert, nd-redirect }} {c['ovl_in_nd']} drop
    accept
  }}
  chain to_overlay {{
    ether saddr {{ {', '.join(gw_macs)} }} {c['ovl_out_gw']} drop
    udp dport {{ 67, 68, 546, 547 }} {c['ovl_out_dhcp']} drop
    accept
  }}"""
    return _digest_table(netns, "bridge", f"{config.prefix}_ovl", TENANT_COUNTERS, body)


def overlay_tables(spec: OverlaySpec, config: HostConfig) -> frozenset[NftTable]:
    """The host table and one bridge table per tenant namespace with overlay networks."""
    limited = {on.vni: [p.overlay_ip for p in spec.peers if p.host_id in on.hosts]
               for on in spec.networks if on.hosts is not None}
    out = {host_overlay_table(config, wg_name(config, spec.host_id), (p.overlay_ip for p in spec.peers),
                              spec.pool, spec.vxlan_port, limited)}
    by_ns: dict[str, list[tuple[str, Network]]] = {}
    for on in spec.networks:
        by_ns.setdefault(config.netns(on.network.tenant), []).append((vxlan_name(config, on.network.id), on.network))
    for ns, pairs in by_ns.items():
        tenants = {n.tenant for _, n in pairs}
        macs = [nic.mac for nic in spec.local_nics if nic.tenant in tenants]
        out.add(tenant_overlay_table(config, ns, pairs, macs))
    return frozenset(out)


def desired_overlay(spec: OverlaySpec, config: HostConfig) -> OverlayState:
    """Everything that should exist on this host for `spec`."""
    wg = wg_name(config, spec.host_id)
    link = WgLink(wg, IPv4Interface(f"{spec.overlay_ip}/{spec.pool.prefixlen}"), spec.wg_mtu)
    conf = WgConf(wg, spec.listen_port, spec.private_key,
                  frozenset((p.public_key, f"{p.ip}:{p.port}", f"{p.overlay_ip}/32") for p in spec.peers))
    def remotes(on: OverlayNetwork) -> frozenset[IPv4Address]:
        return frozenset(p.overlay_ip for p in spec.peers if on.hosts is None or p.host_id in on.hosts)

    vx = frozenset(VxlanSpec(config.netns(on.network.tenant), vxlan_name(config, on.network.id), on.vni,
                             spec.overlay_ip, spec.vxlan_port, spec.vxlan_mtu, config.bridge(on.network.id),
                             remotes(on))
                   for on in spec.networks)
    names = [v.name for v in vx]
    if len(set(names)) != len(names):
        raise ConfigError("two overlay networks derive the same VXLAN device name; change one network id")
    return OverlayState(link, conf, vx, overlay_tables(spec, config))


def plan_overlay(observed: OverlayState, desired: OverlayState) -> list[Action]:
    """Actions that turn `observed` into `desired`: removals first (tables, VXLANs, the WireGuard
    interface), then creations (WireGuard interface, its configuration and address, host table, VXLANs,
    FDB entries, tenant tables). A VXLAN whose identity (VNI, local address, port, MTU) changed is
    re-created; one on the wrong bridge is re-attached; changed remotes rewrite its FDB."""
    acts: list[Action] = []
    want_tables = {(t.netns, t.family, t.name) for t in desired.tables}
    for t in sorted(observed.tables - desired.tables, key=lambda t: (t.netns, t.name)):
        if (t.netns, t.family, t.name) not in want_tables:
            acts.append(Action("nft_delete", t))
    want = {(v.netns, v.name): v for v in desired.vxlans}
    have = {(v.netns, v.name): v for v in observed.vxlans}
    for key, v in sorted(have.items()):
        w = want.get(key)
        if w is None or (w.vni, w.local, w.port, w.mtu) != (v.vni, v.local, v.port, v.mtu):
            acts.append(Action("vxlan_delete", v))
    wg_gone = observed.link is not None and (desired.link is None or observed.link.name != desired.link.name)
    if observed.link is not None and wg_gone:
        acts.append(Action("wg_delete", observed.link))
    if desired.link is not None and desired.conf is not None:
        if observed.link is None or wg_gone:
            acts.append(Action("wg_create", desired.link))
            acts.append(Action("wg_configure", desired.conf))
            acts.append(Action("wg_address", desired.link))
        else:
            if observed.conf != desired.conf:
                acts.append(Action("wg_configure", desired.conf))
            if observed.link != desired.link:
                acts.append(Action("wg_address", desired.link))
    for t in sorted(desired.tables - observed.tables, key=lambda t: (t.netns != "", t.netns, t.name)):
        if t.netns == "":
            acts.append(Action("nft_apply", t))
    for key, d in sorted(want.items()):
        cur = have.get(key)
        fresh = cur is None or (d.vni, d.local, d.port, d.mtu) != (cur.vni, cur.local, cur.port, cur.mtu)
        if fresh:
            acts.append(Action("vxlan_create", d))
        elif cur is not None and cur.bridge != d.bridge:
            acts.append(Action("vxlan_attach", d))
        if fresh or (cur is not None and cur.remotes != d.remotes):
            acts.append(Action("fdb_set", d))
    for t in sorted(desired.tables - observed.tables, key=lambda t: (t.netns, t.name)):
        if t.netns != "":
            acts.append(Action("nft_apply", t))
    return acts
