"""A host agent's own audit log and its publication to the fleet (docs/FLEET.md "Witnessing").

The agent records what it does (VM starts under a fencing token, stops, exits, self-fencing) in the same
Merkle audit log as the daemon's (daemon/auditlog.py: SQLite, a signed head after every commit), under a
key of its own, `<state>/audit.key`; `<state>/audit.vkey` is the C2SP verifier key the operator enrols
at the controller (`bulkhead fleet enroll --audit-vkey`). A log that was there and is gone (wiped) is
refused at start, as the daemon refuses one.

`publication(witnessed)` is what the agent puts under its lease at `checkpoint/H`: the signed head and a
consistency proof from the size the fleet last witnessed (the controller's `witnessed/H`), which the
controller judges with fleet.witnessing.judge.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from bulkhead.control.audit import Record
from bulkhead.control.note import Checkpoint
from bulkhead.daemon.auditlog import AuditLog, load_audit_key, make_audit_key, make_origin, now_iso
from bulkhead.errors import HostError

__all__ = ["HostLog"]


class HostLog:
    def __init__(self, state_dir: Path, host: str) -> None:
        key_path, pub, db = state_dir / "audit.key", state_dir / "audit.pub", state_dir / "audit.db"
        fresh = not key_path.exists()
        if fresh:
            if db.exists():
                raise HostError(f"{db} exists but its key {key_path} does not: refusing to start a second log")
            make_audit_key(key_path, pub)
        elif not db.exists():
            raise HostError(f"the agent's audit log {db} is gone (wiped?) while its key remains: refusing to start")
        self.log = AuditLog(db, load_audit_key(key_path), state_dir / "audit.checkpoint", checkpoint_every=1,
                            create=fresh, origin=make_origin(f"fleet-{host}") if fresh else None)
        (state_dir / "audit.vkey").write_text(str(self.log.verifier) + "\n")
        self.host = host
        self._lock = threading.Lock()
        self._published: tuple[int, int] | None = None  # (log size, witnessed size) of the last publication

    def record(self, action: str, vm: str = "", **detail: Any) -> None:
        """Append one durable record of this agent's action (raises AuditUnavailable)."""
        self.log.append(Record.make(now_iso(), "vm" if vm else "system", {"host": self.host, **detail},
                                    principal=f"agent:{self.host}", action=action, vm=vm, result="ok"))

    def publication(self, witnessed: int) -> dict[str, Any] | None:
        """The record to publish (None when the last one still stands): the signed head and the proof
        from `witnessed` (the fleet's size for this log) to it."""
        with self._lock:
            note = self.log.head_note()
            size = Checkpoint.parse(note[: note.rfind("\n\n") + 1]).size if note else 0
            if not note or (self._published is not None and self._published[0] == size
                            and (self._published[1] == witnessed or witnessed >= size)):
                return None  # the last one stands (a new witnessed size needs a new proof only below size)
            proof: list[str] = []
            if 0 < witnessed < size:
                reader = self.log.reader()
                try:
                    proof = list(reader.consistency(witnessed, size)["path"])
                finally:
                    reader.conn.close()
            self._published = (size, witnessed)
            return {"note": note, "old": witnessed if witnessed <= size else size, "proof": proof}

    def close(self) -> None:
        self.log.close()
