"""The audit log on disk: tamper tests that edit the SQLite file directly (modify, delete, insert, reorder,
truncate, rewrite with recomputed hashes, wipe in every form), the daemon refusing a wiped or damaged
log while `init` creates a new one, the verify / checkpoint / prove / export CLI, group commit under
concurrency, and proofs through the API under RBAC. Rollback to an older signed state with a witness:
tests/test_audit_witness.py."""

from __future__ import annotations

import base64
import json
import sqlite3
import threading
from pathlib import Path

import pytest

from bulkhead.control.audit import FIELDS, Record, decode_leaf, leaf_bytes
from bulkhead.control.merkle import (
    Frontier,
    leaf_hash,
    root_from_leaves,
    verify_consistency,
    verify_inclusion,
)
from bulkhead.daemon.auditlog import (
    AuditLog,
    load_audit_key,
    load_verifier,
    make_audit_key,
    query_records,
    verify_files,
)
from bulkhead.daemon.cli import audit_main
from bulkhead.errors import HostError

N = 20
EVERY = 5
GUARDS = [f"{t}_no_{op}" for t in ("records", "nodes", "checkpoints", "meta") for op in ("update", "delete")]


def _rec(i: int) -> Record:
    return Record.make(f"2026-01-01T00:00:{i:02d}.000000Z", "api", {"i": i}, principal=f"p{i % 3}",
                       action="vm/read", scope="/", decision="allow", result="200", request_id=f"r{i}",
                       vm=f"vm{i % 2}")


def _open(d: Path, create: bool = False) -> AuditLog:
    return AuditLog(d / "audit.db", load_audit_key(d / "audit.key"), d / "audit.checkpoint",
                    checkpoint_every=EVERY, create=create)


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    make_audit_key(tmp_path / "audit.key", tmp_path / "audit.pub")
    log = _open(tmp_path, create=True)
    (tmp_path / "audit.vkey").write_text(f"{log.verifier}\n")
    for i in range(1, N + 1):
        assert log.append(_rec(i)) == i
    log.close()
    return tmp_path


def _verify(d: Path, checkpoint: bool = True):
    return verify_files(d / "audit.db", load_verifier(d / "audit.vkey", d / "audit.db"),
                        d / "audit.checkpoint" if checkpoint else None)


def _tamper(d: Path, *sql: str, params: tuple = ()) -> None:
    """What an attacker with write access to the file does: drop the guard triggers, then edit."""
    conn = sqlite3.connect(d / "audit.db", isolation_level=None)
    for t in GUARDS:
        conn.execute(f"DROP TRIGGER IF EXISTS {t}")
    for s in sql:
        conn.execute(s, params if "?" in s else ())
    conn.close()


def _changed(d: Path, seq: int, **changes: str) -> tuple[str, tuple]:
    """SQL + params replacing record `seq`'s stored content (leaf) by an edited copy, keeping its hash."""
    conn = sqlite3.connect(d / "audit.db")
    leaf = conn.execute("SELECT leaf FROM records WHERE seq = ?", (seq,)).fetchone()[0]
    conn.close()
    s, values = decode_leaf(leaf)
    vals = dict(zip(FIELDS, values, strict=True)) | changes
    return "UPDATE records SET leaf = ? WHERE seq = ?", (leaf_bytes(s, [vals[f] for f in FIELDS]), seq)


def _row(d: Path, seq: int) -> tuple:
    conn = sqlite3.connect(d / "audit.db")
    row = conn.execute("SELECT * FROM records WHERE seq = ?", (seq,)).fetchone()
    conn.close()
    return row


