"""The audit log on disk: an append-only SQLite file of its own (WAL, synchronous=FULL), hash-chained
records (bulkhead.control.audit), a signed head checkpoint updated in the same transaction as every
append, signed history checkpoints every `checkpoint_every` records, and the latest checkpoint also kept in
a separate file (`audit.checkpoint.json`).

Appends go through one writer thread that commits whatever is queued in one transaction (group commit):
`append()` returns only after its record is durable, and raises AuditUnavailable when it is not, so the
caller can refuse the action it describes (fail closed). Nothing here updates or deletes records, and
SQLite triggers refuse UPDATE/DELETE on the records table as a second line.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import queue
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from bulkhead.control.audit import (
    FIELDS,
    GENESIS,
    Checkpoint,
    Record,
    VerifyReport,
    chain_hash,
    sign_checkpoint,
    verify,
)
from bulkhead.errors import BulkheadError, HostError

__all__ = [
    "AuditLog",
    "AuditUnavailable",
    "export_jsonl",
    "load_audit_key",
    "load_audit_pub",
    "make_audit_key",
    "now_iso",
    "query_records",
    "verify_files",
]

SCHEMA = """
CREATE TABLE IF NOT EXISTS records(
  seq INTEGER PRIMARY KEY, time TEXT NOT NULL, kind TEXT NOT NULL, principal TEXT NOT NULL,
  action TEXT NOT NULL, scope TEXT NOT NULL, decision TEXT NOT NULL, result TEXT NOT NULL,
  request_id TEXT NOT NULL, vm TEXT NOT NULL, detail TEXT NOT NULL, prev BLOB NOT NULL, hash BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS records_principal ON records(principal);
CREATE INDEX IF NOT EXISTS records_vm ON records(vm);
CREATE INDEX IF NOT EXISTS records_time ON records(time);
CREATE TABLE IF NOT EXISTS head(id INTEGER PRIMARY KEY CHECK (id = 1), checkpoint TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints(size INTEGER PRIMARY KEY, checkpoint TEXT NOT NULL);
CREATE TRIGGER IF NOT EXISTS records_no_update BEFORE UPDATE ON records
  BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER IF NOT EXISTS records_no_delete BEFORE DELETE ON records
  BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER IF NOT EXISTS checkpoints_no_update BEFORE UPDATE ON checkpoints
  BEGIN SELECT RAISE(ABORT, 'checkpoints are append-only'); END;
CREATE TRIGGER IF NOT EXISTS checkpoints_no_delete BEFORE DELETE ON checkpoints
  BEGIN SELECT RAISE(ABORT, 'checkpoints are append-only'); END;
"""
_COLS = "seq, " + ", ".join(FIELDS) + ", prev, hash"  # constants only: no user input reaches SQL text
_INSERT = f"INSERT INTO records({_COLS}) VALUES ({','.join('?' * 13)})"  # noqa: S608


class AuditUnavailable(BulkheadError):
    """An audit record could not be made durable; the action it describes must not happen."""


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def make_audit_key(key_path: Path, pub_path: Path) -> None:
    from bulkhead.daemon.pki import write_private

    key = Ed25519PrivateKey.generate()
    write_private(
        key_path,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    write_private(
        pub_path,
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        0o644,
    )


def load_audit_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise HostError(f"cannot load the audit signing key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise HostError(f"{path} is not an ed25519 private key")
    return key


def load_audit_pub(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise HostError(f"cannot load the audit public key {path}: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise HostError(f"{path} is not an ed25519 public key")
    return key


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


@dataclass
class _Pending:
    record: Record
    done: threading.Event = field(default_factory=threading.Event)
    seq: int = 0
    error: str = ""


class AuditLog:
    """Open (creating if needed) the audit database. Raises HostError when the file cannot be opened or
    its tail does not match the signed head (the daemon refuses to start on a damaged log)."""

    def __init__(
        self, path: Path, key: Ed25519PrivateKey, checkpoint_file: Path, checkpoint_every: int = 1000
    ) -> None:
        self.path = path
        self.checkpoint_file = checkpoint_file
        self._key = key
        self._every = max(1, checkpoint_every)
        try:
            self._conn = _connect(path)
            self._conn.executescript(SCHEMA)
            row = self._conn.execute("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
            head_row = self._conn.execute("SELECT checkpoint FROM head WHERE id = 1").fetchone()
        except sqlite3.Error as exc:
            raise HostError(f"cannot open the audit log {path}: {exc}") from None
        self._size, self._prev = (int(row[0]), bytes(row[1])) if row else (0, GENESIS)
        if head_row is not None:
            head = Checkpoint.from_json(head_row[0])
            if head.size != self._size or head.head != self._prev.hex():
                raise HostError(
                    f"the audit log {path} does not match its signed head (size {head.size}, found {self._size}); "
                    "run `bulkhead audit verify`"
                )
        elif self._size:
            raise HostError(f"the audit log {path} has records but no signed head; run `bulkhead audit verify`")
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._failed = ""
        self._closed = False
        self._thread = threading.Thread(target=self._writer, name="audit-writer", daemon=True)
        self._thread.start()

    @property
    def size(self) -> int:
        return self._size

    def append(self, record: Record, timeout: float = 30.0) -> int:
        """Append and wait until durable. Returns the record's seq. Raises AuditUnavailable."""
        if self._closed:
            raise AuditUnavailable("the audit log is closed")
        p = _Pending(record)
        self._queue.put(p)
        if not p.done.wait(timeout):
            raise AuditUnavailable("the audit log did not commit in time")
        if p.error:
            raise AuditUnavailable(p.error)
        return p.seq

    def _writer(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < 1024:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            try:
                self._commit(batch)
            except Exception as exc:  # never leave callers waiting: they fail closed
                for p in batch:
                    p.error = p.error or f"audit append failed: {exc!r}"
                    p.done.set()
            if stop:
                return

    def _commit(self, batch: list[_Pending]) -> None:
        size, prev = self._size, self._prev
        rows: list[tuple[Any, ...]] = []
        cps: list[Checkpoint] = []
        for p in batch:
            size += 1
            values = p.record.values()
            h = chain_hash(prev, size, values)
            rows.append((size, *values, prev, h))
            p.seq = size
            prev = h
            if size % self._every == 0:
                cps.append(sign_checkpoint(self._key, size, h, now_iso()))
        head = sign_checkpoint(self._key, size, prev, now_iso())
        try:
            if os.environ.get("BULKHEAD_AUDIT_FAIL"):  # fault injection for the fail-closed tests
                raise sqlite3.OperationalError("injected audit failure")
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.executemany(_INSERT, rows)
            self._conn.execute("INSERT OR REPLACE INTO head(id, checkpoint) VALUES (1, ?)", (head.to_json(),))
            for cp in cps:
                self._conn.execute("INSERT INTO checkpoints(size, checkpoint) VALUES (?, ?)", (cp.size, cp.to_json()))
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            for p in batch:
                p.error = f"audit append failed: {exc}"
                p.done.set()
            return
        self._size, self._prev = size, prev
        if cps:
            self._write_checkpoint_file(cps[-1])
        for p in batch:
            p.done.set()

    def _write_checkpoint_file(self, cp: Checkpoint) -> None:
        from bulkhead.daemon.pki import write_private

        try:
            write_private(self.checkpoint_file, cp.to_json().encode(), 0o644)
        except HostError:
            pass  # the signed head and the checkpoints table still hold it

    def close(self) -> None:
        """Stop the writer, write a final checkpoint file, close the database."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=30)
        if self._size:
            self._write_checkpoint_file(sign_checkpoint(self._key, self._size, self._prev, now_iso()))
        self._conn.close()


def _readonly(path: Path) -> sqlite3.Connection:
    if not path.exists():
        raise HostError(f"audit log {path} does not exist")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        conn.execute("SELECT 1 FROM records LIMIT 1")
    except sqlite3.Error as exc:
        raise HostError(f"cannot read the audit log {path}: {exc}") from None
    return conn


def verify_files(db: Path, pub: Ed25519PublicKey, checkpoint_file: Path | None = None) -> VerifyReport:
    """Verify the audit database against its signed head, its checkpoint history and (if present) the
    separate checkpoint file. Raises HostError only when the database cannot be read at all."""
    conn = _readonly(db)
    try:
        head_row = conn.execute("SELECT checkpoint FROM head WHERE id = 1").fetchone()
        cps_rows = conn.execute("SELECT checkpoint FROM checkpoints ORDER BY size").fetchall()
    except sqlite3.Error as exc:
        conn.close()
        return VerifyReport(False, 0, 1, f"the checkpoint tables are unreadable: {exc}")
    try:
        head = Checkpoint.from_json(head_row[0]) if head_row else None
        cps = [Checkpoint.from_json(r[0]) for r in cps_rows]
        if checkpoint_file is not None and checkpoint_file.exists():
            cps.append(Checkpoint.from_json(checkpoint_file.read_text()))
    except (ValueError, TypeError) as exc:
        conn.close()
        return VerifyReport(False, 0, 1, f"a checkpoint is malformed: {exc}")
    try:
        cur = conn.execute(f"SELECT {_COLS} FROM records ORDER BY seq")  # noqa: S608
        return verify(_flat(cur), pub, head, cps)
    finally:
        conn.close()


def _flat(cur: sqlite3.Cursor) -> Iterator[tuple[Any, ...]]:
    while True:
        chunk = cur.fetchmany(8192)
        if not chunk:
            return
        yield from chunk


def query_records(
    db: Path,
    *,
    since: str | None = None,
    principal: str | None = None,
    vm: str | None = None,
    scopes: list[str] | None = None,
    after_seq: int = 0,
    limit: int | None = 1000,
) -> Iterator[dict[str, Any]]:
    """Records matching the filters, oldest first. `scopes` (None = all) limits to records whose scope is
    within one of them. Raises HostError when the database cannot be read."""
    conn = _readonly(db)
    where: list[str] = ["seq > ?"]
    args: list[object] = [after_seq]
    if since:
        where.append("time >= ?")
        args.append(since)
    if principal:
        where.append("principal = ?")
        args.append(principal)
    if vm:
        where.append("vm = ?")
        args.append(vm)
    if scopes is not None:
        if not scopes:
            conn.close()
            return
        if "/" not in scopes:
            where.append("(" + " OR ".join("(scope = ? OR scope LIKE ?)" for _ in scopes) + ")")
            for s in scopes:
                args.extend([s, s + "/%"])  # scopes are validated: no LIKE wildcards
    sql = f"SELECT {_COLS} FROM records WHERE {' AND '.join(where)} ORDER BY seq"  # noqa: S608 - placeholders
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    try:
        for row in _flat(conn.execute(sql, args)):
            d = {"seq": row[0]}
            d.update(zip(FIELDS, row[1 : 1 + len(FIELDS)], strict=True))
            yield d
    finally:
        conn.close()


def export_jsonl(records: Iterator[dict[str, Any]]) -> Iterator[str]:
    for r in records:
        yield json.dumps(r, sort_keys=True) + "\n"
