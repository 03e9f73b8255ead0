"""The audit log's record format, Merkle tree leaves, signed checkpoints and verification (pure, no I/O).

Leaf (RFC 9162 2.1 via bulkhead.control.merkle): record seq (from 1) is leaf index seq-1 and its leaf
input is `leaf_bytes(seq, values)`: a length-prefixed (4-byte big-endian) concatenation of the UTF-8
fields "bulkhead-audit-v2", seq, time, kind, principal, action, scope, decision, result, request_id, vm,
detail, so no two different records encode alike. The leaf input is what is stored (and what queries
decode and show), with its leaf hash; the interior complete-subtree hashes are stored beside them
(daemon/auditlog.py), so proofs cost O(log n) reads and verification never decodes a record.

Checkpoints (bulkhead.control.note): C2SP tlog-checkpoint notes signed with the host's ed25519 audit key,
origin `bulkhead.<hostid>/audit/<logid>`. The signed *head* (the latest tree) is what makes truncation
and unsigned appends detectable, history checkpoints and witness-cosigned checkpoints are what make a
rewrite with a stolen key, a wipe or a rollback detectable.

`verify()` streams the rows in seq order, recomputes every leaf hash and the tree, and reports the first
bad record: a missing seq (deleted), a seq out of order (reordered/inserted), content that does not
match its leaf hash (modified), a tree that differs from a signed checkpoint (rewritten: the first bad
record lies after the last matching checkpoint), records beyond the signed head, fewer records than a
checkpoint covers (truncated), and an empty or headless log (wiped). It never raises on hostile data.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bulkhead.control.merkle import EMPTY_ROOT
from bulkhead.control.note import Checkpoint, NoteError, Verifier, open_note

__all__ = [
    "FIELDS",
    "MAX_FIELD",
    "Record",
    "SignedCheckpoint",
    "VerifyReport",
    "decode_leaf",
    "leaf_bytes",
    "parse_signed",
    "verify",
]

FIELDS = ("time", "kind", "principal", "action", "scope", "decision", "result", "request_id", "vm", "detail")
MAX_FIELD = 16384
_TAG = b"\x00\x00\x00\x11bulkhead-audit-v2"



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


def leaf_bytes(seq: int, values: Sequence[object]) -> bytes:
    """The leaf input of record `seq`: the exact canonical bytes the tree commits to."""
    parts = [_TAG]
    s = str(seq).encode()
    parts.append(len(s).to_bytes(4, "big") + s)
    for v in values:
        b = ("" if v is None else str(v)).encode("utf-8", "surrogatepass")
        parts.append(len(b).to_bytes(4, "big") + b)
    return b"".join(parts)


def decode_leaf(leaf: bytes) -> tuple[int, tuple[str, ...]]:
    """(seq, field values) of a leaf input; raises ValueError unless it is exactly leaf_bytes' output."""
    if not leaf.startswith(_TAG):
        raise ValueError("not a bulkhead-audit-v2 leaf")
    out: list[str] = []
    i, n = len(_TAG), len(leaf)
    for _ in range(1 + len(FIELDS)):
        if i + 4 > n:
            raise ValueError("truncated leaf")
        ln = int.from_bytes(leaf[i : i + 4], "big")
        if i + 4 + ln > n:
            raise ValueError("truncated leaf")
        out.append(leaf[i + 4 : i + 4 + ln].decode("utf-8", "surrogatepass"))
        i += 4 + ln
    if i != n or not out[0].isdigit() or str(int(out[0])) != out[0]:
        raise ValueError("malformed leaf")
    return int(out[0]), tuple(out[1:])


@dataclass(frozen=True)
class SignedCheckpoint:
    note: str
    cp: Checkpoint
    source: str  # "head", "history", "file", "witness <name>", ...


def parse_signed(note: str, verifier: Verifier, source: str) -> SignedCheckpoint:
    """Open a checkpoint note signed by the log's key. Raises NoteError (also for another origin)."""
    cp = Checkpoint.parse(open_note(note, verifier))
    if cp.origin != verifier.name:
        raise NoteError(f"the checkpoint is for log {cp.origin!r}, not {verifier.name!r}")
    return SignedCheckpoint(note, cp, source)


@dataclass
class VerifyReport:
    ok: bool
    records: int
    first_bad: int | None = None  # seq of the first bad record (None when ok)
    problem: str = ""
    checkpoints_checked: int = 0
    root: str = ""  # hex MTH of the records present
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "records": self.records,
            "first_bad": self.first_bad,
            "problem": self.problem,
            "checkpoints_checked": self.checkpoints_checked,
            "root": self.root,
        }


Row = Sequence[Any]  # (seq, leaf input: bytes, leaf hash: bytes)
NodeLevel = Callable[[int], bytes]  # level >= 1 -> the stored hashes of that level, ascending index, concatenated