def test_untouched_log_verifies(log_dir):
    rep = _verify(log_dir)
    assert rep.ok, rep.problem
    assert rep.records == N
    assert rep.checkpoints_checked == 1 + (1 + N // EVERY) + 1  # head + history (1, 5, 10, ...) + file
    leaves = [leaf_bytes(r["seq"], [r[f] for f in FIELDS]) for r in query_records(log_dir / "audit.db", limit=None)]
    assert rep.root == root_from_leaves(leaves).hex()
    assert [r["result"] for r in query_records(log_dir / "audit.db", limit=None)] == ["200"] * N


def test_a_tampered_index_column_can_neither_change_nor_leak_what_queries_show(log_dir):
    _tamper(log_dir, "UPDATE records SET principal = 'p1', scope = '/tenants/x' WHERE seq = 3")
    recs = list(query_records(log_dir / "audit.db", principal="p1", limit=None))
    assert 3 not in [r["seq"] for r in recs] and all(r["principal"] == "p1" for r in recs)
    assert list(query_records(log_dir / "audit.db", scopes=["/tenants/x"])) == []


def test_modify_is_detected_and_named(log_dir):
    sql, params = _changed(log_dir, 7, result="403")
    _tamper(log_dir, sql, params=params)
    rep = _verify(log_dir)
    assert not rep.ok and rep.first_bad == 7 and "modified" in rep.problem


def test_delete_is_detected_and_named(log_dir):
    _tamper(log_dir, "DELETE FROM records WHERE seq = 7")
    rep = _verify(log_dir)
    assert not rep.ok and rep.first_bad == 7 and "missing" in rep.problem


def test_delete_and_renumber_is_detected(log_dir):
    _tamper(log_dir, "DELETE FROM records WHERE seq = 7", "UPDATE records SET seq = seq - 1 WHERE seq > 7")
    rep = _verify(log_dir)
    assert not rep.ok and rep.first_bad == 7 and "renumbered" in rep.problem  # record 8's leaf is not record 7's


def test_insert_in_the_middle_with_a_well_formed_leaf_is_detected(log_dir):
    forged = _rec(99)
    lh = leaf_hash(leaf_bytes(8, forged.values()))
    _tamper(log_dir, "UPDATE records SET seq = -seq WHERE seq >= 8", "UPDATE records SET seq = 1 - seq WHERE seq < 0",
            "INSERT INTO records VALUES (8,'t','p','','/',?,?)", params=(leaf_bytes(8, forged.values()), lh))
    rep = _verify(log_dir)
    assert not rep.ok and rep.first_bad is not None and 6 <= rep.first_bad <= 9


def test_insert_at_the_end_is_detected(log_dir):
    forged = _rec(98)
    lh = leaf_hash(leaf_bytes(N + 1, forged.values()))
    _tamper(log_dir, "INSERT INTO records VALUES (?,'t','p','','/',?,?)",
            params=(N + 1, leaf_bytes(N + 1, forged.values()), lh))
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


def _rollback(d: Path, to: int, file_too: bool) -> None:
    """Roll the database back to its genuine signed state at `to` records (and the file, if asked)."""
    conn = sqlite3.connect(d / "audit.db")
    old = conn.execute("SELECT note FROM checkpoints WHERE size = ?", (to,)).fetchone()[0]
    conn.close()
    _tamper(d, f"DELETE FROM records WHERE seq > {to}", f"DELETE FROM checkpoints WHERE size > {to}",
            f"DELETE FROM nodes WHERE (idx + 1) << level > {to}", "UPDATE head SET note = ?", params=(old,))
    if file_too:
        (d / "audit.checkpoint").write_text(old)


def test_rollback_of_the_database_is_caught_by_the_checkpoint_file(log_dir):
    _rollback(log_dir, 10, file_too=False)
    assert _verify(log_dir, checkpoint=False).ok  # the database alone is self-consistent now...
    rep = _verify(log_dir)  # ...but the separate checkpoint file still covers 20 records
    assert not rep.ok and rep.first_bad == 11 and "truncated" in rep.problem
    with pytest.raises(HostError, match="not an extension of its checkpoint file"):
        _open(log_dir)


def test_rewrite_with_recomputed_leaf_hashes_is_caught_by_signed_checkpoints(log_dir):
    conn = sqlite3.connect(log_dir / "audit.db")
    leaves = [bytes(r[0]) for r in conn.execute("SELECT leaf FROM records ORDER BY seq")]
    conn.close()
    s, values = decode_leaf(leaves[11])  # record 12
    vals = list(values)
    vals[FIELDS.index("result")] = "201"
    leaves[11] = leaf_bytes(s, vals)
    f = Frontier()
    nodes = []
    for lf in leaves:
        nodes += f.append(leaf_hash(lf))
    _tamper(log_dir, "DELETE FROM nodes")
    conn = sqlite3.connect(log_dir / "audit.db", isolation_level=None)
    conn.executemany("UPDATE records SET leaf = ?, hash = ? WHERE seq = ?",
                     [(lf, leaf_hash(lf), i + 1) for i, lf in enumerate(leaves)])
    conn.executemany("INSERT INTO nodes VALUES (?,?,?)", nodes)
    conn.close()
    rep = _verify(log_dir)
    assert not rep.ok and rep.first_bad == 11 and "records 11..15" in rep.problem


def test_a_stored_tree_node_that_lies_is_detected(log_dir):
    _tamper(log_dir, "UPDATE nodes SET hash = zeroblob(32) WHERE level = 1 AND idx = 2")
    rep = _verify(log_dir)
    assert not rep.ok and "stored tree node (level 1, index 2)" in rep.problem


def test_forged_head_is_detected(log_dir):
    conn = sqlite3.connect(log_dir / "audit.db")
    head = conn.execute("SELECT note FROM head").fetchone()[0]
    conn.close()
    forged = head.replace(f"\n{N}\n", f"\n{N - 1}\n", 1)
    _tamper(log_dir, f"DELETE FROM records WHERE seq = {N}", "UPDATE head SET note = ?", params=(forged,))
    rep = _verify(log_dir)
    assert not rep.ok and "does not verify" in rep.problem


@pytest.mark.parametrize("how", ["records", "records+head", "everything", "file", "db-file"])
def test_a_wiped_log_fails_verification_and_the_daemon_refuses_it(log_dir, how):
    """Issue 12 hole 5: the wipe is attempted in each form; verify fails with a clear message and the
    log cannot be opened (the daemon does not start a fresh chain)."""
    if how == "file":
        (log_dir / "audit.checkpoint").unlink()
    elif how == "db-file":
        for s in ("", "-wal", "-shm"):
            Path(f"{log_dir / 'audit.db'}{s}").unlink(missing_ok=True)
    else:
        stmts = ["DELETE FROM records", "DELETE FROM nodes"]
        if how != "records":
            stmts.append("DELETE FROM head")
        if how == "everything":
            stmts.append("DELETE FROM checkpoints")
            (log_dir / "audit.checkpoint").unlink()
        _tamper(log_dir, *stmts)
    if how == "db-file":
        with pytest.raises(HostError, match=r"audit log .*audit\.db does not exist"):
            _verify(log_dir)
    else:
        rep = _verify(log_dir)
        assert not rep.ok and rep.problem
        assert any(w in rep.problem for w in ("wiped", "truncated", "missing", "empty"))
    with pytest.raises(HostError, match=r"wiped|does not exist|no checkpoint file|no signed head"):
        _open(log_dir)


def test_init_creates_a_log_only_on_an_empty_file(log_dir, tmp_path):
    with pytest.raises(HostError, match="already has content"):
        _open(log_dir, create=True)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    make_audit_key(fresh / "audit.key", fresh / "audit.pub")
    with pytest.raises(HostError, match="does not exist"):
        _open(fresh)  # a missing database is never silently created outside init
    log = _open(fresh, create=True)
    (fresh / "audit.vkey").write_text(f"{log.verifier}\n")
    assert log.append(_rec(1)) == 1  # init's record: the first checkpoint (size 1) is written with it
    log.close()
    assert _verify(fresh).ok
    assert _open(fresh).size == 1


def test_verify_with_another_key_fails(log_dir, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    make_audit_key(other / "k", other / "p")
    rep = verify_files(log_dir / "audit.db", load_verifier(None, log_dir / "audit.db", other / "p"))
    assert not rep.ok and ("not signed by" in rep.problem or "does not verify" in rep.problem)


def test_verify_cli_names_the_first_bad_record(log_dir, capsys):
    assert audit_main(["verify", "--state-dir", str(log_dir)]) == 0
    assert f"audit log OK: {N} records" in capsys.readouterr().out
    sql, params = _changed(log_dir, 13, principal="mallory")
    _tamper(log_dir, sql, params=params)
    assert audit_main(["verify", "--state-dir", str(log_dir)]) == 1
    assert "first bad record 13" in capsys.readouterr().out
    assert audit_main(["verify", "--state-dir", str(log_dir), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["first_bad"] == 13


def test_verify_cli_on_a_wiped_log_is_a_failure_not_ok(log_dir, capsys):
    _tamper(log_dir, "DELETE FROM records", "DELETE FROM nodes", "DELETE FROM head", "DELETE FROM checkpoints")
    (log_dir / "audit.checkpoint").unlink()
    assert audit_main(["verify", "--state-dir", str(log_dir)]) == 1
    out = capsys.readouterr().out
    assert "BAD" in out and "OK" not in out


def test_checkpoint_and_prove_cli(log_dir, capsys):
    vk = load_verifier(log_dir / "audit.vkey", log_dir / "audit.db")
    assert audit_main(["checkpoint", "--state-dir", str(log_dir), "--verifier-key"]) == 0
    assert capsys.readouterr().out.strip() == str(vk)
    assert audit_main(["checkpoint", "--state-dir", str(log_dir)]) == 0
    note = capsys.readouterr().out
    assert note.startswith(f"{vk.name}\n{N}\n")
    root = base64.b64decode(note.split("\n")[2])
    assert audit_main(["prove", "inclusion", "7", "--state-dir", str(log_dir), "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert set(p) == {"leaf_index", "tree_size", "leaf_hash", "path", "root_hash"}
    assert p["leaf_index"] == 6 and p["tree_size"] == N and bytes.fromhex(p["root_hash"]) == root
    leaf = leaf_bytes(7, _rec(7).values())
    assert verify_inclusion(leaf_hash(leaf), 6, N, [bytes.fromhex(x) for x in p["path"]], root)
    assert audit_main(["prove", "inclusion", "7", "--size", "9", "--state-dir", str(log_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tree_size"] == 9
    assert audit_main(["prove", "consistency", "6", str(N), "--state-dir", str(log_dir), "--json"]) == 0
    c = json.loads(capsys.readouterr().out)
    assert set(c) == {"old_size", "new_size", "old_root", "new_root", "path"}
    assert verify_consistency(6, N, bytes.fromhex(c["old_root"]), root, [bytes.fromhex(x) for x in c["path"]])
    assert audit_main(["prove", "inclusion", str(N + 1), "--state-dir", str(log_dir)]) == 2
    assert "not in a tree" in capsys.readouterr().err
    assert audit_main(["prove", "consistency", "5", "99", "--state-dir", str(log_dir)]) == 2


def test_records_are_append_only_in_sqlite_too(log_dir):
    conn = sqlite3.connect(log_dir / "audit.db")
    for sql in ("UPDATE records SET leaf = x'00' WHERE seq = 1", "DELETE FROM records WHERE seq = 1",
                "DELETE FROM checkpoints", "DELETE FROM nodes", "UPDATE meta SET value = 'x'"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute(sql)
    conn.close()
    assert _verify(log_dir).ok


def test_daemon_refuses_to_open_a_truncated_log(log_dir):
    _tamper(log_dir, "DELETE FROM records WHERE seq = 20")
    with pytest.raises(HostError, match=r"does not match its signed head|no node"):
        _open(log_dir)


def test_reopen_continues_the_tree_and_checkpoints_on_time(log_dir):
    log = AuditLog(log_dir / "audit.db", load_audit_key(log_dir / "audit.key"), log_dir / "audit.checkpoint",
                   checkpoint_every=1000, checkpoint_interval=0.1)
    seen: list[str] = []
    log.on_checkpoint = seen.append
    assert log.append(_rec(21)) == N + 1
    deadline = __import__("time").monotonic() + 5
    while not seen and __import__("time").monotonic() < deadline:
        threading.Event().wait(0.05)
    assert seen and f"\n{N + 1}\n" in seen[0]  # made by time, not by count
    log.append(_rec(22))
    log.close()  # clean shutdown: a checkpoint of everything
    assert f"\n{N + 2}\n" in (log_dir / "audit.checkpoint").read_text()
    assert _verify(log_dir).ok


def test_concurrent_appends_are_all_durable_and_ordered(tmp_path):
    make_audit_key(tmp_path / "audit.key", tmp_path / "audit.pub")
    log = AuditLog(tmp_path / "audit.db", load_audit_key(tmp_path / "audit.key"), tmp_path / "audit.checkpoint",
                   checkpoint_every=50, create=True)
    (tmp_path / "audit.vkey").write_text(str(log.verifier))
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
    assert _verify(tmp_path).ok


def test_query_filters_and_leaf_export(log_dir):
    recs = list(query_records(log_dir / "audit.db", principal="p1"))
    assert recs and all(r["principal"] == "p1" for r in recs)
    assert [r["seq"] for r in query_records(log_dir / "audit.db", vm="vm0", limit=3)] == [2, 4, 6]
    assert [r["seq"] for r in query_records(log_dir / "audit.db", since="2026-01-01T00:00:18")] == [18, 19, 20]
    assert list(query_records(log_dir / "audit.db", scopes=[])) == []
    full = list(query_records(log_dir / "audit.db", limit=None, leaf=True))
    assert root_from_leaves(base64.b64decode(r["leaf"]) for r in full).hex() == _verify(log_dir).root


# ---------------------------------------------------------------- through the API, under RBAC
@pytest.fixture
def h(tmp_path):
    from bulkhead.daemon.testkit import Harness

    harness = Harness(tmp_path / "sd")
    yield harness
    harness.close()


def test_api_proofs_under_rbac(h):
    t, u = h.tenant("acme"), h.tenant("umbrella")
    v = h.vm(t, "mine")
    h.vm(u, "theirs")
    mine = [r for r in query_records(h.root / "audit.db", limit=None) if r["scope"].startswith(f"/tenants/{t}")]
    theirs = [r for r in query_records(h.root / "audit.db", limit=None) if r["scope"].startswith(f"/tenants/{u}")]
    assert mine and theirs
    aud = h.principal("acme-auditor", ("Auditor", f"/tenants/{t}"))
    nobody = h.principal("nobody")
    with h.client(aud) as c:
        cp = c.get("/v1/audit/checkpoint").json()
        size = cp["tree_size"]
        root = bytes.fromhex(cp["root_hash"])
        vk = load_verifier(cp["verifier_key"], h.root / "audit.db")
        assert f"\n{size}\n" in cp["note"] and vk.name == cp["origin"]
        for r in mine:  # its own tenant's records: provable from the leaf it can read and hashes only
            p = c.get("/v1/audit/proof/inclusion", params={"seq": r["seq"], "size": size}).json()
            leaf = leaf_bytes(r["seq"], [r[f] for f in FIELDS])
            assert p["leaf_hash"] == leaf_hash(leaf).hex()
            assert verify_inclusion(leaf_hash(leaf), r["seq"] - 1, size, [bytes.fromhex(x) for x in p["path"]], root)
        for r in theirs:  # another tenant's record: 404, as if it did not exist
            assert c.get("/v1/audit/proof/inclusion", params={"seq": r["seq"]}).status_code == 404
        assert c.get("/v1/audit/proof/inclusion", params={"seq": 10**9}).status_code == 404
        p = c.get("/v1/audit/proof/consistency", params={"old": 2, "new": size}).json()
        assert verify_consistency(2, size, bytes.fromhex(p["old_root"]), root, [bytes.fromhex(x) for x in p["path"]])
        assert c.get("/v1/audit/proof/consistency", params={"old": 3, "new": 10**9}).status_code == 422
        recs = c.get("/v1/audit", params={"leaf": "true", "limit": 10000}).json()
        assert recs and all(r["scope"].startswith(f"/tenants/{t}") for r in recs)
        assert all(base64.b64decode(r["leaf"]) == leaf_bytes(r["seq"], [r[f] for f in FIELDS]) for r in recs)
        assert "leaf" not in c.get("/v1/audit").json()[0]
    with h.client(nobody) as c:
        for path, params in (("/v1/audit/checkpoint", {}), ("/v1/audit/proof/inclusion", {"seq": 1}),
                             ("/v1/audit/proof/consistency", {"old": 1, "new": 2})):
            assert c.get(path, params=params).status_code == 404
    with h.client() as c:  # the local root principal (Owner at /) proves anything
        assert c.get("/v1/audit/proof/inclusion", params={"seq": theirs[0]["seq"]}).status_code == 200
    assert v


def test_the_daemon_refuses_a_wiped_state_dir_but_init_makes_a_new_one(tmp_path):
    from bulkhead.daemon.daemon import Daemon
    from bulkhead.daemon.setup import init_state_dir

    sd = init_state_dir(tmp_path / "sd")
    assert _verify(sd.root).ok and _verify(sd.root).records == 1  # init's record, signed
    _tamper(sd.root, "DELETE FROM records", "DELETE FROM nodes", "DELETE FROM head", "DELETE FROM checkpoints")
    sd.checkpoint.unlink()
    with pytest.raises(HostError, match="wiped"):
        Daemon.open(sd.root)
    assert audit_main(["verify", "--state-dir", str(sd.root)]) == 1


def test_audit_key_files_have_their_modes(tmp_path):
    """The signing key is private to its owner (0600); the public key is world-readable (0644)."""
    make_audit_key(tmp_path / "k", tmp_path / "k.pub")
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "k.pub").stat().st_mode & 0o777 == 0o644


def test_latest_checkpoint_is_the_largest_signed_tree(log_dir):
    log = _open(log_dir)
    try:
        note = log.latest_checkpoint()
        origin, size = note.split("\n")[:2]
        assert (origin, size) == (str(log.verifier).split("+")[0], str(N))  # N is a multiple of EVERY
    finally:
        log.close()
