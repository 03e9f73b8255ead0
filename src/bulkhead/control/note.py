"""C2SP signed notes, checkpoints, cosignatures and the witness protocol's request body (pure, no I/O).

- C2SP `signed-note`: a note is UTF-8 text ending in a newline, a blank line, then signature lines
  `— <name> <base64(key hash (4 bytes) || signature)>`. An ed25519 key (type 0x01) has key hash
  SHA-256(name || 0x0A || 0x01 || public key)[:4]; its verifier key is `<name>+<hex hash>+<base64(0x01 ||
  public key)>`. Signatures by unknown keys are ignored (not an error).
- C2SP `tlog-checkpoint`: the text is `<origin>\\n<tree size, decimal>\\n<base64 root hash>\\n` followed by
  optional non-empty extension lines.
- C2SP `tlog-cosignature` (cosignature/v1, key type 0x04): the witness signs
  `cosignature/v1\\ntime <unix seconds>\\n<checkpoint text>` and its signature line carries
  base64(key hash || 8-byte big-endian time || ed25519 signature).
- C2SP `tlog-witness` add-checkpoint body: `old <size>\\n`, one base64 consistency-proof hash per line, a
  blank line, then the signed checkpoint note.

Every parser raises NoteError (a ValueError) on malformed input and never anything else.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "ALG_COSIGNATURE",
    "ALG_ED25519",
    "AddCheckpoint",
    "Checkpoint",
    "NoteError",
    "Verifier",
    "cosign",
    "format_add_checkpoint",
    "key_hash",
    "open_note",
    "parse_add_checkpoint",
    "raw_public",
    "sign_note",
    "verify_cosignature",
]

ALG_ED25519 = 0x01
ALG_COSIGNATURE = 0x04
DASH = "\u2014"
MAX_NOTE = 1 << 16
_NAME = re.compile(r"[^\s+]+")
_B64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


class NoteError(ValueError):
    pass


def _b64d(s: str) -> bytes:
    if not _B64.fullmatch(s):
        raise NoteError("not base64")
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise NoteError("not base64") from None


def _b64e(b: bytes) -> str:
    return base64.b64encode(b).decode()


def raw_public(pub: Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_hash(name: str, alg: int, pub: bytes) -> bytes:
    """signed-note key ID: the first 4 bytes of SHA-256(name || 0x0A || alg || public key)."""
    return hashlib.sha256(name.encode() + b"\n" + bytes([alg]) + pub).digest()[:4]


@dataclass(frozen=True)
class Verifier:
    """A note verifier key: name, algorithm (0x01 note signatures, 0x04 cosignatures), ed25519 key."""

    name: str
    alg: int
    pub: bytes

    @property
    def hash(self) -> bytes:
        return key_hash(self.name, self.alg, self.pub)

    def __str__(self) -> str:
        return f"{self.name}+{self.hash.hex()}+{_b64e(bytes([self.alg]) + self.pub)}"

    @staticmethod
    def for_key(name: str, key: Ed25519PrivateKey | Ed25519PublicKey, alg: int = ALG_ED25519) -> Verifier:
        if not _NAME.fullmatch(name):
            raise NoteError(f"bad key name {name!r}")
        pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
        return Verifier(name, alg, raw_public(pub))

    @staticmethod
    def parse(text: str) -> Verifier:
        """`<name>+<hex hash>+<base64(alg || key)>`; the hash must match."""
        parts = text.strip().split("+", 2)
        if len(parts) != 3 or not _NAME.fullmatch(parts[0]) or not re.fullmatch(r"[0-9a-f]{8}", parts[1]):
            raise NoteError("a verifier key is <name>+<8 hex digits>+<base64 key>")
        raw = _b64d(parts[2])
        if len(raw) != 33 or raw[0] not in (ALG_ED25519, ALG_COSIGNATURE):
            raise NoteError("the verifier key is not an ed25519 (0x01) or cosignature/v1 (0x04) key")
        v = Verifier(parts[0], raw[0], raw[1:])
        if v.hash.hex() != parts[1]:
            raise NoteError("the verifier key's hash does not match its name and key")
        return v

    def verify(self, msg: bytes, sig: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.pub).verify(sig, msg)
        except (InvalidSignature, ValueError):
            return False
        return True


@dataclass(frozen=True)
class Checkpoint:
    """tlog-checkpoint: origin, tree size, root hash, extension lines."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def text(self) -> str:
        ext = "".join(e + "\n" for e in self.extensions)
        return f"{self.origin}\n{self.size}\n{_b64e(self.root)}\n{ext}"

    @staticmethod
    def parse(text: str) -> Checkpoint:
        if not text.endswith("\n"):
            raise NoteError("a checkpoint ends with a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise NoteError("a checkpoint has an origin, a size and a root hash line")
        origin, size, root, *ext = lines
        if not origin or origin != origin.strip():
            raise NoteError("empty or padded origin line")
        if not re.fullmatch(r"0|[1-9][0-9]{0,19}", size):
            raise NoteError("the tree size is not a decimal number")
        r = _b64d(root)
        if len(r) != 32:
            raise NoteError("the root hash is not 32 bytes")
        if any(not e for e in ext):
            raise NoteError("empty extension line")
        return Checkpoint(origin, int(size), r, tuple(ext))


def sign_note(text: str, name: str, key: Ed25519PrivateKey) -> str:
    """A signed note with one ed25519 signature (signed-note)."""
    if not text.endswith("\n"):
        raise NoteError("note text must end with a newline")
    kh = key_hash(name, ALG_ED25519, raw_public(key.public_key()))
    sig = key.sign(text.encode())
    return f"{text}\n{DASH} {name} {_b64e(kh + sig)}\n"


def _split_note(note: str) -> tuple[str, list[tuple[str, bytes]]]:
    if len(note) > MAX_NOTE:
        raise NoteError("note too large")
    if not note.endswith("\n"):
        raise NoteError("a note ends with a newline")
    i = note.rfind("\n\n")
    if i < 0:
        raise NoteError("a note has a blank line before its signatures")
    text, sigpart = note[: i + 1], note[i + 2 :]
    sigs: list[tuple[str, bytes]] = []
    for line in sigpart[:-1].split("\n"):
        parts = line.split(" ")
        if len(parts) != 3 or parts[0] != DASH or not _NAME.fullmatch(parts[1]):
            raise NoteError(f"malformed signature line {line[:80]!r}")
        raw = _b64d(parts[2])
        if len(raw) < 5:
            raise NoteError("signature too short")
        sigs.append((parts[1], raw))
    if not sigs or len(sigs) > 100:
        raise NoteError("a note has 1 to 100 signatures")
    return text, sigs


def open_note(note: str, verifier: Verifier) -> str:
    """The note's text when `verifier` signed it (other signatures are ignored). Raises NoteError."""
    text, sigs = _split_note(note)
    for name, raw in sigs:
        if name == verifier.name and raw[:4] == verifier.hash and verifier.alg == ALG_ED25519:
            if verifier.verify(text.encode(), raw[4:]):
                return text
            raise NoteError(f"the signature by {name} does not verify")
    raise NoteError(f"the note is not signed by {verifier.name}")


def cosignature_message(text: str, time: int) -> bytes:
    return f"cosignature/v1\ntime {time}\n".encode() + text.encode()


def cosign(text: str, name: str, key: Ed25519PrivateKey, time: int) -> str:
    """tlog-cosignature: one signature line over the checkpoint `text` at unix `time`."""
    kh = key_hash(name, ALG_COSIGNATURE, raw_public(key.public_key()))
    sig = key.sign(cosignature_message(text, time))
    return f"{DASH} {name} {_b64e(kh + time.to_bytes(8, 'big') + sig)}\n"


def verify_cosignature(note: str, witness: Verifier) -> int:
    """The cosignature time when `witness` (alg 0x04) cosigned this note's checkpoint. Raises NoteError."""
    text, sigs = _split_note(note)
    for name, raw in sigs:
        if name == witness.name and raw[:4] == witness.hash and witness.alg == ALG_COSIGNATURE:
            if len(raw) != 4 + 8 + 64:
                raise NoteError("a cosignature is key hash, 8-byte time and signature")
            t = int.from_bytes(raw[4:12], "big")
            if witness.verify(cosignature_message(text, t), raw[12:]):
                return t
            raise NoteError(f"the cosignature by {name} does not verify")
    raise NoteError(f"the note is not cosigned by {witness.name}")


@dataclass(frozen=True)
class AddCheckpoint:
    old: int
    proof: tuple[bytes, ...]
    note: str


def format_add_checkpoint(old: int, proof: list[bytes], note: str) -> bytes:
    return (f"old {old}\n" + "".join(_b64e(p) + "\n" for p in proof) + "\n" + note).encode()


def parse_add_checkpoint(body: bytes) -> AddCheckpoint:
    try:
        s = body.decode()
    except UnicodeDecodeError:
        raise NoteError("the body is not UTF-8") from None
    head, sep, note = s.partition("\n\n")
    if not sep:
        raise NoteError("no blank line after the consistency proof")
    lines = head.split("\n")
    m = re.fullmatch(r"old (0|[1-9][0-9]{0,19})", lines[0])
    if not m:
        raise NoteError("the first line is `old <size>`")
    proof = tuple(_b64d(x) for x in lines[1:])
    if len(proof) > 63 or any(len(p) != 32 for p in proof):
        raise NoteError("the consistency proof is at most 63 hashes of 32 bytes")
    return AddCheckpoint(int(m.group(1)), proof, note)
