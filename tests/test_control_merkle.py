"""bulkhead.control.merkle against an independent, deliberately naive implementation written straight from
RFC 9162 2.1.1 (MTH), 2.1.3.1 (PATH), 2.1.4.1 (PROOF/SUBPROOF) on Python lists, the published RFC 6962
/ CT reference known-answer vectors, and proofs that must not verify (a record not in the log, any
changed hash, size or index)."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bulkhead.control.merkle import (
    EMPTY_ROOT,
    Frontier,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    root_from_leaves,
    verify_consistency,
    verify_inclusion,
)


# ---------------------------------------------------------------- the naive reference (RFC 9162 text)
def H(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


def k_of(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def MTH(D: list[bytes]) -> bytes:
    n = len(D)
    if n == 0:
        return H(b"")
    if n == 1:
        return H(b"\x00" + D[0])
    k = k_of(n)
    return H(b"\x01" + MTH(D[:k]) + MTH(D[k:]))


def PATH(m: int, D: list[bytes]) -> list[bytes]:
    n = len(D)
    if n == 1:
        return []
    k = k_of(n)
    if m < k:
        return [*PATH(m, D[:k]), MTH(D[k:])]
    return [*PATH(m - k, D[k:]), MTH(D[:k])]


def SUBPROOF(m: int, D: list[bytes], b: bool) -> list[bytes]:
    n = len(D)
    if m == n:
        return [] if b else [MTH(D)]
    k = k_of(n)
    if m <= k:
        return [*SUBPROOF(m, D[:k], b), MTH(D[k:])]
    return [*SUBPROOF(m - k, D[k:], False), MTH(D[:k])]


def PROOF(m: int, D: list[bytes]) -> list[bytes]:
    return SUBPROOF(m, D, True)


class Mem:
    """A NodeReader over leaves appended through Frontier (what the audit log stores)."""

    def __init__(self, leaves: list[bytes]) -> None:
        self.nodes: dict[tuple[int, int], bytes] = {}
        f = Frontier()
        for i, d in enumerate(leaves):
            lh = leaf_hash(d)
            self.nodes[(0, i)] = lh
            for level, idx, h in f.append(lh):
                self.nodes[(level, idx)] = h
        self.frontier = f
        self.reads = 0

    def node(self, level: int, index: int) -> bytes:
        self.reads += 1
        return self.nodes[(level, index)]


# ---------------------------------------------------------------- known answers
# RFC 6962 / certificate-transparency reference test leaves and roots (merkle_tree_test).
KAT_LEAVES = [bytes.fromhex(x) for x in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                                          "606162636465666768696a6b6c6d6e6f")]
KAT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
KAT_INCLUSION_0_8 = ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                     "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                     "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]
KAT_CONSISTENCY = {
    (1, 8): KAT_INCLUSION_0_8,
    (6, 8): ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
             "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
             "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"],
    (2, 5): ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
             "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"],
}


def test_empty_tree_is_sha256_of_nothing():
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert root_from_leaves([]) == EMPTY_ROOT == MTH([])


def test_known_answer_roots():
    for n in range(1, 9):
        assert root_from_leaves(KAT_LEAVES[:n]).hex() == KAT_ROOTS[n - 1]
        assert MTH(KAT_LEAVES[:n]).hex() == KAT_ROOTS[n - 1]


def test_known_answer_proofs():
    mem = Mem(KAT_LEAVES)
    assert [p.hex() for p in inclusion_proof(mem, 0, 8)] == KAT_INCLUSION_0_8
    for (m, n), want in KAT_CONSISTENCY.items():
        got = consistency_proof(mem, m, n)
        assert [p.hex() for p in got] == want
        assert verify_consistency(m, n, bytes.fromhex(KAT_ROOTS[m - 1]), bytes.fromhex(KAT_ROOTS[n - 1]), got)


def test_structured_small_trees_against_the_naive_reference():
    for n in range(1, 40):
        leaves = [bytes([i]) * (i % 5) for i in range(n)]
        mem = Mem(leaves)
        root = mem.frontier.root()
        assert root == MTH(leaves)
        for m in range(n):
            p = inclusion_proof(mem, m, n)
            assert p == PATH(m, leaves)
            assert verify_inclusion(leaf_hash(leaves[m]), m, n, p, root)
        for m in range(1, n + 1):
            p = consistency_proof(mem, m, n)
            assert p == (PROOF(m, leaves) if m < n else [])
            assert verify_consistency(m, n, MTH(leaves[:m]), root, p)


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 300), data=st.data())
def test_proofs_match_the_reference_and_verify(n, data):
    leaves = [i.to_bytes(3, "big") for i in range(n)]
    mem = Mem(leaves)
    root = MTH(leaves)
    m = data.draw(st.integers(0, n - 1))
    p = inclusion_proof(mem, m, n)
    assert p == PATH(m, leaves)
    assert verify_inclusion(leaf_hash(leaves[m]), m, n, p, root)
    old = data.draw(st.integers(1, n))
    c = consistency_proof(mem, old, n)
    assert c == (PROOF(old, leaves) if old < n else [])
    assert verify_consistency(old, n, MTH(leaves[:old]), root, c)
    # a proof for any tree size up to n comes from the same stored nodes
    size = data.draw(st.integers(m + 1, n))
    assert verify_inclusion(leaf_hash(leaves[m]), m, size, inclusion_proof(mem, m, size), MTH(leaves[:size]))


@settings(max_examples=150, deadline=None)
@given(n=st.integers(2, 200), data=st.data())
def test_tampered_proofs_do_not_verify(n, data):
    leaves = [i.to_bytes(3, "big") for i in range(n)]
    mem = Mem(leaves)
    root = MTH(leaves)
    m = data.draw(st.integers(0, n - 1))
    p = inclusion_proof(mem, m, n)
    lh = leaf_hash(leaves[m])
    # a record that is not in the log cannot be proven, whatever path is offered
    assert not verify_inclusion(leaf_hash(b"not in the log"), m, n, p, root)
    for j in range(n):
        if j != m:
            assert not verify_inclusion(lh, j, n, p, root)
    assert not verify_inclusion(lh, m, n, p, H(root))
    if p:
        k = data.draw(st.integers(0, len(p) - 1))
        bad = list(p)
        bad[k] = H(bad[k])
        assert not verify_inclusion(lh, m, n, bad, root)
        assert not verify_inclusion(lh, m, n, p[:-1], root)
    assert not verify_inclusion(lh, m, n, [*p, root], root)
    old = data.draw(st.integers(1, n - 1))
    c = consistency_proof(mem, old, n)
    old_root = MTH(leaves[:old])
    assert not verify_consistency(old, n, H(old_root), root, c)  # a forked old tree
    assert not verify_consistency(old, n, old_root, H(root), c)
    k = data.draw(st.integers(0, len(c) - 1))
    bad = list(c)
    bad[k] = H(bad[k])
    assert not verify_consistency(old, n, old_root, root, bad)
    assert not verify_consistency(old, n, old_root, root, [])
    assert not verify_consistency(n, old, root, old_root, c)  # shrinking is never consistent


def test_a_forked_log_has_no_consistency_proof():
    a = [bytes([i]) for i in range(10)]
    b = list(a)
    b[3] = b"forged"
    assert not verify_consistency(6, 10, MTH(b[:6]), MTH(a), consistency_proof(Mem(a), 6, 10))
    assert not verify_consistency(6, 10, MTH(a[:6]), MTH(b), consistency_proof(Mem(b), 6, 10))


def test_proof_reads_are_logarithmic():
    n = 100_003
    leaves = [i.to_bytes(4, "big") for i in range(n)]
    mem = Mem(leaves)
    for m in (0, 1, n // 2, n - 2, n - 1):
        mem.reads = 0
        inclusion_proof(mem, m, n)
        assert mem.reads <= 2 * 17 + 2
    mem.reads = 0
    consistency_proof(mem, 77_777, n)
    assert mem.reads <= 2 * 17 + 2
    assert Frontier.restore(n, mem).root() == mem.frontier.root()


def test_bad_arguments():
    mem = Mem([b"a"])
    with pytest.raises(ValueError, match="leaf 1 is not in a tree of 1 leaves"):
        inclusion_proof(mem, 1, 1)
    with pytest.raises(ValueError, match="no consistency proof from size 2 to size 1"):
        consistency_proof(mem, 2, 1)
    assert not verify_inclusion(b"x" * 32, -1, 1, [], b"x" * 32)
    assert not verify_inclusion(b"x" * 32, 0, 1, [b"short"], b"x" * 32)
    assert verify_consistency(0, 5, EMPTY_ROOT, b"y" * 32, [])
    assert not verify_consistency(0, 5, EMPTY_ROOT, b"y" * 32, [b"z" * 32])
    assert verify_consistency(3, 3, b"r" * 32, b"r" * 32, [])
    assert not verify_consistency(3, 3, b"r" * 32, b"s" * 32, [])
