"""The host state that should exist, as data, and the plan that turns observed state into it (pure).

`desired_state(networks, nics, config)` says which namespaces, bridges, taps, uplinks, nftables tables
and DHCP servers should exist; `plan(observed, desired)` lists the actions (in a safe order) that make
the observed state equal to the desired one. `bulkhead.network.host` observes the host and executes a
plan; both ends use the same `HostState` shape, so reconcile is a diff that is tested without root.

Names are derived from ids by hashing (interface names have at most 15 bytes) under a short prefix
(default "bh") that marks everything bulkhead owns: reconcile removes objects with the prefix that are
not desired and never touches anything else.

    tenant namespace   <p>-<12 hex of tenant>         bridge   <p>b<hex of network id>
    tap                <p>n<hex of vm id/index>       uplink   <p>u<hex of tenant> (tenant side),
                                                               <p>h<hex of tenant> (host side)
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Interface, IPv4Network

from bulkhead.errors import ConfigError
from bulkhead.network.model import Network, Nic
from bulkhead.network.rules import NftTable, guard_table, host_table, tenant_table

__all__ = [
    "Action",
    "BridgeSpec",
    "DhcpSpec",
    "HostConfig",
    "HostState",
    "TapSpec",
    "UplinkSpec",
    "bridge_mac",
    "desired_state",
    "dhcp_paths",
    "digest",
    "dnsmasq_config",
    "plan",
]

DEFAULT_UPLINK_POOL = IPv4Network("100.127.0.0/16")
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,3}$")


@dataclass(frozen=True)
class HostConfig:
    """Where and how networks are realised.

    prefix: 1-4 of a-z0-9 (starting with a letter), marks every object bulkhead owns.
    state_dir: dnsmasq configs, host files, leases, pid files.
    uplink_pool: addresses for the tenant<->host veth pairs (a /31 per tenant with egress); tenant
    subnets may not overlap it. host_netns: a named namespace that plays the host (tests, benchmarks),
    or None for the daemon's own namespace.
    """

    prefix: str = "bh"
    state_dir: str = "/run/bulkhead/network"
    uplink_pool: IPv4Network = DEFAULT_UPLINK_POOL
    host_netns: str | None = None

    def __post_init__(self) -> None:
        if not _PREFIX_RE.match(self.prefix):
            raise ConfigError(f"network prefix {self.prefix!r} must be 1-4 of a-z, 0-9, starting with a letter")
        if self.uplink_pool.prefixlen > 30:
            raise ConfigError(f"uplink pool {self.uplink_pool} is too small (at most /30)")

    def _h(self, value: str, width: int) -> str:
        return hashlib.sha256(value.encode()).hexdigest()[:width]

    def netns(self, tenant: str) -> str:
        return f"{self.prefix}-{self._h('t' + tenant, 12)}"

    def bridge(self, network_id: str) -> str:
        return f"{self.prefix}b{self._h('n' + network_id, 14 - len(self.prefix))}"

    def tap(self, vm_id: str, index: int) -> str:
        return f"{self.prefix}n{self._h(f'v{vm_id}/{index}', 14 - len(self.prefix))}"

    def uplink(self, tenant: str) -> tuple[str, str]:
        h = self._h("u" + tenant, 14 - len(self.prefix))
        return f"{self.prefix}u{h}", f"{self.prefix}h{h}"

    def owns_link(self, name: str) -> bool:
        return name.startswith(self.prefix) and name[len(self.prefix):len(self.prefix) + 1] in ("b", "n", "u", "h")

    def owns_netns(self, name: str) -> bool:
        return re.fullmatch(re.escape(self.prefix) + r"-[0-9a-f]{12}", name) is not None


@dataclass(frozen=True)
class BridgeSpec:
    netns: str
    name: str
    mac: str
    address: IPv4Interface
    network_id: str = field(default="", compare=False)


@dataclass(frozen=True)
class TapSpec:
    netns: str
    name: str
    bridge: str
    nic_key: str = field(default="", compare=False)


@dataclass(frozen=True)
class UplinkSpec:
    netns: str
    inner: str
    outer: str
    inner_addr: IPv4Interface
    outer_addr: IPv4Interface


@dataclass(frozen=True)
class DhcpSpec:
    """A dnsmasq for one network. Equality by config digest; `hosts` (static leases) can change without a
    restart (SIGHUP re-reads them), so it is compared separately."""

    netns: str
    network_id: str
    bridge: str
    digest: str
    hosts_digest: str = field(compare=False)
    config: str = field(default="", compare=False)
    hosts: str = field(default="", compare=False)


@dataclass(frozen=True)
class HostState:
    namespaces: frozenset[str] = frozenset()
    forwarding: frozenset[str] = frozenset()  # namespaces ("" = host) where IPv4 forwarding must be on
    bridges: frozenset[BridgeSpec] = frozenset()
    taps: frozenset[TapSpec] = frozenset()
    uplinks: frozenset[UplinkSpec] = frozenset()
    tables: frozenset[NftTable] = frozenset()
    dhcp: frozenset[DhcpSpec] = frozenset()


@dataclass(frozen=True)
class Action:
    op: str
    target: object
    detail: object = None

    def __str__(self) -> str:
        t = self.target
        name = getattr(t, "name", None) or getattr(t, "bridge", None) or getattr(t, "inner", None) or t
        return f"{self.op} {name}"


def digest(text: str) -> str:
    """16 hex digits of SHA-256: content identity for configs and rulesets."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def dnsmasq_config(net: Network, bridge: str, paths: dict[str, str]) -> str:
    """dnsmasq options for one network: DHCPv4 on `bridge` only, static leases only, no DNS."""
    lines = [
        "port=0", "no-resolv", "no-hosts", "no-poll", "bind-interfaces", f"interface={bridge}",
        "except-interface=lo", f"listen-address={net.gateway4}", "dhcp-authoritative", "dhcp-no-override",
        f"dhcp-range={net.ipv4.network_address},static,{net.ipv4.netmask},12h",
        f"dhcp-hostsfile={paths['hosts']}", f"dhcp-leasefile={paths['leases']}", f"pid-file={paths['pid']}",
        f"log-facility={paths['log']}", "user=nobody", "group=nogroup",
        "dhcp-option=option:dns-server", "dhcp-option=option:domain-search",
    ]
    lines.append(f"dhcp-option=option:router,{net.gateway4}" if net.egress else "dhcp-option=option:router")
    return "\n".join(lines) + "\n"


