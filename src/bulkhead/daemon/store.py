"""The daemon's state: one SQLite file (WAL, synchronous=FULL), separate from the audit log.

Writes are group-committed (issue 16 item 5). `txn()` runs its body on the one write connection inside
the batch transaction that is open (BEGIN IMMEDIATE, one SAVEPOINT per body, bodies one at a time under
the writer lock); an exception inside rolls back that body alone. The body's durable records (the
request's audit record, `add_durable`) join the batch. One committer thread then makes the whole batch's
records durable (`durable`: one audit transaction, one fsync) and COMMITs the state (one fsync), and only
then wakes every member: `txn()` returns after its change is durable, never before (a SIGKILL loses nothing
acknowledged), and raises when the batch failed (nothing of it was changed). Reads (`q`, `q1`) outside a
transaction need no lock: each thread reads on its own WAL reader connection, which sees committed state
only; inside a body they read on the write connection (their own changes). `lock` is an in-memory guard
for callers; it is never held while waiting for a commit. Raises HostError when the file cannot be opened.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bulkhead.control.rbac import BUILTIN_ROLES, Assignment, RoleDef
from bulkhead.daemon.auditlog import now_iso
from bulkhead.errors import BulkheadError, HostError
from bulkhead.network.service import SCHEMA as NETWORK_SCHEMA

__all__ = ["StateUnavailable", "Store", "new_id"]

BATCH_MAX = 256  # bodies per group commit


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


class _Batch:
    """One group commit: the members' durable records in body order, what runs after the COMMIT."""

    def __init__(self) -> None:
        self.records: list[Any] = []
        self.after: list[Callable[[], None]] = []
        self.members = 0
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.durable = False  # the records were made durable (a later state COMMIT may still fail)


