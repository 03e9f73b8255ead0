"""nftables rulesets as text, generated from networks and NICs (pure).

Three tables, each replaced atomically as a whole (`nft -f`: declare, delete, define in one transaction):

- `bridge <p>_guard` in each tenant namespace: anti-spoofing per NIC, hooked at bridge prerouting so it
  sees every frame a VM sends, whether it is forwarded to another port or delivered to the bridge itself.
  Per NIC (its tap is the input port): source MAC pinned; only IPv4, ARP and IPv6 ethertypes (no VLAN
  tags, no other protocols); IPv4 source pinned (0.0.0.0 only for a DHCP discover/request to port 67);
  ARP hardware type Ethernet, sender MAC and sender IP pinned (0.0.0.0 allowed for probes); IPv6 source
  pinned to the NIC's address or its EUI-64 link-local (:: only for DAD neighbour solicitations and MLD
  reports); neighbour advertisements may only claim the NIC's own addresses, and a source/target
  link-layer option must carry the NIC's MAC; no router advertisements or redirects, and no DHCP/DHCPv6
  server traffic from VMs. A frame from one of our taps that has no NIC chain is dropped. Every drop is
  counted in a named counter `<tap>_<reason>` (reasons: mac, ip, arp, nd, proto, dhcp-chaddr) readable
  with `nft -j list counters`. DHCP is pinned to the port: a request to a DHCP server (UDP port 67) must
  carry the NIC's own MAC in BOOTP `chaddr` with htype Ethernet and hlen 6 (RFC 2131 §2: the server
  identifies the client by chaddr, so another NIC's MAC there would be offered that NIC's lease), and must
  hold a whole BOOTP header in one unfragmented datagram (the bridge does not reassemble, so chaddr could
  otherwise hide in a later fragment); anything else is dropped as `dhcp-chaddr`.
- `inet <p>_tenant` in each tenant namespace: nothing reaches the namespace itself except DHCP on a
  network's bridge; forwarding only from egress-enabled networks out through the uplink (masqueraded),
  plus replies; networks of one tenant do not route to each other.
- `inet <p>_host` in the host namespace: nothing arriving on an uplink reaches the host's own addresses;
  no forwarding between uplinks (tenants); nothing new into an uplink; tenant traffic leaving the host
  is masqueraded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv6Address

from bulkhead.network.model import Network, Nic, link_local

__all__ = ["DROP_REASONS", "NftTable", "guard_table", "host_table", "render", "tenant_table"]

DROP_REASONS = ("mac", "ip", "arp", "nd", "proto", "dhcp-chaddr")

# BOOTP (RFC 951 §3; RFC 2131 §2, Figure 1) fields inside a UDP datagram, as nft raw-payload offsets in bits
# from the transport header (@th): UDP header 8 bytes, then op(1) htype(1) hlen(1) hops(1) xid(4) secs(2)
# flags(2) ciaddr giaddr yiaddr siaddr (4 each), chaddr(16) at byte 28, sname(64), file(128)
_BOOTP_HTYPE_HLEN = (8 + 1) * 8  # 16 bits: htype 1 (Ethernet, RFC 1700 "ARP hardware"), hlen 6
_BOOTP_CHADDR = (8 + 28) * 8  # the first hlen=6 bytes of chaddr: the client's MAC
_BOOTP_MIN_UDP_LEN = 8 + 236  # UDP header + the fixed BOOTP header up to and including `file`


@dataclass(frozen=True)
class NftTable:
    """One nftables table: where it lives ("" = the host namespace), its identity and its content.

    Equality is by (netns, family, name, digest): the digest covers counters and body, and is stored in
    the live table as an empty chain `digest_<16 hex>` so the observed state can be compared."""

    netns: str
    family: str
    name: str
    digest: str
    counters: tuple[str, ...] = field(default=(), compare=False)
    body: str = field(default="", compare=False)


def _table(netns: str, family: str, name: str, counters: Sequence[str], body: str) -> NftTable:
    h = hashlib.sha256(f"{family}\0{name}\0{','.join(counters)}\0{body}".encode()).hexdigest()[:16]
    return NftTable(netns, family, name, h, tuple(counters), body)


def render(t: NftTable, values: Mapping[str, tuple[int, int]] | None = None) -> str:
    """The `nft -f` script that atomically replaces table t; counters start at `values` (carried over
    from the table being replaced) or zero."""
    vals = values or {}
    out = [f"table {t.family} {t.name}", f"delete table {t.family} {t.name}", f"table {t.family} {t.name} {{"]
    for c in t.counters:
        p, b = vals.get(c, (0, 0))
        out.append(f"  counter {c} {{ packets {int(p)} bytes {int(b)} }}")
    out.append(f"  chain digest_{t.digest} {{\n  }}")
    out.append(t.body.rstrip("\n"))
    out.append("}")
    return "\n".join(out) + "\n"


def _mac_hex(mac: str) -> str:
    return "0x" + mac.replace(":", "")


def _ip6_hex(a: IPv6Address) -> str:
    return f"0x{int(a):032x}"


def _nic_chain(tap: str, nic: Nic) -> str:
    mac, ip4 = nic.mac, nic.ipv4
    ll = link_local(mac)
    own6: list[IPv6Address] = [ll] + ([nic.ipv6] if nic.ipv6 is not None else [])
    set6 = "{ " + ", ".join(str(a) for a in own6) + " }"
    na_target = " ".join(f"@th,64,128 != {_ip6_hex(a)}" for a in own6)
    c = {r: f'counter name "{tap}_{r}"' for r in DROP_REASONS}
    return f"""
  chain nic_{tap} {{
    ether saddr != {mac} {c['mac']} drop
    ether type arp jump arp_{tap}
    ether type ip jump ip4_{tap}
    ether type ip6 jump ip6_{tap}
    {c['proto']} drop
  }}
  chain arp_{tap} {{
    arp htype != 1 {c['arp']} drop
    arp ptype != ip {c['arp']} drop
    arp hlen != 6 {c['arp']} drop
    arp plen != 4 {c['arp']} drop
    arp saddr ether != {mac} {c['arp']} drop
    arp saddr ip != {{ 0.0.0.0, {ip4} }} {c['arp']} drop
    accept
  }}
  chain ip4_{tap} {{
    udp dport 67 ip frag-off & 0x2000 != 0 {c['dhcp-chaddr']} drop
    udp dport 67 udp length < {_BOOTP_MIN_UDP_LEN} {c['dhcp-chaddr']} drop
    udp dport 67 @th,{_BOOTP_HTYPE_HLEN},16 != 0x0106 {c['dhcp-chaddr']} drop
    udp dport 67 @th,{_BOOTP_CHADDR},48 != {_mac_hex(mac)} {c['dhcp-chaddr']} drop
    ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept
    ip saddr != {ip4} {c['ip']} drop
    udp sport 67 {c['proto']} drop
    accept
  }}
  chain ip6_{tap} {{
    ip6 saddr :: icmpv6 type {{ nd-neighbor-solicit, mld2-listener-report, mld-listener-report }} jump nd_{tap}
    ip6 saddr != {set6} {c['ip']} drop
    icmpv6 type {{ nd-router-advert, nd-redirect }} {c['nd']} drop
    udp sport 547 {c['proto']} drop
    icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} jump nd_{tap}
    accept
  }}
  chain nd_{tap} {{
    icmpv6 type nd-neighbor-advert {na_target} {c['nd']} drop
    icmpv6 type nd-neighbor-advert @th,192,16 0x0201 @th,208,48 != {_mac_hex(mac)} {c['nd']} drop
    icmpv6 type nd-neighbor-solicit @th,192,16 0x0101 @th,208,48 != {_mac_hex(mac)} {c['nd']} drop
    accept
  }}"""


def guard_table(netns: str, prefix: str, taps: Iterable[tuple[str, Nic]]) -> NftTable:
    """The tenant namespace's bridge-family anti-spoofing table for (tap name, NIC) pairs."""
    pairs = sorted(taps, key=lambda p: p[0])
    counters = [f"{tap}_{r}" for tap, _ in pairs for r in DROP_REASONS] + ["unknown_port"]
    lines = ["  chain prerouting {", "    type filter hook prerouting priority -200; policy accept;"]
    if pairs:
        vmap = ", ".join(f'"{tap}" : jump nic_{tap}' for tap, _ in pairs)
        lines.append(f"    iifname vmap {{ {vmap} }}")
    lines.append(f'    iifname "{prefix}n*" counter name "unknown_port" drop')
    lines.append("  }")
    body = "\n".join(lines) + "".join(_nic_chain(tap, nic) for tap, nic in pairs)
    return _table(netns, "bridge", f"{prefix}_guard", counters, body)


