"""Realise tenant networks on the host: namespaces, bridges, taps, uplinks (pyroute2), nftables, dnsmasq.

    reconcile(networks, nics, config)     observe, plan, apply; idempotent (a daemon restart calls it)
    create_tap_for_nic(nic, config)       -> fd of a fresh tap in the tenant namespace, on its bridge
    teardown(config)                      remove everything bulkhead owns (reconcile to nothing)
    read_counters(config, tenant)         the named nftables drop counters of a tenant

Taps: the daemon creates each VM's tap when the VM starts, inside the tenant's namespace (the opening
thread enters the namespace, so the tap is born there and never exists in the host namespace), enslaves
it to the network's bridge and hands the open fd to the VMM (`NetConfig.tap_fd`, adopted by
`TapBackend.adopt`). The tap is not persistent: it disappears when the last fd closes, i.e. when the VM's
worker exits, so a stopped or crashed VM leaves no tap behind. `create_persistent_tap` exists for VMMs that
open their tap by name (`ip netns exec <ns> bulkhead run --net tap=NAME`); reconcile removes it with its NIC.

Every netlink call goes through pyroute2 over a netlink socket opened inside the namespace by a thread
that entered it (`netlink_socket_in`; namespaces are created by `netns_create`): the daemon never forks
for networking (docs/NETWORK.md, "Namespaces without fork"). nftables through the `nft` command
(text rulesets replaced atomically); commands run inside a namespace through `nsenter --net=`.
Raises HostError when the host refuses (not root, missing nft/dnsmasq, netlink errors).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from ipaddress import IPv4Interface
from typing import Any, TypeVar

from bulkhead.errors import HostError
from bulkhead.network.model import Network, Nic
from bulkhead.network.rules import NftTable, render
from bulkhead.network.state import (
    Action,
    BridgeSpec,
    DhcpSpec,
    HostConfig,
    HostState,
    TapSpec,
    UplinkSpec,
    desired_state,
    dhcp_paths,
    digest,
    plan,
)

__all__ = [
    "apply",
    "create_persistent_tap",
    "create_tap_for_nic",
    "delete_tap",
    "ipr_in",
    "netlink_socket_in",
    "netns_create",
    "netns_remove",
    "observe",
    "read_counters",
    "reconcile",
    "run_in_netns",
    "teardown",
    "terminate",
]

T = TypeVar("T")
NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
MS_BIND, MS_REC, MS_SHARED, MNT_DETACH = 0x1000, 0x4000, 1 << 20, 2
TUNSETIFF, TUNSETPERSIST, TUNSETOFFLOAD, TUNSETVNETHDRSZ = 0x400454CA, 0x400454CB, 0x400454D0, 0x400454D8
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
_libc = ctypes.CDLL(None, use_errno=True)
_lock = threading.RLock()  # one reconcile / tap operation at a time


# --- namespaces ----------------------------------------------------------------------------------------


def _ns_path(ns: str, config: HostConfig) -> str | None:
    """Path of a namespace; "" is the host (None = this process's own namespace)."""
    if ns == "":
        return f"{NETNS_DIR}/{config.host_netns}" if config.host_netns else None
    return f"{NETNS_DIR}/{ns}"


def run_in_netns(path: str | None, fn: Callable[[], T]) -> T:
    """Run fn on a helper thread that has entered the network namespace at `path` (None: run it here).
    Raises HostError if the namespace cannot be entered; re-raises what fn raises."""
    if path is None:
        return fn()
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            box["err"] = HostError(f"network namespace {path} cannot be opened: {exc.strerror}")
            return
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                box["err"] = HostError(f"cannot enter {path}: {os.strerror(ctypes.get_errno())}")
                return
        finally:
            os.close(fd)
        try:
            box["val"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            box["err"] = exc

    t = threading.Thread(target=body, name="bulkhead-netns")
    t.start()
    t.join()
    if "err" in box:
        raise box["err"]
    return box["val"]  # type: ignore[no-any-return]


def netlink_socket_in(path: str | None) -> int:
    """A NETLINK_ROUTE socket (fd, close-on-exec) that belongs to the network namespace at `path` (None:
    this process's). The socket is opened on a short-lived thread that has entered the namespace with
    setns(2); a socket keeps the namespace it was created in for its whole life (netlink(7), network
    namespaces(7)), so the caller's threads use it from the daemon's own namespace. No process is forked:
    pyroute2's own `IPRoute(netns=...)` forks a helper (pyroute2 0.9.7 `netns.create_socket` ->
    `ChildProcess`), and a forked child of the daemon inherits the asyncio loop's signal wakeup fd, so a
    SIGTERM sent to that helper ran the daemon's stop handler (issue 12, docs/NETWORK.md)."""

    def go() -> int:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                             socket.NETLINK_ROUTE).detach()

    return run_in_netns(path, go)


def ipr_in(path: str | None) -> Any:
    """A pyroute2 IPRoute over `netlink_socket_in(path)` (owns the fd; use as a context manager)."""
    from pyroute2 import IPRoute

    return IPRoute(fileno=netlink_socket_in(path))


def _ipr(ns: str, config: HostConfig) -> Any:
    return ipr_in(_ns_path(ns, config))


def netns_create(name: str) -> None:
    """Create the named network namespace /run/netns/<name> as `ip netns add` does (ip-netns(8)): the
    run directory made a shared mount, an empty file bind-mounted over by the new namespace. The namespace
    is made by unshare(CLONE_NEWNET) on a short-lived thread (a thread may unshare its network namespace
    alone: unshare(2)), never by a forked child (pyroute2's `netns.create` forks). Raises HostError."""
    os.makedirs(NETNS_DIR, mode=0o755, exist_ok=True)
    d = NETNS_DIR.encode()
    # not a mount point yet: bind it onto itself, then share it (what iproute2 does)
    if _libc.mount(b"", d, b"none", MS_SHARED | MS_REC, None) != 0 and (
            _libc.mount(d, d, b"none", MS_BIND | MS_REC, None) != 0
            or _libc.mount(b"", d, b"none", MS_SHARED | MS_REC, None) != 0):
        raise HostError(f"cannot make {NETNS_DIR} a shared mount: {os.strerror(ctypes.get_errno())}")
    path = f"{NETNS_DIR}/{name}"
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0))
    except FileExistsError:
        raise HostError(f"network namespace {name} already exists") from None
    box: dict[str, str] = {}

    def body() -> None:
        if _libc.unshare(CLONE_NEWNET) != 0:
            box["err"] = f"unshare: {os.strerror(ctypes.get_errno())}"
            return
        me = f"/proc/self/task/{threading.get_native_id()}/ns/net".encode()
        if _libc.mount(me, path.encode(), b"none", MS_BIND, None) != 0:
            box["err"] = f"bind mount: {os.strerror(ctypes.get_errno())}"

    t = threading.Thread(target=body, name="bulkhead-netns-create")
    t.start()
    t.join()
    if "err" in box:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise HostError(f"cannot create network namespace {name}: {box['err']}")


