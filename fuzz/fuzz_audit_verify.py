"""atheris harness for the audit-log verifier (bulkhead.control.audit.verify) and signed-note parsing.

A valid log of 5 records (leaf inputs, leaf hashes) with its signed head checkpoint (C2SP note, fixed
test key) is built once. The input is a list of edits: each 4-byte group (op, row, field, value)
replaces bytes of a row's leaf or leaf hash with fuzz-chosen bytes, deletes or duplicates a row, swaps
two rows, shortens a row tuple, or replaces the head with the remaining input parsed as a signed note
(parse_signed: NoteError means no head). A crash is any exception escaping verify() or parse_signed()
other than NoteError, or a wrong verdict: ok=True for a log that differs from the signed one, or
ok=False for the untouched log with a genuine head. An empty or headless log is never ok (issue 12).

Run: .venv/bin/python fuzz/fuzz_audit_verify.py -max_total_time=60 /tmp/bh-fuzz/audit_verify fuzz/corpus/audit_verify
Regenerate the seeds: .venv/bin/python fuzz/fuzz_audit_verify.py --write-seeds
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import atheris

with atheris.instrument_imports(include=["bulkhead"]):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from bulkhead.control.audit import Record, SignedCheckpoint, leaf_bytes, parse_signed, verify
    from bulkhead.control.merkle import Frontier, leaf_hash
    from bulkhead.control.note import Checkpoint, NoteError, Verifier, sign_note

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
ORIGIN = "bulkhead.fuzz/audit/0000000000000000"
VERIFIER = Verifier.for_key(ORIGIN, KEY)


def _build(n: int) -> tuple[list[list[Any]], str]:
    rows: list[list[Any]] = []
    f = Frontier()
    for seq in range(1, n + 1):
        rec = Record.make(f"2026-01-01T00:00:{seq:02d}Z", "api", {"i": seq}, principal="alice", action="vm/create")
        leaf = leaf_bytes(seq, rec.values())
        lh = leaf_hash(leaf)
        f.append(lh)
        rows.append([seq, leaf, lh])
    return rows, sign_note(Checkpoint(ORIGIN, n, f.root()).text(), ORIGIN, KEY)


ROWS, HEAD_NOTE = _build(5)
HEAD = parse_signed(HEAD_NOTE, VERIFIER, "head")


def TestOneInput(data: bytes) -> None:
    rows = [list(r) for r in ROWS]
    head: SignedCheckpoint | None = HEAD
    i = 0
    while i + 4 <= len(data):
        op, r, f, v = data[i], data[i + 1], data[i + 2], data[i + 3]
        i += 4
        op %= 6
        if op == 0 and rows:
            row = rows[r % len(rows)]
            col = f % 3
            if col >= len(row):
                continue
            if col == 0:
                row[0] = v - 2
            else:
                b = bytes(row[col]) if isinstance(row[col], bytes) else b""
                chunk = bytes(data[i : i + (v % 8)])
                i += v % 8
                pos = (f * 7) % (len(b) + 1)
                row[col] = b[:pos] + chunk + b[pos + len(chunk) :]
        elif op == 1 and rows:
            del rows[r % len(rows)]
        elif op == 2 and rows:
            rows.insert(f % (len(rows) + 1), list(rows[r % len(rows)]))
        elif op == 3 and len(rows) > 1:
            a, b2 = r % len(rows), f % len(rows)
            rows[a], rows[b2] = rows[b2], rows[a]
        elif op == 4:
            try:
                head = parse_signed(data[i:].decode("utf-8", "replace"), VERIFIER, "fuzz")
            except NoteError:
                head = None
            break
        elif op == 5 and rows:
            rows[r % len(rows)] = rows[r % len(rows)][: f % 3]
    report = verify(rows, head)
    same = rows == ROWS and head is not None and (head.cp.size, head.cp.root) == (HEAD.cp.size, HEAD.cp.root)
    if same and not report.ok:
        raise AssertionError(f"the untouched log failed verification: {report.problem}")
    if report.ok and not same:
        raise AssertionError(f"a modified log verified: {len(rows)} rows, head={head}")


def write_seeds(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.iterdir():
        old.unlink()
    seeds = {
        "untouched": b"",
        "edit_leaf": bytes([0, 2, 1, 5]) + b"mallo",
        "edit_hash": bytes([0, 2, 2, 3]) + b"abc",
        "delete_row": bytes([1, 4, 0, 0]),
        "duplicate": bytes([2, 1, 3, 0]),
        "swap": bytes([3, 1, 2, 0]),
        "head_note": bytes([4, 0, 0, 0]) + HEAD_NOTE.encode(),
        "truncate_row": bytes([5, 0, 2, 0]),
        "empty_log_no_head": bytes([1, 0, 0, 0] * 5 + [4, 0, 0, 0]),
    }
    for name, data in seeds.items():
        (directory / name).write_bytes(data)


def main() -> None:
    if "--write-seeds" in sys.argv:
        write_seeds(Path(__file__).parent / "corpus" / "audit_verify")
        return
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
