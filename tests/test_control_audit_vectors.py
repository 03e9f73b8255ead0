"""Known answers and exact boundaries for the audit core (issue 15: mutation survivors).

- the bulkhead-audit-v2 leaf format written out byte by byte (control/audit.py module docstring) and its
  RFC 9162 2.1.1 leaf hash; canonical `detail` JSON; lone surrogates survive a round trip;
- `decode_leaf` refuses another format tag and a leaf truncated in its last field;
- every `verify()` verdict reports exactly how many records were good and which one is the first bad;
- RFC 9162 2.1.3.2 / 2.1.4.2 verifiers answer False (never raise, never accept) for wrong types, a
  leaf index equal to the tree size, wrong-length hashes and over-long proofs, and accept the longest
  proofs a 64-bit tree size allows.
"""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bulkhead.control.audit import FIELDS, Record, VerifyReport, decode_leaf, leaf_bytes, parse_signed, verify
from bulkhead.control.merkle import (
    EMPTY_ROOT,
    Frontier,
    consistency_proof,
    leaf_hash,
    node_hash,
    verify_consistency,
    verify_inclusion,
)
from bulkhead.control.note import Checkpoint, NoteError, Verifier, sign_note

KEY = Ed25519PrivateKey.generate()
ORIGIN = "bulkhead.test/audit/00000000000000ff"
V = Verifier.for_key(ORIGIN, KEY)


def _lp(b: bytes) -> bytes:
    return len(b).to_bytes(4, "big") + b


def signed(size: int, root: bytes, origin: str = ORIGIN) -> str:
    return sign_note(Checkpoint(origin, size, root).text(), ORIGIN, KEY)


def build(n: int) -> tuple[list[tuple[int, bytes, bytes]], list[str], dict[int, list[bytes]]]:
    rows, f, notes, nodes = [], Frontier(), [], {}
    for seq in range(1, n + 1):
        leaf = leaf_bytes(seq, Record.make(f"t{seq}", "api", {"n": seq}).values())
        lh = leaf_hash(leaf)
        rows.append((seq, leaf, lh))
        for level, _index, h in f.append(lh):
            nodes.setdefault(level, []).append(h)
        notes.append(signed(seq, f.root()))
    return rows, notes, nodes


def head_of(notes: list[str], i: int = -1, source: str = "head"):
    return parse_signed(notes[i], V, source)


# ---------------------------------------------------------------- leaf format known answers


def test_leaf_bytes_known_answer():
    rec = Record.make("2026-01-02T03:04:05Z", "api", {"b": 1, "a": [1, "x"]}, principal="alice",
                      action="vm.start", scope="/tenants/t1", decision="allow", result="200",
                      request_id="r-1", vm="v1")
    assert rec.detail == '{"a":[1,"x"],"b":1}'  # sorted keys, no spaces
    want = (b"\x00\x00\x00\x11bulkhead-audit-v2" + _lp(b"7") + _lp(b"2026-01-02T03:04:05Z") + _lp(b"api")
            + _lp(b"alice") + _lp(b"vm.start") + _lp(b"/tenants/t1") + _lp(b"allow") + _lp(b"200")
            + _lp(b"r-1") + _lp(b"v1") + _lp(b'{"a":[1,"x"],"b":1}'))
    leaf = leaf_bytes(7, rec.values())
    assert leaf == want
    assert leaf_hash(leaf) == hashlib.sha256(b"\x00" + want).digest()
    assert decode_leaf(leaf) == (7, rec.values())


def test_record_detail_is_canonical_json():
    assert Record.make("t", "vm").detail == "{}"
    assert Record.make("t", "vm", {}).detail == "{}"
    assert Record.make("t", "vm", {"z": {"y": 2, "x": 1}, "a": None}).detail == '{"a":null,"z":{"x":1,"y":2}}'
    assert Record.make("t", "vm", {"when": b"\x01"}).detail == '{"when":"b\'\\\\x01\'"}'  # default=str


def test_none_fields_encode_empty_and_surrogates_round_trip():
    values = [None] * len(FIELDS)
    assert leaf_bytes(1, values) == b"\x00\x00\x00\x11bulkhead-audit-v2" + _lp(b"1") + _lp(b"") * len(FIELDS)
    odd = ["\ud800lone", *[""] * (len(FIELDS) - 1)]
    leaf = leaf_bytes(3, odd)
    assert _lp(b"\xed\xa0\x80lone") in leaf
    assert decode_leaf(leaf) == (3, tuple(odd))


def test_decode_leaf_refuses_another_tag_and_a_truncated_last_field():
    good = leaf_bytes(1, ["a"] * len(FIELDS))
    v3 = good.replace(b"bulkhead-audit-v2", b"bulkhead-audit-v3", 1)
    with pytest.raises(ValueError, match="not a bulkhead-audit-v2 leaf"):
        decode_leaf(v3)
    long_last = good[:-5] + _lp(b"a" * 40)[:-39]  # the detail field claims 40 bytes, carries 1
    with pytest.raises(ValueError, match="truncated leaf"):
        decode_leaf(long_last)
    with pytest.raises(ValueError, match="truncated leaf"):
        decode_leaf(good[:-1])


