"""Realise a cross-host tenant overlay on this host: WireGuard, one VXLAN per network, nftables (edge).

Issue 18, "Networks"; docs/NETWORK.md, "Overlay". The host agent calls:

    priv, pub = generate_keypair()            # WireGuard keys (X25519, base64), no fork
    spec = make_overlay(host_id, underlay, priv, peers, networks, local_nics=...)   # overlay_model
    host.reconcile(networks, local_nics, cfg) # tenant namespaces and bridges (single-host part) first
    reconcile(spec, cfg)                      # idempotent: [] when the host already matches
    status(cfg, host_id) / read_counters(cfg) / teardown(cfg)

WireGuard: the kernel's (`ip link add type wireguard`, tried through netlink) where it exists, else
userspace `wireguard-go` (Debian), started in the host namespace through `nsenter --net=` (fork + exec,
like dnsmasq); it daemonises, creates the TUN device and its control socket
/var/run/wireguard/<if>.sock. Either is configured with `wg setconf <if> /dev/stdin` (wireguard-tools;
the private key goes through a pipe, never argv or a file) and observed with `wg show <if> dump`.
VXLAN: created over a netlink socket of the host namespace (so its UDP socket stays there, bound to
the VXLAN port, with the host's overlay address as source: the x-netns VXLAN of Linux), then moved into
the tenant namespace and enslaved to the network's bridge; head-end replication through all-zero FDB
entries, one per peer. Netlink always goes through `host.ipr_in` (sockets opened by setns threads: the
daemon never forks for netlink, docs/NETWORK.md "Namespaces without fork").
Raises HostError when the host refuses (no wireguard-go/wg, netlink or nft failures).
"""

from __future__ import annotations

import base64
import contextlib
import os
import threading
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Interface
from typing import Any

from bulkhead.errors import HostError
from bulkhead.network import host
from bulkhead.network.overlay_model import (
    HOST_COUNTERS,
    TENANT_COUNTERS,
    OverlaySpec,
    OverlayState,
    VxlanSpec,
    WgConf,
    WgLink,
    desired_overlay,
    plan_overlay,
    wg_name,
)
from bulkhead.network.rules import NftTable
from bulkhead.network.state import Action, HostConfig

__all__ = ["WG_RUN_DIR", "generate_keypair", "observe", "read_counters", "reconcile", "status", "teardown"]

WG_RUN_DIR = "/var/run/wireguard"
_lock = threading.RLock()
_kernel_wg: bool | None = None  # learned on the first interface creation


