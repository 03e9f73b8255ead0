"""The audit log on disk: an append-only SQLite file of its own (WAL, synchronous=FULL) holding an
RFC 9162 Merkle tree (bulkhead.control.merkle) of the records (bulkhead.control.audit), its C2SP signed
checkpoints (bulkhead.control.note) and the latest history checkpoint also in a separate file
(`audit.checkpoint`). See docs/AUDIT.md.

Tables: `records` (one row per record, with its leaf hash = the tree's level-0 node), `nodes` (every
complete interior subtree hash (level >= 1, index): proofs and the frontier are O(log n) reads), `head`
(the signed checkpoint of the whole tree, replaced in the same transaction as every append),
`checkpoints` (history: every `checkpoint_every` records, every `checkpoint_interval` seconds when
records arrived, at open and at clean shutdown), `meta` (the log's origin).

Appends go through one writer thread that commits whatever is queued in one transaction (group commit):
`append()` returns only after its record is durable, and raises AuditUnavailable when it is not, so the
caller can refuse the action it describes (fail closed). Nothing here updates or deletes rows, and SQLite
triggers refuse UPDATE/DELETE as a second line.

A log is opened with `create=True` only by `bulkhead init` (an empty file, which then gets its init
record and first checkpoint); any other open of an empty, headless or checkpoint-less log is refused
(HostError): a wiped log is never mistaken for a new one.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import queue
import re
import secrets
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from bulkhead.control.audit import (
    FIELDS,
    Record,
    SignedCheckpoint,
    VerifyReport,
    decode_leaf,
    leaf_bytes,
    parse_signed,
    verify,
)
from bulkhead.control.merkle import Frontier, consistency_proof, inclusion_proof, leaf_hash, subtree_hash
from bulkhead.control.note import Checkpoint, NoteError, Verifier, sign_note
from bulkhead.errors import BulkheadError, ConfigError, HostError

__all__ = [
    "AuditLog",
    "AuditUnavailable",
    "TreeReader",
    "export_jsonl",
    "load_audit_key",
    "load_audit_pub",
    "load_verifier",
    "make_audit_key",
    "make_origin",
    "now_iso",
    "query_records",
    "read_origin",
    "verify_files",
]

SCHEMA = """
CREATE TABLE IF NOT EXISTS records(
  seq INTEGER PRIMARY KEY, time TEXT NOT NULL, principal TEXT NOT NULL, vm TEXT NOT NULL, scope TEXT NOT NULL,
  leaf BLOB NOT NULL, hash BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS records_principal ON records(principal);
CREATE INDEX IF NOT EXISTS records_vm ON records(vm);
CREATE INDEX IF NOT EXISTS records_time ON records(time);
CREATE TABLE IF NOT EXISTS nodes(level INTEGER NOT NULL, idx INTEGER NOT NULL, hash BLOB NOT NULL,
  PRIMARY KEY(level, idx)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS head(id INTEGER PRIMARY KEY CHECK (id = 1), note TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints(size INTEGER PRIMARY KEY, time TEXT NOT NULL, note TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_GUARDED = ("records", "nodes", "checkpoints", "meta")
TRIGGERS = "".join(
    f"CREATE TRIGGER IF NOT EXISTS {t}_no_{op} BEFORE {op.upper()} ON {t} "
    f"BEGIN SELECT RAISE(ABORT, 'audit {t} are append-only'); END;\n"
    for t in _GUARDED for op in ("update", "delete"))
_INSERT = "INSERT INTO records(seq, time, principal, vm, scope, leaf, hash) VALUES (?,?,?,?,?,?,?)"
_IDX = [FIELDS.index(f) for f in ("time", "principal", "vm", "scope")]
_NAME_SAFE = re.compile(r"[^A-Za-z0-9.-]")


class AuditUnavailable(BulkheadError):
    """An audit record could not be made durable; the action it describes must not happen."""


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def make_origin(kind: str = "audit") -> str:
    """`bulkhead.<hostid>/<kind>/<logid>`: the host (its name, made safe) and a fresh random log id."""
    host = _NAME_SAFE.sub("-", socket.gethostname())[:64] or "host"
    return f"bulkhead.{host}/{kind}/{secrets.token_hex(8)}"


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


class TreeReader:
    """merkle.NodeReader over an audit database connection: level 0 from records, the rest from nodes."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def node(self, level: int, index: int) -> bytes:
        if level == 0:
            row = self.conn.execute("SELECT hash FROM records WHERE seq = ?", (index + 1,)).fetchone()
        else:
            row = self.conn.execute("SELECT hash FROM nodes WHERE level = ? AND idx = ?", (level, index)).fetchone()
        if row is None:
            raise HostError(f"the audit tree has no node ({level}, {index}); run `bulkhead audit verify`")
        return bytes(row[0])

    def root(self, size: int) -> bytes:
        return Frontier.restore(size, self).root()

    def inclusion(self, seq: int, size: int) -> dict[str, Any]:
        """The inclusion proof of record `seq` in the tree of `size` records (RFC 9162 2.1.3), hex."""
        if not 1 <= seq <= size:
            raise ValueError(f"record {seq} is not in a tree of {size} records")
        path = inclusion_proof(self, seq - 1, size)
        return {"leaf_index": seq - 1, "tree_size": size, "leaf_hash": self.node(0, seq - 1).hex(),
                "path": [p.hex() for p in path], "root_hash": self.root(size).hex()}

    def consistency(self, old: int, new: int) -> dict[str, Any]:
        """The consistency proof between the trees of `old` and `new` records (RFC 9162 2.1.4), hex."""
        if not 1 <= old <= new:
            raise ConfigError(f"no consistency proof from {old} to {new} records (1 <= OLD <= NEW)")
        path = consistency_proof(self, old, new)
        return {"old_size": old, "new_size": new, "old_root": self.root(old).hex(),
                "new_root": self.root(new).hex(), "path": [p.hex() for p in path]}

    def subtree(self, lo: int, hi: int) -> bytes:
        return subtree_hash(self, lo, hi)


@dataclass
class _Pending:
    records: list[Record]
    done: threading.Event = field(default_factory=threading.Event)
    seq: int = 0  # of the first record
    error: str = ""


class AuditLog:
    """Open the audit database (create=True: a new, empty one, for `bulkhead init`). Raises HostError when
    the file cannot be opened, is empty or headless (wiped), its tree does not match its signed head, or
    the checkpoint file is missing or not a prefix of the tree (the daemon refuses to start)."""

    def __init__(self, path: Path, key: Ed25519PrivateKey, checkpoint_file: Path, checkpoint_every: int = 1000,
                 *, checkpoint_interval: float = 60.0, create: bool = False, origin: str | None = None,
                 on_checkpoint: Callable[[str], None] | None = None) -> None:
        self.path = path
        self.checkpoint_file = checkpoint_file
        self._key = key
        self._every = max(1, checkpoint_every)
        self._interval = max(0.05, checkpoint_interval)
        self.on_checkpoint = on_checkpoint
        existed = path.exists()
        if not create and not existed:
            raise HostError(f"the audit log {path} does not exist (wiped?); a state directory gets its log from "
                            "`bulkhead init`")
        try:
            self._conn = _connect(path)
            self._conn.executescript(SCHEMA + TRIGGERS)
            size = int(self._conn.execute("SELECT COUNT(*) FROM records").fetchone()[0])
            head_row = self._conn.execute("SELECT note FROM head WHERE id = 1").fetchone()
            meta = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.Error as exc:
            raise HostError(f"cannot open the audit log {path}: {exc}") from None
        self._reader = TreeReader(self._conn)
        if create:
            if size or head_row is not None or meta:
                self._conn.close()
                raise HostError(f"the audit log {path} already has content; refusing to create it anew")
            self.origin = origin or make_origin()
            self._conn.execute("INSERT INTO meta(key, value) VALUES ('origin', ?)", (self.origin,))
            self._frontier = Frontier()
        else:
            self.origin = str(meta.get("origin", ""))
            self._frontier = self._check_open(size, head_row)
        self.verifier = Verifier.for_key(self.origin, key)
        self._last_cp = int(self._conn.execute("SELECT COALESCE(MAX(size), 0) FROM checkpoints").fetchone()[0])
        self._last_cp_time = time.monotonic()
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._writer, name="audit-writer", daemon=True)
        self._thread.start()

    def _check_open(self, size: int, head_row: Any) -> Frontier:
        def refuse(why: str) -> HostError:
            self._conn.close()
            return HostError(f"the audit log {self.path} {why}; run `bulkhead audit verify`")

        if not self.origin:
            raise refuse("has no origin (not a bulkhead v2 log; re-initialise the state directory)")
        if size == 0 or head_row is None:
            raise refuse("is empty or has no signed head (wiped)")
        verifier = Verifier.for_key(self.origin, self._key)
        try:
            head = parse_signed(head_row[0], verifier, "head").cp
        except NoteError as exc:
            raise refuse(f"has a bad signed head ({exc})") from None
        try:
            frontier = Frontier.restore(size, self._reader)
        except HostError as exc:
            raise refuse(str(exc)) from None
        if head.size != size or frontier.root() != head.root:
            raise refuse(f"does not match its signed head (size {head.size}, found {size})")
        try:
            cp = parse_signed(self.checkpoint_file.read_text(), verifier, "file").cp
        except OSError:
            raise refuse(f"has no checkpoint file {self.checkpoint_file} (wiped or rolled back?)") from None
        except NoteError as exc:
            raise refuse(f"has a bad checkpoint file {self.checkpoint_file} ({exc})") from None
        if cp.size > size or self._reader.root(cp.size) != cp.root:
            raise refuse(f"is not an extension of its checkpoint file (size {cp.size}): truncated or rewritten")
        return frontier

    @property
    def size(self) -> int:
        return self._frontier.size

    def head_note(self) -> str:
        """The signed head (also after close: then from a read-only connection)."""
        conn = _readonly(self.path) if self._closed else self._conn
        try:
            row = conn.execute("SELECT note FROM head WHERE id = 1").fetchone()
        finally:
            if conn is not self._conn:
                conn.close()
        return str(row[0]) if row else ""

    def latest_checkpoint(self) -> str:
        row = self._conn.execute("SELECT note FROM checkpoints ORDER BY size DESC LIMIT 1").fetchone()
        return str(row[0]) if row else ""

    def reader(self) -> TreeReader:
        """A TreeReader on its own read-only connection (for proofs from other threads); close its conn."""
        return TreeReader(_readonly(self.path))

    def append(self, record: Record, timeout: float = 30.0) -> int:
        """Append and wait until durable. Returns the record's seq. Raises AuditUnavailable."""
        return self.append_many([record], timeout)

    def append_many(self, records: list[Record], timeout: float = 30.0) -> int:
        """Append `records` in this order in one transaction (one fsync: a state group commit's records,
        store.py) and wait until durable. Returns the first record's seq. Raises AuditUnavailable."""
        if self._closed:
            raise AuditUnavailable("the audit log is closed")
        p = _Pending(list(records))
        self._queue.put(p)
        if not p.done.wait(timeout):
            raise AuditUnavailable("the audit log did not commit in time")
        if p.error:
            raise AuditUnavailable(p.error)
        return p.seq

    def _writer(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=self._interval)
            except queue.Empty:  # T seconds without records: checkpoint what arrived since the last one
                if self._frontier.size > self._last_cp:
                    self._safe_commit([], force_cp=True)
                continue
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
            self._safe_commit(batch)
            if stop:
                return

    def _safe_commit(self, batch: list[_Pending], force_cp: bool = False) -> None:
        try:
            self._commit(batch, force_cp)
        except Exception as exc:  # never leave callers waiting: they fail closed
            for p in batch:
                p.error = p.error or f"audit append failed: {exc!r}"
                p.done.set()

    def _signed(self, size: int, root: bytes) -> str:
        return sign_note(Checkpoint(self.origin, size, root).text(), self.origin, self._key)

    def _commit(self, batch: list[_Pending], force_cp: bool = False) -> None:
        f = Frontier(self._frontier.size, list(self._frontier.stack))
        rows: list[tuple[Any, ...]] = []
        nodes: list[tuple[int, int, bytes]] = []
        for p in batch:
            p.seq = f.size + 1
            for record in p.records:
                seq = f.size + 1
                values = record.values()
                leaf = leaf_bytes(seq, values)
                lh = leaf_hash(leaf)
                rows.append((seq, *(values[i] for i in _IDX), leaf, lh))
                nodes.extend(f.append(lh))
        root = f.root()
        head = self._signed(f.size, root)
        make_cp = f.size > self._last_cp and (
            force_cp or self._last_cp == 0 or f.size // self._every > self._last_cp // self._every
            or time.monotonic() - self._last_cp_time >= self._interval)
        try:
            if os.environ.get("BULKHEAD_AUDIT_FAIL"):  # fault injection for the fail-closed tests
                raise sqlite3.OperationalError("injected audit failure")
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.executemany(_INSERT, rows)
            self._conn.executemany("INSERT INTO nodes(level, idx, hash) VALUES (?,?,?)", nodes)
            self._conn.execute("INSERT OR REPLACE INTO head(id, note) VALUES (1, ?)", (head,))
            if make_cp:
                self._conn.execute("INSERT INTO checkpoints(size, time, note) VALUES (?,?,?)", (f.size, now_iso(), head))
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
        self._frontier = f
        for p in batch:
            p.done.set()
        if make_cp:
            self._last_cp, self._last_cp_time = f.size, time.monotonic()
            self._write_checkpoint_file(head)
            if self.on_checkpoint is not None:
                try:
                    self.on_checkpoint(head)
                except Exception as exc:  # a witness pusher must not break the log
                    print(f"bulkheadd: checkpoint hook: {exc!r}", flush=True)

    def _write_checkpoint_file(self, note: str) -> None:
        from bulkhead.daemon.pki import write_private

        try:
            write_private(self.checkpoint_file, note.encode(), 0o644)
        except HostError:
            pass  # the signed head and the checkpoints table still hold it

    def close(self) -> None:
        """Stop the writer, write the final checkpoint (clean shutdown), close the database."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=30)
        if self._frontier.size > self._last_cp:
            try:
                self._commit([], force_cp=True)
            except Exception as exc:
                print(f"bulkheadd: final audit checkpoint: {exc!r}", flush=True)
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


def read_origin(db: Path) -> str:
    conn = _readonly(db)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'origin'").fetchone()
    except sqlite3.Error:
        row = None
    finally:
        conn.close()
    return str(row[0]) if row else ""


def load_verifier(vkey: Path | str | None, db: Path, pub: Path | None = None) -> Verifier:
    """The log's note verifier key: `vkey` (a file or the key text), else `pub` (PEM) named by the
    database's origin. Raises HostError."""
    if vkey is not None:
        text = str(vkey)
        if isinstance(vkey, Path) or "+" not in text:
            try:
                text = Path(vkey).read_text()
            except OSError as exc:
                raise HostError(f"cannot read the verifier key {vkey}: {exc}") from None
        try:
            return Verifier.parse(text)
        except NoteError as exc:
            raise HostError(f"bad verifier key {vkey}: {exc}") from None
    if pub is None:
        raise HostError("no verifier key: give --verifier-key (or --pub)")
    origin = read_origin(db)
    if not origin:
        raise HostError(f"{db} names no origin; give --verifier-key")
    return Verifier.for_key(origin, load_audit_pub(pub))


def verify_files(db: Path, verifier: Verifier, checkpoint_file: Path | None = None,
                 extra: Sequence[SignedCheckpoint] = (), check_nodes: bool = True) -> VerifyReport:
    """Verify the audit database against its signed head, its checkpoint history, the separate checkpoint
    file (required when given: a missing one fails) and `extra` signed checkpoints (e.g. the witnesses'),
    recomputing the tree from the records. Raises HostError only when the database cannot be read."""
    conn = _readonly(db)
    try:
        try:
            head_row = conn.execute("SELECT note FROM head WHERE id = 1").fetchone()
            cps_rows = conn.execute("SELECT note FROM checkpoints ORDER BY size").fetchall()
        except sqlite3.Error as exc:
            return VerifyReport(False, 0, 1, f"the checkpoint tables are unreadable: {exc}")
        try:
            head = parse_signed(head_row[0], verifier, "head") if head_row else None
            cps = [parse_signed(r[0], verifier, "history") for r in cps_rows]
        except NoteError as exc:
            return VerifyReport(False, 0, 1, f"a stored checkpoint is bad: {exc}")
        if checkpoint_file is not None:
            try:
                cps.append(parse_signed(checkpoint_file.read_text(), verifier, f"file {checkpoint_file.name}"))
            except OSError:
                return VerifyReport(False, 0, 1, f"the checkpoint file {checkpoint_file} is missing (wiped or "
                                    "rolled back?)")
            except NoteError as exc:
                return VerifyReport(False, 0, 1, f"the checkpoint file {checkpoint_file} is bad: {exc}")
        cps.extend(extra)
        cur = conn.execute("SELECT seq, leaf, hash FROM records ORDER BY seq")

        def level(lv: int) -> bytes:
            c = conn.execute("SELECT hash FROM nodes WHERE level = ? ORDER BY idx", (lv,))
            return b"".join([bytes(r[0]) for r in c.fetchall()])

        return verify(_flat(cur), head, cps, level if check_nodes else None)
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
    seq: int | None = None,
    leaf: bool = False,
) -> Iterator[dict[str, Any]]:
    """Records matching the filters, oldest first. `scopes` (None = all) limits to records whose scope is
    within one of them. `leaf`: add each record's leaf input (base64). Raises HostError when the database
    cannot be read."""
    conn = _readonly(db)
    where: list[str] = ["seq > ?"]
    args: list[object] = [after_seq]
    if seq is not None:
        where.append("seq = ?")
        args.append(seq)
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
    sql = f"SELECT seq, leaf FROM records WHERE {' AND '.join(where)} ORDER BY seq"  # noqa: S608 - placeholders
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    try:
        for row in _flat(conn.execute(sql, args)):
            try:
                seq_, values = decode_leaf(bytes(row[1]))
            except (ValueError, TypeError):
                raise HostError(f"audit record {row[0]} is damaged; run `bulkhead audit verify`") from None
            d: dict[str, Any] = {"seq": row[0]}
            d.update(zip(FIELDS, values, strict=True))
            # the index columns only select: what is shown (and filtered on) is what the tree commits to
            if seq_ != row[0] or not _matches(d, since, principal, vm, scopes):
                continue
            if leaf:
                d["leaf"] = base64.b64encode(bytes(row[1])).decode()
            yield d
    finally:
        conn.close()


def _matches(d: dict[str, Any], since: str | None, principal: str | None, vm: str | None,
             scopes: list[str] | None) -> bool:
    if (since and d["time"] < since) or (principal and d["principal"] != principal) or (vm and d["vm"] != vm):
        return False
    if scopes is None or "/" in scopes:
        return True
    return any(d["scope"] == s or d["scope"].startswith(s + "/") for s in scopes)


def export_jsonl(records: Iterator[dict[str, Any]]) -> Iterator[str]:
    for r in records:
        yield json.dumps(r, sort_keys=True) + "\n"
