"""Tenant networks through the daemon on real kernel parts (root): two tenants' networks and VMs created
through the API exist on the host (namespaces, bridges, taps while the VMs run, nftables tables, the egress
uplink); a daemon restart rebuilds what was damaged and removes what should not exist; deleting everything
through the API leaves nothing (`ip -o link`, `ip netns`, `nft list ruleset` compared before and after).

A named namespace plays the host (HostConfig.host_netns), so the real host's own links and rules are never
touched; tenant namespaces are real named namespaces. VMs use the FakeBackend, which holds the tap fds it is
handed exactly as a worker would (a guest cannot run here for every VM; the jailed path is in
test_daemon_jailed.py).
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute
from pyroute2 import netns as pnetns

from bulkhead.daemon.testkit import Harness
from bulkhead.network import host
from bulkhead.network.service import NetworkService
from bulkhead.network.state import HostConfig

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]


def _run(ns: str | None, argv: list[str]) -> str:
    pre = ["nsenter", f"--net=/run/netns/{ns}", "--"] if ns else []
    return subprocess.run(pre + argv, capture_output=True, text=True, timeout=30, check=False).stdout


def _snap(ns: str | None) -> dict[str, list[str]]:
    out = {}
    for key, argv in (("link", ["ip", "-o", "link"]), ("addr", ["ip", "-o", "addr"]), ("route", ["ip", "route"]),
                      ("nft", ["nft", "list", "ruleset"])):
        out[key] = sorted(line.split(": ", 1)[-1] for line in _run(ns, argv).splitlines())
    return out


def _netns() -> set[str]:
    return {line.split()[0] for line in _run(None, ["ip", "netns", "list"]).splitlines() if line.strip()}


def _links(ns: str) -> set[str]:
    with IPRoute(netns=ns) as ipr:
        return {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}


def _tables(ns: str) -> set[str]:
    data = json.loads(_run(ns, ["nft", "-j", "list", "tables"]) or '{"nftables": []}')
    return {f"{t['table']['family']} {t['table']['name']}" for t in data["nftables"] if "table" in t}


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[HostConfig, Path]]:
    prefix = "d" + secrets.token_hex(1)
    hns = f"{prefix}host"
    real_before = _snap(None)
    pnetns.create(hns)
    cfg = HostConfig(prefix=prefix, state_dir=f"/run/bulkhead-test-{prefix}", host_netns=hns)
    try:
        fake_before = _snap(hns)
        yield cfg, tmp_path / "state"
        fake_after = _snap(hns)
    finally:
        with contextlib.suppress(Exception):
            host.teardown(cfg)
        with contextlib.suppress(Exception):
            pnetns.remove(hns)
    assert fake_after == fake_before, "the host namespace is not as it was before the networks existed"
    real_after = _snap(None)
    for key in real_before:
        changed = set(real_before[key]) ^ set(real_after[key])
        assert not [line for line in changed if re.search(rf"(^|[\s@]){prefix}[bnuh_-]", line)], (key, changed)
    assert not [n for n in _netns() if n.startswith(prefix)]  # (others' tests may add their own meanwhile)


def _harness(state: Path, cfg: HostConfig) -> Harness:
    return Harness(state, net=NetworkService(cfg))


def test_networks_through_the_api_exist_on_the_host_and_leave_nothing(world: Any) -> None:
    cfg, state = world
    h = _harness(state, cfg)
    try:
        ta, tb = h.tenant("acme"), h.tenant("globex")
        with h.client() as c:
            na = c.post(f"/v1/tenants/{ta}/networks", json={"name": "lan", "ipv4_subnet": "10.0.0.0/24",
                                                            "egress": True}).json()["id"]
            nb = c.post(f"/v1/tenants/{tb}/networks", json={"name": "lan", "ipv4_subnet": "10.0.0.0/24"}).json()["id"]
            vms = {}
            for name, t, n in (("a1", ta, na), ("a2", ta, na), ("b1", tb, nb)):
                r = c.post("/v1/vms", json={"tenant": t, "name": name, "kernel": "vmlinux", "nics": [{"network": n}]})
                assert r.status_code == 201, r.text
                vms[name] = r.json()["id"]
            nsa, nsb = cfg.netns(ta), cfg.netns(tb)
            assert {nsa, nsb} <= _netns()
            assert cfg.bridge(na) in _links(nsa) and cfg.bridge(nb) in _links(nsb)
            assert cfg.bridge(nb) not in _links(nsa)
            assert {f"bridge {cfg.prefix}_guard", f"inet {cfg.prefix}_tenant"} <= _tables(nsa)
            assert f"inet {cfg.prefix}_host" in _tables(cfg.host_netns or "")  # egress: the host table
            uplink_tenant, uplink_host = cfg.uplink(ta)
            assert uplink_tenant in _links(nsa) and uplink_host in _links(cfg.host_netns or "")
            # the guard already pins each NIC (before any tap exists)
            guard = _run(nsa, ["nft", "list", "table", "bridge", f"{cfg.prefix}_guard"])
            a1 = c.get(f"/v1/vms/{vms['a1']}").json()["nics"][0]
            assert a1["mac"] in guard and cfg.tap(vms["a1"], 0) in guard

            for v in vms.values():
                assert c.post(f"/v1/vms/{v}/start").status_code == 200
            taps = {name: cfg.tap(v, 0) for name, v in vms.items()}
            assert {taps["a1"], taps["a2"]} <= _links(nsa) and taps["b1"] in _links(nsb)
            assert not ({taps["a1"], taps["a2"], taps["b1"]} & _links(cfg.host_netns or ""))
            counters = c.get(f"/v1/networks/{na}/counters").json()["counters"]
            assert f"{a1['mac']}/mac" in counters and "tenant/to_host" in counters

            assert c.post(f"/v1/vms/{vms['a2']}/stop").status_code == 200
            assert taps["a2"] not in _links(nsa)  # the tap lived exactly as long as its holder

            assert c.delete(f"/v1/networks/{na}").status_code == 409
            for v in vms.values():
                c.post(f"/v1/vms/{v}/stop")
                assert c.delete(f"/v1/vms/{v}").status_code == 204
            assert cfg.tap(vms["a1"], 0) not in _run(nsa, ["nft", "list", "table", "bridge", f"{cfg.prefix}_guard"])
            assert c.delete(f"/v1/networks/{na}").status_code == 204
            assert nsa not in _netns() and nsb in _netns()
            assert c.delete(f"/v1/networks/{nb}").status_code == 204
            assert not [n for n in _netns() if n.startswith(cfg.prefix + "-")]
    finally:
        h.close()


def test_a_daemon_restart_rebuilds_what_should_exist_and_removes_the_rest(world: Any) -> None:
    cfg, state = world
    h = _harness(state, cfg)
    try:
        t = h.tenant("acme")
        with h.client() as c:
            n = c.post(f"/v1/tenants/{t}/networks", json={"name": "lan", "ipv4_subnet": "10.5.0.0/24"}).json()["id"]
            vm = c.post("/v1/vms", json={"tenant": t, "name": "a", "kernel": "vmlinux",
                                         "nics": [{"network": n}]}).json()["id"]
    finally:
        h.close()
    ns = cfg.netns(t)
    # while the daemon is down: its bridge and rules are lost, a stray namespace and a stray tap appear
    with IPRoute(netns=ns) as ipr:
        ipr.link("del", index=ipr.link_lookup(ifname=cfg.bridge(n))[0])
    _run(ns, ["nft", "delete", "table", "bridge", f"{cfg.prefix}_guard"])
    stray_ns = f"{cfg.prefix}-{'0' * 12}"
    pnetns.create(stray_ns)
    stray_tap = f"{cfg.prefix}n{'f' * (14 - len(cfg.prefix))}"
    _run(ns, ["ip", "tuntap", "add", "dev", stray_tap, "mode", "tap"])
    assert stray_tap in _links(ns)

    h = _harness(state, cfg)  # a restart: open + start
    try:
        assert cfg.bridge(n) in _links(ns)
        assert stray_tap not in _links(ns) and stray_ns not in _netns()
        guard = _run(ns, ["nft", "list", "table", "bridge", f"{cfg.prefix}_guard"])
        assert cfg.tap(vm, 0) in guard
        with h.client() as c:
            recs = [r for r in c.get("/v1/audit", params={"limit": 10000}).json()
                    if r["action"] == "network.reconcile"]
            last = json.loads(recs[-1]["detail"])
            assert recs[-1]["kind"] == "system" and recs[-1]["result"] == "ok" and last["reason"] == "daemon start"
            assert last["count"] >= 3 and any(cfg.bridge(n) in a for a in last["actions"])
            assert c.delete(f"/v1/vms/{vm}").status_code == 204
            assert c.delete(f"/v1/networks/{n}").status_code == 204
        assert ns not in _netns()
    finally:
        h.close()
    h = _harness(state, cfg)  # nothing to do now: the reconcile at start takes no action
    try:
        with h.client() as c:
            recs = [r for r in c.get("/v1/audit", params={"limit": 10000}).json()
                    if r["action"] == "network.reconcile"]
            assert json.loads(recs[-1]["detail"])["count"] == 0
    finally:
        h.close()