def generate_keypair() -> tuple[str, str]:
    """(private, public) WireGuard keys, base64 as `wg genkey | wg pubkey` prints them (Curve25519,
    WireGuard whitepaper §5.4; `cryptography`'s X25519 clamps as wg does)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    k = X25519PrivateKey.generate()
    raw = serialization.Encoding.Raw
    priv = k.private_bytes(raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    pub = k.public_key().public_bytes(raw, serialization.PublicFormat.Raw)
    return base64.b64encode(priv).decode(), base64.b64encode(pub).decode()


# --- observation ---------------------------------------------------------------------------------------


def _wg_dump(name: str, config: HostConfig) -> WgConf | None:
    res = host._cmd("", config, ["wg", "show", name, "dump"], check=False)
    if res.returncode != 0:
        return None
    lines = [ln.split("\t") for ln in res.stdout.splitlines() if ln]
    if not lines or len(lines[0]) < 3:
        return None
    priv, _pub, port = lines[0][:3]
    peers = frozenset((p[0], p[2], p[3]) for p in lines[1:] if len(p) >= 4)
    return WgConf(name, int(port) if port.isdigit() else 0, priv, peers)


def _userspace_pid(name: str, config: HostConfig) -> int | None:
    """The pid of the wireguard-go serving `name` in the host namespace, if one is alive: argv is
    `wireguard-go <name>` (its daemonised child re-executes itself with the same arguments) and its
    network namespace is the host's (its control socket's peer credentials name the parent, which
    exits once the child runs, so they cannot identify it)."""
    path = host._ns_path("", config) or "/proc/self/ns/net"
    try:
        want = os.stat(path).st_ino
    except OSError:
        return None
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if len(argv) < 2 or not argv[0].endswith(b"wireguard-go") or argv[1] != name.encode():
                continue
            if os.stat(f"/proc/{entry}/ns/net").st_ino == want:
                return int(entry)
        except OSError:
            continue
    return None


def observe(config: HostConfig) -> OverlayState:
    """What overlay state bulkhead owns now: its WireGuard interface (links `<p>w…` of the host
    namespace), VXLAN devices (`<p>x…` in its tenant namespaces) and `<p>_ovl` tables. Raises HostError."""
    wprefix, xprefix = config.prefix + "w", config.prefix + "x"
    link: WgLink | None = None
    conf: WgConf | None = None
    vxlans: set[VxlanSpec] = set()
    with host._ipr("", config) as ipr:
        for lk in ipr.get_links():
            name = lk.get_attr("IFLA_IFNAME")
            if name.startswith(xprefix):  # a VXLAN whose move into its tenant namespace failed: removed
                vxlans.add(VxlanSpec("", name, 0, IPv4Address(0), 0, 0, ""))
            if not name.startswith(wprefix) or link is not None:
                continue
            addrs = [f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in ipr.get_addr(family=2, index=lk["index"])]
            link = WgLink(name, IPv4Interface(addrs[0] if len(addrs) == 1 else "0.0.0.0/32"),
                          int(lk.get_attr("IFLA_MTU")), bool(lk["flags"] & 1))
    if link is not None:
        conf = _wg_dump(link.name, config)
    tables: set[NftTable] = set()
    namespaces = sorted(n for n in os.listdir(host.NETNS_DIR) if config.owns_netns(n)) \
        if os.path.isdir(host.NETNS_DIR) else []
    for ns in namespaces:
        with host._ipr(ns, config) as ipr:
            links = list(ipr.get_links())
            names = {lk["index"]: lk.get_attr("IFLA_IFNAME") for lk in links}
            for lk in links:
                name = lk.get_attr("IFLA_IFNAME")
                if not name.startswith(xprefix):
                    continue
                info = lk.get_attr("IFLA_LINKINFO")
                data = info.get_attr("IFLA_INFO_DATA") if info is not None else None
                if data is None:
                    vxlans.add(VxlanSpec(ns, name, 0, IPv4Address(0), 0, 0, ""))  # not a VXLAN: removed
                    continue
                fdb = frozenset(IPv4Address(n.get_attr("NDA_DST")) for n in ipr.fdb("dump", ifindex=lk["index"])
                                if n["ifindex"] == lk["index"] and n.get_attr("NDA_LLADDR") == "00:00:00:00:00:00"
                                and n.get_attr("NDA_DST"))
                master = lk.get_attr("IFLA_MASTER")
                up = bool(lk["flags"] & 1)
                vxlans.add(VxlanSpec(ns, name, int(data.get_attr("IFLA_VXLAN_ID") or 0),
                                     IPv4Address(data.get_attr("IFLA_VXLAN_LOCAL") or 0),
                                     int(data.get_attr("IFLA_VXLAN_PORT") or 0), int(lk.get_attr("IFLA_MTU")),
                                     (names.get(master, "") if master and up else ""), fdb))
        tables |= _tables(ns, "bridge", config)
    tables |= _tables("", "inet", config)
    return OverlayState(link, conf, frozenset(vxlans), frozenset(tables))


def _tables(ns: str, family: str, config: HostConfig) -> set[NftTable]:
    name = f"{config.prefix}_ovl"
    res = host._cmd(ns, config, ["nft", "list", "chains", family], check=False)
    if res.returncode != 0:
        return set()
    found, dig = False, ""
    table = None
    for line in res.stdout.splitlines():
        words = line.split()
        if words[:1] == ["table"]:
            table = words[2] if len(words) > 2 else None
        elif words[:1] == ["chain"] and table == name:
            found = True
            if words[1].startswith("digest_"):
                dig = words[1][len("digest_"):]
    return {NftTable(ns, family, name, dig)} if found else set()


# --- actions -------------------------------------------------------------------------------------------


def _wg_create(link: WgLink, config: HostConfig) -> None:
    global _kernel_wg
    if _kernel_wg is not False:
        try:
            with host._ipr("", config) as ipr:
                ipr.link("add", ifname=link.name, kind="wireguard")
            _kernel_wg = True
            return
        except Exception:  # no WireGuard module (these machines): "Unknown device type" / EOPNOTSUPP
            _kernel_wg = False
    stale = _userspace_pid(link.name, config)
    if stale is not None:
        host.terminate(stale)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"{WG_RUN_DIR}/{link.name}.sock")
    host._cmd("", config, ["wireguard-go", link.name])
    if _userspace_pid(link.name, config) is None:
        raise HostError(f"wireguard-go did not start for {link.name}")


def _wg_configure(conf: WgConf, config: HostConfig) -> None:
    text = [f"[Interface]\nPrivateKey = {conf.private_key}\nListenPort = {conf.listen_port}\n"]
    for pub, endpoint, allowed in sorted(conf.peers):
        text.append(f"[Peer]\nPublicKey = {pub}\nEndpoint = {endpoint}\nAllowedIPs = {allowed}\n")
    host._cmd("", config, ["wg", "setconf", conf.name, "/dev/stdin"], stdin="\n".join(text))


def _wg_address(link: WgLink, config: HostConfig) -> None:
    with host._ipr("", config) as ipr:
        idx = ipr.link_lookup(ifname=link.name)
        if not idx:
            raise HostError(f"WireGuard interface {link.name} is missing")
        for a in ipr.get_addr(family=2, index=idx[0]):
            addr = f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
            if addr != str(link.address):
                ipr.addr("del", index=idx[0], address=a.get_attr("IFA_ADDRESS"), prefixlen=a["prefixlen"])
        if not any(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" == str(link.address)
                   for a in ipr.get_addr(family=2, index=idx[0])):
            ipr.addr("add", index=idx[0], address=str(link.address.ip), prefixlen=link.address.network.prefixlen)
        ipr.link("set", index=idx[0], mtu=link.mtu, state="up")


def _wg_delete(link: WgLink, config: HostConfig) -> None:
    pid = _userspace_pid(link.name, config)
    host._link_delete("", link.name, config)
    if pid is not None:
        host.terminate(pid)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"{WG_RUN_DIR}/{link.name}.sock")


def _vxlan_create(v: VxlanSpec, config: HostConfig) -> None:
    if not os.path.exists(f"{host.NETNS_DIR}/{v.netns}"):
        raise HostError(f"tenant namespace {v.netns} does not exist: reconcile the tenant networks "
                        "(host.reconcile) before the overlay")
    host._link_delete(v.netns, v.name, config)
    host._link_delete("", v.name, config)
    # created in the host namespace: its UDP socket lives there for the device's whole life
    with host._ipr("", config) as ipr:
        ipr.link("add", ifname=v.name, kind="vxlan", vxlan_id=v.vni, vxlan_local=str(v.local), vxlan_port=v.port,
                 vxlan_learning=1, mtu=v.mtu)
        ipr.link("set", index=ipr.link_lookup(ifname=v.name)[0], net_ns_fd=v.netns)
    _vxlan_attach(v, config)


def _vxlan_attach(v: VxlanSpec, config: HostConfig) -> None:
    with host._ipr(v.netns, config) as ipr:
        idx, br = ipr.link_lookup(ifname=v.name), ipr.link_lookup(ifname=v.bridge)
        if not idx or not br:
            raise HostError(f"bridge {v.bridge} does not exist in {v.netns}: reconcile the tenant networks "
                            "(host.reconcile) before the overlay")
        ipr.link("set", index=idx[0], master=br[0], state="up")


def _fdb_set(v: VxlanSpec, config: HostConfig) -> None:
    zero = "00:00:00:00:00:00"
    with host._ipr(v.netns, config) as ipr:
        idx = ipr.link_lookup(ifname=v.name)[0]
        have = {IPv4Address(n.get_attr("NDA_DST")) for n in ipr.fdb("dump", ifindex=idx)
                if n["ifindex"] == idx and n.get_attr("NDA_LLADDR") == zero and n.get_attr("NDA_DST")}
        for ip in sorted(have - v.remotes):
            ipr.fdb("del", ifindex=idx, lladdr=zero, dst=str(ip))
        for ip in sorted(v.remotes - have):
            ipr.fdb("append", ifindex=idx, lladdr=zero, dst=str(ip))


def _execute(a: Action, config: HostConfig) -> None:
    t: Any = a.target
    ops: dict[str, Callable[[Any, HostConfig], None]] = {"wg_create": _wg_create, "wg_configure": _wg_configure, "wg_address": _wg_address,
           "wg_delete": _wg_delete, "vxlan_create": _vxlan_create, "vxlan_attach": _vxlan_attach,
           "fdb_set": _fdb_set, "nft_apply": host._nft_apply, "nft_delete": host._nft_delete}
    if a.op == "vxlan_delete":
        host._link_delete(t.netns, t.name, config)
        return
    fn = ops.get(a.op)
    if fn is None:  # pragma: no cover - plan_overlay only produces the ops above
        raise HostError(f"unknown overlay action {a.op}")
    fn(t, config)


def reconcile(spec: OverlaySpec, config: HostConfig) -> list[Action]:
    """Make this host's overlay match `spec`; returns the actions taken ([] when it already did). The
    tenant networks' namespaces and bridges must exist (`host.reconcile` first). Overlay networks left
    out of `spec` lose their VXLAN device. Raises ConfigError or HostError."""
    desired = desired_overlay(spec, config)
    with _lock:
        return host.apply(plan_overlay(observe(config), desired), config, _execute)


def teardown(config: HostConfig) -> list[Action]:
    """Remove the WireGuard interface (and its wireguard-go), every VXLAN device and overlay table
    bulkhead owns under config.prefix. Raises HostError."""
    with _lock:
        return host.apply(plan_overlay(observe(config), OverlayState()), config, _execute)


def status(config: HostConfig) -> dict[str, Any]:
    """{"interface", "backend" (kernel|userspace|none), "overlay_ip", "listen_port", "peers": {public key:
    {"endpoint", "allowed_ip", "latest_handshake" (unix s, 0 = never), "rx_bytes", "tx_bytes"}}}."""
    st = observe(config)
    if st.link is None:
        return {"interface": None, "backend": "none", "overlay_ip": None, "listen_port": None, "peers": {}}
    peers: dict[str, dict[str, Any]] = {}
    res = host._cmd("", config, ["wg", "show", st.link.name, "dump"], check=False)
    for line in res.stdout.splitlines()[1:]:
        p = line.split("\t")
        if len(p) >= 7:
            peers[p[0]] = {"endpoint": p[2], "allowed_ip": p[3], "latest_handshake": int(p[4] or 0),
                           "rx_bytes": int(p[5] or 0), "tx_bytes": int(p[6] or 0)}
    return {"interface": st.link.name, "backend": "userspace" if _userspace_pid(st.link.name, config) else "kernel",
            "overlay_ip": str(st.link.address.ip), "listen_port": st.conf.listen_port if st.conf else None,
            "peers": peers}


def read_counters(config: HostConfig, tenant: str | None = None) -> dict[str, tuple[int, int]]:
    """The overlay's named drop counters {name: (packets, bytes)}: the host table's (tenant None:
    underlay_vxlan, overlay_other, overlay_forward, cleartext_out) or a tenant namespace's (ovl_in_*,
    ovl_out_*). Missing tables read as zeros."""
    ns, fam, names = ("", "inet", HOST_COUNTERS) if tenant is None else (config.netns(tenant), "bridge", TENANT_COUNTERS)
    vals = host._counter_values(NftTable(ns, fam, f"{config.prefix}_ovl", ""), config)
    return {n: vals.get(n, (0, 0)) for n in names}


__all__ += ["wg_name"]
