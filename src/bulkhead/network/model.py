"""Tenant networks and NIC attachments as values: validation, deterministic MACs, IPAM (pure, no I/O).

A `Network` belongs to one tenant and has an IPv4 subnet (the first host address is the gateway: the
bridge's own address in the tenant's namespace, where DHCP answers), an optional IPv6 /64 and an egress
flag. A `Nic` attaches one VM interface (vm id + index) to one network of the VM's own tenant, with a
MAC derived from (vm id, index) and a pinned IPv4 allocated from the subnet (never one another NIC holds)
and, on an IPv6 network, a pinned IPv6 address (prefix + EUI-64 of the MAC).

Every function raises `ConfigError` (one sentence) for bad user input and nothing else.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from bulkhead.errors import ConfigError

__all__ = [
    "MAX_NICS_PER_VM",
    "Network",
    "Nic",
    "NicRate",
    "allocate_ipv4",
    "attach_nic",
    "eui64_address",
    "link_local",
    "make_network",
    "nic_mac",
    "parse_mac",
]

MAX_NICS_PER_VM = 8
MIN_PREFIX4, MAX_PREFIX4 = 16, 29  # /29: 5 usable addresses after the gateway; /16: 65533
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
# Addresses a tenant subnet may never use: the host's own kinds of addresses and shared spaces.
_FORBIDDEN4 = tuple(
    IPv4Network(n) for n in ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4")
)
_ALLOWED4 = tuple(IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10"))


@dataclass(frozen=True)
class NicRate:
    """Per-NIC rate limit applied by bulkhead's virtio-net device (0 = unlimited), both directions."""

    bytes_per_sec: int = 0
    ops_per_sec: int = 0

    def __post_init__(self) -> None:
        for what, v in (("bytes_per_sec", self.bytes_per_sec), ("ops_per_sec", self.ops_per_sec)):
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 40:
                raise ConfigError(f"NIC rate {what} must be an integer from 0 to 2^40-1")


@dataclass(frozen=True)
class Network:
    """A tenant's virtual network. Build it with `make_network` (which validates)."""

    id: str
    tenant: str
    name: str
    ipv4: IPv4Network
    ipv6: IPv6Network | None = None
    egress: bool = False

    @property
    def gateway4(self) -> IPv4Address:
        """The bridge's address (DHCP server, and the router when egress is on)."""
        return self.ipv4.network_address + 1

    def to_dict(self) -> dict[str, object]:
        """The API resource shape."""
        return {"id": self.id, "tenant": self.tenant, "name": self.name, "ipv4_subnet": str(self.ipv4),
                "ipv4_gateway": str(self.gateway4), "ipv6_prefix": str(self.ipv6) if self.ipv6 else None,
                "egress": self.egress}


@dataclass(frozen=True)
class Nic:
    """One VM interface attached to one network; addresses are pinned for the NIC's lifetime."""

    vm_id: str
    index: int
    network_id: str
    tenant: str
    mac: str
    ipv4: IPv4Address
    ipv6: IPv6Address | None = None
    rate: NicRate = field(default_factory=NicRate)

    @property
    def key(self) -> str:
        return f"{self.vm_id}/{self.index}"

    def to_dict(self) -> dict[str, object]:
        """The API resource shape."""
        return {"vm": self.vm_id, "index": self.index, "network": self.network_id, "mac": self.mac,
                "ipv4": str(self.ipv4), "ipv6": str(self.ipv6) if self.ipv6 else None,
                "rate": {"bytes_per_sec": self.rate.bytes_per_sec, "ops_per_sec": self.rate.ops_per_sec}}


def _check_id(what: str, value: object) -> str:
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise ConfigError(f"{what} must be 1-128 characters of letters, digits, '_', '.' and '-'")
    return value


