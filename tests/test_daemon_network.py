"""Tenant networks through the API (no root: the daemon's NetworkService validates but changes nothing on
the host): CRUD, validation (overlaps, bad subnets), tenant isolation (404 outside scopes, a NIC on another
tenant's network refused exactly like a missing one), NIC address pinning and reuse, what a VM start hands
the backend (tap names, MACs, rates, the tenant namespace), counters, RBAC, audit records. No 5xx."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from bulkhead.daemon.backend import FakeBackend
from bulkhead.daemon.networks import DryNetworkService
from bulkhead.daemon.testkit import Harness
from bulkhead.network.model import nic_mac


@pytest.fixture
def h(tmp_path: Path):
    harness = Harness(tmp_path / "s")
    yield harness
    harness.close()


def _net(c: Any, tenant: str, name: str, subnet: str, **kw: Any) -> Any:
    return c.post(f"/v1/tenants/{tenant}/networks", json={"name": name, "ipv4_subnet": subnet, **kw})


def test_network_crud_and_its_audit_records(h):
    t = h.tenant("acme")
    with h.client() as c:
        r = _net(c, t, "lan", "10.1.0.0/24", ipv6_prefix="fd00:1::/64")
        assert r.status_code == 201, r.text
        net = r.json()
        assert (net["tenant"], net["name"], net["ipv4_subnet"], net["ipv4_gateway"], net["ipv6_prefix"],
                net["egress"]) == (t, "lan", "10.1.0.0/24", "10.1.0.1", "fd00:1::/64", False)
        uuid.UUID(net["id"])
        assert c.get(f"/v1/networks/{net['id']}").json() == net
        assert c.get(f"/v1/tenants/{t}/networks").json() == [net]
        assert c.get(f"/v1/networks/{net['id']}/counters").json() == {"network": net["id"], "counters": {}}
        assert c.delete(f"/v1/networks/{net['id']}").status_code == 204
        assert c.get(f"/v1/networks/{net['id']}").status_code == 404
        assert c.get(f"/v1/tenants/{t}/networks").json() == []
        recs = [x for x in c.get("/v1/audit", params={"limit": 10000}).json() if x["action"].startswith("network/")]
    got = [(x["action"], x["result"], x["decision"]) for x in recs]
    assert got == [("network/write", "201", "allow"), ("network/read", "200", "allow"),
                   ("network/read", "200", "allow"), ("network/read", "200", "allow"),
                   ("network/write", "204", "allow"), ("network/read", "404", "deny"), ("network/read", "200", "allow")]
    assert recs[0]["scope"] == f"/tenants/{t}" and recs[1]["scope"] == f"/tenants/{t}/networks/{net['id']}"
    # every create and delete made the host match the store (a dry service here: it records the calls)
    assert h.daemon.net.synced[-2:] == [(1, 0), (0, 0)]


@pytest.mark.parametrize("body, status, words", [
    ({"ipv4_subnet": "10.1.0.128/25"}, 422, "overlaps network 'lan'"),   # inside the existing 10.1.0.0/24
    ({"ipv4_subnet": "10.0.0.0/8"}, 422, "between /16 and /29"),
    ({"ipv4_subnet": "10.2.0.0/30"}, 422, "between /16 and /29"),
    ({"ipv4_subnet": "8.8.8.0/24"}, 422, "10/8, 172.16/12"),
    ({"ipv4_subnet": "10.2.0.1/24"}, 422, "no host bits"),
    ({"ipv4_subnet": "100.127.3.0/24"}, 422, "which the host reserves"),  # the uplink pool
    ({"ipv4_subnet": "10.3.0.0/24", "ipv6_prefix": "fe80::/64"}, 422, "unicast prefix"),
    ({"ipv4_subnet": "10.3.0.0/24", "ipv6_prefix": "fd00:1::/48"}, 422, "must be a /64"),
    ({"ipv4_subnet": "10.3.0.0/24", "ipv6_prefix": "fd00:1::/64"}, 422, "overlaps network 'lan'"),
    ({"name": "lan", "ipv4_subnet": "10.4.0.0/24"}, 409, "already exists"),
    ({"name": "Bad_Name", "ipv4_subnet": "10.4.0.0/24"}, 422, ""),
    ({"ipv4_subnet": "10.4.0.0/24", "egress": "yes"}, 422, ""),
    ({"ipv4_subnet": "10.4.0.0/24", "tap": "x"}, 422, ""),
    ({"ipv4_subnet": "not-a-subnet"}, 422, ""),
])
def test_bad_networks_are_refused_with_a_reason(h, body, status, words):
    t = h.tenant("v")
    with h.client() as c:
        assert _net(c, t, "lan", "10.1.0.0/24", ipv6_prefix="fd00:1::/64").status_code == 201
        r = c.post(f"/v1/tenants/{t}/networks", json={"name": "other", **body})
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    text = detail if isinstance(detail, str) else " ".join(d["msg"] for d in detail)
    assert words in text


def test_tenants_may_reuse_subnets_and_never_see_each_other(h):
    t, u = h.tenant("acme"), h.tenant("globex")
    with h.client() as c:
        theirs = _net(c, u, "lan", "10.1.0.0/24").json()["id"]
    owner = h.principal("acme-owner", ("Owner", f"/tenants/{t}"))
    with h.client(owner) as c:
        assert _net(c, t, "lan", "10.1.0.0/24").status_code == 201  # the same subnet: separate namespaces
        nobody = str(uuid.uuid4())
        for path in (f"/v1/networks/{theirs}", f"/v1/networks/{theirs}/counters"):
            r1, r2 = c.get(path), c.get(path.replace(theirs, nobody))
            assert (r1.status_code, r1.json()) == (404, {"detail": "not found"}) == (r2.status_code, r2.json())
        r = c.delete(f"/v1/networks/{theirs}")
        assert (r.status_code, r.json()) == (404, {"detail": "not found"})
        assert c.get(f"/v1/tenants/{u}/networks").json() == []
        assert _net(c, u, "intruder", "10.9.0.0/24").status_code == 404
        assert _net(c, str(uuid.uuid4()), "x", "10.9.0.0/24").status_code == 404
    with h.client() as c:
        assert c.get(f"/v1/networks/{theirs}").status_code == 200  # still there, untouched


def test_roles_on_networks(h):
    t = h.tenant("acme")
    with h.client() as c:
        net = _net(c, t, "lan", "10.1.0.0/24").json()["id"]
    reader = h.principal("reader", ("Reader", f"/tenants/{t}"))
    contrib = h.principal("contrib", ("Contributor", f"/tenants/{t}"))
    operator = h.principal("operator", ("VM Operator", f"/tenants/{t}"))
    with h.client(reader) as c:
        assert c.get(f"/v1/networks/{net}").status_code == 200
        assert [n["id"] for n in c.get(f"/v1/tenants/{t}/networks").json()] == [net]
        assert c.get(f"/v1/networks/{net}/counters").status_code == 200
        assert _net(c, t, "mine", "10.2.0.0/24").status_code == 403
        assert c.delete(f"/v1/networks/{net}").status_code == 403
    with h.client(operator) as c:  # no network/read: the network is invisible
        assert c.get(f"/v1/networks/{net}").status_code == 404
        assert c.get(f"/v1/tenants/{t}/networks").json() == []
    with h.client(contrib) as c:
        other = _net(c, t, "dmz", "10.2.0.0/24").json()["id"]
        assert c.delete(f"/v1/networks/{other}").status_code == 204


def test_nics_attach_to_own_tenant_networks_with_pinned_addresses(h):
    t, u = h.tenant("acme"), h.tenant("globex")
    with h.client() as c:
        lan = _net(c, t, "lan", "10.1.0.0/24", ipv6_prefix="fd00:1::/64").json()["id"]
        foreign = _net(c, u, "lan", "10.1.0.0/24").json()["id"]
    owner = h.principal("acme-owner", ("Owner", f"/tenants/{t}"))
    with h.client(owner) as c:
        def vm(name: str, *nics: dict[str, Any]) -> Any:
            return c.post("/v1/vms", json={"tenant": t, "name": name, "kernel": "vmlinux", "nics": list(nics)})

        r_foreign, r_missing = vm("steal", {"network": foreign}), vm("steal", {"network": str(uuid.uuid4())})
        assert r_foreign.status_code == r_missing.status_code == 422
        assert "was not found in tenant" in r_foreign.json()["detail"][0]["msg"]
        assert r_foreign.json()["detail"][0]["msg"].replace(foreign, "X") == \
            r_missing.json()["detail"][0]["msg"].replace(r_missing.json()["detail"][0]["msg"].split()[1], "X")

        a = vm("a", {"network": lan}, {"network": lan, "ipv4": "10.1.0.50", "rate": {"bytes_per_sec": 1000000}})
        assert a.status_code == 201, a.text
        va = a.json()
        assert [(n["index"], n["network"], n["ipv4"]) for n in va["nics"]] == [(0, lan, "10.1.0.2"),
                                                                                  (1, lan, "10.1.0.50")]
        assert va["nics"][0]["mac"] == nic_mac(va["id"], 0)
        assert va["nics"][0]["ipv6"].startswith("fd00:1::")
        assert va["nics"][1]["rate"] == {"bytes_per_sec": 1000000, "ops_per_sec": 0}
        assert c.get(f"/v1/vms/{va['id']}").json()["nics"] == va["nics"]

        taken = vm("b", {"network": lan, "ipv4": "10.1.0.50"})
        assert taken.status_code == 422 and "already held" in taken.json()["detail"][0]["msg"]
        for bad, words in (("10.1.0.1", "reserved"), ("10.1.1.9", "not in network"), ("10.1.0.255", "reserved")):
            r = vm("b", {"network": lan, "ipv4": bad})
            assert r.status_code == 422 and words in r.json()["detail"][0]["msg"], (bad, r.text)
        dup_mac = vm("b", {"network": lan, "mac": va["nics"][0]["mac"]})
        assert dup_mac.status_code == 422 and "already used" in dup_mac.json()["detail"][0]["msg"]
        b = vm("b", {"network": lan}).json()
        assert b["nics"][0]["ipv4"] == "10.1.0.3"  # lowest free; nothing was held by the refused requests

        assert c.delete(f"/v1/networks/{lan}").status_code == 409  # NICs still on it
        assert c.delete(f"/v1/vms/{va['id']}").status_code == 204
        again = vm("c", {"network": lan}).json()
        assert again["nics"][0]["ipv4"] == "10.1.0.2"  # free again only once the VM holding it is gone
        for v in (b["id"], again["id"]):
            assert c.delete(f"/v1/vms/{v}").status_code == 204
        assert c.delete(f"/v1/networks/{lan}").status_code == 204
    assert h.daemon.store.q("SELECT * FROM nics WHERE tenant = ?", (t,)) == []


def test_tenant_with_a_network_cannot_be_deleted(h):
    t = h.tenant("acme")
    with h.client() as c:
        net = _net(c, t, "lan", "10.1.0.0/24").json()["id"]
        r = c.delete(f"/v1/tenants/{t}")
        assert r.status_code == 409 and "networks" in r.json()["detail"]
        assert c.delete(f"/v1/networks/{net}").status_code == 204
        assert c.delete(f"/v1/tenants/{t}").status_code == 204


def test_a_start_hands_the_backend_the_nics_taps(h):
    t = h.tenant("acme")
    with h.client() as c:
        lan = _net(c, t, "lan", "10.1.0.0/24").json()["id"]
        vm = c.post("/v1/vms", json={"tenant": t, "name": "a", "kernel": "vmlinux",
                                     "nics": [{"network": lan, "rate": {"bytes_per_sec": 5000, "ops_per_sec": 7}}]})
        vid = vm.json()["id"]
        synced = len(h.daemon.net.synced)
        assert c.post(f"/v1/vms/{vid}/start").status_code == 200
    assert len(h.daemon.net.synced) == synced + 1  # rules in place before the tap exists
    spec = h.backend.specs[vid]
    cfg = h.daemon.net.config
    (nic,) = spec.nics
    assert (nic.tap, nic.mac, nic.rate.bytes_per_sec, nic.rate.ops_per_sec) == (
        cfg.tap(vid, 0), nic_mac(vid, 0), 5000, 7)
    assert spec.netns == cfg.netns(t)


class _ByName(FakeBackend):
    opens_taps_by_name = True


def test_a_backend_that_opens_taps_by_name_gets_persistent_taps_and_the_namespace(tmp_path):
    made: list[str] = []

    class Net(DryNetworkService):
        def create_persistent_tap(self, nic: Any) -> tuple[str, str]:
            made.append(nic.vm_id)
            return super().create_persistent_tap(nic)

    h = Harness(tmp_path / "s", backend=_ByName(), net=Net())
    try:
        t = h.tenant("acme")
        with h.client() as c:
            lan = _net(c, t, "lan", "10.1.0.0/24").json()["id"]
            vid = c.post("/v1/vms", json={"tenant": t, "name": "a", "kernel": "vmlinux",
                                          "nics": [{"network": lan}]}).json()["id"]
            assert c.post(f"/v1/vms/{vid}/start").status_code == 200
        spec = h.backend.specs[vid]
        assert made == [vid] and spec.nics[0].tap_fd == -1 and spec.netns == h.daemon.net.config.netns(t)
    finally:
        h.close()


def test_counters_are_named_by_nic_and_exclude_other_networks(tmp_path):
    class Net(DryNetworkService):
        raw: dict[str, tuple[int, int]] = {}

        def counters(self, tenant: str) -> dict[str, tuple[int, int]]:
            return dict(self.raw)

    net = Net()
    h = Harness(tmp_path / "s", net=net)
    try:
        t = h.tenant("acme")
        with h.client() as c:
            lan = _net(c, t, "lan", "10.1.0.0/24").json()["id"]
            dmz = _net(c, t, "dmz", "10.2.0.0/24").json()["id"]
            a = c.post("/v1/vms", json={"tenant": t, "name": "a", "kernel": "vmlinux",
                                        "nics": [{"network": lan}]}).json()["id"]
            b = c.post("/v1/vms", json={"tenant": t, "name": "b", "kernel": "vmlinux",
                                        "nics": [{"network": dmz}]}).json()["id"]
            cfg = net.config
            Net.raw = {f"{cfg.tap(a, 0)}_mac": (3, 180), f"{cfg.tap(a, 0)}_arp": (1, 42), "to_host": (2, 120),
                       f"{cfg.tap(b, 0)}_mac": (9, 9)}
            got = c.get(f"/v1/networks/{lan}/counters").json()["counters"]
        mac = nic_mac(a, 0)
        assert got == {f"{mac}/mac": {"packets": 3, "bytes": 180}, f"{mac}/arp": {"packets": 1, "bytes": 42},
                       "tenant/to_host": {"packets": 2, "bytes": 120}}
    finally:
        h.close()


def test_no_bad_network_request_is_a_5xx(h):
    t = h.tenant("acme")
    bodies: list[Any] = [None, [], {}, {"name": "x"}, {"name": "x", "ipv4_subnet": 5}, {"name": "x" * 70, "ipv4_subnet":
                         "10.0.0.0/24"}, {"name": "x", "ipv4_subnet": "999.1.1.0/24"},
                         {"name": "x", "ipv4_subnet": "10.0.0.0/24", "ipv6_prefix": "::ffff:0:0/64"},
                         {"name": "x", "ipv4_subnet": "10.0.0.0/24", "ipv6_prefix": "zz::/64"}]
    with h.client() as c:
        for body in bodies:
            r = c.post(f"/v1/tenants/{t}/networks", json=body)
            assert r.status_code == 422, (body, r.text)
        for path in ("/v1/networks/not-a-uuid", "/v1/networks/not-a-uuid/counters"):
            assert c.get(path).status_code == 422


def test_network_cli_through_the_local_socket(tmp_path, capsys):
    import json as _json

    from bulkhead.daemon.cli import network_main, vm_main
    from bulkhead.daemon.testkit import ServerThread

    h = Harness(tmp_path / "s")
    try:
        h.tenant("acme")
        sock = ["--socket", str(h.sd.socket)]
        with ServerThread(h):
            assert network_main(["create", "--tenant", "acme", "--name", "lan", "--ipv4", "10.7.0.0/24",
                                 "--egress", *sock, "--json"]) == 0
            net = _json.loads(capsys.readouterr().out)
            assert (net["name"], net["ipv4_gateway"], net["egress"]) == ("lan", "10.7.0.1", True)
            assert network_main(["list", "--tenant", "acme", *sock]) == 0
            out = capsys.readouterr().out
            assert out.splitlines()[0].split()[:3] == ["ID", "TENANT", "NAME"] and "10.7.0.0/24" in out
            assert network_main(["create", "--tenant", "acme", "--name", "dup", "--ipv4", "10.7.0.0/25", *sock]) == 1
            assert "overlaps network 'lan'" in capsys.readouterr().err
            assert vm_main(["create", "--tenant", "acme", "--name", "web", "--kernel", "vmlinux",
                            "--net", "lan,ip=10.7.0.9,bw=1000", *sock, "--json"]) == 0
            vm = _json.loads(capsys.readouterr().out)
            assert (vm["nics"][0]["network"], vm["nics"][0]["ipv4"], vm["nics"][0]["rate"]["bytes_per_sec"]) == (
                net["id"], "10.7.0.9", 1000)
            assert vm_main(["create", "--tenant", "acme", "--name", "x", "--kernel", "vmlinux",
                            "--net", "lan,speed=9", *sock]) == 2
            assert "options are ip=" in capsys.readouterr().err
            assert network_main(["counters", "lan", "--tenant", "acme", *sock]) == 0
            assert capsys.readouterr().out.strip() == "(none)"  # a dry service: no counters
            assert network_main(["delete", net["id"], *sock]) == 1  # the VM's NIC is on it
            assert "NICs on the network" in capsys.readouterr().err
            assert vm_main(["delete", "web", *sock]) == 0
            assert network_main(["delete", "lan", "--tenant", "acme", *sock]) == 0
            assert network_main(["get", net["id"], *sock]) == 1
    finally:
        h.close()
