"""The audit log's record format, Merkle tree leaves, signed checkpoints and verification (pure, no I/O).

Leaf (RFC 9162 2.1 via bulkhead.control.merkle): record seq (from 1) is leaf index seq-1 and its leaf
input is `leaf_bytes(seq, values)`: a length-prefixed (4-byte big-endian) concatenation of the UTF-8
fields "bulkhead-audit-v2", seq, time, kind, principal, action, scope, decision, result, request_id, vm,
detail, so no two different records encode alike. Each stored row keeps its leaf hash; the interior
complete-subtree hashes are stored beside them (daemon/auditlog.py), so proofs cost O(log n) reads.

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

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bulkhead.control.merkle import EMPTY_ROOT, Frontier, leaf_hash
from bulkhead.control.note import Checkpoint, NoteError, Verifier, open_note

__all__ = [
    "FIELDS",
    "MAX_FIELD",
    "Record",
    "SignedCheckpoint",
    "VerifyReport",
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


Row = Sequence[Any]  # (seq, *FIELDS values, leaf hash: bytes)
NodeRow = Sequence[Any]  # (level >= 1, index, hash: bytes), ascending (level, index)


def verify(
    rows: Iterable[Row],
    head: SignedCheckpoint | None,
    checkpoints: Sequence[SignedCheckpoint] = (),
    nodes: Iterable[NodeRow] | None = None,
) -> VerifyReport:
    """Verify `rows` (ascending seq) against the signed `head` and other signed `checkpoints` (already
    opened with the log's verifier key: parse_signed), and the stored interior `nodes` if given."""
    if head is None:
        return VerifyReport(False, 0, 1, "no signed head checkpoint: the log was wiped or never initialised")
    all_cps = [head, *checkpoints]
    want: dict[int, SignedCheckpoint] = {}
    for sc in all_cps:
        prev = want.setdefault(sc.cp.size, sc)
        if prev.cp.root != sc.cp.root:
            return VerifyReport(False, 0, sc.cp.size or 1, f"two signed checkpoints disagree about size {sc.cp.size} "
                                f"({prev.source} and {sc.source})")
    frontier = Frontier()
    nf = len(FIELDS)
    expected = 1
    last_good = 0
    made: dict[int, list[bytes]] = {}
    collect = nodes is not None
    for row in rows:
        try:
            seq = int(row[0])
            values = tuple(row[1 : 1 + nf])
            stored = bytes(row[1 + nf])
            if len(values) != nf:
                raise ValueError
        except (TypeError, ValueError, IndexError):
            return VerifyReport(False, expected - 1, expected, f"record {expected} is malformed")
        if seq != expected:
            if seq > expected:
                what = f"record {expected} is missing (deleted)"
            else:
                what = f"record {seq} appears out of order after record {expected - 1} (reordered or inserted)"
            return VerifyReport(False, expected - 1, expected, what)
        lh = leaf_hash(leaf_bytes(seq, values))
        if lh != stored:
            return VerifyReport(False, expected - 1, seq, f"record {seq} does not match its leaf hash (modified)")
        new = frontier.append(lh)
        if collect:
            for level, _idx, h in new:
                made.setdefault(level, []).append(h)
        hit = want.get(seq)
        if hit is not None:
            if frontier.root() != hit.cp.root:
                return VerifyReport(
                    False, expected - 1, last_good + 1,
                    f"records {last_good + 1}..{seq} differ from the signed checkpoint at {seq} ({hit.source}): "
                    "rewritten; the first bad record is in that range")
            last_good = seq
        expected += 1
    n = expected - 1
    root = frontier.root()
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
        bad = _check_nodes(nodes, made)
        if bad:
            return VerifyReport(False, n, None, bad, len(all_cps), root.hex())
    return VerifyReport(True, n, None, "", len(all_cps), root.hex())


def _check_nodes(nodes: Iterable[NodeRow], made: dict[int, list[bytes]]) -> str:
    """The stored interior nodes must be exactly the recomputed ones (proofs are served from them)."""
    want_total = sum(len(v) for v in made.values())
    count = 0
    for row in nodes:
        try:
            level, idx, h = int(row[0]), int(row[1]), bytes(row[2])
            ok = made[level][idx] == h
        except (TypeError, ValueError, IndexError, KeyError):
            ok = False
            level, idx = -1, -1
        if not ok:
            return f"stored tree node (level {level}, index {idx}) does not match the records"
        count += 1
    if count != want_total:
        return f"the stored tree has {count} interior nodes, the records make {want_total}"
    return ""
