"""Audit log benchmarks (issue 17 targets, docs/AUDIT.md): verify N records from scratch (target 1M in
<= 5 s), inclusion and consistency proof generation + verification on that log (target <= 5 ms each),
append throughput (1 and 8 writers; must not regress against the hash-chain log).

Run (quiet machine): .venv/bin/python bench/bench_audit.py --records 1000000 --out bench/results/audit.json
Smoke:              .venv/bin/python bench/bench_audit.py --smoke
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from bulkhead.control.audit import Record, leaf_bytes  # noqa: E402
from bulkhead.control.merkle import Frontier, leaf_hash, verify_consistency, verify_inclusion  # noqa: E402
from bulkhead.control.note import Checkpoint, sign_note  # noqa: E402
from bulkhead.daemon.auditlog import (  # noqa: E402
    _INSERT,
    SCHEMA,
    TRIGGERS,
    AuditLog,
    TreeReader,
    load_audit_key,
    load_verifier,
    make_audit_key,
    verify_files,
)


def generate(tmp: Path, n: int) -> tuple[Path, Any]:
    """n records written directly with the log's own leaf/tree code in one transaction (checkpoints
    every 1000), the same bytes AuditLog would write."""
    make_audit_key(tmp / "k", tmp / "p")
    key = load_audit_key(tmp / "k")
    db = tmp / "big.db"
    origin = "bulkhead.bench/audit/0000000000000000"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(SCHEMA + TRIGGERS)
    conn.execute("BEGIN")
    conn.execute("INSERT INTO meta VALUES ('origin', ?)", (origin,))
    f = Frontier()
    rows: list[tuple[Any, ...]] = []
    nodes: list[tuple[int, int, bytes]] = []
    for seq in range(1, n + 1):
        values = Record.make(f"2026-01-01T00:00:00.{seq % 1000000:06d}Z", "api", {"i": seq}, principal="p",
                             action="vm/read", scope="/", decision="allow", result="200",
                             request_id=f"r{seq}", vm="").values()
        leaf = leaf_bytes(seq, values)
        lh = leaf_hash(leaf)
        rows.append((seq, values[0], values[2], values[8], values[4], leaf, lh))
        nodes.extend(f.append(lh))
        if len(rows) == 50000:
            conn.executemany(_INSERT, rows)
            conn.executemany("INSERT INTO nodes VALUES (?,?,?)", nodes)
            rows, nodes = [], []
        if seq % 1000 == 0 or seq == n:
            note = sign_note(Checkpoint(origin, seq, f.root()).text(), origin, key)
            conn.execute("INSERT INTO checkpoints VALUES (?, 't', ?)", (seq, note))
    conn.executemany(_INSERT, rows)
    conn.executemany("INSERT INTO nodes VALUES (?,?,?)", nodes)
    conn.execute("INSERT INTO head VALUES (1, ?)", (note,))
    conn.execute("COMMIT")
    conn.close()
    (tmp / "vkey").write_text(str(load_verifier(None, db, tmp / "p")))
    return db, load_verifier(tmp / "vkey", db)


def verify_bench(tmp: Path, n: int) -> dict[str, object]:
    t0 = time.perf_counter()
    db, verifier = generate(tmp, n)
    gen = time.perf_counter() - t0
    out: dict[str, object] = {"records": n, "generate_s": gen}
    for label, nodes in (("verify_s", True), ("verify_records_only_s", False)):
        t0 = time.perf_counter()
        rep = verify_files(db, verifier, check_nodes=nodes)
        out[label] = time.perf_counter() - t0
        assert rep.ok and rep.records == n, rep
    out["records_per_s"] = n / float(out["verify_s"])  # type: ignore[arg-type]
    out["checkpoints"] = rep.checkpoints_checked
    out.update(proof_bench(db, n))
    return out


def proof_bench(db: Path, n: int, k: int = 200) -> dict[str, float]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    t = TreeReader(conn)
    root = t.root(n)
    rnd = random.Random(1)
    t0 = time.perf_counter()
    for _ in range(k):
        seq = rnd.randint(1, n)
        p = t.inclusion(seq, n)
        assert verify_inclusion(bytes.fromhex(p["leaf_hash"]), seq - 1, n, [bytes.fromhex(x) for x in p["path"]], root)
    inc = (time.perf_counter() - t0) / k
    t0 = time.perf_counter()
    for _ in range(k):
        old = rnd.randint(1, n - 1)
        c = t.consistency(old, n)
        assert verify_consistency(old, n, bytes.fromhex(c["old_root"]), root, [bytes.fromhex(x) for x in c["path"]])
    con = (time.perf_counter() - t0) / k
    conn.close()
    return {"inclusion_prove_and_verify_ms": inc * 1000, "consistency_prove_and_verify_ms": con * 1000}


def append_bench(tmp: Path, n: int) -> dict[str, object]:
    make_audit_key(tmp / "ak", tmp / "ap")
    log = AuditLog(tmp / "a.db", load_audit_key(tmp / "ak"), tmp / "a.checkpoint", create=True)
    rec = Record.make("2026-01-01T00:00:00.000000Z", "api", {"method": "GET", "path": "/v1/vms/x"},
                      principal=str(uuid.uuid4()), action="vm/read", scope="/tenants/a/vms/b", decision="allow",
                      result="200", request_id=str(uuid.uuid4()), vm=str(uuid.uuid4()))
    t0 = time.perf_counter()
    for _ in range(n):
        log.append(rec)
    one = n / (time.perf_counter() - t0)
    per = n // 8

    def w() -> None:
        for _ in range(per):
            log.append(rec)

    ts = [threading.Thread(target=w) for _ in range(8)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    many = per * 8 / (time.perf_counter() - t0)
    log.close()
    return {"appends_per_s_1_writer": one, "appends_per_s_8_writers": many, "n": n}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--appends", type=int, default=4000)
    ap.add_argument("--smoke", action="store_true", help="20,000 records, 400 appends")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.smoke:
        args.records, args.appends = 20_000, 400
    with tempfile.TemporaryDirectory() as d:
        res = {"verify": verify_bench(Path(d), args.records), "append": append_bench(Path(d), args.appends)}
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