def tenant_table(netns: str, prefix: str, bridges: Iterable[tuple[str, Network]], uplink: str | None) -> NftTable:
    """The tenant namespace's inet table: DHCP to each bridge only; egress networks out via `uplink`."""
    pairs = sorted(bridges, key=lambda p: p[0])
    brs = [b for b, _ in pairs]
    egress = [b for b, n in pairs if n.egress and uplink]
    lines = ["  chain input {", "    type filter hook input priority 0; policy drop;", '    iif "lo" accept']
    if brs:
        lines.append(f"    iifname {{ {', '.join(repr_(b) for b in brs)} }} udp dport 67 accept")
    lines += ['    counter name "to_host" drop', "  }", "  chain forward {",
              "    type filter hook forward priority 0; policy drop;"]
    if uplink and egress:
        lines.append(f'    iifname "{uplink}" ct state established,related accept')
        lines.append(f"    iifname {{ {', '.join(repr_(b) for b in egress)} }} oifname \"{uplink}\" accept")
    lines += ['    counter name "forward" drop', "  }", "  chain output {",
              "    type filter hook output priority 0; policy accept;", "  }"]
    if uplink and egress:
        lines += ["  chain postrouting {", "    type nat hook postrouting priority 100; policy accept;",
                  f'    oifname "{uplink}" masquerade', "  }"]
    return _table(netns, "inet", f"{prefix}_tenant", ["to_host", "forward"], "\n".join(lines))


def host_table(prefix: str, outer: Sequence[str], pool: str) -> NftTable:
    """The host namespace's table for the uplinks `outer` (host-side veth names) from `pool`."""
    names = "{ " + ", ".join(repr_(o) for o in sorted(outer)) + " }"
    body = f"""  chain input {{
    type filter hook input priority -10; policy accept;
    iifname {names} counter name "to_host" drop
  }}
  chain forward {{
    type filter hook forward priority -10; policy accept;
    iifname {names} oifname {names} counter name "cross_tenant" drop
    oifname {names} ct state established,related accept
    oifname {names} counter name "inbound" drop
  }}
  chain postrouting {{
    type nat hook postrouting priority 100; policy accept;
    ip saddr {pool} oifname != {names} masquerade
  }}"""
    return _table("", "inet", f"{prefix}_host", ["to_host", "cross_tenant", "inbound"], body)


def repr_(name: str) -> str:
    """An interface name as an nft string literal (our names are [a-z0-9-], checked by the caller)."""
    return f'"{name}"'

