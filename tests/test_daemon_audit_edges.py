"""The audit log on disk at its edges (issue 15): what the mutation check found untested.

- RFC 9162 §2.1.4.1: PROOF(m, D[n]) for m == n is the empty list, and §2.1.4.2 then only compares the
  two roots; sizes outside 1 <= OLD <= NEW are refused with a typed ConfigError.
- Fail closed and atomic: a commit that fails inside its transaction (the head insert refused by SQLite)
  raises AuditUnavailable, leaves no record, node or head behind (ROLLBACK), and the next append takes the
  same seq and verifies; the tree never counts a record that is not durable.
- A bad checkpoint (stored, or the separate file, C2SP signed-note) verifies nothing: ok is False, no
  record counts as verified and record 1 is the first one not shown good.
- Group commit: one transaction takes at most 1024 waiting appends.
- Scope filters select whole path segments; a fresh log has no checkpoint yet; exported JSON lines have
  sorted keys (stable bytes for diffing two exports).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from tests.test_daemon_audit import EVERY, N, _open, _rec, _tamper, _verify, log_dir  # noqa: F401  (log_dir: fixture)

from bulkhead.control.audit import Record
from bulkhead.control.merkle import verify_consistency
from bulkhead.daemon.auditlog import (
    AuditLog,
    AuditUnavailable,
    TreeReader,
    export_jsonl,
    load_audit_key,
    make_audit_key,
    query_records,
)
from bulkhead.daemon.cli import audit_main
from bulkhead.errors import ConfigError


def _wait_for(cond, what: str, limit: float = 20.0) -> None:
    """Wait for a condition another thread makes true (no fixed sleep); fail after `limit` seconds."""
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        threading.Event().wait(0.005)


def _count(d: Path, table: str) -> int:
    conn = sqlite3.connect(d / "audit.db")
    try:
        return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
    finally:
        conn.close()


def test_consistency_proof_of_equal_sizes_is_empty_and_bounds_are_typed_errors(log_dir):  # noqa: F811
    conn = sqlite3.connect(f"file:{log_dir / 'audit.db'}?mode=ro", uri=True)
    try:
        t = TreeReader(conn)
        same = t.consistency(N, N)
        assert same["path"] == [] and same["old_root"] == same["new_root"] == _verify(log_dir).root
        assert verify_consistency(N, N, bytes.fromhex(same["old_root"]), bytes.fromhex(same["new_root"]), [])
        one = t.consistency(1, N)  # the smallest OLD
        assert one["path"] and verify_consistency(1, N, bytes.fromhex(one["old_root"]),
                                                  bytes.fromhex(one["new_root"]), [bytes.fromhex(p) for p in one["path"]])
        for old, new in ((0, N), (N, N - 1), (2, 1)):
            with pytest.raises(ConfigError, match="no consistency proof"):
                t.consistency(old, new)
    finally:
        conn.close()
    assert audit_main(["prove", "consistency", str(N), str(N), "--state-dir", str(log_dir), "--json"]) == 0


def test_a_commit_failing_inside_its_transaction_leaves_nothing_and_the_seq_is_reused(log_dir):  # noqa: F811
    """The head insert is refused after the record and node rows went in: all of it is rolled back."""
    log = _open(log_dir)
    head_before = log.head_note()
    conn = sqlite3.connect(log_dir / "audit.db", isolation_level=None)
    conn.execute("CREATE TABLE fault(x INTEGER)")
    conn.execute("CREATE TRIGGER fault_head BEFORE INSERT ON head WHEN EXISTS (SELECT 1 FROM fault) "
                 "BEGIN SELECT RAISE(ABORT, 'injected: disk full'); END")
    conn.execute("INSERT INTO fault VALUES (1)")
    try:
        nodes_before = _count(log_dir, "nodes")
        with pytest.raises(AuditUnavailable, match="disk full"):
            log.append_many([_rec(90), _rec(91)])  # 22 records would complete new interior nodes
        assert log.size == N and _count(log_dir, "records") == N and _count(log_dir, "nodes") == nodes_before
        assert log.head_note() == head_before
        conn.execute("DELETE FROM fault")
        assert log.append(_rec(92)) == N + 1  # the same seq the failed batch would have taken
    finally:
        conn.execute("DROP TRIGGER fault_head")
        conn.close()
        log.close()
    rep = _verify(log_dir)
    assert rep.ok and rep.records == N + 1, rep.problem
    (last,) = query_records(log_dir / "audit.db", seq=N + 1)
    assert last["request_id"] == "r92"


@pytest.mark.parametrize("which", ["stored", "file"])
def test_a_bad_checkpoint_verifies_nothing(log_dir, which, capsys):  # noqa: F811
    if which == "stored":
        conn = sqlite3.connect(log_dir / "audit.db")
        note = conn.execute("SELECT note FROM checkpoints WHERE size = ?", (EVERY,)).fetchone()[0]
        conn.close()
        forged = note.replace(f"\n{EVERY}\n", f"\n{EVERY + 1}\n", 1)  # its signature no longer verifies
        _tamper(log_dir, "UPDATE checkpoints SET note = ? WHERE size = ?", params=(forged, EVERY))
    else:
        (log_dir / "audit.checkpoint").write_text("not a signed note\n")
    rep = _verify(log_dir)
    assert (rep.ok, rep.records, rep.first_bad) == (False, 0, 1)
    assert ("stored checkpoint is bad" if which == "stored" else "checkpoint file") in rep.problem
    assert audit_main(["verify", "--state-dir", str(log_dir), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert (out["ok"], out["records"], out["first_bad"]) == (False, 0, 1)


def test_a_new_log_has_no_checkpoint_until_its_first_record(tmp_path):
    make_audit_key(tmp_path / "audit.key", tmp_path / "audit.pub")
    log = _open(tmp_path, create=True)
    try:
        assert log.latest_checkpoint() == "" and log.size == 0
        assert log.append(_rec(1)) == 1
        assert log.latest_checkpoint().split("\n")[1] == "1"  # the first record is checkpointed at once
    finally:
        log.close()


def test_group_commit_takes_at_most_1024_appends_per_transaction(tmp_path):
    """With checkpoint_every=1 every transaction ends in a checkpoint of its size, so the sizes show the
    batches. The writer is held at BEGIN by another connection's write lock while 1100 appends queue."""
    make_audit_key(tmp_path / "audit.key", tmp_path / "audit.pub")
    log = AuditLog(tmp_path / "audit.db", load_audit_key(tmp_path / "audit.key"), tmp_path / "audit.checkpoint",
                   checkpoint_every=1, create=True)
    blocker = sqlite3.connect(tmp_path / "audit.db", isolation_level=None)
    threads: list[threading.Thread] = []
    try:
        blocker.execute("BEGIN IMMEDIATE")  # the writer's BEGIN IMMEDIATE now waits (busy timeout 30 s)
        first = threading.Thread(target=log.append, args=(_rec(0),))
        first.start()
        q = log._queue  # unfinished_tasks counts every put (nothing calls task_done)
        _wait_for(lambda: q.unfinished_tasks == 1 and q.qsize() == 0, "the writer to take the first append")
        threads = [threading.Thread(target=log.append, args=(_rec(i % 60),)) for i in range(1100)]
        for t in threads:
            t.start()
        _wait_for(lambda: q.unfinished_tasks == 1101, "1100 queued appends")
        assert q.qsize() > 1024  # the batch after the blocked one can hit the cap
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    first.join(30)
    for t in threads:
        t.join(30)
    log.close()
    conn = sqlite3.connect(tmp_path / "audit.db")
    sizes = [r[0] for r in conn.execute("SELECT size FROM checkpoints ORDER BY size")]
    conn.close()
    batches = [b - a for a, b in zip([0, *sizes], sizes, strict=False)]
    assert sum(batches) == 1101 and max(batches) == 1024, batches


