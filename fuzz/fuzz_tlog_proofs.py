"""atheris harness for the RFC 9162 proof verifiers (bulkhead.control.merkle, sections 2.1.3.2 and
2.1.4.2) and the C2SP parsers (bulkhead.control.note).

Input byte 0 picks the target:
- 0: inclusion. A tree of n leaves (n from the input, 1..300) and the genuine proof of leaf m; the rest
  of the input edits the proof (replace, drop, add hashes), the leaf hash and the index. A crash: an
  exception, the genuine proof not verifying, or an edited (leaf, index, path) verifying.
- 1: consistency, the same for a proof from size m to n (an edited proof or old root must not verify).
- 2: the remaining input as a signed note / checkpoint / add-checkpoint body / verifier key: anything
  but NoteError escaping is a crash.

Run: .venv/bin/python fuzz/fuzz_tlog_proofs.py -max_total_time=60 /tmp/bh-fuzz/tlog_proofs fuzz/corpus/tlog_proofs
Regenerate the seeds: .venv/bin/python fuzz/fuzz_tlog_proofs.py --write-seeds
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["bulkhead"]):
    from bulkhead.control.merkle import (
        Frontier,
        consistency_proof,
        inclusion_proof,
        leaf_hash,
        verify_consistency,
        verify_inclusion,
    )
    from bulkhead.control.note import Checkpoint, NoteError, Verifier, open_note, parse_add_checkpoint

VKEY = Verifier.parse("PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW")


class _Tree:
    def __init__(self, n: int) -> None:
        self.nodes: dict[tuple[int, int], bytes] = {}
        self.f = Frontier()
        self.prefix_roots = []
        for i in range(n):
            lh = leaf_hash(i.to_bytes(2, "big"))
            self.nodes[(0, i)] = lh
            for level, idx, h in self.f.append(lh):
                self.nodes[(level, idx)] = h
            self.prefix_roots.append(self.f.root())

    def node(self, level: int, index: int) -> bytes:
        return self.nodes[(level, index)]


TREES: dict[int, _Tree] = {}


def _tree(n: int) -> _Tree:
    t = TREES.get(n)
    if t is None:
        t = TREES[n] = _Tree(n)
    return t


def _edit(path: list[bytes], edits: bytes) -> list[bytes]:
    p = list(path)
    for j in range(0, len(edits) - 1, 2):
        op, arg = edits[j] % 4, edits[j + 1]
        if op == 0 and p:
            k = arg % len(p)
            p[k] = hashlib.sha256(p[k] + bytes([arg])).digest()
        elif op == 1 and p:
            del p[arg % len(p)]
        elif op == 2:
            p.insert(arg % (len(p) + 1), hashlib.sha256(bytes([arg])).digest())
        elif op == 3 and len(p) > 1:
            a, b = arg % len(p), (arg // 7) % len(p)
            p[a], p[b] = p[b], p[a]
    return p


def TestOneInput(data: bytes) -> None:
    if len(data) < 5:
        return
    mode = data[0] % 3
    if mode == 2:
        text = data[1:].decode("utf-8", "replace")
        for fn in (lambda: open_note(text, VKEY), lambda: Checkpoint.parse(text),
                   lambda: parse_add_checkpoint(data[1:]), lambda: Verifier.parse(text)):
            try:
                fn()
            except NoteError:
                pass
        return
    n = 1 + int.from_bytes(data[1:3], "big") % 300
    t = _tree(n)
    root = t.f.root()
    m = int.from_bytes(data[3:5], "big") % n
    edits = data[5:]
    if mode == 0:
        path = inclusion_proof(t, m, n)
        lh = t.nodes[(0, m)]
        if not verify_inclusion(lh, m, n, path, root):
            raise AssertionError(f"genuine inclusion proof of {m} in {n} failed")
        bad = _edit(path, edits[1:])
        idx = m if not edits or edits[0] % 3 else (m + 1 + edits[0]) % n
        leaf = lh if not edits or edits[0] % 5 else leaf_hash(b"not in the log")
        if (bad, idx, leaf) != (path, m, lh) and verify_inclusion(leaf, idx, n, bad, root):
            raise AssertionError(f"an edited inclusion proof verified (leaf {idx} of {n})")
        return
    old = m + 1
    path = consistency_proof(t, old, n)
    old_root = t.prefix_roots[old - 1]
    if not verify_consistency(old, n, old_root, root, path):
        raise AssertionError(f"genuine consistency proof {old}->{n} failed")
    bad = _edit(path, edits[1:])
    fake_old = old_root if not edits or edits[0] % 5 else hashlib.sha256(old_root).digest()
    if (bad, fake_old) != (path, old_root) and verify_consistency(old, n, fake_old, root, bad):
        raise AssertionError(f"an edited consistency proof {old}->{n} verified")


def write_seeds(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    seeds = {
        "inclusion": bytes([0, 0, 100, 0, 7]),
        "inclusion_edit": bytes([0, 0, 33, 0, 12, 1, 0, 3]),
        "inclusion_foreign_leaf": bytes([0, 0, 9, 0, 2, 5]),
        "consistency": bytes([1, 0, 200, 0, 50]),
        "consistency_edit": bytes([1, 0, 17, 0, 4, 1, 1, 0]),
        "consistency_forked_old": bytes([1, 0, 64, 0, 9, 5]),
        "note_go_example": bytes([2]) + (
            "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
            "\n\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6"
            "RyyBwJnAM=\n").encode(),
        "add_checkpoint": bytes([2]) + b"old 3\n" + b"A" * 43 + b"=\n\norigin\n5\n" + b"A" * 43 + b"=\n\n",
    }
    for name, data in seeds.items():
        (directory / name).write_bytes(data)


def main() -> None:
    if "--write-seeds" in sys.argv:
        write_seeds(Path(__file__).parent / "corpus" / "tlog_proofs")
        return
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
