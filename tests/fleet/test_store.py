"""The etcd layer against the real 3-member TLS cluster: fencing-token transactions, leases, fail-over,
and the attacks a stale or foreign client would try (docs/FLEET.md "Fencing")."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from bulkhead.errors import HostError
from bulkhead.fleet.etcdrun import EtcdCluster
from bulkhead.fleet.model import key
from bulkhead.fleet.storage import DiskFence, StaleToken
from bulkhead.fleet.store import Cmp, EtcdStore, Op


def _store(etcd: EtcdCluster) -> EtcdStore:
    return EtcdStore(etcd.endpoints, etcd.client_tls("s" + uuid.uuid4().hex[:6]), namespace="/s" + uuid.uuid4().hex[:8])


def test_stale_fencing_token_cannot_claim(etcd: EtcdCluster) -> None:
    """F1: a start guarded by an old assignment revision is refused after the VM was reassigned."""
    s = _store(etcd)
    lease = s.grant(5)
    s.put(key("hosts", "h1"), "{}", lease)
    old = s.put(key("assign", "v"), '{"host":"h1"}')
    s.put(key("assign", "v"), '{"host":"h2"}')  # the controller moved it: new revision
    ok, _ = s.txn([Cmp(key("assign", "v"), "MOD", old), Cmp(key("hosts", "h1"), "LEASE", lease),
                   Cmp(key("running", "v"), "CREATE", 0)], [Op(key("running", "v"), "h1", lease)])
    assert not ok and s.get(key("running", "v")) is None


def test_second_claim_is_refused_and_expiry_releases(etcd: EtcdCluster) -> None:
    """At most one running/V and one disks/D at any revision; the claim goes with its lease."""
    s = _store(etcd)
    l1, l2 = s.grant(2), s.grant(30)
    claim = [Cmp(key("running", "v"), "CREATE", 0), Cmp(key("disks", "d"), "CREATE", 0)]
    assert s.txn(claim, [Op(key("running", "v"), "h1", l1), Op(key("disks", "d"), "h1", l1)])[0]
    assert not s.txn(claim, [Op(key("running", "v"), "h2", l2), Op(key("disks", "d"), "h2", l2)])[0]
    deadline = time.monotonic() + 10
    while s.get(key("running", "v")) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert s.get(key("running", "v")) is None and s.get(key("disks", "d")) is None
    assert s.keepalive(l1) == 0  # the agent learns its lease is gone
    assert s.txn(claim, [Op(key("running", "v"), "h2", l2), Op(key("disks", "d"), "h2", l2)])[0]


def test_foreign_lease_does_not_pass_the_host_check(etcd: EtcdCluster) -> None:
    """An agent cannot claim under a lease that is not the one its registration holds."""
    s = _store(etcd)
    mine, other = s.grant(10), s.grant(10)
    s.put(key("hosts", "h1"), "{}", mine)
    ok, _ = s.txn([Cmp(key("hosts", "h1"), "LEASE", other)], [Op(key("running", "v"), "x", other)])
    assert not ok


def test_one_member_down_is_survived(etcd: EtcdCluster) -> None:
    s = _store(etcd)
    etcd.stop_member(0)
    try:
        s.put("/x", "1")
        assert s.get("/x").value == "1"  # type: ignore[union-attr]
    finally:
        etcd.start_member(0)


def test_client_with_a_foreign_certificate_is_refused(etcd: EtcdCluster, tmp_path: Path) -> None:
    """mTLS: etcd refuses a client whose certificate another CA signed (the attack: any key pair)."""
    from bulkhead.fleet.etcdrun import EtcdCluster as Other

    other = Other(tmp_path, 1)
    other._pki()  # a CA of its own, never started
    foreign = other.client_tls("intruder")
    tls = etcd.client_tls("x")
    from bulkhead.fleet.etcdrun import ClientTls

    with pytest.raises(HostError):
        EtcdStore(etcd.endpoints, ClientTls(tls.ca, foreign.cert, foreign.key), timeout=2).put("/x", "1")
    EtcdStore(etcd.endpoints, tls, timeout=2).put("/x", "1")  # the control: our CA's client is served


def test_storage_fence_refuses_an_older_token(tmp_path: Path) -> None:
    f = DiskFence(tmp_path)
    f.acquire("d1", 10)
    f.acquire("d1", 10)  # the same owner again (restart under one assignment)
    f.acquire("d1", 12)
    with pytest.raises(StaleToken):
        f.acquire("d1", 11)
    assert f.current("d1") == 12


def _controller(s: EtcdStore, ident: str, tmp: Path, events: list[tuple[str, dict]]) -> object:
    from bulkhead.fleet.controller import Controller
    from bulkhead.fleet.model import FleetTiming

    return Controller(s, ident, tmp, timing=FleetTiming(ttl=3.0),
                      emit=lambda kind, action, detail: events.append((action, detail)))


def test_deposed_controller_resumes_only_while_its_key_is_its_own(etcd: EtcdCluster, tmp_path: Path) -> None:
    """F4 resumption: a controller that deposed itself (its renewal deadline passed, etcd never saw it)
    leads again at once while its lease lives and the leader key still has its create revision; once
    another controller has created the key, the old one cannot resume and stays a standby."""
    from bulkhead.fleet.controller import Controller

    s = _store(etcd)
    events: list[tuple[str, dict]] = []
    c1 = _controller(s, "c1", tmp_path, events)
    assert isinstance(c1, Controller)
    assert c1.campaign()
    rev = c1.leader_rev
    c1.deadline = 0.0  # what a renewal that waited past TTL - margin leaves behind: deposed
    assert c1.campaign() and c1.leader_rev == rev  # resumed: the same key, no new campaign
    assert events[-1] == ("fleet.leader", {"id": "c1", "revision": rev, "resumed": True})
    assert c1.deadline > 0.0

    s.revoke(c1.lease)  # its lease ends (as if it had expired): the key goes with it
    c2 = _controller(s, "c2", tmp_path, events)
    assert isinstance(c2, Controller)
    assert c2.campaign() and c2.leader_rev != rev
    assert not c1.campaign()  # its old lease is gone and the key is c2's: no resumption
    assert c1.leader_rev == 0
    assert s.get(key("leader")) is not None and c2.leader_rev == s.get(key("leader")).create_revision


def test_resumption_is_refused_when_another_leader_holds_the_key_and_the_old_lease_lives(
        etcd: EtcdCluster, tmp_path: Path) -> None:
    """The compare, not the lease, proves continuity: c1's lease is alive but the key was deleted and
    created again by c2 (a new create revision); c1's resumption fails and it keeps its lease to campaign."""
    from bulkhead.fleet.controller import Controller

    s = _store(etcd)
    events: list[tuple[str, dict]] = []
    c1 = _controller(s, "c1", tmp_path, events)
    assert isinstance(c1, Controller)
    assert c1.campaign()
    lease = c1.lease
    s.delete(key("leader"))
    c2 = _controller(s, "c2", tmp_path, events)
    assert isinstance(c2, Controller)
    assert c2.campaign()
    assert not c1.reclaim()
    assert c1.leader_rev == 0 and c1.lease == lease
    assert not c1.campaign()  # c2 leads: the key exists