def dhcp_paths(config: HostConfig, network_id: str) -> dict[str, str]:
    base = f"{config.state_dir}/{config.bridge(network_id)}"
    return {k: f"{base}.{k}" for k in ("conf", "hosts", "leases", "pid", "log")}


def bridge_mac(network_id: str) -> str:
    """The MAC of a network's bridge (the gateway): the same on every host, so the gateway is local
    everywhere (the overlay keeps it off VXLAN: docs/NETWORK.md, "Overlay")."""
    h = hashlib.sha256(f"bulkhead-bridge\0{network_id}".encode()).digest()
    return ":".join(f"{b:02x}" for b in ((h[0] & 0xFC) | 0x02, *h[1:6]))


def desired_state(networks: Iterable[Network], nics: Iterable[Nic], config: HostConfig) -> HostState:
    """Everything that should exist on the host for these networks and NICs.

    Raises ConfigError if a NIC names a network that is not given or of another tenant, or if two
    objects would get the same interface name (a hash collision: change one id)."""
    nets = {n.id: n for n in networks}
    nic_list = list(nics)
    by_tenant: dict[str, list[Network]] = {}
    for n in nets.values():
        by_tenant.setdefault(n.tenant, []).append(n)
    namespaces, forwarding = set(), set()
    bridges, taps, uplinks, tables, dhcp = set(), set(), set(), set(), set()
    seen: dict[str, str] = {}

    def claim(name: str, owner: str) -> str:
        if seen.setdefault(name, owner) != owner:
            raise ConfigError(f"interface name {name} is derived for both {seen[name]} and {owner}")
        return name

    uplink_index = _uplink_indices([t for t, ns in by_tenant.items() if any(n.egress for n in ns)], config)
    outer_names: list[str] = []
    for tenant, tnets in sorted(by_tenant.items()):
        ns = config.netns(tenant)
        namespaces.add(ns)
        brs: list[tuple[str, Network]] = []
        for net in sorted(tnets, key=lambda n: n.id):
            br = claim(config.bridge(net.id), f"network {net.id}")
            brs.append((br, net))
            bridges.add(BridgeSpec(ns, br, bridge_mac(net.id), IPv4Interface(f"{net.gateway4}/{net.ipv4.prefixlen}"),
                                   net.id))
            paths = dhcp_paths(config, net.id)
            conf = dnsmasq_config(net, br, paths)
            hosts = "".join(f"{c.mac},{c.ipv4}\n" for c in sorted(nic_list, key=lambda c: c.key)
                            if c.network_id == net.id)
            dhcp.add(DhcpSpec(ns, net.id, br, digest(conf), digest(hosts), conf, hosts))
        uplink_name: str | None = None
        if tenant in uplink_index:
            inner, outer = config.uplink(tenant)
            claim(inner, f"tenant {tenant}")
            claim(outer, f"tenant {tenant}")
            base = int(config.uplink_pool.network_address) + 4 * uplink_index[tenant]
            uplinks.add(UplinkSpec(ns, inner, outer, IPv4Interface(f"{_ip(base + 2)}/30"),
                                   IPv4Interface(f"{_ip(base + 1)}/30")))
            uplink_name = inner
            outer_names.append(outer)
            forwarding.add(ns)
        tenant_taps: list[tuple[str, Nic]] = []
        for nic in nic_list:
            net_of = nets.get(nic.network_id)
            if net_of is None or net_of.tenant != tenant:
                continue
            tap = claim(config.tap(nic.vm_id, nic.index), f"NIC {nic.key}")
            taps.add(TapSpec(ns, tap, config.bridge(nic.network_id), nic.key))
            tenant_taps.append((tap, nic))
        tables.add(guard_table(ns, config.prefix, tenant_taps))
        tables.add(tenant_table(ns, config.prefix, brs, uplink_name))
    for nic in nic_list:
        owner = nets.get(nic.network_id)
        if owner is None or owner.tenant != nic.tenant:
            raise ConfigError(f"NIC {nic.key} refers to network {nic.network_id!r}, which does not exist")
    if outer_names:
        tables.add(host_table(config.prefix, outer_names, str(config.uplink_pool)))
        forwarding.add("")
    return HostState(frozenset(namespaces), frozenset(forwarding), frozenset(bridges), frozenset(taps),
                     frozenset(uplinks), frozenset(tables), frozenset(dhcp))