# ---------------------------------------------------------------- verify(): exact verdicts


def test_parse_signed_refuses_a_checkpoint_for_another_log():
    note = signed(1, b"\x01" * 32, origin="bulkhead.test/audit/other")
    with pytest.raises(NoteError, match=r"is for log 'bulkhead.test/audit/other'"):
        parse_signed(note, V, "head")


def test_report_as_dict_known_answer():
    rep = VerifyReport(False, 3, 4, "p", 2, "ab", ["n"])
    assert rep.as_dict() == {"ok": False, "records": 3, "first_bad": 4, "problem": "p",
                             "checkpoints_checked": 2, "root": "ab"}


def test_headless_and_empty_logs_report_record_one():
    rows, _notes, _ = build(2)
    rep = verify(rows, None)
    assert (rep.ok, rep.records, rep.first_bad) == (False, 0, 1)
    assert rep.problem.startswith("no signed head checkpoint")
    rep = verify([], parse_signed(signed(0, EMPTY_ROOT), V, "head"))
    assert (rep.ok, rep.records, rep.first_bad, rep.root) == (False, 0, 1, EMPTY_ROOT.hex())
    assert rep.problem.startswith("the log is empty")


def test_disagreeing_checkpoints_name_their_size():
    rows, notes, _ = build(3)
    other = parse_signed(signed(3, b"\x07" * 32), V, "witness w")
    rep = verify(rows, head_of(notes), [other])
    assert (rep.ok, rep.records, rep.first_bad) == (False, 0, 3)
    assert rep.problem == "two signed checkpoints disagree about size 3 (head and witness w)"
    zero_a = parse_signed(signed(0, EMPTY_ROOT), V, "history")
    zero_b = parse_signed(signed(0, b"\x09" * 32), V, "file")
    rep = verify(rows, head_of(notes), [zero_a, zero_b])
    assert (rep.ok, rep.records, rep.first_bad) == (False, 0, 1)


def test_each_verdict_counts_the_good_records_and_names_the_first_bad():
    rows, notes, _ = build(4)
    head = head_of(notes)
    rep = verify([rows[0], ("x", b"", b"")], head)  # malformed second row
    assert (rep.records, rep.first_bad, rep.problem) == (1, 2, "record 2 is malformed")
    rep = verify([rows[0], rows[2], rows[3]], head)
    assert (rep.records, rep.first_bad, rep.problem) == (1, 2, "record 2 is missing (deleted)")
    rep = verify([rows[0], rows[1], rows[1]], head)
    assert (rep.records, rep.first_bad) == (2, 3)
    assert rep.problem == "record 2 appears out of order after record 2 (reordered or inserted)"
    modified = (3, rows[2][1] + b"x", rows[2][2])
    rep = verify([rows[0], rows[1], modified], head)
    assert (rep.records, rep.first_bad) == (2, 3)
    renumbered = (3, rows[1][1], rows[1][2])  # record 2's content and hash in slot 3
    rep = verify([rows[0], rows[1], renumbered], head)
    assert (rep.records, rep.first_bad) == (2, 3)
    assert rep.problem.startswith("record 3 is not the record for position 3")
    rep = verify(rows[:2], head)
    assert (rep.records, rep.first_bad) == (2, 3)
    assert rep.problem == ("truncated: a signed checkpoint (head) covers 4 records but only 2 are present; "
                           "record 3 is the first missing")
    rep = verify(rows, head_of(notes, 1))
    assert (rep.records, rep.first_bad, rep.checkpoints_checked) == (4, 3, 1)
    assert rep.problem == "records 3..4 are not covered by the signed head (appended without the key)"


def _rehashed(rows, k: int):
    seq, leaf, _ = rows[k]
    s, values = decode_leaf(leaf)
    new = leaf_bytes(s, ["mallory", *values[1:]])
    out = list(rows)
    out[k] = (seq, new, leaf_hash(new))
    return out


def test_a_rewrite_is_located_after_the_last_matching_checkpoint():
    rows, notes, _ = build(4)
    bad = _rehashed(rows, 2)  # record 3 rewritten with its leaf hash recomputed
    rep = verify(bad, head_of(notes))
    assert (rep.ok, rep.records, rep.first_bad) == (False, 3, 1)
    assert rep.problem.startswith("records 1..4 differ from the signed checkpoint at 4 (head)")
    rep = verify(bad, head_of(notes), [head_of(notes, 1, "history")])
    assert (rep.records, rep.first_bad) == (3, 3)
    assert rep.problem.startswith("records 3..4 differ")


