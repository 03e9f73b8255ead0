"""The audit log on disk: tamper tests that edit the SQLite file directly (modify, delete, insert, reorder,
truncate, rollback, rewrite with recomputed hashes), the verify CLI naming the first bad record, the
append-only triggers, group commit under concurrency, and the pure verifier on hostile rows."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bulkhead.control.audit import FIELDS, GENESIS, Checkpoint, Record, chain_hash, sign_checkpoint, verify
from bulkhead.daemon.auditlog import (
    AuditLog,
    load_audit_key,
    load_audit_pub,
    make_audit_key,
    query_records,
    verify_files,
)
from bulkhead.daemon.cli import audit_main
from bulkhead.errors import HostError

N = 20
EVERY = 5


def _rec(i: int) -> Record:
    return Record.make(f"2026-01-01T00:00:{i:02d}.000000Z", "api", {"i": i}, principal=f"p{i % 3}",
                       action="vm/read", scope="/", decision="allow", result="200", request_id=f"r{i}",
                       vm=f"vm{i % 2}")


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    make_audit_key(tmp_path / "audit.key", tmp_path / "audit.pub")
    log = AuditLog(tmp_path / "audit.db", load_audit_key(tmp_path / "audit.key"),
                   tmp_path / "audit.checkpoint.json", checkpoint_every=EVERY)
    for i in range(1, N + 1):
        assert log.append(_rec(i)) == i
    log.close()
    return tmp_path


def _verify(d: Path, checkpoint: bool = True):
    return verify_files(d / "audit.db", load_audit_pub(d / "audit.pub"),
                        d / "audit.checkpoint.json" if checkpoint else None)


def _tamper(d: Path, *sql: str, params: tuple = ()) -> None:
    """What an attacker with write access to the file does: drop the guard triggers, then edit."""
    conn = sqlite3.connect(d / "audit.db", isolation_level=None)
    for t in ("records_no_update", "records_no_delete", "checkpoints_no_update", "checkpoints_no_delete"):
        conn.execute(f"DROP TRIGGER IF EXISTS {t}")
    for s in sql:
        conn.execute(s, params if "?" in s else ())
    conn.close()


def _row(d: Path, seq: int) -> tuple:
    conn = sqlite3.connect(d / "audit.db")
    row = conn.execute("SELECT * FROM records WHERE seq = ?", (seq,)).fetchone()
    conn.close()
    return row


def test_untouched_log_verifies(log_dir):
    rep = _verify(log_dir)
    assert rep.ok, rep.problem
    assert rep.records == N
    assert rep.checkpoints_checked == 1 + N // EVERY + 1  # head + history + file


def test_modify_is_detected_and_named(log_dir):
    _tamper(log_dir, "UPDATE records SET result = '403' WHERE seq = 7")
    rep = _verify(log_dir)
    assert not rep.ok and rep.first_bad == 7 and "modified" in rep.problem


def test_delete_is_detected_and_named(log_dir):
    _tamper(log_dir, "DELETE FROM records WHERE seq = 7")
    rep = _verify(log_dir)
    assert not rep.ok and rep.first_bad == 7 and "missing" in rep.problem


def test_delete_and_renumber_is_detected(log_dir):
    _tamper(log_dir, "DELETE FROM records WHERE seq = 7", "UPDATE records SET seq = seq - 1 WHERE seq > 7")
    rep = _verify(log_dir)
    assert not rep.ok and rep.first_bad == 7 and "does not link" in rep.problem


def test_insert_in_the_middle_is_detected(log_dir):
    # a well-formed forged record 8, chained onto record 7; the rest renumbered
    r7 = _row(log_dir, 7)
    forged = _rec(99)
    h = chain_hash(r7[-1], 8, forged.values())
    _tamper(log_dir, "UPDATE records SET seq = -seq WHERE seq >= 8", "UPDATE records SET seq = 1 - seq WHERE seq < 0",
            "INSERT INTO records VALUES (8,?,?,?,?,?,?,?,?,?,?,?,?)", params=(*forged.values(), r7[-1], h))
    rep = _verify(log_dir)
    assert not rep.ok and rep.first_bad == 9 and "does not link" in rep.problem


def test_insert_at_the_end_is_detected(log_dir):
    last = _row(log_dir, N)
    forged = _rec(98)
    h = chain_hash(last[-1], N + 1, forged.values())
    _tamper(log_dir, "INSERT INTO records VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", params=(N + 1, *forged.values(), last[-1], h))
    rep = _verify(log_dir)
    assert not rep.ok and rep.first_bad == N + 1 and "not covered by the signed head" in rep.problem


def test_reorder_is_detected_and_named(log_dir):
    _tamper(log_dir, "UPDATE records SET seq = -1 WHERE seq = 7", "UPDATE records SET seq = 7 WHERE seq = 8",
            "UPDATE records SET seq = 8 WHERE seq = -1")
    rep = _verify(log_dir)
    assert not rep.ok and rep.first_bad == 7


def test_truncate_is_detected_via_the_signed_head(log_dir):
    _tamper(log_dir, f"DELETE FROM records WHERE seq > {N - 6}")
    rep = _verify(log_dir)
    assert not rep.ok and rep.first_bad == N - 5 and "truncated" in rep.problem


def test_truncate_with_rolled_back_head_and_history_is_caught_by_the_checkpoint_file(log_dir):
    conn = sqlite3.connect(log_dir / "audit.db")
    old = conn.execute("SELECT checkpoint FROM checkpoints WHERE size = 10").fetchone()[0]
    conn.close()
    _tamper(log_dir, "DELETE FROM records WHERE seq > 10", "DELETE FROM checkpoints WHERE size > 10",
            "UPDATE head SET checkpoint = ?", params=(old,))
    assert _verify(log_dir, checkpoint=False).ok  # the database alone is self-consistent now...
    rep = _verify(log_dir)  # ...but the separate checkpoint file still covers 20 records
    assert not rep.ok and rep.first_bad == 11 and "truncated" in rep.problem


def test_rewrite_with_recomputed_hashes_is_caught_by_signed_checkpoints(log_dir):
    conn = sqlite3.connect(log_dir / "audit.db")
    rows = conn.execute("SELECT * FROM records ORDER BY seq").fetchall()
    conn.close()
    prev = GENESIS
    fixed = []
    for row in rows:
        vals = list(row[1:1 + len(FIELDS)])
        if row[0] == 12:
            vals[FIELDS.index("result")] = "201"
        h = chain_hash(prev, row[0], vals)
        fixed.append((*vals, prev, h, row[0]))
        prev = h
    cols = ", ".join(f"{f} = ?" for f in FIELDS)
    conn = sqlite3.connect(log_dir / "audit.db", isolation_level=None)
    conn.execute("DROP TRIGGER records_no_update")
    conn.executemany(f"UPDATE records SET {cols}, prev = ?, hash = ? WHERE seq = ?", fixed)
    conn.close()
    rep = _verify(log_dir)
    assert not rep.ok and rep.first_bad == 11 and "records 11..15" in rep.problem


def test_forged_head_signature_is_detected(log_dir):
    conn = sqlite3.connect(log_dir / "audit.db")
    head = json.loads(conn.execute("SELECT checkpoint FROM head").fetchone()[0])
    conn.close()
    head["size"] = N - 1
    _tamper(log_dir, "DELETE FROM records WHERE seq = ?", "UPDATE head SET checkpoint = ?", params=(json.dumps(head),))
    rep = _verify(log_dir)
    assert not rep.ok and "bad signature" in rep.problem


def test_deleting_the_head_is_detected(log_dir):
    _tamper(log_dir, "DELETE FROM head")
    rep = _verify(log_dir, checkpoint=False)
    assert not rep.ok and "no signed head" in rep.problem


def test_verify_with_another_key_fails(log_dir, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    make_audit_key(other / "k", other / "p")
    rep = verify_files(log_dir / "audit.db", load_audit_pub(other / "p"))
    assert not rep.ok and "bad signature" in rep.problem


def test_verify_cli_names_the_first_bad_record(log_dir, capsys):
    assert audit_main(["verify", "--state-dir", str(log_dir)]) == 0
    assert "audit log OK: 20 records" in capsys.readouterr().out
    _tamper(log_dir, "UPDATE records SET principal = 'mallory' WHERE seq = 13")
    assert audit_main(["verify", "--state-dir", str(log_dir)]) == 1
    out = capsys.readouterr().out
    assert "first bad record 13" in out
    assert audit_main(["verify", "--state-dir", str(log_dir), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["first_bad"] == 13


def test_records_are_append_only_in_sqlite_too(log_dir):
    conn = sqlite3.connect(log_dir / "audit.db")
    for sql in ("UPDATE records SET result = 'x' WHERE seq = 1", "DELETE FROM records WHERE seq = 1",
                "DELETE FROM checkpoints"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute(sql)
    conn.close()
    assert _verify(log_dir).ok


def test_daemon_refuses_to_open_a_truncated_log(log_dir):
    _tamper(log_dir, "DELETE FROM records WHERE seq = 20")
    with pytest.raises(HostError, match="does not match its signed head"):
        AuditLog(log_dir / "audit.db", load_audit_key(log_dir / "audit.key"), log_dir / "cp.json")


def test_reopen_continues_the_chain(log_dir):
    log = AuditLog(log_dir / "audit.db", load_audit_key(log_dir / "audit.key"), log_dir / "audit.checkpoint.json",
                   checkpoint_every=EVERY)
    assert log.append(_rec(21)) == N + 1
    log.close()
    assert _verify(log_dir).ok


def test_concurrent_appends_are_all_durable_and_ordered(tmp_path):
    make_audit_key(tmp_path / "k", tmp_path / "p")
    log = AuditLog(tmp_path / "a.db", load_audit_key(tmp_path / "k"), tmp_path / "cp.json", checkpoint_every=50)
    seqs: list[int] = []
    lock = threading.Lock()

    def worker(w: int) -> None:
        for i in range(40):
            s = log.append(_rec(i))
            with lock:
                seqs.append(s)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    assert sorted(seqs) == list(range(1, 321))
    assert verify_files(tmp_path / "a.db", load_audit_pub(tmp_path / "p"), tmp_path / "cp.json").ok


def test_query_filters(log_dir):
    recs = list(query_records(log_dir / "audit.db", principal="p1"))
    assert recs and all(r["principal"] == "p1" for r in recs)
    assert [r["seq"] for r in query_records(log_dir / "audit.db", vm="vm0", limit=3)] == [2, 4, 6]
    assert [r["seq"] for r in query_records(log_dir / "audit.db", since="2026-01-01T00:00:18")] == [18, 19, 20]
    assert list(query_records(log_dir / "audit.db", scopes=[])) == []


def test_pure_verifier_survives_hostile_rows():
    key = Ed25519PrivateKey.generate()
    head = sign_checkpoint(key, 1, b"\x01" * 32, "t")
    for rows in ([("x",)], [(1, None)], [(1, *("a",) * 10, "notbytes", b"")], [(0, *("a",) * 10, b"", b"")]):
        rep = verify(rows, key.public_key(), head)
        assert not rep.ok
    assert verify([], key.public_key(), None).ok
    assert not verify([], key.public_key(), head).ok  # truncated to nothing
    with pytest.raises(ValueError):
        Checkpoint.from_json("[1]")