def _ip(n: int) -> str:
    return ".".join(str((n >> s) & 0xFF) for s in (24, 16, 8, 0))


def _uplink_indices(tenants: list[str], config: HostConfig) -> dict[str, int]:
    """A stable /30 slot per tenant: its hash, probing upward on collision (in tenant id order)."""
    slots = config.uplink_pool.num_addresses // 4
    used: dict[int, str] = {}
    out: dict[str, int] = {}
    for t in sorted(tenants):
        i = int(hashlib.sha256(("slot" + t).encode()).hexdigest(), 16) % slots
        for _ in range(slots):
            if i not in used:
                break
            i = (i + 1) % slots
        else:
            raise ConfigError(f"uplink pool {config.uplink_pool} is full")
        used[i] = t
        out[t] = i
    return out


def plan(observed: HostState, desired: HostState) -> list[Action]:
    """Actions that turn `observed` into `desired`, removals first (innermost first), then creations
    (outermost first). Taps are never created here (the daemon creates them when a VM starts); a desired
    tap that exists but hangs off the wrong bridge (or none) is re-attached."""
    acts: list[Action] = []
    gone_ns = observed.namespaces - desired.namespaces
    # removals
    for d in sorted(observed.dhcp - desired.dhcp, key=lambda d: d.bridge):
        acts.append(Action("dhcp_stop", d))
    for t in sorted(observed.tables - desired.tables, key=lambda t: (t.netns, t.name)):
        if t.netns not in gone_ns and not _replaced(t, desired.tables):
            acts.append(Action("nft_delete", t))
    want_taps = {(t.netns, t.name) for t in desired.taps}
    for tp in sorted(observed.taps, key=lambda t: t.name):
        if tp.netns not in gone_ns and (tp.netns, tp.name) not in want_taps:
            acts.append(Action("tap_delete", tp))
    for u in sorted(observed.uplinks - desired.uplinks, key=lambda u: u.inner):
        # also when the namespace goes: the kernel destroys a dead namespace's veths asynchronously, and
        # the host-side end must be gone when teardown returns
        acts.append(Action("uplink_delete", u))
    for b in sorted(observed.bridges - desired.bridges, key=lambda b: b.name):
        if b.netns not in gone_ns:
            acts.append(Action("bridge_delete", b))
    for ns in sorted(gone_ns):
        acts.append(Action("netns_delete", ns))
    # creations
    for ns in sorted(desired.namespaces - observed.namespaces):
        acts.append(Action("netns_create", ns))
    for ns in sorted(desired.forwarding ^ observed.forwarding):
        if ns == "" and ns not in desired.forwarding:
            continue  # never switch the host's forwarding off: someone else may need it
        if ns in desired.namespaces or ns == "":
            acts.append(Action("forwarding", ns, ns in desired.forwarding))
    new_bridges = desired.bridges - observed.bridges
    for b in sorted(new_bridges, key=lambda b: b.name):
        acts.append(Action("bridge_create", b))
    for u in sorted(desired.uplinks - observed.uplinks, key=lambda u: u.inner):
        acts.append(Action("uplink_create", u))
    for t in sorted(desired.tables - observed.tables, key=lambda t: (t.netns, t.name)):
        acts.append(Action("nft_apply", t))
    obs_dhcp = {(d.netns, d.network_id): d for d in observed.dhcp}
    for d in sorted(desired.dhcp, key=lambda d: d.bridge):
        old = obs_dhcp.get((d.netns, d.network_id))
        if old is None or old != d or any(b.name == d.bridge for b in new_bridges):
            acts.append(Action("dhcp_start", d))
        elif old.hosts_digest != d.hosts_digest:
            acts.append(Action("dhcp_reload", d))
    have = {(t.netns, t.name): t for t in observed.taps}
    for tap in sorted(desired.taps, key=lambda t: t.name):
        cur = have.get((tap.netns, tap.name))
        if cur is not None and (cur.bridge != tap.bridge or any(b.name == tap.bridge for b in new_bridges)):
            acts.append(Action("tap_attach", tap))
    return acts


def _replaced(t: NftTable, desired: frozenset[NftTable]) -> bool:
    return any(d.netns == t.netns and d.family == t.family and d.name == t.name for d in desired)