def test_scope_filters_select_whole_path_segments(tmp_path):
    make_audit_key(tmp_path / "audit.key", tmp_path / "audit.pub")
    log = _open(tmp_path, create=True)
    scopes = ["/", "/tenants/acme", "/tenants/acme/vms/v1", "/tenants/acmecorp", "/tenants/umbrella/vms/u1"]
    for i, scope in enumerate(scopes):
        log.append(Record.make(f"2026-01-01T00:00:0{i}.000000Z", "api", {}, principal="p", action="vm/read",
                               scope=scope, decision="allow", result="200", request_id=f"s{i}"))
    log.close()
    db = tmp_path / "audit.db"
    assert [r["scope"] for r in query_records(db, scopes=["/tenants/acme"])] == scopes[1:3]  # not acmecorp
    assert [r["scope"] for r in query_records(db, scopes=["/tenants/acme", "/tenants/umbrella"])] == [
        scopes[1], scopes[2], scopes[4]]
    assert [r["scope"] for r in query_records(db, scopes=["/"])] == scopes
    assert list(query_records(db, scopes=["/tenants/none"])) == []


def test_exported_json_lines_have_sorted_keys():
    recs = [{"seq": 2, "action": "vm/read", "b": 1, "a": [3, 1]}, {"z": None, "m": "x"}]
    assert list(export_jsonl(iter(recs))) == ['{"a": [3, 1], "action": "vm/read", "b": 1, "seq": 2}\n',
                                              '{"m": "x", "z": null}\n']


