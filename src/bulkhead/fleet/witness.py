"""The controller as the witness of every host's audit log (docs/FLEET.md "Witnessing").

Each tick, for every host with a published checkpoint (`checkpoint/H`, under the host's lease) and an
enrolled log key (`<state>/hosts/H/audit.vkey`), fleet.witnessing.judge decides against the fleet's own
`witnessed/H`. A consistent checkpoint is cosigned (C2SP tlog-cosignature, with the controller's
witness key `<state>/witness.key`; its verifier key is `<state>/witness.vkey`) and stored as the new
`witnessed/H`; an inconsistent one writes `flagged/H` (no lease: it outlives the host's registration,
a controller restart and a failover), which makes the host untrusted, so its VMs are drained or stopped
as for a failed attestation, and is audited as a security event. Both writes are guarded (rule F4).
A flag is cleared only by an operator, after investigation, by deleting `flagged/H` in etcd.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bulkhead.control.note import ALG_COSIGNATURE, NoteError, Verifier, cosign
from bulkhead.fleet.model import decode, encode, key
from bulkhead.fleet.store import Cmp, Op
from bulkhead.fleet.witnessing import judge

__all__ = ["WITNESS_NAME", "FleetWitness"]

WITNESS_NAME = "bulkhead.fleet/witness"


class FleetWitness:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._key: Any = None

    def key(self) -> Any:
        """The controller's cosigning key, made on first use (Ed25519, 0600)."""
        if self._key is None:
            from bulkhead.daemon.auditlog import load_audit_key, make_audit_key

            path = self.state_dir / "witness.key"
            if not path.exists():
                make_audit_key(path, self.state_dir / "witness.pub")
            self._key = load_audit_key(path)
            (self.state_dir / "witness.vkey").write_text(str(Verifier.for_key(WITNESS_NAME, self._key, ALG_COSIGNATURE)) + "\n")
        return self._key

    def _verifier(self, host: str) -> Verifier | None:
        path = self.state_dir / "hosts" / host / "audit.vkey"
        try:
            return Verifier.parse(path.read_text().strip())
        except (OSError, NoteError):
            return None  # not enrolled for witnessing: its checkpoints are not judged (docs/FLEET.md)

    def tick(self, ctl: Any, snap: Any, now_wall: float) -> None:
        for host in snap.names("checkpoint"):
            if snap.kv("flagged", host) is not None:
                continue
            verifier = self._verifier(host)
            if verifier is None:
                continue
            pub_kv, last_kv = snap.kv("checkpoint", host), snap.kv("witnessed", host)
            pub = decode(pub_kv.value) if pub_kv else None
            last = decode(last_kv.value) if last_kv else None
            j = judge(pub or {}, verifier, last)
            if j.status == "wait" or (j.status == "ok" and last is not None and last.get("size") == j.size):
                continue
            guard = Cmp(key("witnessed", host), "MOD", last_kv.mod_revision) if last_kv else \
                Cmp(key("witnessed", host), "CREATE", 0)
            if j.status == "ok":
                sig = cosign(j.text, WITNESS_NAME, self.key(), int(now_wall))
                rec = {"size": j.size, "root": j.root.hex(), "note": str((pub or {})["note"]) + sig,
                       "at": now_wall, "by": ctl.ident}
                ctl._guarded([guard], [Op(key("witnessed", host), encode(rec))])
                continue
            flag = {"reason": j.reason, "at": now_wall, "by": ctl.ident,
                    "witnessed": (last or {}).get("size", 0)}
            if ctl._guarded([guard, Cmp(key("flagged", host), "CREATE", 0)], [Op(key("flagged", host), encode(flag))]):
                ctl.emit("security", "fleet.host.audit-inconsistent", {"host": host, "reason": j.reason})
