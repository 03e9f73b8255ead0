"""The daemon's state: one SQLite file (WAL, synchronous=FULL), separate from the audit log.

Writes are group-committed (daemon/groupcommit.py, issue 16 item 5): concurrent `txn()` bodies share one
transaction, whose audit records (`add_durable`) are made durable in one append before its one COMMIT;
`txn()` returns only once its change is durable. An exception inside a body rolls that body back, which is
how a failed audit append undoes a state change (fail closed). Reads need no lock (per-thread WAL
readers: committed state). `lock` is an in-memory guard for callers, never held by the store across a
commit wait. Raises HostError when the file cannot be opened.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from pathlib import Path
from typing import Any

from bulkhead.control.rbac import BUILTIN_ROLES, Assignment, RoleDef
from bulkhead.daemon.auditlog import now_iso
from bulkhead.daemon.groupcommit import GroupCommitDb
from bulkhead.errors import BulkheadError, HostError
from bulkhead.network.service import SCHEMA as NETWORK_SCHEMA

__all__ = ["StateUnavailable", "Store", "new_id"]


class StateUnavailable(BulkheadError):
    """The state database refused a change or a read (a full or locked disk, sqlite3.Error): the change
    was rolled back, nothing was changed (issue 12, soak finding B)."""


SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tenants(id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS principals(id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, kind TEXT NOT NULL,
  created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS certs(fingerprint TEXT PRIMARY KEY, principal_id TEXT NOT NULL, serial TEXT NOT NULL,
  not_after TEXT NOT NULL, revoked INTEGER NOT NULL DEFAULT 0, revoked_at TEXT);
CREATE INDEX IF NOT EXISTS certs_principal ON certs(principal_id);
CREATE INDEX IF NOT EXISTS certs_serial ON certs(serial);
CREATE TABLE IF NOT EXISTS roles(id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, description TEXT NOT NULL,
  actions TEXT NOT NULL, not_actions TEXT NOT NULL, assignable_scopes TEXT NOT NULL, builtin INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS assignments(id TEXT PRIMARY KEY, principal_id TEXT NOT NULL, role_id TEXT NOT NULL,
  scope TEXT NOT NULL, UNIQUE(principal_id, role_id, scope));
CREATE TABLE IF NOT EXISTS disks(id TEXT PRIMARY KEY, tenant TEXT NOT NULL, name TEXT NOT NULL,
  size_mib INTEGER NOT NULL, path TEXT NOT NULL, created TEXT NOT NULL, UNIQUE(tenant, name));
CREATE TABLE IF NOT EXISTS vms(id TEXT PRIMARY KEY, tenant TEXT NOT NULL, name TEXT NOT NULL,
  state TEXT NOT NULL, spec TEXT NOT NULL, exit_status INTEGER, pid INTEGER, created TEXT NOT NULL,
  updated TEXT NOT NULL, UNIQUE(tenant, name));
CREATE INDEX IF NOT EXISTS vms_tenant ON vms(tenant);
CREATE TABLE IF NOT EXISTS vm_events(id INTEGER PRIMARY KEY, vm TEXT NOT NULL, time TEXT NOT NULL,
  event TEXT NOT NULL, detail TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS vm_events_vm ON vm_events(vm);
"""


def new_id() -> str:
    return str(uuid.uuid4())