def verify(
    rows: Iterable[Row],
    head: SignedCheckpoint | None,
    checkpoints: Sequence[SignedCheckpoint] = (),
    nodes: NodeLevel | None = None,
) -> VerifyReport:
    """Verify `rows` (ascending seq) against the signed `head` and other signed `checkpoints` (already
    opened with the log's verifier key: parse_signed), and the stored interior nodes (`nodes`) if given.
    A leaf's own seq must be its position (so a renumbered record is caught as such)."""
    if head is None:
        return VerifyReport(False, 0, 1, "no signed head checkpoint: the log was wiped or never initialised")
    all_cps = [head, *checkpoints]
    want = _by_size(all_cps)
    if isinstance(want, VerifyReport):
        return want
    # The frontier (merkle.Frontier.append) inlined: this loop is the whole cost of verifying a log.
    levels: list[int] = []
    hashes: list[bytes] = []
    made: dict[int, list[bytes]] = {}
    expected = 1
    last_good = 0
    sha = hashlib.sha256
    tag_len = len(_TAG)
    for row in rows:
        try:
            seq, leaf, stored = row
            seq = int(seq)
            leaf = bytes(leaf)
        except (TypeError, ValueError):
            return VerifyReport(False, expected - 1, expected, f"record {expected} is malformed")
        if seq != expected:
            if seq > expected:
                what = f"record {expected} is missing (deleted)"
            else:
                what = f"record {seq} appears out of order after record {expected - 1} (reordered or inserted)"
            return VerifyReport(False, expected - 1, expected, what)
        h = sha(b"\x00" + leaf).digest()
        if h != stored:
            return VerifyReport(False, expected - 1, seq, f"record {seq} does not match its leaf hash (modified)")
        sb = b"%d" % seq
        if leaf[:tag_len] != _TAG or leaf[tag_len : tag_len + 4 + len(sb)] != len(sb).to_bytes(4, "big") + sb:
            return VerifyReport(False, expected - 1, seq, f"record {seq} is not the record for position {seq} "
                                "(renumbered, reordered or forged)")
        level = 0
        while levels and levels[-1] == level:
            levels.pop()
            h = sha(b"\x01" + hashes.pop() + h).digest()
            level += 1
            lst = made.get(level)
            if lst is None:
                made[level] = lst = []
            lst.append(h)
        levels.append(level)
        hashes.append(h)
        hit = want.get(seq)
        if hit is not None:
            if _fold(hashes) != hit.cp.root:
                return VerifyReport(
                    False, expected - 1, last_good + 1,
                    f"records {last_good + 1}..{seq} differ from the signed checkpoint at {seq} ({hit.source}): "
                    "rewritten; the first bad record is in that range")
            last_good = seq
        expected += 1
    return _complete(expected - 1, _fold(hashes), head, all_cps, made, nodes)


def _by_size(all_cps: list[SignedCheckpoint]) -> dict[int, SignedCheckpoint] | VerifyReport:
    """The signed checkpoints by tree size, or the failure when two disagree about one size."""
    want: dict[int, SignedCheckpoint] = {}
    for sc in all_cps:
        prev = want.setdefault(sc.cp.size, sc)
        if prev.cp.root != sc.cp.root:
            return VerifyReport(False, 0, sc.cp.size or 1, f"two signed checkpoints disagree about size {sc.cp.size} "
                                f"({prev.source} and {sc.source})")
    return want


def _complete(n: int, root: bytes, head: SignedCheckpoint, all_cps: list[SignedCheckpoint],
              made: dict[int, list[bytes]], nodes: NodeLevel | None) -> VerifyReport:
    """After every record matched: nothing truncated, nothing appended past the signed head, and the
    stored interior nodes equal the ones the records make."""
    covered = max(all_cps, key=lambda s: s.cp.size)
    if covered.cp.size > n:
        return VerifyReport(
            False, n, n + 1,
            f"truncated: a signed checkpoint ({covered.source}) covers {covered.cp.size} records but only {n} "
            f"are present; record {n + 1} is the first missing", len(all_cps), root.hex())
    if n == 0:
        return VerifyReport(False, 0, 1, "the log is empty: every bulkhead log starts with its init record (wiped)",
                            root=EMPTY_ROOT.hex())
    if head.cp.size < n:
        return VerifyReport(False, n, head.cp.size + 1, f"records {head.cp.size + 1}..{n} are not covered by the "
                            "signed head (appended without the key)", len(all_cps), root.hex())
    if nodes is not None:
        for level in range(1, max(made, default=0) + 2):
            mine, stored_level = b"".join(made.get(level, ())), nodes(level)
            if mine != stored_level:
                idx = next((i for i in range(0, max(len(mine), len(stored_level)), 32)
                            if mine[i : i + 32] != stored_level[i : i + 32]), 0) // 32
                return VerifyReport(False, n, None, f"stored tree node (level {level}, index {idx}) does not match "
                                    "the records", len(all_cps), root.hex())
    return VerifyReport(True, n, None, "", len(all_cps), root.hex())


def _fold(hashes: list[bytes]) -> bytes:
    """MTH from the frontier's complete subtrees (highest first)."""
    if not hashes:
        return EMPTY_ROOT
    r = hashes[-1]
    for h in reversed(hashes[:-1]):
        r = hashlib.sha256(b"\x01" + h + r).digest()
    return r
