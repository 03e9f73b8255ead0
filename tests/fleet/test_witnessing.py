"""fleet.witnessing.judge, the controller's check of a host's published audit checkpoint (docs/FLEET.md
"Witnessing"), against real signed notes and real Merkle proofs from daemon/auditlog.py: an honest log's
growth is accepted, and each lie a host could tell is refused with its reason (rollback, fork, a proof
that does not verify, a foreign key, a foreign origin, malformed input)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bulkhead.control.audit import Record
from bulkhead.control.note import Checkpoint, Verifier, sign_note
from bulkhead.fleet.hostlog import HostLog
from bulkhead.fleet.witnessing import judge


def _log(tmp: Path, name: str = "h1") -> HostLog:
    d = tmp / name
    d.mkdir()
    return HostLog(d, name)


def _pub(h: HostLog, witnessed: int) -> dict:
    pub = h.publication(witnessed)
    assert pub is not None
    return pub


def _last(h: HostLog) -> dict:
    note = h.log.head_note()
    cp = Checkpoint.parse(note[: note.rfind("\n\n") + 1])
    return {"size": cp.size, "root": cp.root.hex()}


def test_an_honest_log_is_accepted_as_it_grows(tmp_path: Path) -> None:
    h = _log(tmp_path)
    v = h.log.verifier
    h.record("agent.start")
    first = judge(_pub(h, 0), v, None)
    assert first.status == "ok" and first.size == 1
    last = {"size": first.size, "root": first.root.hex()}
    for i in range(5):
        h.record("vm.start", vm=f"v{i}", token=i)
    j = judge(_pub(h, 1), v, last)
    assert (j.status, j.size) == ("ok", 6)
    assert h.publication(1) is None  # nothing new to publish
    assert h.publication(6) is None  # the fleet caught up: the publication stands, no proof is needed
    h.record("vm.stop", vm="v0")
    assert judge(_pub(h, 6), v, {"size": 6, "root": j.root.hex()}).status == "ok"
    h.close()


def test_a_rollback_and_a_fork_are_refused(tmp_path: Path) -> None:
    h = _log(tmp_path)
    for i in range(4):
        h.record("vm.start", vm=f"v{i}")
    small = _pub(h, 0)  # a publication of size 4, kept as an attacker would
    for i in range(3):
        h.record("vm.stop", vm=f"v{i}")
    witnessed = _last(h)  # size 7
    back = judge(small, h.log.verifier, witnessed)
    assert back.status == "bad" and back.reason.startswith("rollback: the log has 4 records")
    # a second log with the same origin and key but another history of the same size: a fork
    other = tmp_path / "fork"
    other.mkdir()
    for f in ("audit.key", "audit.pub"):
        (other / f).write_bytes((tmp_path / "h1" / f).read_bytes())
    from bulkhead.daemon.auditlog import AuditLog, load_audit_key, now_iso

    forged = AuditLog(other / "audit.db", load_audit_key(other / "audit.key"), other / "cp", checkpoint_every=1,
                      create=True, origin=h.log.origin)
    for i in range(7):
        forged.append(Record.make(now_iso(), "vm", {}, action="vm.start", vm=f"x{i}"))
    note = forged.head_note()
    fork = judge({"note": note, "old": 7, "proof": []}, h.log.verifier, witnessed)
    assert fork.status == "bad" and fork.reason == "fork: another root for size 7"
    for i in range(3):
        forged.append(Record.make(now_iso(), "vm", {}, action="vm.start", vm=f"y{i}"))
    r = forged.reader()
    try:
        proof = list(r.consistency(7, 10)["path"])
    finally:
        r.conn.close()
    grown = judge({"note": forged.head_note(), "old": 7, "proof": proof}, h.log.verifier, witnessed)
    assert grown.status == "bad" and "does not verify" in grown.reason  # its proof is from its own history
    forged.close()
    h.close()


def test_a_foreign_key_a_foreign_origin_and_a_stale_proof(tmp_path: Path) -> None:
    h = _log(tmp_path)
    h.record("agent.start")
    pub = _pub(h, 0)
    stranger = Verifier.for_key(h.log.origin, Ed25519PrivateKey.generate())
    bad = judge(pub, stranger, None)
    assert bad.status == "bad" and "not signed by the host's enrolled log key" in bad.reason
    text = pub["note"][: pub["note"].rfind("\n\n") + 1]
    elsewhere = Ed25519PrivateKey.generate()
    other = text.replace(h.log.origin, "bulkhead.other/audit/0", 1)
    renamed = sign_note(other, "bulkhead.other/audit/0", elsewhere)
    assert judge({"note": renamed, "old": 0, "proof": []}, Verifier.for_key("bulkhead.other/audit/0", elsewhere),
                 None).status == "ok"  # consistent by itself...
    wrong = judge({"note": renamed, "old": 0, "proof": []}, h.log.verifier, None)
    assert wrong.status == "bad"  # ...but not this host's log
    for _ in range(2):
        h.record("vm.start", vm="v")
    stale = judge(_pub(h, 0), h.log.verifier, {"size": 2, "root": "00" * 32})
    assert stale.status == "wait" and stale.reason == "proof from 0, the fleet witnessed 2"
    h.close()


@pytest.mark.parametrize("pub", [
    {}, {"note": 5, "old": 0, "proof": []}, {"note": "x", "old": "0", "proof": []},
    {"note": "x", "old": True, "proof": []}, {"note": "x", "old": 0, "proof": "ab"},
    {"note": "x", "old": 0, "proof": ["ab"] * 65}, {"note": "x", "old": 0, "proof": [1]},
])
def test_malformed_publications_are_refused(tmp_path: Path, pub: dict) -> None:
    h = _log(tmp_path)
    assert judge(pub, h.log.verifier, None) == ("bad", "malformed publication", 0, b"", "")
    h.close()


def test_a_proof_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    h = _log(tmp_path)
    for _ in range(3):
        h.record("vm.start", vm="v")
    last = _last(h)
    h.record("vm.stop", vm="v")
    pub = _pub(h, 3)
    assert judge(pub, h.log.verifier, last).status == "ok"
    assert judge({**pub, "proof": ["zz" * 32]}, h.log.verifier, last).status == "bad"
    assert judge({**pub, "proof": ["ab" * 31]}, h.log.verifier, last).reason == "malformed consistency proof"
    assert judge({**pub, "proof": []}, h.log.verifier, last).status == "bad"
    h.close()


def test_a_wiped_host_log_is_refused_at_start(tmp_path: Path) -> None:
    from bulkhead.errors import HostError

    h = _log(tmp_path)
    h.record("agent.start")
    h.close()
    (tmp_path / "h1" / "audit.db").unlink()
    with pytest.raises(HostError, match="is gone"):
        HostLog(tmp_path / "h1", "h1")
