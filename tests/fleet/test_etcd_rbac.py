"""etcd access control (docs/FLEET.md "etcd access control"): etcd itself refuses a host agent's writes
outside its own keys. A real 1-member etcd with client TLS and authentication on, a real controller and
real agents logged in as their own etcd users; the attacks use a host agent's own credentials."""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.fleet.kit import Fleet, make_vm, wait

from bulkhead.errors import HostError
from bulkhead.fleet import etcdauth
from bulkhead.fleet.etcdrun import EtcdCluster
from bulkhead.fleet.model import encode, key
from bulkhead.fleet.store import Cmp, EtcdRefused, EtcdStore, Op

pytestmark = pytest.mark.slow


@pytest.fixture
def auth_fleet(tmp_path: Path) -> Iterator[tuple[Fleet, dict[str, EtcdStore]]]:
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed")
    cluster = EtcdCluster(tmp_path / "etcd", 1).start()  # its own: auth on would lock out the shared one
    fleet = None
    try:
        fleet = Fleet(cluster, tmp_path / "fleet")
        open_store = fleet.store
        root_pw = secrets.token_hex(12)
        etcdauth.bootstrap(open_store, root_pw)
        root = EtcdStore(cluster.endpoints, fleet.tls, namespace=fleet.ns, user="root", password=root_pw)
        fleet.store = root
        stores: dict[str, EtcdStore] = {"root": root}
        for who in ("c1", "h1", "h2"):
            pw = secrets.token_hex(12)
            user = etcdauth.add_scheduler(root, pw) if who == "c1" else etcdauth.add_host(root, who, pw)
            f = tmp_path / f"{who}.pw"
            f.write_text(pw)
            fleet.users[who] = ["--etcd-user", user, "--etcd-password-file", str(f)]
            stores[who] = EtcdStore(cluster.endpoints, fleet.tls, namespace=fleet.ns, user=user, password=pw)
        yield fleet, stores
    finally:
        if fleet is not None:
            fleet.close()
        cluster.stop()


def _refused(fn: object) -> str:
    with pytest.raises(EtcdRefused) as e:
        fn()  # type: ignore[operator]
    assert "permission denied" in e.value.reason, e.value.reason
    return e.value.reason


def test_an_agent_can_write_only_its_own_keys(auth_fleet: tuple[Fleet, dict[str, EtcdStore]]) -> None:
    fleet, st = auth_fleet
    fleet.start_controller("c1")
    fleet.wait_api()
    for h in ("h1", "h2"):
        fleet.start_agent(h)
    wait(lambda: len(hs := fleet.hosts()) == 2 and all(x["state"] == "ready" for x in hs.values()), 40, "hosts ready")
    with fleet.client() as c:  # the whole path works with auth on: register, attest, place, claim, run
        t = c.post("/tenants", {"name": "acme"})["id"]
        disk = c.post(f"/tenants/{t}/disks", {"name": "d0", "size_mib": 1})["id"]
        vm = make_vm(c, t, "v0", drives=[{"disk": disk, "read_only": False}])["id"]
        c.post(f"/vms/{vm}/start", {})
    wait(lambda: any(vm in fleet.running_on(h) for h in ("h1", "h2")), 30, "the VM running")
    owner = next(h for h in ("h1", "h2") if vm in fleet.running_on(h))
    other = "h2" if owner == "h1" else "h1"
    bad = st[other]

    # no anonymous access: a fleet certificate without an etcd login is refused
    with pytest.raises(EtcdRefused):
        EtcdStore(fleet.etcd.endpoints, fleet.tls, namespace=fleet.ns).put(key("hosts", owner), "{}")
    # the other host's credential: its own keys yes, nothing else
    bad.put(key("evidence", other), "{}")
    _refused(lambda: bad.put(key("hosts", owner), encode({"mem_mib": 1 << 20})))  # impersonate a host
    _refused(lambda: bad.put(key("evidence", owner), "{}"))
    _refused(lambda: bad.put(key("assign", vm), encode({"host": other, "vm": vm})))  # steal the VM
    _refused(lambda: bad.put(key("attest", other), encode({"trusted": True})))  # attest itself
    _refused(lambda: bad.put(key("running", vm), "{}"))  # claim a VM assigned elsewhere
    _refused(lambda: bad.put(key("disks", disk), "{}"))  # or its writable disk
    _refused(lambda: bad.put(key("exit", vm), encode({"host": owner, "status": 0})))  # or report its exit
    _refused(lambda: bad.delete(key("leader")))
    _refused(lambda: bad.txn([], [Op(key("assign", vm))]))  # a transaction is checked op by op
    _refused(lambda: bad.auth("role/grant", {"name": etcdauth.host_user(other),
                                             "perm": {"key": bad.raw_key(key("")), "permType": "READWRITE"}}))
    # it reads what it needs (its assignments, the comparisons of its fenced transactions)
    assert bad.get(key("assign", vm)) is not None
    ok, _ = bad.txn([Cmp(key("running", vm), "CREATE", 0)], [])
    assert not ok
    # the owner's permissions on the VM's keys follow the assignment: drained away, they are revoked
    with fleet.client() as c:
        c.post(f"/hosts/{owner}/drain", {})
    wait(lambda: vm in fleet.running_on(other), 30, "the VM moved to the other host")

    def revoked() -> bool:  # the revocation follows the old claim's release by a controller tick
        try:  # a transaction whose compare never holds: checked for permission, changes nothing
            st[owner].txn([Cmp(key("running", vm), "CREATE", -1)], [Op(key("running", vm), "{}")])
        except EtcdRefused:
            return True
        return False

    wait(revoked, 10, "the old owner's grant on the VM revoked")
    _refused(lambda: st[owner].put(key("running", vm), "{}"))
    _refused(lambda: st[owner].put(key("disks", disk), "{}"))
    assert st["c1"].get(key("leader")) is not None
    with pytest.raises(HostError):
        EtcdStore(fleet.etcd.endpoints, fleet.tls, namespace=fleet.ns, user="host-h1", password="wrong").get("/x")
