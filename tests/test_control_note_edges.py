"""C2SP signed-note, tlog-checkpoint and tlog-cosignature parsing at every refusal and every limit
(control/note.py; issue 15 mutation survivors). Each malformed input is refused with its own error,
so a check that silently stops working cannot hide behind a later one."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bulkhead.control.note import (
    ALG_COSIGNATURE,
    DASH,
    MAX_NOTE,
    Checkpoint,
    NoteError,
    Verifier,
    cosign,
    format_add_checkpoint,
    key_hash,
    open_note,
    parse_add_checkpoint,
    raw_public,
    sign_note,
    verify_cosignature,
)

KEY = Ed25519PrivateKey.generate()
NAME = "bulkhead.test/audit/0000000000000001"
V = Verifier.for_key(NAME, KEY)
ROOT64 = base64.b64encode(b"\x05" * 32).decode()
TEXT = f"{NAME}\n3\n{ROOT64}\n"


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def test_key_names_and_verifier_keys_are_checked_field_by_field():
    with pytest.raises(NoteError, match="bad key name"):
        Verifier.for_key("two words", KEY)
    good = str(V)
    name, h, key = good.split("+", 2)
    for bad in (f"{name}+{h}", f"bad name+{h}+{key}", f"{name}+{h.upper()}+{key}", f"{name}+{h}0+{key}"):
        with pytest.raises(NoteError, match="a verifier key is <name>"):
            Verifier.parse(bad)
    for raw in (b"\x01" + V.pub[:31], b"\x02" + V.pub, b"\x01" + V.pub + b"\x00"):
        with pytest.raises(NoteError, match="is not an ed25519"):
            Verifier.parse(f"{name}+{h}+{b64(raw)}")
    assert Verifier.parse(good) == V
    assert V.verify(b"m", b"\x00" * 64) is False
    assert V.verify(b"m", KEY.sign(b"m")) is True


def test_checkpoint_text_and_every_refusal():
    cp = Checkpoint("o", 2, b"\x01" * 32, ("ext one", "ext two"))
    assert cp.text() == "o\n2\n" + b64(bytes([1]) * 32) + "\next one\next two\n"
    cases = [
        (f"o\n2\n{ROOT64}", "ends with a newline"),
        ("o\n2\n", "has an origin, a size and a root"),
        (f" o\n2\n{ROOT64}\n", "empty or padded origin"),
        (f"\n2\n{ROOT64}\n", "empty or padded origin"),
        (f"o\n02\n{ROOT64}\n", "not a decimal number"),
        (f"o\n2\n{b64(b'x' * 31)}\n", "not 32 bytes"),
        (f"o\n2\n{ROOT64}\n\n", "empty extension line"),
        (f"o\n2\n{ROOT64}\next\n\n", "empty extension line"),
    ]
    for text, why in cases:
        with pytest.raises(NoteError, match=why):
            Checkpoint.parse(text)


def test_sign_note_needs_a_final_newline():
    with pytest.raises(NoteError, match="must end with a newline"):
        sign_note("no newline", NAME, KEY)


def test_a_note_whose_text_is_one_newline_opens():
    assert open_note(sign_note("\n", NAME, KEY), V) == "\n"


def _sigline(raw: bytes, name: str = NAME) -> str:
    return f"{DASH} {name} {b64(raw)}\n"


def test_note_framing_refusals():
    note = sign_note(TEXT, NAME, KEY)
    assert open_note(note, V) == TEXT
    pad = MAX_NOTE - len(sign_note(TEXT + "p\n", NAME, KEY))
    biggest = sign_note(TEXT + "p" * (pad + 1) + "\n", NAME, KEY)
    assert len(biggest) == MAX_NOTE and open_note(biggest, V).startswith(TEXT)  # exactly the limit opens
    with pytest.raises(NoteError, match="note too large"):
        open_note("x" * (MAX_NOTE - len(note)) + note + "x", V)
    with pytest.raises(NoteError, match="ends with a newline"):
        open_note(note[:-1], V)
    with pytest.raises(NoteError, match="blank line before its signatures"):
        open_note(TEXT + _sigline(b"\x00" * 68), V)
    for line in (f"{DASH} {NAME}\n", f"- {NAME} {b64(b'x' * 68)}\n", f"{DASH} a+b {b64(b'x' * 68)}\n"):
        with pytest.raises(NoteError, match="malformed signature line"):
            open_note(TEXT + "\n" + line, V)
    with pytest.raises(NoteError, match="signature too short"):
        open_note(TEXT + "\n" + _sigline(V.hash), V)
    with pytest.raises(NoteError, match=f"the signature by {NAME} does not verify"):
        open_note(TEXT + "\n" + _sigline(V.hash + b"\x00"), V)  # 5 bytes: long enough to be judged


def test_a_note_may_carry_at_most_100_signatures():
    other = Ed25519PrivateKey.generate()
    extra = sign_note(TEXT, "someone.else", other).split("\n\n", 1)[1]
    note = sign_note(TEXT, NAME, KEY)
    assert open_note(note + extra * 99, V) == TEXT  # 100 signatures
    with pytest.raises(NoteError, match="1 to 100 signatures"):
        open_note(note + extra * 100, V)


def test_a_same_named_impostor_signature_is_skipped_not_trusted():
    impostor = Ed25519PrivateKey.generate()
    forged = sign_note(TEXT, NAME, impostor)
    with pytest.raises(NoteError, match=f"the note is not signed by {NAME}"):
        open_note(forged, V)
    both = forged + sign_note(TEXT, NAME, KEY).split("\n\n", 1)[1]
    assert open_note(both, V) == TEXT  # the impostor's line first, the real one after it


def test_cosignature_length_and_large_times():
    wkey = Ed25519PrivateKey.generate()
    wv = Verifier.for_key("witness.example/w", wkey, ALG_COSIGNATURE)
    note = sign_note(TEXT, NAME, KEY)
    t = (1 << 60) + 12345  # the top byte of the 8-byte time matters
    assert verify_cosignature(note + cosign(TEXT, wv.name, wkey, t), wv) == t
    kh = key_hash(wv.name, ALG_COSIGNATURE, raw_public(wkey.public_key()))
    with pytest.raises(NoteError, match="a cosignature is key hash, 8-byte time and signature"):
        verify_cosignature(note + _sigline(kh + b"\x00" * 71, wv.name), wv)


def test_add_checkpoint_body_refusals_and_proof_limit():
    note = sign_note(TEXT, NAME, KEY)
    with pytest.raises(NoteError, match="no blank line after the consistency proof"):
        parse_add_checkpoint(b"old 3")
    with pytest.raises(NoteError, match="not base64"):
        parse_add_checkpoint(b"old 3\nAAA==\n\n" + note.encode())  # excess padding: strict base64
    ok = parse_add_checkpoint(format_add_checkpoint(3, [b"\x07" * 32] * 63, note))
    assert (ok.old, len(ok.proof), ok.note) == (3, 63, note)
    with pytest.raises(NoteError, match="at most 63 hashes"):
        parse_add_checkpoint(format_add_checkpoint(3, [b"\x07" * 32] * 64, note))
