"""RFC 9162 section 2.1 Merkle tree: hashes, roots, inclusion and consistency proofs (pure, no I/O).

- Leaf hash  (2.1.1): SHA-256(0x00 || leaf input); node hash: SHA-256(0x01 || left || right);
  MTH of the empty tree: SHA-256() = e3b0c442...b855.
- A *stored node* (level L, index i) is the hash of the complete subtree over leaves [i*2^L, (i+1)*2^L).
  Proofs are generated from a `NodeReader` that returns stored nodes; any RFC subtree D[lo:hi] that
  the proof definitions (2.1.3.1 PATH, 2.1.4.1 PROOF/SUBPROOF) need is either one stored node or (only
  the right edge of the tree) a fold of at most log2(n) of them, so a proof costs O(log n) reads.
- `Frontier` keeps the complete subtrees of the rightmost edge: appending a leaf yields the new stored
  nodes (amortized one per leaf) and the root of any prefix is folded from it (used by the writer and by
  from-scratch verification).
- `verify_inclusion` and `verify_consistency` are the algorithms of RFC 9162 2.1.3.2 and 2.1.4.2,
  step by step; they never raise on hostile input, they return False.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "EMPTY_ROOT",
    "Frontier",
    "NodeReader",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "root_from_leaves",
    "subtree_hash",
    "verify_consistency",
    "verify_inclusion",
]

EMPTY_ROOT = hashlib.sha256(b"").digest()
_sha256 = hashlib.sha256


def leaf_hash(leaf: bytes) -> bytes:
    """RFC 9162 2.1.1: MTH({d0}) = SHA-256(0x00 || d0)."""
    return _sha256(b"\x00" + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 2.1.1: SHA-256(0x01 || MTH(D[0:k]) || MTH(D[k:n]))."""
    return _sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than n (n >= 2): the k of RFC 9162 2.1.1."""
    return 1 << ((n - 1).bit_length() - 1)


class NodeReader(Protocol):
    def node(self, level: int, index: int) -> bytes:
        """The stored hash of the complete subtree over leaves [index << level, (index + 1) << level)."""
        ...


def subtree_hash(reader: NodeReader, lo: int, hi: int) -> bytes:
    """MTH(D[lo:hi]) for 0 <= lo < hi where lo is a multiple of the largest power of two <= hi - lo
    (true of every subtree the RFC's recursions name). Reads one stored node per complete piece."""
    n = hi - lo
    if n & (n - 1) == 0 and lo % n == 0:
        return reader.node(n.bit_length() - 1, lo // n)
    k = _split(n)
    return node_hash(subtree_hash(reader, lo, lo + k), subtree_hash(reader, lo + k, hi))


def inclusion_proof(reader: NodeReader, index: int, size: int) -> list[bytes]:
    """PATH(m, D[n]) of RFC 9162 2.1.3.1 for m = index in a tree of `size` leaves. Raises ValueError
    when index is not in the tree."""
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not in a tree of {size} leaves")
    out: list[bytes] = []
    lo, hi, m = 0, size, index
    while hi - lo > 1:  # iterative PATH: the sibling of each level, collected top-down, emitted bottom-up
        k = _split(hi - lo)
        if m < k:
            out.append(subtree_hash(reader, lo + k, hi))
            hi = lo + k
        else:
            out.append(subtree_hash(reader, lo, lo + k))
            lo, m = lo + k, m - k
    out.reverse()
    return out


def consistency_proof(reader: NodeReader, old: int, new: int) -> list[bytes]:
    """PROOF(m, D[n]) of RFC 9162 2.1.4.1 for m = old, n = new (empty when old is 0 or old == new).
    Raises ValueError unless 0 <= old <= new."""
    if not 0 <= old <= new:
        raise ValueError(f"no consistency proof from size {old} to size {new}")
    if old == 0 or old == new:
        return []
    out: list[bytes] = []
    lo, hi, m, b = 0, new, old, True
    while True:  # SUBPROOF(m, D[lo:hi], b)
        n = hi - lo
        if m == n:
            if not b:
                out.append(subtree_hash(reader, lo, hi))
            break
        k = _split(n)
        if m <= k:
            out.append(subtree_hash(reader, lo + k, hi))
            hi = lo + k
        else:
            out.append(subtree_hash(reader, lo, lo + k))
            lo, m, b = lo + k, m - k, False
    out.reverse()
    return out


def verify_inclusion(leaf: bytes, index: int, size: int, path: Sequence[bytes], root: bytes) -> bool:
    """RFC 9162 2.1.3.2, for the leaf *hash* `leaf` at `index` in a tree of `size` with root `root`."""
    if not (isinstance(index, int) and isinstance(size, int)) or index < 0 or index >= size:  # step 1
        return False
    if any(not isinstance(p, bytes) or len(p) != 32 for p in path) or len(path) > 64:
        return False
    fn, sn, r = index, size - 1, leaf  # step 2
    for p in path:  # step 3
        if sn == 0:  # 3a
            return False
        if fn & 1 or fn == sn:  # 3b
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1  # 3c
        sn >>= 1
    return sn == 0 and r == root  # step 4


def verify_consistency(old: int, new: int, old_root: bytes, new_root: bytes, path: Sequence[bytes]) -> bool:
    """RFC 9162 2.1.4.2 for 0 < old < new; old == new needs an empty path and equal roots, and old == 0
    (the empty tree, consistent with everything) an empty path."""
    if not (isinstance(old, int) and isinstance(new, int)) or old < 0 or old > new:
        return False
    if any(not isinstance(p, bytes) or len(p) != 32 for p in path) or len(path) > 128:
        return False
    if old == 0:
        return not path and old_root == EMPTY_ROOT
    if old == new:
        return not path and old_root == new_root
    if not path:  # step 1
        return False
    c = list(path)
    if old & (old - 1) == 0:  # step 2: first is an exact power of 2
        c.insert(0, old_root)
    fn, sn = old - 1, new - 1  # step 3
    while fn & 1:  # step 4
        fn >>= 1
        sn >>= 1
    fr = sr = c[0]  # step 5
    for x in c[1:]:  # step 6
        if sn == 0:  # 6a
            return False
        if fn & 1 or fn == sn:  # 6b
            fr = node_hash(x, fr)
            sr = node_hash(x, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, x)
        fn >>= 1  # 6c
        sn >>= 1
    return fr == old_root and sr == new_root and sn == 0  # step 7


@dataclass
class Frontier:
    """The complete subtrees on the right edge of a tree of `size` leaves: one (level, hash) per set
    bit of size, highest level first."""

    size: int = 0
    stack: list[tuple[int, bytes]] = field(default_factory=list)

    def append(self, lh: bytes) -> list[tuple[int, int, bytes]]:
        """Add a leaf hash; returns the stored nodes (level >= 1, index, hash) it completes."""
        made: list[tuple[int, int, bytes]] = []
        index = self.size
        level, h = 0, lh
        stack = self.stack
        while stack and stack[-1][0] == level:
            _, left = stack.pop()
            h = _sha256(b"\x01" + left + h).digest()
            level += 1
            index >>= 1
            made.append((level, index, h))
        stack.append((level, h))
        self.size += 1
        return made

    def root(self) -> bytes:
        """MTH of the first `size` leaves."""
        if not self.stack:
            return EMPTY_ROOT
        r = self.stack[-1][1]
        for _, h in reversed(self.stack[:-1]):
            r = node_hash(h, r)
        return r

    @staticmethod
    def restore(size: int, reader: NodeReader) -> Frontier:
        """The frontier of a stored tree of `size` leaves (log2(size) reads)."""
        stack: list[tuple[int, bytes]] = []
        lo = 0
        for level in range(size.bit_length() - 1, -1, -1):
            if size >> level & 1:
                stack.append((level, reader.node(level, lo >> level)))
                lo += 1 << level
        return Frontier(size, stack)


def root_from_leaves(leaves: Iterable[bytes]) -> bytes:
    """MTH of the leaf inputs (not hashes), streaming."""
    f = Frontier()
    for d in leaves:
        f.append(leaf_hash(d))
    return f.root()
