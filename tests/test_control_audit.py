"""The pure audit core: C2SP signed notes / checkpoints / cosignatures (against the Go `note` package's
published example, byte for byte), leaf encoding injectivity, any single change to a log is caught and
located (hypothesis), an empty or headless log is a failure; and the pure VM lifecycle table."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from bulkhead.control.audit import FIELDS, Record, decode_leaf, leaf_bytes, parse_signed, verify
from bulkhead.control.lifecycle import STATES, TRANSITIONS, LifecycleError, next_state
from bulkhead.control.merkle import Frontier, leaf_hash
from bulkhead.control.note import (
    ALG_COSIGNATURE,
    Checkpoint,
    NoteError,
    Verifier,
    cosign,
    format_add_checkpoint,
    open_note,
    parse_add_checkpoint,
    sign_note,
    verify_cosignature,
)

KEY = Ed25519PrivateKey.generate()
ORIGIN = "bulkhead.test/audit/0123456789abcdef"
V = Verifier.for_key(ORIGIN, KEY)

# golang.org/x/mod/sumdb/note's documented example (key, text, signature).
GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
GO_SIG = ("\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6"
          "RyyBwJnAM=\n")


def test_signed_note_matches_the_go_note_package_byte_for_byte():
    key = Ed25519PrivateKey.from_private_bytes(base64.b64decode(GO_SKEY.split("+", 4)[4])[1:])
    assert str(Verifier.for_key("PeterNeumann", key)) == GO_VKEY
    assert sign_note(GO_TEXT, "PeterNeumann", key) == GO_TEXT + "\n" + GO_SIG
    assert open_note(GO_TEXT + "\n" + GO_SIG, Verifier.parse(GO_VKEY)) == GO_TEXT
    with pytest.raises(NoteError, match="the signature by PeterNeumann does not verify"):
        open_note(GO_TEXT.replace("you", "we", 1) + "\n" + GO_SIG, Verifier.parse(GO_VKEY))
    with pytest.raises(NoteError, match="hash does not match"):
        Verifier.parse(GO_VKEY.replace("c74f20a3", "c74f20a4"))


def signed(size: int, root: bytes) -> str:
    return sign_note(Checkpoint(ORIGIN, size, root).text(), ORIGIN, KEY)


def test_checkpoint_format_and_signature():
    note = signed(5, b"\x02" * 32)
    b64 = base64.b64encode(bytes([2]) * 32).decode()
    assert note.startswith(f"{ORIGIN}\n5\n{b64}\n\n\u2014 {ORIGIN} ")
    sc = parse_signed(note, V, "t")
    assert (sc.cp.size, sc.cp.root) == (5, b"\x02" * 32)
    for bad, why in ((note.replace("\n5\n", "\n6\n"), "does not verify"),
                     (note.replace(ORIGIN, ORIGIN + "x", 1), "does not verify"),
                     (note[:-3] + "AA\n", "does not verify"),
                     (note.replace("\n\n", "\n"), "a note has a blank line before its signatures")):
        with pytest.raises(NoteError, match=why):
            parse_signed(bad, V, "t")
    other = Verifier.for_key(ORIGIN, Ed25519PrivateKey.generate())
    with pytest.raises(NoteError, match="the note is not signed by"):
        parse_signed(note, other, "t")
    for text, why in (("o\n05\nAAAA\n", "not a decimal number"),
                      ("o\n1\n" + base64.b64encode(b"x" * 31).decode() + "\n", "not 32 bytes"),
                      ("o\n1\n", "has an origin, a size and a root hash line"),
                      ("\n1\nAA==\n", "empty or padded origin line")):
        with pytest.raises(NoteError, match=why):
            Checkpoint.parse(text)
    ext = Checkpoint("o", 1, b"\x01" * 32, ("ext line",))
    assert Checkpoint.parse(ext.text()) == ext


def test_cosignature_v1():
    wkey = Ed25519PrivateKey.generate()
    wv = Verifier.for_key("witness.example/w1", wkey, ALG_COSIGNATURE)
    assert Verifier.parse(str(wv)) == wv
    note = signed(3, b"\x05" * 32)
    text = note[: note.rfind("\n\n") + 1]
    line = cosign(text, wv.name, wkey, 1700000000)
    raw = base64.b64decode(line.split(" ")[2])
    assert raw[:4] == wv.hash and int.from_bytes(raw[4:12], "big") == 1700000000 and len(raw) == 76
    assert verify_cosignature(note + line, wv) == 1700000000
    assert open_note(note + line, V) == text  # the log signature still verifies beside it
    with pytest.raises(NoteError, match=r"the cosignature by witness\.example/w1 does not verify"):
        verify_cosignature(signed(4, b"\x05" * 32) + line, wv)
    with pytest.raises(NoteError, match="the note is not cosigned by"):  # a note signature (0x01) is not a cosignature (0x04)
        verify_cosignature(note, Verifier.for_key(ORIGIN, KEY, ALG_COSIGNATURE))


def test_add_checkpoint_body_round_trip():
    body = format_add_checkpoint(7, [b"\x01" * 32, b"\x02" * 32], signed(9, b"\x03" * 32))
    assert body.startswith(b"old 7\n" + base64.b64encode(b"\x01" * 32) + b"\n")
    req = parse_add_checkpoint(body)
    assert req.old == 7 and req.proof == (b"\x01" * 32, b"\x02" * 32)
    for bad, why in ((b"old 07\n\nx", "the first line is `old <size>`"),
                     (b"old 1\nAAAA\n\nx", "at most 63 hashes of 32 bytes"),
                     (b"new 1\n\nx", "the first line is `old <size>`"),
                     (b"old 1\n", "no blank line after the consistency proof"),
                     (b"\xff", "the body is not UTF-8")):
        with pytest.raises(NoteError, match=why):
            parse_add_checkpoint(bad)


def test_leaf_encoding_is_injective_across_field_boundaries():
    a = ["ab", "c"] + [""] * (len(FIELDS) - 2)
    b = ["a", "bc"] + [""] * (len(FIELDS) - 2)
    assert leaf_bytes(1, a) != leaf_bytes(1, b)
    assert leaf_bytes(1, a) != leaf_bytes(2, a)
    assert leaf_bytes(1, a).startswith(b"\x00\x00\x00\x11bulkhead-audit-v2")
    assert decode_leaf(leaf_bytes(12, a)) == (12, tuple(a))
    for bad, why in ((b"", "not a bulkhead-audit-v2 leaf"), (leaf_bytes(1, a)[:-1], "truncated leaf"),
                     (leaf_bytes(1, a) + b"x", "malformed leaf"), (leaf_bytes(1, a[:-1]), "truncated leaf"),
                     (leaf_bytes(1, a).replace(b"\x00\x00\x00\x011", b"\x00\x00\x00\x01x", 1), "malformed leaf")):
        with pytest.raises(ValueError, match=why):
            decode_leaf(bad)


def build(n: int) -> tuple[list[tuple], list[str]]:
    rows, f, notes = [], Frontier(), []
    for seq in range(1, n + 1):
        vals = Record.make(f"t{seq}", "api", {"n": seq}, principal=f"p{seq % 2}", result="200").values()
        leaf = leaf_bytes(seq, vals)
        lh = leaf_hash(leaf)
        rows.append((seq, leaf, lh))
        f.append(lh)
        notes.append(signed(seq, f.root()))
    return rows, notes


def test_empty_or_headless_log_fails():
    rows, notes = build(3)
    assert verify(rows, parse_signed(notes[-1], V, "head")).ok
    rep = verify([], None)
    assert not rep.ok and "wiped" in rep.problem
    rep = verify(rows, None)
    assert not rep.ok and "no signed head" in rep.problem
    rep = verify([], parse_signed(notes[0], V, "head"))
    assert not rep.ok and "truncated" in rep.problem
    empty_head = parse_signed(signed(0, Frontier().root()), V, "head")
    rep = verify([], empty_head)
    assert not rep.ok and "empty" in rep.problem


@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 30), data=st.data())
def test_any_single_tampering_is_detected_at_or_before_the_change(n, data):
    rows, notes = build(n)
    head = parse_signed(notes[-1], V, "head")
    assert verify(rows, head).ok
    kind = data.draw(st.sampled_from(["modify", "delete", "swap", "truncate", "duplicate", "rehash"]))
    k = data.draw(st.integers(0, n - 1))
    bad = list(rows)
    if kind == "modify":  # any byte of the stored leaf
        row = list(bad[k])
        pos = data.draw(st.integers(0, len(row[1]) - 1))
        row[1] = row[1][:pos] + bytes([row[1][pos] ^ 0x20]) + row[1][pos + 1 :]
        bad[k] = tuple(row)
    elif kind == "rehash":  # modified and its leaf hash recomputed: only the tree root can tell
        row = list(bad[k])
        s_, values = decode_leaf(row[1])
        row[1] = leaf_bytes(s_, ["mallory", *values[1:]])
        row[2] = leaf_hash(row[1])
        bad[k] = tuple(row)
    elif kind == "delete":
        del bad[k]
    elif kind == "swap":
        j = data.draw(st.integers(0, n - 1).filter(lambda j: j != k))
        a, b = sorted((k, j))
        bad[a], bad[b] = (bad[a][0], *bad[b][1:]), (bad[b][0], *bad[a][1:])  # contents swapped, seq kept
        k = a
    elif kind == "truncate":
        bad = bad[:k]
    else:
        bad.insert(k + 1, bad[k])
    cps = [parse_signed(x, V, "history") for x in notes[4::5]]
    rep = verify(bad, head, cps)
    assert not rep.ok
    assert rep.first_bad is not None and 1 <= rep.first_bad <= k + 2
    if kind in ("modify", "delete", "swap", "truncate"):
        assert rep.first_bad == k + 1


def test_pure_verifier_survives_hostile_rows():
    head = parse_signed(signed(1, b"\x01" * 32), V, "head")
    for rows in ([("x",)], [(1, None)], [(1, "notbytes", b"")], [(0, b"", b"")], [(1, "a")], [(1, b"x", b"y", b"z")]):
        assert not verify(rows, head).ok
    with pytest.raises(NoteError, match="a note ends with a newline"):
        parse_signed("[1]", V, "x")


def test_lifecycle_table():
    assert next_state("stopped", "start") == "running"
    assert next_state("running", "pause") == "paused"
    assert next_state("paused", "resume") == "running"
    assert next_state("paused", "stop") == "stopped"
    assert next_state("lost", "start") == "running"
    assert next_state("exited", "delete") == "deleted"
    with pytest.raises(LifecycleError, match="stop it first"):
        next_state("running", "delete")
    with pytest.raises(LifecycleError, match="cannot pause a VM that is stopped"):
        next_state("stopped", "pause")
    with pytest.raises(LifecycleError, match="unknown VM operation 'teleport'"):
        next_state("running", "teleport")
    for allowed, result in TRANSITIONS.values():
        assert allowed <= set(STATES)
        assert result in (*STATES, "deleted")
