"""The fleet witnesses its hosts' audit logs (issue 18 "Audit", docs/FLEET.md "Witnessing"), with real etcd,
a real controller and real agent processes (fake VM backend).

- Each agent keeps its own Merkle audit log (its VM starts, stops, exits, self-fencing) and publishes the
  signed checkpoint under its lease; the controller checks it against the host's enrolled log key and the
  fleet's own last witnessed checkpoint, and cosigns it (C2SP tlog-cosignature).
- Attacks, made as a compromised host would make them, by writing the host's own `checkpoint/H` key: a
  replayed older checkpoint (a rollback) and a checkpoint signed by another key. Each flags the host:
  it becomes untrusted (unattested in `fleet hosts`, with the reason), its VMs move to another host, the
  flag is persisted in etcd (not in the controller's memory) and audited as a security event.
"""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tests.fleet.kit import Fleet, make_vm, wait

from bulkhead.control.note import Checkpoint, Verifier, sign_note, verify_cosignature
from bulkhead.fleet.model import key
from bulkhead.fleet.witness import WITNESS_NAME

pytestmark = pytest.mark.slow


def _rec(fleet: Fleet, kind: str, host: str) -> dict | None:
    kv = fleet.store.get(key(kind, host))
    return json.loads(kv.value) if kv else None


def _state(fleet: Fleet, vm: str) -> dict:
    with fleet.client() as c:
        return dict(c.get(f"/vms/{vm}"))


def test_hosts_logs_are_cosigned_and_a_rollback_or_a_foreign_key_flags_the_host(fleet: Fleet) -> None:
    fleet.start_controller()
    fleet.wait_api()
    for h in ("h1", "h2", "h3"):
        fleet.start_agent(h)
    wait(lambda: len(hs := fleet.hosts()) == 3 and all(x["state"] == "ready" for x in hs.values()), 40,
         "every host ready")
    with fleet.client() as c:
        t = str(c.post("/tenants", {"name": "acme"})["id"])
        vm = make_vm(c, t, "web")["id"]
        c.post(f"/vms/{vm}/start", {})
    first = wait(lambda: (s := _state(fleet, vm))["state"] == "running" and s["host"], 30, "the VM running")
    # the start is in that host's log: the fleet witnessed at least agent.start + vm.start, and cosigned it
    w = wait(lambda: (r := _rec(fleet, "witnessed", first)) and r["size"] >= 2 and r, 20, "the start witnessed")
    witness = Verifier.parse((fleet.ctl_dir / "witness.vkey").read_text().strip())
    assert witness.name == WITNESS_NAME
    assert verify_cosignature(w["note"], witness) > 0
    for h in ("h1", "h2", "h3"):
        assert wait(lambda h=h: _rec(fleet, "witnessed", h), 20, f"{h} witnessed")["size"] >= 1
    assert all(_rec(fleet, "flagged", h) is None for h in ("h1", "h2", "h3"))  # honest hosts are never flagged

    # a rollback: the host republishes its first checkpoint (size 1) after the fleet saw more
    published = _rec(fleet, "checkpoint", first)
    assert published is not None
    old_note = published["note"]
    assert Checkpoint.parse(old_note[: old_note.rfind("\n\n") + 1]).size == w["size"]
    lease = fleet.store.get(key("checkpoint", first)).lease
    first_pub = {"note": _first_note(fleet, first), "old": 0, "proof": []}
    fleet.store.put(key("checkpoint", first), json.dumps(first_pub), lease)
    flag = wait(lambda: _rec(fleet, "flagged", first), 20, "the rollback flagged")
    assert flag["reason"].startswith("rollback: the log has 1 records")
    hosts = fleet.hosts()
    assert hosts[first]["state"] == "unattested" and any("rollback" in r for r in hosts[first]["reasons"]), hosts
    moved = wait(lambda: (s := _state(fleet, vm))["state"] == "running" and s["host"] != first and s["host"], 30,
                 "the VM moved off the flagged host")
    with fleet.client() as c:
        audit = c.get("/audit", params={"limit": 1000})
    assert any(r["action"] == "fleet.host.audit-inconsistent" and first in json.dumps(r) for r in audit)

    # a checkpoint signed by another key, published by the third host
    third = next(h for h in ("h1", "h2", "h3") if h not in (first, moved))
    stranger = Ed25519PrivateKey.generate()
    mine = _rec(fleet, "checkpoint", third)
    assert mine is not None
    text = mine["note"][: mine["note"].rfind("\n\n") + 1]
    origin = text.split("\n", 1)[0]
    forged = {"note": sign_note(text, origin, stranger), "old": 0, "proof": []}
    fleet.store.put(key("checkpoint", third), json.dumps(forged), fleet.store.get(key("checkpoint", third)).lease)
    flag3 = wait(lambda: _rec(fleet, "flagged", third), 20, "the forged checkpoint flagged")
    assert "not signed by the host's enrolled log key" in flag3["reason"]
    assert _rec(fleet, "flagged", moved) is None  # the honest host stays trusted
    assert fleet.hosts()[moved]["state"] == "ready"


def _first_note(fleet: Fleet, host: str) -> str:
    """The host's checkpoint of size 1, as the host itself signed it (read from its own log)."""
    import sqlite3

    db = sqlite3.connect(f"file:{fleet.agent_dir(host) / 'audit.db'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT note FROM checkpoints WHERE size = 1").fetchone()
    finally:
        db.close()
    assert row is not None, "the host's log has no checkpoint of size 1"
    return str(row[0])
