"""etcd users and roles for the fleet (docs/FLEET.md "etcd access control").

etcd itself refuses what a member may not write, so a compromised host agent is contained by the store,
not by the controller's goodwill:
- `root` (the operator's bootstrap user) and the controller's user hold etcd's root role: the controller
  is the scheduler, and only the root role may change permissions, which it does at every placement;
- a host agent's user `host-<id>` has the role `host-<id>`: READ on the fleet's prefix (its assignments,
  its nonce, the comparisons its fenced transactions make), READWRITE on exactly its own registration
  and evidence keys, and, only while a VM is assigned to it, on that VM's `running`/`exit` keys and the
  `disks` keys of its writable drives (granted by the controller before the assignment is written,
  revoked from the previous host first).

Clients reach etcd through its JSON gateway, which with auth enabled refuses certificates that carry a
Common Name (etcd 3.4: the gateway cannot pass the CN on), so fleet client certificates name their holder
in a SAN only and authenticate with a password (etcd simple tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from bulkhead.errors import HostError
from bulkhead.fleet.model import key, valid_host_id
from bulkhead.fleet.store import EtcdRefused, EtcdStore

__all__ = ["SCHEDULER", "Grants", "add_host", "add_scheduler", "bootstrap", "grant_vm", "host_user", "revoke_vm"]

SCHEDULER = "bulkhead-controller"


def host_user(host: str) -> str:
    return "host-" + valid_host_id(host)


def _ignore_exists(store: EtcdStore, op: str, body: dict[str, object]) -> None:
    try:
        store.auth(op, body)
    except EtcdRefused as exc:
        if "already exists" not in exc.reason and "already granted" not in exc.reason:
            raise


def _user(store: EtcdStore, name: str, password: str, roles: Iterable[str]) -> None:
    _ignore_exists(store, "user/add", {"name": name, "password": password})
    store.auth("user/changepw", {"name": name, "password": password})
    for r in roles:
        _ignore_exists(store, "role/add", {"name": r})
        store.auth("user/grant", {"user": name, "role": r})


def bootstrap(store: EtcdStore, root_password: str) -> None:
    """Create `root` and enable authentication (a store without a user: before auth is on)."""
    _user(store, "root", root_password, ["root"])
    store.auth("enable", {})


def add_scheduler(root: EtcdStore, password: str) -> str:
    """The controller's user (root role: it grants the hosts' per-VM permissions). Returns its name."""
    _user(root, SCHEDULER, password, ["root"])
    return SCHEDULER


def _perm(store: EtcdStore, k: str, kind: str, prefix: bool = False) -> dict[str, object]:
    perm: dict[str, object] = {"key": store.raw_key(k), "permType": kind}
    if prefix:
        perm["range_end"] = store.raw_prefix_end(k)
    return perm


def add_host(root: EtcdStore, host: str, password: str) -> str:
    """Host `host`'s user and role (its static permissions). Returns the user name."""
    user = host_user(host)
    _user(root, user, password, [user])
    root.auth("role/grant", {"name": user, "perm": _perm(root, key(""), "READ", prefix=True)})
    for k in (key("hosts", host), key("evidence", host), key("checkpoint", host)):
        root.auth("role/grant", {"name": user, "perm": _perm(root, k, "READWRITE")})
    return user


def _vm_keys(vm: str, rw_disks: Iterable[str]) -> list[str]:
    return [key("running", vm), key("exit", vm), *(key("disks", d) for d in rw_disks)]


def grant_vm(store: EtcdStore, host: str, vm: str, rw_disks: Iterable[str]) -> None:
    """Let `host` write VM `vm`'s claim, exit and writable-disk keys (before its assignment is written)."""
    for k in _vm_keys(vm, rw_disks):
        store.auth("role/grant", {"name": host_user(host), "perm": _perm(store, k, "READWRITE")})


def revoke_vm(store: EtcdStore, host: str, vm: str, rw_disks: Iterable[str]) -> None:
    """Take those permissions back (a permission that is not there is not an error)."""
    for k in _vm_keys(vm, rw_disks):
        try:
            store.auth("role/revoke", {"role": host_user(host), "key": store.raw_key(k)})
        except EtcdRefused as exc:
            if "not granted" not in exc.reason and "not found" not in exc.reason:
                raise HostError(f"etcd: revoking {host}'s permission on {k}: {exc.reason}") from None




class Grants:
    """The controller's side of the per-VM permissions: grant the new host before its assignment is
    written; revoke the previous host's once it no longer holds the VM's claim (it must be able to
    release it). The pending revocations live in memory: a controller restart in between leaves that
    grant in place (docs/FLEET.md "etcd access control", not done)."""

    def __init__(self) -> None:
        self.pending: dict[tuple[str, str], list[str]] = {}

    def move(self, store: EtcdStore, host: str | None, old: object, vm: str, spec: object) -> None:
        drives = spec.get("drives", []) if isinstance(spec, dict) else []
        rw = [str(d.get("disk")) for d in drives if isinstance(d, dict) and not d.get("read_only")]
        if isinstance(old, str) and old and old != host:
            self.pending[(old, vm)] = rw
        if host is not None and old != host:
            grant_vm(store, host, vm, rw)

    def released(self, store: EtcdStore, claim_holder: Callable[[str], object]) -> None:
        """`claim_holder(vm)`: the host holding `running/vm` now (None when nobody does)."""
        for (old, vm), rw in list(self.pending.items()):
            if claim_holder(vm) != old:
                revoke_vm(store, old, vm, rw)
                del self.pending[(old, vm)]