def make_network(net_id: str, tenant: str, name: str, ipv4: str, ipv6: str | None = None, *,
                 egress: bool = False, existing: Iterable[Network] = (),
                 reserved: Iterable[IPv4Network] = ()) -> Network:
    """Validate and build a Network.

    Rules: name is 1-63 of a-z, 0-9, '-' (starting with a letter or digit) and unique in the tenant;
    the IPv4 subnet is a private (RFC 1918) or shared (RFC 6598) network written without host bits,
    /16 to /29, overlapping no other network of the same tenant nor a `reserved` range (the host's
    uplink pool); the optional IPv6 prefix is a /64, unicast (not link-local, multicast or loopback) and
    overlaps no other IPv6 prefix of the tenant. Different tenants may reuse the same subnets.
    Raises ConfigError.
    """
    _check_id("network id", net_id)
    _check_id("tenant id", tenant)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"network name {name!r} must be 1-63 characters of a-z, 0-9 and '-'")
    try:
        net4 = IPv4Network(ipv4, strict=True)
    except (ValueError, TypeError):
        raise ConfigError(f"IPv4 subnet {ipv4!r} is not a network like 10.1.0.0/24 (no host bits)") from None
    if not MIN_PREFIX4 <= net4.prefixlen <= MAX_PREFIX4:
        raise ConfigError(f"IPv4 subnet {net4} must be between /{MIN_PREFIX4} and /{MAX_PREFIX4}")
    if any(net4.overlaps(f) for f in _FORBIDDEN4) or not any(net4.subnet_of(a) for a in _ALLOWED4):
        raise ConfigError(f"IPv4 subnet {net4} must lie in 10/8, 172.16/12, 192.168/16 or 100.64/10")
    for r in reserved:
        if net4.overlaps(r):
            raise ConfigError(f"IPv4 subnet {net4} overlaps {r}, which the host reserves")
    net6: IPv6Network | None = None
    if ipv6 is not None:
        try:
            net6 = IPv6Network(ipv6, strict=True)
        except (ValueError, TypeError):
            raise ConfigError(f"IPv6 prefix {ipv6!r} is not a network like fd00:1::/64") from None
        if net6.prefixlen != 64:
            raise ConfigError(f"IPv6 prefix {net6} must be a /64")
        if net6.is_link_local or net6.is_multicast or net6.is_loopback or net6.is_unspecified \
                or net6.overlaps(IPv6Network("::ffff:0:0/96")) or net6.overlaps(IPv6Network("::/8")):
            raise ConfigError(f"IPv6 prefix {net6} must be a unicast prefix (ULA fc00::/7 or global)")
    if not isinstance(egress, bool):
        raise ConfigError("egress must be true or false")
    for other in existing:
        if other.tenant != tenant or other.id == net_id:
            continue
        if other.name == name:
            raise ConfigError(f"tenant already has a network named {name!r}")
        if other.ipv4.overlaps(net4):
            raise ConfigError(f"IPv4 subnet {net4} overlaps network {other.name!r} ({other.ipv4})")
        if net6 is not None and other.ipv6 is not None and other.ipv6.overlaps(net6):
            raise ConfigError(f"IPv6 prefix {net6} overlaps network {other.name!r} ({other.ipv6})")
    return Network(net_id, tenant, name, net4, net6, egress)


def nic_mac(vm_id: str, index: int) -> str:
    """Deterministic MAC for (vm id, NIC index): SHA-256 based, locally administered, unicast."""
    h = hashlib.sha256(f"bulkhead-nic\0{vm_id}\0{index}".encode()).digest()
    first = (h[0] & 0xFC) | 0x02  # bit 0 clear: unicast; bit 1 set: locally administered
    return ":".join(f"{b:02x}" for b in (first, *h[1:6]))


def parse_mac(mac: str) -> bytes:
    """'02:aa:..' -> 6 bytes. Raises ConfigError unless it is a lowercase-able unicast MAC."""
    m = mac.lower() if isinstance(mac, str) else ""
    if not _MAC_RE.match(m):
        raise ConfigError(f"{mac!r} is not a MAC address like 02:12:34:56:78:9a")
    raw = bytes.fromhex(m.replace(":", ""))
    if raw[0] & 1:
        raise ConfigError(f"MAC {mac} is a multicast address")
    if raw == bytes(6):
        raise ConfigError("MAC 00:00:00:00:00:00 is not usable")
    return raw