def netns_remove(name: str) -> None:
    """Unmount and remove /run/netns/<name> (a missing one is not an error)."""
    path = f"{NETNS_DIR}/{name}"
    _libc.umount2(path.encode(), MNT_DETACH)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _cmd(ns: str, config: HostConfig, argv: list[str], stdin: str | None = None,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    path = _ns_path(ns, config)
    full = (["nsenter", f"--net={path}", "--"] if path else []) + argv
    try:
        res = subprocess.run(full, input=stdin, capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError:
        raise HostError(f"{argv[0]} is not installed") from None
    if check and res.returncode != 0:
        raise HostError(f"{' '.join(argv[:3])} failed in {ns or 'the host namespace'}: {res.stderr.strip()[:300]}")
    return res


def _sysctl(ns: str, config: HostConfig, key: str, value: str | None = None) -> str | None:
    """Read (value None) or write /proc/sys/<key> inside the namespace; None if the key does not exist."""
    p = "/proc/sys/" + key.replace(".", "/")

    def go() -> str | None:
        try:
            if value is None:
                with open(p) as f:
                    return f.read().strip()
            with open(p, "w") as f:
                f.write(value)
            return value
        except FileNotFoundError:
            return None

    return run_in_netns(_ns_path(ns, config), go)


# --- observation -----------------------------------------------------------------------------------------


def _links(ns: str, config: HostConfig) -> list[dict[str, Any]]:
    out = []
    with _ipr(ns, config) as ipr:
        addrs: dict[int, list[str]] = {}
        for a in ipr.get_addr(family=2):
            addrs.setdefault(a["index"], []).append(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
        links = list(ipr.get_links())
        names = {lk["index"]: lk.get_attr("IFLA_IFNAME") for lk in links}
        for lk in links:
            info = lk.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
            master = lk.get_attr("IFLA_MASTER")
            out.append({"name": lk.get_attr("IFLA_IFNAME"), "index": lk["index"], "kind": kind,
                        "mac": lk.get_attr("IFLA_ADDRESS"), "master": names.get(master) if master else None,
                        "addrs": addrs.get(lk["index"], [])})
    return out


def _tables(ns: str, config: HostConfig) -> set[NftTable]:
    res = _cmd(ns, config, ["nft", "-j", "list", "chains"], check=False)
    if res.returncode != 0:
        return set()
    found: dict[tuple[str, str], str] = {}
    # only the tables this module owns: the overlay's (network/overlay.py, `<p>_ovl`) are reconciled there
    ours = {f"{config.prefix}_{t}" for t in ("guard", "tenant", "host")}
    for item in json.loads(res.stdout).get("nftables", []):
        ch = item.get("chain")
        if not ch or str(ch.get("table", "")) not in ours:
            continue
        key = (ch["family"], ch["table"])
        name = str(ch.get("name", ""))
        found.setdefault(key, "")
        if name.startswith("digest_"):
            found[key] = name[len("digest_"):]
    return {NftTable(ns, fam, name, digest) for (fam, name), digest in found.items()}


def _dnsmasqs(config: HostConfig, ns_by_inode: dict[int, str]) -> set[DhcpSpec]:
    out: set[DhcpSpec] = set()
    if not os.path.isdir(config.state_dir):
        return out
    for fn in sorted(os.listdir(config.state_dir)):
        if not fn.endswith(".conf") or not config.owns_link(fn[:-5]):
            continue
        bridge = fn[:-5]
        pid = _dnsmasq_pid(config, bridge)
        if pid is None:
            continue
        try:
            ino = os.stat(f"/proc/{pid}/ns/net").st_ino
            with open(os.path.join(config.state_dir, fn)) as f:
                conf = f.read()
            with open(os.path.join(config.state_dir, bridge + ".hosts")) as f:
                hosts = f.read()
        except OSError:
            continue
        first = conf.splitlines()[0] if conf else ""
        net_id = first[len("# bulkhead network "):] if first.startswith("# bulkhead network ") else ""
        body = conf.split("\n", 1)[1] if "\n" in conf else ""
        out.add(DhcpSpec(ns_by_inode.get(ino, "?"), net_id, bridge, digest(body), digest(hosts), body, hosts))
    return out


def dnsmasq_alive(config: HostConfig, network_id: str) -> bool:
    """Whether the network's own dnsmasq runs (a cheap check: its pid file and /proc, no netlink)."""
    return _dnsmasq_pid(config, config.bridge(network_id)) is not None


def _dnsmasq_pid(config: HostConfig, bridge: str) -> int | None:
    """The pid of our dnsmasq for `bridge` if it is alive and really is that dnsmasq."""
    base = os.path.join(config.state_dir, bridge)
    try:
        with open(base + ".pid") as f:
            pid = int(f.read().strip() or "0")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except (OSError, ValueError):
        return None
    if pid <= 1 or not argv or not argv[0].endswith(b"dnsmasq") or f"--conf-file={base}.conf".encode() not in argv:
        return None
    return pid


def observe(config: HostConfig) -> HostState:
    """What bulkhead-owned state exists now (only objects carrying config.prefix). Raises HostError."""
    namespaces = set()
    if os.path.isdir(NETNS_DIR):
        namespaces = {n for n in os.listdir(NETNS_DIR) if config.owns_netns(n)}
    forwarding, bridges, taps, uplinks, tables = set(), set(), set(), set(), set()
    host_links = {lk["name"]: lk for lk in _links("", config)}
    ns_by_inode: dict[int, str] = {}
    for ns in sorted(namespaces):
        with contextlib.suppress(OSError):
            ns_by_inode[os.stat(f"{NETNS_DIR}/{ns}").st_ino] = ns
        if _sysctl(ns, config, "net.ipv4.ip_forward") == "1":
            forwarding.add(ns)
        for lk in _links(ns, config):
            name = lk["name"]
            if not config.owns_link(name):
                continue
            kind = name[len(config.prefix)]
            if kind == "b" and lk["kind"] == "bridge":
                addr = lk["addrs"][0] if len(lk["addrs"]) == 1 else "0.0.0.0/32"
                bridges.add(BridgeSpec(ns, name, lk["mac"], IPv4Interface(addr)))
            elif kind == "n":
                taps.add(TapSpec(ns, name, lk["master"] or ""))
            elif kind == "u":
                outer = config.prefix + "h" + name[len(config.prefix) + 1:]
                o = host_links.get(outer, {})
                inner_addr = lk["addrs"][0] if len(lk["addrs"]) == 1 else "0.0.0.0/32"
                outer_addr = o["addrs"][0] if len(o.get("addrs", [])) == 1 else "0.0.0.0/32"
                uplinks.add(UplinkSpec(ns, name, outer, IPv4Interface(inner_addr), IPv4Interface(outer_addr)))
            else:
                bridges.add(BridgeSpec(ns, name, "", IPv4Interface("0.0.0.0/32")))  # stray: removed
        tables |= _tables(ns, config)
    # host-side ends whose tenant end is gone (normally the veth pair dies with its namespace)
    live_outer = {u.outer for u in uplinks}
    for name in host_links:
        if config.owns_link(name) and name not in live_outer:
            uplinks.add(UplinkSpec("", name, name, IPv4Interface("0.0.0.0/32"), IPv4Interface("0.0.0.0/32")))
    tables |= _tables("", config)
    if _sysctl("", config, "net.ipv4.ip_forward") == "1":
        forwarding.add("")
    return HostState(frozenset(namespaces), frozenset(forwarding), frozenset(bridges), frozenset(taps),
                     frozenset(uplinks), frozenset(tables), frozenset(_dnsmasqs(config, ns_by_inode)))


# --- actions ---------------------------------------------------------------------------------------------


def _netns_create(ns: str, config: HostConfig) -> None:
    netns_create(ns)
    # IPv6 off for the namespace's own stack (VMs still bridge IPv6 between themselves); bridged frames
    # never go through iptables/ip6tables/arptables (br_netfilter), only through our bridge table.
    for key, val in (("net.ipv6.conf.all.disable_ipv6", "1"), ("net.ipv6.conf.default.disable_ipv6", "1"),
                     ("net.bridge.bridge-nf-call-iptables", "0"), ("net.bridge.bridge-nf-call-ip6tables", "0"),
                     ("net.bridge.bridge-nf-call-arptables", "0"), ("net.ipv4.ip_forward", "0")):
        _sysctl(ns, config, key, val)
    with _ipr(ns, config) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def _netns_delete(ns: str, config: HostConfig) -> None:
    netns_remove(ns)


def _bridge_create(b: BridgeSpec, config: HostConfig) -> None:
    with _ipr(b.netns, config) as ipr:
        for idx in ipr.link_lookup(ifname=b.name):
            ipr.link("del", index=idx)
        ipr.link("add", ifname=b.name, kind="bridge", address=b.mac, br_stp_state=0, br_forward_delay=0,
                 br_nf_call_iptables=0, br_nf_call_ip6tables=0, br_nf_call_arptables=0)
        idx = ipr.link_lookup(ifname=b.name)[0]
        ipr.addr("add", index=idx, address=str(b.address.ip), prefixlen=b.address.network.prefixlen)
        ipr.link("set", index=idx, state="up")


def _link_delete(ns: str, name: str, config: HostConfig) -> None:
    with _ipr(ns, config) as ipr:
        for idx in ipr.link_lookup(ifname=name):
            with contextlib.suppress(Exception):
                ipr.link("del", index=idx)


def _uplink_create(u: UplinkSpec, config: HostConfig) -> None:
    _link_delete(u.netns, u.inner, config)
    _link_delete("", u.outer, config)
    host = _ns_path("", config)
    with _ipr(u.netns, config) as ipr:
        ipr.link("add", ifname=u.inner, kind="veth", peer=u.outer)
        outer_idx = ipr.link_lookup(ifname=u.outer)[0]
        if host is None:
            ipr.link("set", index=outer_idx, net_ns_pid=os.getpid())
        else:
            ipr.link("set", index=outer_idx, net_ns_fd=config.host_netns)
        idx = ipr.link_lookup(ifname=u.inner)[0]
        ipr.addr("add", index=idx, address=str(u.inner_addr.ip), prefixlen=30)
        ipr.link("set", index=idx, state="up")
        ipr.route("replace", dst="0.0.0.0/0", gateway=str(u.outer_addr.ip))
    _sysctl("", config, f"net.ipv6.conf.{u.outer}.disable_ipv6", "1")
    with _ipr("", config) as ipr:
        idx = ipr.link_lookup(ifname=u.outer)[0]
        ipr.addr("add", index=idx, address=str(u.outer_addr.ip), prefixlen=30)
        ipr.link("set", index=idx, state="up")


def _counter_values(t: NftTable, config: HostConfig) -> dict[str, tuple[int, int]]:
    res = _cmd(t.netns, config, ["nft", "-j", "list", "counters", "table", t.family, t.name], check=False)
    if res.returncode != 0:
        return {}
    out = {}
    for item in json.loads(res.stdout).get("nftables", []):
        c = item.get("counter")
        if c:
            out[str(c["name"])] = (int(c.get("packets", 0)), int(c.get("bytes", 0)))
    return out


def _nft_apply(t: NftTable, config: HostConfig) -> None:
    if not t.body:
        raise HostError(f"nftables table {t.name} has no content to apply")
    _cmd(t.netns, config, ["nft", "-f", "-"], stdin=render(t, _counter_values(t, config)))


def _nft_delete(t: NftTable, config: HostConfig) -> None:
    _cmd(t.netns, config, ["nft", "delete", "table", t.family, t.name], check=False)


def terminate(pid: int) -> None:
    """SIGTERM a daemon we started (dnsmasq, wireguard-go), wait up to 5 s, then SIGKILL it."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.01)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _dhcp_stop(d: DhcpSpec, config: HostConfig) -> None:
    pid = _dnsmasq_pid(config, d.bridge)
    if pid is not None:
        terminate(pid)
    for ext in ("conf", "hosts", "leases", "pid", "log"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(config.state_dir, f"{d.bridge}.{ext}"))


def _write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), "w") as f:
        os.fchmod(f.fileno(), 0o644)
        f.write(text)
    os.replace(tmp, path)


def _dhcp_start(d: DhcpSpec, config: HostConfig) -> None:
    _dhcp_stop(d, config)
    os.makedirs(config.state_dir, mode=0o711, exist_ok=True)  # dnsmasq re-reads hosts as nobody
    paths = dhcp_paths(config, d.network_id)
    _write(paths["hosts"], d.hosts)
    _write(paths["conf"], f"# bulkhead network {d.network_id}\n" + d.config)
    with open(paths["leases"], "a"):
        pass
    _cmd(d.netns, config, ["dnsmasq", f"--conf-file={paths['conf']}"])
    if _dnsmasq_pid(config, d.bridge) is None:
        raise HostError(f"dnsmasq for network {d.network_id} did not start")


def _dhcp_reload(d: DhcpSpec, config: HostConfig) -> None:
    _write(dhcp_paths(config, d.network_id)["hosts"], d.hosts)
    pid = _dnsmasq_pid(config, d.bridge)
    if pid is None:
        _dhcp_start(d, config)
    else:
        os.kill(pid, signal.SIGHUP)


def _tap_attach(t: TapSpec, config: HostConfig) -> None:
    with _ipr(t.netns, config) as ipr:
        idx = ipr.link_lookup(ifname=t.name)
        master = ipr.link_lookup(ifname=t.bridge)
        if not idx or not master:
            raise HostError(f"tap {t.name} or bridge {t.bridge} is missing in {t.netns}")
        ipr.link("set", index=idx[0], master=master[0], state="up")


def _execute(a: Action, config: HostConfig) -> None:
    t: Any = a.target
    if a.op == "netns_create":
        _netns_create(t, config)
    elif a.op == "netns_delete":
        _netns_delete(t, config)
    elif a.op == "forwarding":
        _sysctl(t, config, "net.ipv4.ip_forward", "1" if a.detail else "0")
    elif a.op == "bridge_create":
        _bridge_create(t, config)
    elif a.op in ("bridge_delete", "tap_delete"):
        _link_delete(t.netns, t.name, config)
    elif a.op == "uplink_create":
        _uplink_create(t, config)
    elif a.op == "uplink_delete":
        if t.netns and os.path.exists(f"{NETNS_DIR}/{t.netns}"):
            _link_delete(t.netns, t.inner, config)
        _link_delete("", t.outer, config)
    elif a.op == "nft_apply":
        _nft_apply(t, config)
    elif a.op == "nft_delete":
        _nft_delete(t, config)
    elif a.op == "dhcp_start":
        _dhcp_start(t, config)
    elif a.op == "dhcp_reload":
        _dhcp_reload(t, config)
    elif a.op == "dhcp_stop":
        _dhcp_stop(t, config)
    elif a.op == "tap_attach":
        _tap_attach(t, config)
    else:  # pragma: no cover - plan() only produces the ops above
        raise HostError(f"unknown network action {a.op}")


def apply(actions: Iterable[Action], config: HostConfig,
          execute: Callable[[Action, HostConfig], None] | None = None) -> list[Action]:
    """Execute actions in order (with `execute`, default this module's executor; the overlay passes its
    own); returns those done. Raises HostError (netlink/nft failures included)."""
    run = execute or _execute
    done = []
    for a in actions:
        try:
            run(a, config)
        except HostError:
            raise
        except OSError as exc:
            raise HostError(f"network action {a} failed: {exc.strerror or exc}") from None
        except Exception as exc:  # pyroute2 NetlinkError and friends
            raise HostError(f"network action {a} failed: {exc}") from None
        done.append(a)
    return done


def reconcile(networks: Iterable[Network], nics: Iterable[Nic], config: HostConfig) -> list[Action]:
    """Make the host match these networks and NICs; returns the actions taken ([] when it already did).
    Raises ConfigError (inconsistent input) or HostError."""
    desired = desired_state(networks, nics, config)
    with _lock:
        return apply(plan(observe(config), desired), config)


def teardown(config: HostConfig) -> list[Action]:
    """Remove every namespace, bridge, tap, uplink, nftables table and dnsmasq bulkhead owns under
    config.prefix. Raises HostError."""
    with _lock:
        done = apply(plan(observe(config), HostState()), config)
        with contextlib.suppress(OSError):
            os.rmdir(config.state_dir)
        return done


# --- taps --------------------------------------------------------------------------------------------


def _open_tap_in(ns_path: str, name: str, persistent: bool) -> int:
    def go() -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", 12))
            fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
            if persistent:
                fcntl.ioctl(fd, TUNSETPERSIST, 1)
        except OSError as exc:
            os.close(fd)
            why = "it is in use by another VM" if exc.errno == errno.EBUSY else exc.strerror
            raise HostError(f"cannot create tap {name}: {why}") from None
        return fd

    return run_in_netns(ns_path, go)


def create_tap_for_nic(nic: Nic, config: HostConfig) -> int:
    """Create the NIC's tap in its tenant's namespace, attach it to the network's bridge, bring it up, and
    return its fd (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, vnet header 12 bytes, no offloads, non-blocking,
    close-on-exec): hand it to the VMM as NetConfig.tap_fd and close your copy after the worker has it.
    The network must have been reconciled. Raises HostError (e.g. the tap is open in a running VM)."""
    ns = config.netns(nic.tenant)
    name = config.tap(nic.vm_id, nic.index)
    with _lock:
        fd = _open_tap_in(f"{NETNS_DIR}/{ns}", name, persistent=False)
        try:
            _tap_attach(TapSpec(ns, name, config.bridge(nic.network_id)), config)
        except BaseException as exc:
            os.close(fd)
            if isinstance(exc, HostError):
                raise
            raise HostError(f"cannot attach tap {name} to its bridge: {exc}") from None
        return fd


def create_persistent_tap(nic: Nic, config: HostConfig) -> tuple[str, str]:
    """A persistent tap for VMMs that open taps by name: returns (netns, tap name). Run the VMM in that
    namespace; delete_tap (or a reconcile without the NIC) removes it. Raises HostError."""
    fd = create_tap_for_nic(nic, config)
    try:
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
    finally:
        os.close(fd)
    return config.netns(nic.tenant), config.tap(nic.vm_id, nic.index)


def delete_tap(nic: Nic, config: HostConfig) -> None:
    """Remove the NIC's tap if it exists (a running VM's NIC loses its link). Raises HostError."""
    ns = config.netns(nic.tenant)
    if os.path.exists(f"{NETNS_DIR}/{ns}"):
        try:
            _link_delete(ns, config.tap(nic.vm_id, nic.index), config)
        except Exception as exc:
            raise HostError(f"cannot delete the tap of NIC {nic.key}: {exc}") from None


def read_counters(config: HostConfig, tenant: str | None = None) -> dict[str, tuple[int, int]]:
    """Named counters {name: (packets, bytes)} of a tenant's guard and tenant tables (tenant None: the host
    table). Raises HostError if nft fails."""
    ns = config.netns(tenant) if tenant is not None else ""
    out: dict[str, tuple[int, int]] = {}
    fams = (("bridge", f"{config.prefix}_guard"), ("inet", f"{config.prefix}_tenant")) if tenant is not None \
        else (("inet", f"{config.prefix}_host"),)
    for fam, name in fams:
        out.update(_counter_values(NftTable(ns, fam, name, ""), config))
    return out


@contextlib.contextmanager
def owned(config: HostConfig) -> Iterator[HostConfig]:
    """Context manager for tests and benchmarks: tears everything down on exit, even on failure."""
    try:
        yield config
    finally:
        teardown(config)