def test_verify_passes_exactly_the_levels_it_built():
    rows, notes, nodes = build(5)
    asked: list[int] = []

    def level(n: int) -> bytes:
        asked.append(n)
        return b"".join(nodes.get(n, ()))

    rep = verify(rows, head_of(notes), nodes=level)
    assert rep.ok and rep.records == 5 and asked == [1, 2, 3]  # every built level and the one above
    assert (rep.first_bad, rep.problem, rep.checkpoints_checked) == (None, "", 1)
    asked.clear()
    one_rows, one_notes, _ = build(1)
    assert verify(one_rows, head_of(one_notes), nodes=lambda n: asked.append(n) or b"").ok  # type: ignore[func-returns-value]
    assert asked == [1]  # no interior node yet: only level 1 is read (and must be empty)
    tampered = dict(nodes)
    tampered[1] = [nodes[1][0], b"\x00" * 32]
    rep = verify(rows, head_of(notes), nodes=lambda n: b"".join(tampered.get(n, ())))
    assert (rep.ok, rep.records, rep.first_bad) == (False, 5, None)
    assert rep.problem == "stored tree node (level 1, index 1) does not match the records"
    extra = dict(nodes)
    extra[3] = [b"\x01" * 32]  # a node above the top of the tree
    rep = verify(rows, head_of(notes), nodes=lambda n: b"".join(extra.get(n, ())))
    assert not rep.ok and rep.problem.startswith("stored tree node (level 3, index 0)")


# ---------------------------------------------------------------- RFC 9162 verifiers at their edges


LH = leaf_hash(b"leaf")


def test_inclusion_refuses_wrong_types_and_an_index_equal_to_the_size():
    assert verify_inclusion(LH, "0", 1, [], LH) is False  # type: ignore[arg-type]
    assert verify_inclusion(LH, 0, "1", [], LH) is False  # type: ignore[arg-type]
    assert verify_inclusion(LH, 1, 1, [], LH) is False  # index == size is not in the tree
    assert verify_inclusion(LH, 0, 1, [], LH) is True
    assert verify_inclusion(LH, 0, 1, [b"x" * 32], LH) is False  # 3a: path longer than the tree


def test_inclusion_refuses_a_sibling_of_the_wrong_length():
    short = b"s" * 31
    forged_root = hashlib.sha256(b"\x01" + LH + short).digest()
    assert verify_inclusion(LH, 0, 2, [short], forged_root) is False
    assert verify_inclusion(LH, 0, 2, [bytearray(b"s" * 32)], node_hash(LH, b"s" * 32)) is False  # type: ignore[list-item]


def _left_path_root(depth: int) -> tuple[list[bytes], bytes]:
    path = [bytes([i % 256]) * 32 for i in range(depth)]
    r = LH
    for p in path:
        r = node_hash(r, p)
    return path, r


def test_inclusion_accepts_64_levels_and_refuses_65():
    path, root = _left_path_root(64)
    assert verify_inclusion(LH, 0, 1 << 64, path, root) is True  # a 2**64-leaf tree: 64 siblings
    path, root = _left_path_root(65)
    assert verify_inclusion(LH, 0, 1 << 65, path, root) is False  # beyond any 64-bit tree size


def test_consistency_refuses_wrong_types_short_hashes_and_long_proofs():
    old = LH
    assert verify_consistency("1", 2, old, old, [b"x" * 32]) is False  # type: ignore[arg-type]
    assert verify_consistency(1, "2", old, old, [b"x" * 32]) is False  # type: ignore[arg-type]
    short = b"s" * 31
    assert verify_consistency(1, 2, old, hashlib.sha256(b"\x01" + old + short).digest(), [short]) is False
    assert verify_consistency(1, 2, old, node_hash(old, b"s" * 32), [b"s" * 32]) is True
    assert verify_consistency(1, 2, old, node_hash(old, b"s" * 32), []) is False  # step 1
    assert verify_consistency(1, 2, old, node_hash(old, b"s" * 32), [b"s" * 32, b"t" * 32]) is False  # 6a
    assert verify_consistency(2, 1, old, old, [b"s" * 32]) is False
    path, _root = _left_path_root(128)
    path128 = path
    r = old
    for p in path128:
        r = node_hash(r, p)
    assert verify_consistency(1, 1 << 128, old, r, path128) is True
    path129 = [*path128, b"z" * 32]
    r = node_hash(r, b"z" * 32)
    assert verify_consistency(1, 1 << 129, old, r, path129) is False


def test_consistency_proof_from_the_empty_tree_is_empty():
    class Reader:
        def node(self, level: int, index: int) -> bytes:
            raise AssertionError("no node is needed")

    assert consistency_proof(Reader(), 0, 5) == []
    assert consistency_proof(Reader(), 3, 3) == []
    with pytest.raises(ValueError, match="no consistency proof from size -1 to size 5"):
        consistency_proof(Reader(), -1, 5)