# ---------------------------------------------------------------- survivors of the full auditlog run
def test_origin_and_time_formats(monkeypatch):
    """`bulkhead.<host>/<kind>/<16 hex>`: the host name made safe (only A-Za-z0-9 . - kept, 64 at most),
    "host" when nothing is left; times are RFC 3339 UTC with microseconds."""
    import re
    import socket

    from bulkhead.daemon.auditlog import make_origin, now_iso

    monkeypatch.setattr(socket, "gethostname", lambda: "web 01_a.example")
    assert re.fullmatch(r"bulkhead\.web-01-a\.example/witness/[0-9a-f]{16}", make_origin("witness"))
    monkeypatch.setattr(socket, "gethostname", lambda: "h" * 70)
    assert make_origin().split("/")[0] == "bulkhead." + "h" * 64
    monkeypatch.setattr(socket, "gethostname", lambda: "")
    assert make_origin().startswith("bulkhead.host/audit/")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", now_iso())


def test_inclusion_proof_bounds_and_the_subtree_root(log_dir):  # noqa: F811
    """RFC 9162 §2.1.3: records 1..size have proofs (both ends included); 0 and size + 1 do not."""
    from bulkhead.control.merkle import verify_inclusion

    conn = sqlite3.connect(f"file:{log_dir / 'audit.db'}?mode=ro", uri=True)
    try:
        t = TreeReader(conn)
        root = bytes.fromhex(_verify(log_dir).root)
        assert t.subtree(0, N) == root
        for seq in (1, N):
            p = t.inclusion(seq, N)
            assert verify_inclusion(bytes.fromhex(p["leaf_hash"]), seq - 1, N, [bytes.fromhex(x) for x in p["path"]],
                                    root)
        for seq in (0, N + 1):
            with pytest.raises(ValueError, match="is not in a tree"):
                t.inclusion(seq, N)
    finally:
        conn.close()


