"""The fleet witnesses its hosts' audit logs (issue 18 "Audit", docs/FLEET.md "Witnessing"). Pure: no I/O.

Each host agent keeps a Merkle audit log of its own actions and publishes its latest signed checkpoint
(C2SP signed-note / tlog-checkpoint) in etcd, with a consistency proof (RFC 9162 section 2.1.4) from the
size the fleet last witnessed for it. The controller judges each publication as a C2SP tlog-witness
does (docs/AUDIT.md "Witnesses"), against its own record of that host's log, never against anything
the host says about itself:

- the note must carry a valid signature by the host's *enrolled* log key (the vkey the operator
  provisioned, `<controller state>/hosts/H/audit.vkey`), and its origin must be that key's name;
- a size smaller than the witnessed one is a rollback, the same size with another root a fork, and a
  larger size must come with a consistency proof from the witnessed checkpoint that verifies;
- a publication whose proof starts from another size than the witnessed one is not judged yet
  (`wait`): the host has not seen the fleet's latest cosignature.

`ok` publications are cosigned (C2SP tlog-cosignature) and become the new witnessed checkpoint; `bad`
ones flag the host (the controller makes it unschedulable and drains it, and the flag persists).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from bulkhead.control.merkle import EMPTY_ROOT, verify_consistency
from bulkhead.control.note import Checkpoint, NoteError, Verifier, open_note

__all__ = ["MAX_PROOF", "Judgement", "judge"]

MAX_PROOF = 64  # hashes: a consistency proof of a tree of 2^32 leaves needs at most 2 * 32


class Judgement(NamedTuple):
    status: str  # ok | wait | bad
    reason: str = ""
    size: int = 0
    root: bytes = b""
    text: str = ""  # the checkpoint body (what a cosignature covers)


def _bad(reason: str) -> Judgement:
    return Judgement("bad", reason)


def judge(pub: Mapping[str, Any], verifier: Verifier, last: Mapping[str, Any] | None) -> Judgement:
    """Judge host publication `pub` ({note, old, proof: [hex]}) against the enrolled `verifier` and the
    fleet's `last` witnessed checkpoint of that host ({size, root: hex}, None before the first)."""
    note, old, proof_hex = pub.get("note"), pub.get("old"), pub.get("proof")
    if not isinstance(note, str) or type(old) is not int or not isinstance(proof_hex, list) \
            or len(proof_hex) > MAX_PROOF or not all(isinstance(p, str) for p in proof_hex):
        return _bad("malformed publication")
    try:
        proof = [bytes.fromhex(p) for p in proof_hex]
        text = open_note(note, verifier)
        cp = Checkpoint.parse(text)
    except (ValueError, NoteError) as exc:  # NoteError is a ValueError; fromhex raises ValueError
        return _bad(f"checkpoint not signed by the host's enrolled log key: {exc}"[:300])
    if cp.origin != verifier.name:
        return _bad(f"checkpoint origin {cp.origin!r} is not the enrolled log {verifier.name!r}"[:300])
    if any(len(p) != 32 for p in proof):
        return _bad("malformed consistency proof")
    size, root = (int(last["size"]), bytes.fromhex(str(last["root"]))) if last else (0, EMPTY_ROOT)
    if cp.size < size:
        return _bad(f"rollback: the log has {cp.size} records, the fleet witnessed {size}")
    if cp.size == size:
        if cp.root != root:
            return _bad(f"fork: another root for size {size}")
        return Judgement("ok", "", cp.size, cp.root, text)
    if old != size:
        return Judgement("wait", f"proof from {old}, the fleet witnessed {size}")
    if not verify_consistency(size, cp.size, root, cp.root, proof):
        return _bad(f"inconsistent: the proof from {size} to {cp.size} does not verify")
    return Judgement("ok", "", cp.size, cp.root, text)
