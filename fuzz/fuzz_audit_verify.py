"""atheris harness for the audit-log verifier (bulkhead.control.audit.verify) and checkpoint parsing.

A valid log of 5 records with a signed head checkpoint (fixed test key) is built once. The input is a
list of edits: each 4-byte group (op, row, field, value) either replaces a field of a row with
fuzz-chosen bytes, deletes or duplicates a row, swaps two rows, or replaces the head with a parsed
Checkpoint.from_json of the remaining input. A crash is any exception escaping verify() (it must never
raise on malformed rows), or a verdict that is wrong: ok=True for a log that differs from the signed
one (except an empty log with no head, which is consistent by construction), or ok=False for the
untouched log.

Run: .venv/bin/python fuzz/fuzz_audit_verify.py -max_total_time=60 /tmp/bh-fuzz/audit_verify fuzz/corpus/audit_verify
Regenerate the seeds: .venv/bin/python fuzz/fuzz_audit_verify.py --write-seeds
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import atheris

with atheris.instrument_imports():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from bulkhead.control.audit import (
        FIELDS,
        GENESIS,
        Checkpoint,
        Record,
        chain_hash,
        sign_checkpoint,
        verify,
        verify_checkpoint,
    )

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
PUB = KEY.public_key()


def _build(n: int) -> tuple[list[list[Any]], Checkpoint]:
    rows: list[list[Any]] = []
    prev = GENESIS
    for seq in range(1, n + 1):
        rec = Record.make(f"2026-01-01T00:00:{seq:02d}Z", "api", {"i": seq}, principal="alice", action="vm/create")
        values = rec.values()
        h = chain_hash(prev, seq, values)
        rows.append([seq, *values, prev, h])
        prev = h
    return rows, sign_checkpoint(KEY, n, prev, "2026-01-01T00:01:00Z")


ROWS, HEAD = _build(5)
NF = len(FIELDS)


def TestOneInput(data: bytes) -> None:
    rows = [list(r) for r in ROWS]
    head: Checkpoint | None = HEAD
    i = 0
    while i + 4 <= len(data):
        op, r, f, v = data[i], data[i + 1], data[i + 2], data[i + 3]
        i += 4
        op %= 6
        if op == 0 and rows:
            row = rows[r % len(rows)]
            col = f % (NF + 3)
            if col >= len(row):
                continue
            if col == 0:
                row[0] = v - 2
            elif col <= NF:
                row[col] = data[i : i + (v % 16)].decode("latin-1")
                i += v % 16
            else:
                row[col] = bytes(data[i : i + (v % 40)])
                i += v % 40
        elif op == 1 and rows:
            del rows[r % len(rows)]
        elif op == 2 and rows:
            rows.insert(f % (len(rows) + 1), list(rows[r % len(rows)]))
        elif op == 3 and len(rows) > 1:
            a, b = r % len(rows), f % len(rows)
            rows[a], rows[b] = rows[b], rows[a]
        elif op == 4:
            try:
                head = Checkpoint.from_json(data[i:].decode("utf-8", "replace"))
            except (ValueError, RecursionError):
                head = None
            break
        elif op == 5 and rows:
            rows[r % len(rows)] = rows[r % len(rows)][: f % (NF + 3)]
    report = verify(rows, PUB, head)
    # A head that differs only in how its signature is spelled (bytes.fromhex skips whitespace) is the
    # same signed statement.
    same = (
        rows == ROWS
        and head is not None
        and (head.size, head.head, head.time) == (HEAD.size, HEAD.head, HEAD.time)
        and verify_checkpoint(PUB, head)
    )
    if same and not report.ok:
        raise AssertionError(f"the untouched log failed verification: {report.problem}")
    # Without a signed head the verifier can only check internal consistency: an empty log with no
    # head is consistent (the daemon must supply the head it keeps; see docs/FUZZING.md).
    empty_unsigned = rows == [] and head is None
    if report.ok and not same and not empty_unsigned:
        raise AssertionError(f"a modified log verified: {len(rows)} rows, head={head}")


def write_seeds(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    seeds = {
        "untouched": b"",
        "edit_field": bytes([0, 2, 3, 5]) + b"mallory",
        "delete_row": bytes([1, 4, 0, 0]),
        "duplicate": bytes([2, 1, 3, 0]),
        "swap": bytes([3, 1, 2, 0]),
        "head_json": bytes([4, 0, 0, 0]) + HEAD.to_json().encode(),
        "truncate_row": bytes([5, 0, 4, 0]),
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
