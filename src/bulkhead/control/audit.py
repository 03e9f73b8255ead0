"""The audit log's record format, hash chain, signed checkpoints and verification (pure, no I/O).

Chain: record k (seq = k, from 1) has hash
    h_k = SHA-256("bulkhead-audit-v1" || h_{k-1} || enc(seq, time, kind, principal, action, scope,
                                                       decision, result, request_id, vm, detail))
with h_0 = 32 zero bytes and enc() a length-prefixed (4-byte big-endian) concatenation of UTF-8 fields,
so no two different records encode alike. Each stored row keeps `prev` (h_{k-1}) and `hash` (h_k).

Checkpoint: (size, head hash, time) signed with the daemon's ed25519 key. The signed *head* checkpoint
(size = number of records) is what makes truncation detectable: a verifier that finds fewer records than
a valid checkpoint covers reports the first missing record.

`verify()` walks rows in seq order and reports the first bad record: a missing seq (deleted), a row that
does not link to its predecessor (inserted / reordered / deleted and renumbered), content that does not
match its hash (modified), records beyond the signed head (appended without the key), or fewer records
than a checkpoint covers (truncated). It never raises on hostile data; it returns a VerifyReport.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "FIELDS",
    "GENESIS",
    "Checkpoint",
    "Record",
    "VerifyReport",
    "chain_hash",
    "checkpoint_message",
    "sign_checkpoint",
    "verify",
    "verify_checkpoint",
]

GENESIS = b"\x00" * 32
_DOMAIN = b"bulkhead-audit-v1"
_CP_DOMAIN = b"bulkhead-audit-checkpoint-v1\n"
FIELDS = ("time", "kind", "principal", "action", "scope", "decision", "result", "request_id", "vm", "detail")
MAX_FIELD = 16384


@dataclass(frozen=True)
class Record:
    """One audit record before it is sequenced. `detail` is a JSON object string."""

    time: str
    kind: str  # api | vm | security | system
    principal: str = ""
    action: str = ""
    scope: str = ""
    decision: str = ""  # allow | deny | "" (not an authorization)
    result: str = ""  # HTTP status or outcome
    request_id: str = ""
    vm: str = ""
    detail: str = "{}"

    def values(self) -> tuple[str, ...]:
        return tuple(str(getattr(self, f))[:MAX_FIELD] for f in FIELDS)

    @staticmethod
    def make(time: str, kind: str, detail: dict[str, Any] | None = None, **kw: str) -> Record:
        text = json.dumps(detail or {}, sort_keys=True, separators=(",", ":"), default=str)
        return Record(time=time, kind=kind, detail=text, **kw)


def _enc(seq: int, values: Sequence[object]) -> bytes:
    parts = [str(seq).encode()]
    parts.extend(("" if v is None else str(v)).encode("utf-8", "surrogatepass") for v in values)
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def chain_hash(prev: bytes, seq: int, values: Sequence[object]) -> bytes:
    """h_seq from h_{seq-1} and the record's field values (in FIELDS order)."""
    return hashlib.sha256(_DOMAIN + bytes(prev) + _enc(seq, values)).digest()


@dataclass(frozen=True)
class Checkpoint:
    size: int
    head: str  # hex of h_size (GENESIS for size 0)
    time: str
    signature: str  # hex ed25519 signature over checkpoint_message()

    def to_json(self) -> str:
        return json.dumps(
            {"size": self.size, "head": self.head, "time": self.time, "signature": self.signature},
            sort_keys=True,
        )

    @staticmethod
    def from_json(text: str) -> Checkpoint:
        """Raises ValueError on anything that is not a checkpoint object."""
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError("checkpoint is not a JSON object")
        size, head, time, sig = d.get("size"), d.get("head"), d.get("time"), d.get("signature")
        if not isinstance(size, int) or size < 0 or not all(isinstance(x, str) for x in (head, time, sig)):
            raise ValueError("checkpoint fields are missing or of the wrong type")
        return Checkpoint(size, str(head), str(time), str(sig))


def checkpoint_message(size: int, head: str, time: str) -> bytes:
    return _CP_DOMAIN + f"{size}\n{head}\n{time}\n".encode()


