"""The daemon-facing layer: schema, rows, request validation (pure); taps handed over as NetConfig (root)."""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3

import pytest
from pyroute2 import netns as pnetns

from bulkhead.errors import ConfigError
from bulkhead.network.service import (
    SCHEMA,
    NetworkService,
    network_from_row,
    network_row,
    nic_from_row,
    nic_row,
)
from bulkhead.network.state import HostConfig

SVC = NetworkService(HostConfig(prefix="bs", state_dir="/tmp/unused"))


def test_requests_rows_and_schema_round_trip() -> None:
    net = SVC.new_network("t1", {"name": "web", "ipv4_subnet": "10.1.0.0/24", "ipv6_prefix": "fd00:1::/64",
                                 "egress": True}, [])
    nic = SVC.new_nic("vm1", "t1", 0, net, [], {"network": net.id, "rate": {"bytes_per_sec": 1000}})
    db = sqlite3.connect(":memory:")
    db.row_factory = sqlite3.Row
    db.executescript(SCHEMA)
    db.execute("INSERT INTO networks VALUES (:id, :tenant, :name, :ipv4, :ipv6, :egress, 'now')", network_row(net))
    db.execute("INSERT INTO nics VALUES (:vm, :idx, :network, :tenant, :mac, :ipv4, :ipv6, :bytes_per_sec, "
               ":ops_per_sec)", nic_row(nic))
    assert network_from_row(db.execute("SELECT * FROM networks").fetchone()) == net
    assert nic_from_row(db.execute("SELECT * FROM nics").fetchone()) == nic
    # the store itself refuses a second holder of the same address or MAC on a network
    twin = dict(nic_row(nic), vm="vm2")
    with pytest.raises(sqlite3.IntegrityError):
        db.execute("INSERT INTO nics VALUES (:vm, :idx, :network, :tenant, :mac, :ipv4, :ipv6, :bytes_per_sec, "
                   ":ops_per_sec)", twin)


@pytest.mark.parametrize("body", [{"name": "x", "ipv4_subnet": "10.0.0.0/24", "extra": 1},
                                  {"name": "x", "ipv4_subnet": "100.127.0.0/24"},  # the uplink pool
                                  {"name": "x"}, {"ipv4_subnet": "10.0.0.0/24"},
                                  {"name": "x", "ipv4_subnet": "10.0.0.0/24", "egress": "yes"}])
def test_bad_network_requests(body: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        SVC.new_network("t1", body, [])


@pytest.mark.parametrize("spec", [{"network": "n", "bogus": 1}, {"network": "n", "rate": {"bps": 1}},
                                  {"network": "n", "rate": {"bytes_per_sec": -5}}, {"network": "n", "ipv4": "10.2.0.9"},
                                  {"network": "n", "mac": "01:00:00:00:00:01"}, {"network": "n", "rate": 7}])
def test_bad_nic_requests(spec: dict[str, object]) -> None:
    net = SVC.new_network("t1", {"name": "a", "ipv4_subnet": "10.1.0.0/24"}, [])
    with pytest.raises(ConfigError):
        SVC.new_nic("vm1", "t1", 0, net, [], spec)


def test_malformed_rows_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        nic_from_row({"vm": "v", "idx": 0, "network": "n", "tenant": "t", "mac": "x", "ipv4": "nope", "ipv6": None,
                      "bytes_per_sec": 0, "ops_per_sec": 0})
    with pytest.raises(ConfigError):
        network_from_row({"id": "n", "tenant": "t", "name": "a", "ipv4": "8.8.8.0/24", "ipv6": None, "egress": 0})


@pytest.mark.root
def test_vm_nets_hand_over_adoptable_taps_and_close_the_daemons_copies() -> None:
    from bulkhead.runtime.tap import TapBackend

    prefix = "p" + secrets.token_hex(1)
    hns = f"{prefix}host"
    pnetns.create(hns)
    svc = NetworkService(HostConfig(prefix=prefix, state_dir=f"/run/bulkhead-test-{prefix}", host_netns=hns))
    try:
        net = svc.new_network("t1", {"name": "a", "ipv4_subnet": "10.1.0.0/24"}, [])
        n1 = svc.new_nic("vm1", "t1", 1, net, [], {"network": net.id, "rate": {"ops_per_sec": 50}})
        nics = [n1, svc.new_nic("vm1", "t1", 0, net, [n1], {"network": net.id})]
        assert svc.sync([net], nics)
        with svc.vm_nets(nics) as nets:
            assert [n.tap for n in nets] == [svc.tap_name(nics[1]), svc.tap_name(nics[0])]
            assert nets[1].rate.ops_per_sec == 50 and nets[0].mac == nics[1].mac
            worker = [os.dup(n.tap_fd) for n in nets]  # what the supervisor passes on
            fds = [n.tap_fd for n in nets]
        for fd in fds:  # the daemon's copies are closed
            with pytest.raises(OSError):
                os.fstat(fd)
        backends = [TapBackend.adopt(fd) for fd in worker]
        assert [b.name for b in backends] == [n.tap for n in nets]
        for b in backends:
            b.close()
        assert svc.counters("t1")[f"{svc.tap_name(nics[0])}_mac"] == (0, 0)
    finally:
        from bulkhead.network import host

        host.teardown(svc.config)
        with contextlib.suppress(Exception):
            pnetns.remove(hns)