def eui64_address(prefix: IPv6Network, mac: str) -> IPv6Address:
    """prefix (a /64) + modified EUI-64 interface id of `mac` (RFC 4291 appendix A)."""
    raw = bytearray(parse_mac(mac))
    raw[0] ^= 0x02
    iid = bytes(raw[:3]) + b"\xff\xfe" + bytes(raw[3:])
    return IPv6Address(int(prefix.network_address) | int.from_bytes(iid, "big"))


def link_local(mac: str) -> IPv6Address:
    """fe80::/64 + EUI-64 of `mac`: the only link-local source a NIC may use."""
    return eui64_address(IPv6Network("fe80::/64"), mac)


def allocate_ipv4(net: Network, held: Iterable[IPv4Address], requested: str | None = None) -> IPv4Address:
    """An IPv4 address of `net` that nobody holds: `requested` if given (validated), else the lowest free.

    Never returns the network address, the gateway or the broadcast address. Raises ConfigError when the
    requested address is outside the subnet, reserved or held, or when the subnet is full.
    """
    taken = {a for a in held if a in net.ipv4}
    reserved = {net.ipv4.network_address, net.gateway4, net.ipv4.broadcast_address}
    if requested is not None:
        try:
            addr = IPv4Address(requested)
        except (ValueError, TypeError):
            raise ConfigError(f"{requested!r} is not an IPv4 address") from None
        if addr not in net.ipv4:
            raise ConfigError(f"IPv4 address {addr} is not in network {net.name!r} ({net.ipv4})")
        if addr in reserved:
            raise ConfigError(f"IPv4 address {addr} is reserved in network {net.name!r}")
        if addr in taken:
            raise ConfigError(f"IPv4 address {addr} is already held by another NIC")
        return addr
    first = int(net.gateway4) + 1
    last = int(net.ipv4.broadcast_address) - 1
    taken_ints = {int(a) for a in taken}
    for n in range(first, last + 1):
        if n not in taken_ints:
            return IPv4Address(n)
    raise ConfigError(f"network {net.name!r} ({net.ipv4}) has no free IPv4 address")


def attach_nic(vm_id: str, vm_tenant: str, index: int, net: Network, existing: Iterable[Nic], *,
               ipv4: str | None = None, mac: str | None = None, rate: NicRate | None = None) -> Nic:
    """Validate and build a NIC of VM `vm_id` (tenant `vm_tenant`) on `net`.

    The network must belong to the VM's tenant (an unknown or foreign network gets the same answer);
    index is 0..MAX_NICS_PER_VM-1 and unused on the VM; the MAC is `nic_mac(vm_id, index)` unless one is
    given, and may not be used by another NIC of the network; the IPv4 address comes from
    `allocate_ipv4` over every address other NICs hold. Raises ConfigError.
    """
    _check_id("VM id", vm_id)
    if net.tenant != vm_tenant:
        raise ConfigError(f"network {net.id!r} does not exist")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < MAX_NICS_PER_VM:
        raise ConfigError(f"NIC index must be 0 to {MAX_NICS_PER_VM - 1}")
    nics = list(existing)
    if any(n.vm_id == vm_id and n.index == index for n in nics):
        raise ConfigError(f"VM {vm_id!r} already has a NIC {index}")
    the_mac = mac.lower() if mac is not None else nic_mac(vm_id, index)
    parse_mac(the_mac)
    if any(n.network_id == net.id and n.mac == the_mac for n in nics):
        raise ConfigError(f"MAC {the_mac} is already used on network {net.name!r}")
    addr = allocate_ipv4(net, (n.ipv4 for n in nics if n.network_id == net.id), ipv4)
    addr6 = eui64_address(net.ipv6, the_mac) if net.ipv6 is not None else None
    return Nic(vm_id, index, net.id, net.tenant, the_mac, addr, addr6, rate or NicRate())