def sign_checkpoint(key: Ed25519PrivateKey, size: int, head: bytes, time: str) -> Checkpoint:
    hx = head.hex()
    return Checkpoint(size, hx, time, key.sign(checkpoint_message(size, hx, time)).hex())


def verify_checkpoint(pub: Ed25519PublicKey, cp: Checkpoint) -> bool:
    try:
        pub.verify(bytes.fromhex(cp.signature), checkpoint_message(cp.size, cp.head, cp.time))
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass
class VerifyReport:
    ok: bool
    records: int
    first_bad: int | None = None  # seq of the first bad record (None when ok)
    problem: str = ""
    checkpoints_checked: int = 0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "records": self.records,
            "first_bad": self.first_bad,
            "problem": self.problem,
            "checkpoints_checked": self.checkpoints_checked,
        }


Row = Sequence[Any]  # (seq, *FIELDS values, prev: bytes, hash: bytes)


def verify(
    rows: Iterable[Row],
    pub: Ed25519PublicKey,
    head: Checkpoint | None,
    checkpoints: Sequence[Checkpoint] = (),
) -> VerifyReport:
    """Verify the chain of `rows` (in ascending seq order) against the signed `head` and `checkpoints`.

    Returns a VerifyReport naming the first bad record; never raises on malformed rows.
    """
    all_cps = [c for c in ([head] if head else []) + list(checkpoints)]
    for cp in all_cps:
        if not verify_checkpoint(pub, cp):
            return VerifyReport(False, 0, cp.size or 1, f"checkpoint for size {cp.size} has a bad signature")
    want: dict[int, str] = {}
    for cp in all_cps:
        if want.setdefault(cp.size, cp.head) != cp.head:
            return VerifyReport(False, 0, cp.size, f"two signed checkpoints disagree about record {cp.size}")
    nfields = len(FIELDS)
    expected = 1
    prev = GENESIS
    last_good_cp = 0
    for row in rows:
        try:
            seq = int(row[0])
            values = tuple(row[1 : 1 + nfields])
            stored_prev = bytes(row[1 + nfields])
            stored_hash = bytes(row[2 + nfields])
        except (TypeError, ValueError, IndexError):
            return VerifyReport(False, expected - 1, expected, f"record {expected} is malformed")
        if seq != expected:
            if seq > expected:
                what = f"record {expected} is missing (deleted)" if expected > 0 else "bad sequence"
            else:
                what = f"record {seq} appears out of order after record {expected - 1} (reordered or inserted)"
            return VerifyReport(False, expected - 1, expected, what)
        if stored_prev != prev:
            return VerifyReport(
                False,
                expected - 1,
                seq,
                f"record {seq} does not link to record {seq - 1} (inserted, deleted or reordered)",
            )
        h = chain_hash(prev, seq, values)
        if h != stored_hash:
            return VerifyReport(False, expected - 1, seq, f"record {seq} does not match its hash (modified)")
        cp_head = want.get(seq)
        if cp_head is not None:
            if cp_head != h.hex():
                return VerifyReport(
                    False,
                    expected - 1,
                    last_good_cp + 1,
                    f"records {last_good_cp + 1}..{seq} differ from the signed checkpoint at {seq} "
                    "(rewritten); the first bad record is in that range",
                )
            last_good_cp = seq
        prev = h
        expected += 1
    n = expected - 1
    covered = max((cp.size for cp in all_cps), default=0)
    if covered > n:
        return VerifyReport(
            False,
            n,
            n + 1,
            f"truncated: a signed checkpoint covers {covered} records but only {n} are present; "
            f"record {n + 1} is the first missing",
            len(all_cps),
        )
    if 0 in want and want[0] != GENESIS.hex():
        return VerifyReport(False, n, 1, "the signed checkpoint for an empty log is not the genesis hash")
    if head is None:
        if n > 0:
            return VerifyReport(False, n, 1, "no signed head checkpoint, but the log has records")
    elif head.size < n:
        return VerifyReport(
            False,
            n,
            head.size + 1,
            f"records {head.size + 1}..{n} are not covered by the signed head (appended without the key)",
            len(all_cps),
        )
    return VerifyReport(True, n, None, "", len(all_cps))