def test_keys_of_the_wrong_type_are_refused(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from bulkhead.daemon.auditlog import load_audit_pub
    from bulkhead.errors import HostError

    k = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "k").write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
    (tmp_path / "p").write_bytes(k.public_key().public_bytes(serialization.Encoding.PEM,
                                                             serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(HostError, match="not an ed25519 private key"):
        load_audit_key(tmp_path / "k")
    with pytest.raises(HostError, match="not an ed25519 public key"):
        load_audit_pub(tmp_path / "p")


def test_append_after_close_is_refused(log_dir):  # noqa: F811
    log = _open(log_dir)
    log.close()
    with pytest.raises(AuditUnavailable, match="closed"):
        log.append(_rec(50))
    assert _verify(log_dir).records == N


@pytest.mark.parametrize("how", ["file-missing", "tables-unreadable"])
def test_a_missing_checkpoint_file_or_unreadable_table_verifies_nothing(log_dir, how):  # noqa: F811
    if how == "file-missing":
        (log_dir / "audit.checkpoint").unlink()
    else:
        _tamper(log_dir, "DROP TABLE checkpoints")
    rep = _verify(log_dir)
    assert (rep.ok, rep.records, rep.first_bad) == (False, 0, 1)
    assert ("is missing" if how == "file-missing" else "unreadable") in rep.problem


def test_since_includes_a_record_at_exactly_that_time(log_dir):  # noqa: F811
    db = log_dir / "audit.db"
    assert [r["seq"] for r in query_records(db, since="2026-01-01T00:00:18.000000Z")] == [18, 19, 20]


def test_a_lying_index_column_hides_no_later_record(log_dir):  # noqa: F811
    """Record 2's principal column claims p1 (its leaf says p2): it is skipped, and every genuine p1
    record after it is still returned."""
    _tamper(log_dir, "UPDATE records SET principal = 'p1' WHERE seq = 2")
    assert [r["seq"] for r in query_records(log_dir / "audit.db", principal="p1", limit=None)] == [
        1, 4, 7, 10, 13, 16, 19]


def test_create_refuses_a_file_that_already_has_an_origin(tmp_path):
    from bulkhead.errors import HostError

    make_audit_key(tmp_path / "audit.key", tmp_path / "audit.pub")
    _open(tmp_path, create=True).close()  # created, never appended: only its origin is stored
    with pytest.raises(HostError, match="already has content"):
        _open(tmp_path, create=True)


def test_opening_refuses_a_log_without_origin_or_head_or_node(log_dir):  # noqa: F811
    from bulkhead.errors import HostError

    cases = [("DELETE FROM head", "no signed head"), ("DELETE FROM meta", "has no origin"),
             ("DELETE FROM nodes WHERE level = 4", "no node"),
             ("UPDATE nodes SET hash = zeroblob(32) WHERE level = 2 AND idx = 4", "does not match its signed head")]
    for sql, why in cases:
        db = log_dir / "audit.db"
        backup = db.read_bytes()
        _tamper(log_dir, sql)
        with pytest.raises(HostError, match=why):
            _open(log_dir)
        for s in ("-wal", "-shm"):
            Path(f"{db}{s}").unlink(missing_ok=True)
        db.write_bytes(backup)
    assert _open(log_dir).size == N  # the untouched copy opens


def test_checkpoint_hook_every_and_file_mode(tmp_path):
    """checkpoint_every=1 checkpoints each commit; the hook sees each note; the file is 0644 (public)."""
    make_audit_key(tmp_path / "audit.key", tmp_path / "audit.pub")
    seen: list[str] = []
    log = AuditLog(tmp_path / "audit.db", load_audit_key(tmp_path / "audit.key"), tmp_path / "audit.checkpoint",
                   checkpoint_every=0, create=True, on_checkpoint=seen.append)  # 0 is taken as 1
    assert log.head_note() == ""  # nothing signed yet
    for i in range(3):
        log.append(_rec(i))
    conn = sqlite3.connect(tmp_path / "audit.db")
    sizes = [r[0] for r in conn.execute("SELECT size FROM checkpoints ORDER BY size")]
    conn.close()
    assert sizes == [1, 2, 3]  # before close's final checkpoint (committed with each record)
    log.close()  # joins the writer: every hook call has happened
    assert [n.split("\n")[1] for n in seen] == ["1", "2", "3"]
    assert (tmp_path / "audit.checkpoint").stat().st_mode & 0o777 == 0o644
    assert log.head_note().split("\n")[1] == "3"  # after close: from a read-only connection


def test_the_verifier_key_is_read_from_a_path_or_text_and_bad_ones_are_host_errors(log_dir):  # noqa: F811
    from bulkhead.daemon.auditlog import load_verifier, read_origin
    from bulkhead.errors import HostError

    db = log_dir / "audit.db"
    text = (log_dir / "audit.vkey").read_text().strip()
    assert str(load_verifier(str(log_dir / "audit.vkey"), db)) == text  # a path given as a string
    assert str(load_verifier(text, db)) == text
    assert read_origin(db) == text.split("+")[0]
    with pytest.raises(HostError, match="cannot read the verifier key"):
        load_verifier(log_dir / "missing.vkey", db)
    with pytest.raises(HostError, match="bad verifier key"):
        load_verifier("name+zzzz+AAAA", db)


def test_a_reader_serves_another_thread(log_dir):  # noqa: F811
    log = _open(log_dir)
    try:
        t = log.reader()
        out: list[bytes] = []
        th = threading.Thread(target=lambda: out.append(t.root(N)))
        th.start()
        th.join(10)
        t.conn.close()
        assert out == [bytes.fromhex(_verify(log_dir).root)]
    finally:
        log.close()


def test_an_append_that_cannot_commit_in_time_fails_closed(log_dir):  # noqa: F811
    log = _open(log_dir)
    blocker = sqlite3.connect(log_dir / "audit.db", isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(AuditUnavailable, match="in time"):
            log.append(_rec(60), timeout=0.2)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
        log.close()


def test_injected_audit_failure_refuses_the_append_and_writes_nothing(log_dir, monkeypatch):  # noqa: F811
    log = _open(log_dir)
    try:
        monkeypatch.setenv("BULKHEAD_AUDIT_FAIL", "1")
        with pytest.raises(AuditUnavailable, match="injected"):
            log.append(_rec(70))
        monkeypatch.delenv("BULKHEAD_AUDIT_FAIL")
        assert log.append(_rec(71)) == N + 1
    finally:
        log.close()
    assert _verify(log_dir).records == N + 1


def test_verifier_key_sources_that_name_nothing_are_host_errors(log_dir):  # noqa: F811
    from bulkhead.daemon.auditlog import load_verifier, read_origin
    from bulkhead.errors import HostError

    db = log_dir / "audit.db"
    with pytest.raises(HostError, match="no verifier key"):
        load_verifier(None, db, None)
    _tamper(log_dir, "DELETE FROM meta")
    assert read_origin(db) == ""
    with pytest.raises(HostError, match="names no origin"):
        load_verifier(None, db, log_dir / "audit.pub")


def test_a_commit_failing_outside_sqlite_fails_closed_too(log_dir, monkeypatch):  # noqa: F811
    """Any exception in the writer (here: signing the new head) reaches the caller as AuditUnavailable."""
    log = _open(log_dir)
    try:
        def boom(size: int, root: bytes) -> str:
            raise RuntimeError("signing key unavailable")

        monkeypatch.setattr(log, "_signed", boom)
        with pytest.raises(AuditUnavailable, match="audit append failed: RuntimeError"):
            log.append(_rec(80))
        monkeypatch.undo()
        assert log.append(_rec(81)) == N + 1
    finally:
        log.close()
    assert _verify(log_dir).records == N + 1