def _again(err: BaseException, durable: bool) -> BaseException:
    """A fresh copy of a batch's error for one member thread (the same type, so callers map it alike)."""
    try:
        copy = type(err)(*err.args)
    except TypeError:
        copy = err
    copy.records_durable = durable  # type: ignore[attr-defined]
    return copy


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.RLock()  # an in-memory guard for callers, never held across a commit wait
        self._wlock = threading.RLock()  # the write connection and the open batch
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        try:
            self._conn = self._open()
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.executescript(SCHEMA + NETWORK_SCHEMA)  # networks and NICs: bulkhead.network.service
        except sqlite3.Error as exc:
            raise HostError(f"cannot open the state database {path}: {exc}") from None
        self.generation = 0  # bumped on every RBAC change (after its commit), so evaluators know to reload
        # makes a batch's records durable before its state COMMIT (Core: one audit append of all of them);
        # raises to fail the whole batch
        self.durable: Callable[[list[Any]], None] | None = None
        self._batch: _Batch | None = None
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._committer = threading.Thread(target=self._commit_loop, name="state-committer", daemon=True)
        self._committer.start()

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._committer.join(timeout=30)
        with self._wlock:
            for c in [self._conn, *self._readers]:
                c.close()
            self._readers.clear()

    # ------------------------------------------------------------------ group commit
    @contextmanager
    def txn(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (re-entrant: nested uses join the outer one) that returns once durable.
        Raises sqlite3.Error (or what `durable` raised) when its batch failed: nothing of it was changed."""
        loc = self._local
        if getattr(loc, "depth", 0):
            loc.depth += 1
            try:
                yield self._conn
            finally:
                loc.depth -= 1
            return
        with self._wlock:
            batch = self._open_batch()
            self._conn.execute("SAVEPOINT body")
            loc.depth, loc.batch = 1, batch
            marks = len(batch.records), len(batch.after)
            try:
                yield self._conn
                self._conn.execute("RELEASE body")
            except BaseException:
                del batch.records[marks[0]:], batch.after[marks[1]:]  # its records go with its changes
                self._undo(batch)
                raise
            finally:
                loc.depth, loc.batch = 0, None
            batch.members += 1
        with self._cond:
            self._cond.notify_all()
        batch.done.wait()
        if batch.error is not None:
            raise _again(batch.error, batch.durable) from None

    def add_durable(self, record: Any) -> None:
        """Inside a txn body: `record` is made durable (in body order) before this change commits."""
        self._local.batch.records.append(record)

    def after_commit(self, fn: Callable[[], None]) -> None:
        """Run `fn` once the current transaction has committed (at once outside a transaction)."""
        batch = getattr(self._local, "batch", None)
        if batch is None:
            fn()
        else:
            batch.after.append(fn)

    def _open_batch(self) -> _Batch:
        while self._batch is not None and self._batch.members >= BATCH_MAX:
            self._wlock.release()  # a full batch: let the committer take it
            try:
                self._batch.done.wait()
            finally:
                self._wlock.acquire()
        if self._batch is not None and not self._conn.in_transaction:
            self._broken(self._batch)
        if self._batch is None:
            self._conn.execute("BEGIN IMMEDIATE")
            self._batch = _Batch()
        return self._batch

    def _undo(self, batch: _Batch) -> None:
        """A body raised: roll back that body alone (the whole, empty transaction if it was the only one)."""
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK TO body")
                self._conn.execute("RELEASE body")
                if batch.members == 0:
                    self._conn.execute("ROLLBACK")
                    self._batch = None
                return
        except sqlite3.Error:
            pass
        self._broken(batch)

    def _broken(self, batch: _Batch) -> None:
        """SQLite rolled the whole transaction back itself (a full disk, I/O error): its members fail."""
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        batch.error = batch.error or sqlite3.OperationalError("the state transaction was rolled back")
        self._batch = None
        batch.done.set()

    def _commit_loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (self._batch is None or not self._batch.members):
                    self._cond.wait()
                if self._closed and (self._batch is None or not self._batch.members):
                    return
            with self._wlock:
                batch, self._batch = self._batch, None
                if batch is None or batch.done.is_set():
                    continue
                try:
                    if batch.records and self.durable is not None:
                        self.durable(batch.records)
                    batch.durable = True
                    self._conn.execute("COMMIT")
                except BaseException as exc:  # every member fails: nothing of the batch was changed
                    batch.error = exc
                    try:
                        if self._conn.in_transaction:
                            self._conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
            if batch.error is None:
                for fn in batch.after:
                    try:
                        fn()
                    except Exception as exc:  # pragma: no cover - a bug in a hook
                        print(f"bulkheadd: after-commit hook: {exc!r}", flush=True)
            batch.done.set()

    # ------------------------------------------------------------------ reads
    @contextmanager
    def committed(self) -> Iterator[None]:
        """Reads inside see committed state only, also inside a txn body (e.g. RBAC reloads)."""
        self._local.committed = getattr(self._local, "committed", 0) + 1
        try:
            yield
        finally:
            self._local.committed -= 1

    @contextmanager
    def writer(self) -> Iterator[None]:
        """Hold the writer lock: no body runs and no batch commits meanwhile, and reads inside see the
        open batch's changes too (they commit or fail as one; a failed member undoes its own host
        changes afterwards). For code that makes the host follow the store (networks.net_sync)."""
        with self._wlock:
            self._local.paused = getattr(self._local, "paused", 0) + 1
            try:
                yield
            finally:
                self._local.paused -= 1

    def _reader(self) -> sqlite3.Connection:
        """Inside a body or writer(): the write connection; else this thread's own reader (committed
        state only)."""
        loc = self._local
        if (getattr(loc, "depth", 0) or getattr(loc, "paused", 0)) and not getattr(loc, "committed", 0):
            return self._conn
        conn: sqlite3.Connection | None = getattr(self._local, "reader", None)
        if conn is None:
            conn = self._open()
            conn.execute("PRAGMA query_only=1")
            self._local.reader = conn
            with self._wlock:
                self._readers.append(conn)
        return conn

    def q(self, sql: str, args: tuple[Any, ...] | list[Any] = ()) -> list[sqlite3.Row]:
        return self._reader().execute(sql, args).fetchall()

    def q1(self, sql: str, args: tuple[Any, ...] | list[Any] = ()) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self._reader().execute(sql, args).fetchone()
        return row

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
        }
