"""The pure audit core: any single change to a chained log is caught and located (hypothesis), checkpoint
signatures, encoding injectivity; and the pure VM lifecycle table."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from bulkhead.control.audit import (
    FIELDS,
    GENESIS,
    Checkpoint,
    Record,
    chain_hash,
    sign_checkpoint,
    verify,
    verify_checkpoint,
)
from bulkhead.control.lifecycle import STATES, TRANSITIONS, LifecycleError, next_state

KEY = Ed25519PrivateKey.generate()
PUB = KEY.public_key()


def build(n: int) -> tuple[list[tuple], Checkpoint]:
    rows, prev = [], GENESIS
    for seq in range(1, n + 1):
        vals = Record.make(f"t{seq}", "api", {"n": seq}, principal=f"p{seq % 2}", result="200").values()
        h = chain_hash(prev, seq, vals)
        rows.append((seq, *vals, prev, h))
        prev = h
    return rows, sign_checkpoint(KEY, n, prev, "now")


def test_encoding_is_injective_across_field_boundaries():
    a = ["ab", "c"] + [""] * (len(FIELDS) - 2)
    b = ["a", "bc"] + [""] * (len(FIELDS) - 2)
    assert chain_hash(GENESIS, 1, a) != chain_hash(GENESIS, 1, b)
    assert chain_hash(GENESIS, 1, a) != chain_hash(GENESIS, 2, a)


def test_checkpoint_signature_covers_every_field():
    cp = sign_checkpoint(KEY, 5, b"\x02" * 32, "t")
    assert verify_checkpoint(PUB, cp)
    for bad in (Checkpoint(6, cp.head, cp.time, cp.signature), Checkpoint(5, "00" * 32, cp.time, cp.signature),
                Checkpoint(5, cp.head, "u", cp.signature), Checkpoint(5, cp.head, cp.time, "zz")):
        assert not verify_checkpoint(PUB, bad)
    assert Checkpoint.from_json(cp.to_json()) == cp


@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 30), data=st.data())
def test_any_single_tampering_is_detected_at_or_before_the_change(n, data):
    rows, head = build(n)
    assert verify(rows, PUB, head).ok
    kind = data.draw(st.sampled_from(["modify", "delete", "swap", "truncate", "duplicate"]))
    k = data.draw(st.integers(0, n - 1))
    bad = list(rows)
    if kind == "modify":
        col = data.draw(st.integers(1, len(FIELDS)))
        row = list(bad[k])
        row[col] = str(row[col]) + "x"
        bad[k] = tuple(row)
    elif kind == "delete":
        del bad[k]
    elif kind == "swap":
        j = data.draw(st.integers(0, n - 1).filter(lambda j: j != k))
        a, b = sorted((k, j))
        # contents swapped, seq column kept in place (what swapping rows in the table looks like)
        bad[a], bad[b] = (bad[a][0], *bad[b][1:]), (bad[b][0], *bad[a][1:])
        k = a
    elif kind == "truncate":
        bad = bad[:k]
    else:
        bad.insert(k + 1, bad[k])
    rep = verify(bad, PUB, head)
    assert not rep.ok
    assert rep.first_bad is not None and 1 <= rep.first_bad <= k + 2
    if kind in ("modify", "delete", "swap", "truncate"):
        assert rep.first_bad == k + 1


def test_lifecycle_table():
    assert next_state("stopped", "start") == "running"
    assert next_state("running", "pause") == "paused"
    assert next_state("paused", "resume") == "running"
    assert next_state("paused", "stop") == "stopped"
    assert next_state("lost", "start") == "running"
    assert next_state("exited", "delete") == "deleted"
    with pytest.raises(LifecycleError, match="stop it first"):
        next_state("running", "delete")
    with pytest.raises(LifecycleError):
        next_state("stopped", "pause")
    with pytest.raises(LifecycleError):
        next_state("running", "reboot")
    for allowed, result in TRANSITIONS.values():
        assert allowed <= set(STATES)
        assert result in (*STATES, "deleted")