class Store(GroupCommitDb):
    def __init__(self, path: Path) -> None:
        super().__init__(path, SCHEMA + NETWORK_SCHEMA)  # networks and NICs: bulkhead.network.service
        self.lock = threading.RLock()  # an in-memory guard for callers, never held across a commit wait
        self.generation = 0  # bumped on every RBAC change (after its commit), so evaluators know to reload

    # ------------------------------------------------------------------ bootstrap
    def initialize(self) -> None:
        """Seed built-in roles and the local bootstrap principal (idempotent)."""
        with self.txn() as c:
            for r in BUILTIN_ROLES:
                if c.execute("SELECT 1 FROM roles WHERE name = ?", (r.name,)).fetchone() is None:
                    c.execute(
                        "INSERT INTO roles VALUES (?,?,?,?,?,?,1)",
                        (new_id(), r.name, r.description, json.dumps(list(r.actions)),
                         json.dumps(list(r.not_actions)), json.dumps(list(r.assignable_scopes))),
                    )
                else:  # a built-in role follows this release's definition (a new not-action applies at once)
                    c.execute(
                        "UPDATE roles SET description = ?, actions = ?, not_actions = ?, assignable_scopes = ? "
                        "WHERE name = ? AND builtin = 1",
                        (r.description, json.dumps(list(r.actions)), json.dumps(list(r.not_actions)),
                         json.dumps(list(r.assignable_scopes)), r.name),
                    )
            if c.execute("SELECT 1 FROM principals WHERE kind = 'local'").fetchone() is None:
                pid = new_id()
                c.execute("INSERT INTO principals VALUES (?,?,?,?)", (pid, "root@local", "local", now_iso()))
                owner = c.execute("SELECT id FROM roles WHERE name = 'Owner'").fetchone()[0]
                c.execute("INSERT INTO assignments VALUES (?,?,?,?)", (new_id(), pid, owner, "/"))
        self.generation += 1

    def local_principal(self) -> sqlite3.Row:
        row = self.q1("SELECT * FROM principals WHERE kind = 'local'")
        if row is None:
            raise HostError("the state database has no bootstrap principal; run `bulkhead init`")
        return row

    # ------------------------------------------------------------------ principals and certificates
    def add_principal(self, name: str, kind: str = "cert") -> str:
        pid = new_id()
        with self.txn() as c:
            c.execute("INSERT INTO principals VALUES (?,?,?,?)", (pid, name, kind, now_iso()))
        return pid

    def add_cert(self, principal_id: str, fp: str, serial: str, not_after: str) -> None:
        with self.txn() as c:
            c.execute("INSERT INTO certs VALUES (?,?,?,?,0,NULL)", (fp, principal_id, serial, not_after))

    def principal_by_cert(self, fp: str) -> tuple[sqlite3.Row | None, sqlite3.Row | None]:
        """(principal, cert row) for a certificate fingerprint; (None, None) when unknown."""
        cert = self.q1("SELECT * FROM certs WHERE fingerprint = ?", (fp,))
        if cert is None:
            return None, None
        return self.q1("SELECT * FROM principals WHERE id = ?", (cert["principal_id"],)), cert

    def principal_out(self, row: sqlite3.Row) -> dict[str, Any]:
        cert = self.q1(
            "SELECT * FROM certs WHERE principal_id = ? ORDER BY not_after DESC LIMIT 1", (row["id"],)
        )
        return {
            "id": row["id"],
            "name": row["name"],
            "kind": row["kind"],
            "fingerprint": cert["fingerprint"] if cert else "",
            "serial": cert["serial"] if cert else "",
            "not_after": cert["not_after"] if cert else "",
            "revoked": bool(cert["revoked"]) if cert else False,
        }

    # ------------------------------------------------------------------ RBAC data
    @staticmethod
    def role_from_row(row: sqlite3.Row) -> RoleDef:
        return RoleDef(
            row["id"], row["name"], tuple(json.loads(row["actions"])), tuple(json.loads(row["not_actions"])),
            tuple(json.loads(row["assignable_scopes"])), row["description"], bool(row["builtin"]),
        )

    def roles(self) -> list[RoleDef]:
        return [self.role_from_row(r) for r in self.q("SELECT * FROM roles ORDER BY builtin DESC, name")]

    def assignments(self, principal_id: str | None = None) -> list[Assignment]:
        if principal_id is None:
            rows = self.q("SELECT * FROM assignments ORDER BY scope")
        else:
            rows = self.q("SELECT * FROM assignments WHERE principal_id = ? ORDER BY scope", (principal_id,))
        return [Assignment(r["id"], r["principal_id"], r["role_id"], r["scope"]) for r in rows]

    # ------------------------------------------------------------------ VMs
    def vm_event(self, vm_id: str, event: str, detail: dict[str, Any] | None = None) -> None:
        with self.txn() as c:
            c.execute(
                "INSERT INTO vm_events(vm, time, event, detail) VALUES (?,?,?,?)",
                (vm_id, now_iso(), event, json.dumps(detail or {}, sort_keys=True)),
            )

    def set_vm_state(self, vm_id: str, state: str, *, pid: int | None = None, exit_status: int | None = None) -> None:
        with self.txn() as c:
            c.execute(
                "UPDATE vms SET state = ?, pid = ?, exit_status = ?, updated = ? WHERE id = ?",
                (state, pid, exit_status, now_iso(), vm_id),
            )

    @staticmethod
    def vm_out(row: sqlite3.Row) -> dict[str, Any]:
        spec = json.loads(row["spec"])
        return {
            "id": row["id"],
            "tenant": row["tenant"],
            "name": row["name"],
            "state": row["state"],
            "kernel": spec["kernel"],
            "initrd": spec.get("initrd"),
            "cmdline": spec.get("cmdline", ""),
            "mem_mib": spec["mem_mib"],
            "cpus": spec["cpus"],
            "drives": spec.get("drives", []),
            "nics": spec.get("nics", []),
            "rng": spec.get("rng", False),
            "exit_status": row["exit_status"],
            "created": row["created"],
            "updated": row["updated"],
            "expected_digest": spec.get("expected_digest"),
            "vsock_cid": (spec.get("vsock") or {}).get("cid"),
            "vsock_socket": (spec.get("vsock") or {}).get("socket"),
        }
