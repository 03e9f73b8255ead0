"""The snapshot file format (bulkhead/snapshot/format.py): every altered, truncated, spliced, foreign or
malformed file is refused with SnapshotError, and only that; an intact one round-trips exactly.

The attacks are the ones Firecracker's snapshot docs say its CRC-protected format does not stop
(docs/snapshotting/snapshot-support.md, "Snapshot security"): anyone who can write the file can change
guest memory or vCPU state. Here each is attempted on a real file and must fail."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bulkhead.errors import SnapshotError
from bulkhead.snapshot.format import (
    CHUNK_PAGES,
    FORMAT,
    MAGIC,
    PAGE,
    SnapshotReader,
    check_header,
    check_state,
    key_id,
    write_snapshot,
)

HOST_KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def _header(**over: object) -> dict[str, object]:
    h: dict[str, object] = {
        "format": FORMAT,
        "bulkhead": "0.1.0",
        "snapshot_id": "a" * 32,
        "vm_id": "vm-1",
        "launch_digest": "b" * 64,
        "host_key_id": key_id(HOST_KEY),
        "created": 1_800_000_000,
        "mem_bytes": 16 << 20,
        "cpus": 1,
    }
    h.update(over)
    return h


RUNS = [(1, 1, b"\x11" * PAGE), (7, 2, b"\x22" * PAGE + b"\x33" * PAGE), (300, 1, bytes(range(256)) * 16)]
STATE = {"config": {"drives": [], "nets": [], "rng": False}, "vcpus": [{}], "vm": {}, "devices": {"virtio": []}, "cpuid": {},
         "memory": {"runs": [[p, n] for p, n, _ in RUNS]}}  # fmt: skip


def _file(header: dict[str, object] | None = None, runs: list[tuple[int, int, bytes]] = RUNS) -> bytes:
    return b"".join(
        write_snapshot(header or _header(), STATE, runs, host_key=HOST_KEY, dek=b"\x07" * 32, key_nonce=b"\x09" * 12)
    )


def _read_all(data: bytes, key: bytes = HOST_KEY) -> tuple[dict[str, object], list[tuple[int, int, bytes]]]:
    r = SnapshotReader(data)
    state = r.open(key)
    checked = check_state(state, r.header, page_frames=4096)
    chunks = list(r.chunks(checked["memory"]["runs"]))
    r.finish()
    return state, chunks


def test_round_trip_is_exact() -> None:
    data = _file()
    assert data.startswith(MAGIC)
    state, chunks = _read_all(data)
    assert chunks == RUNS
    assert state["memory"] == {"runs": [(p, n) for p, n, _ in RUNS]}
    # nothing of guest memory is in the clear
    assert b"\x11" * 64 not in data and bytes(range(256)) not in data


def test_every_single_byte_change_is_refused() -> None:
    """Flip each byte of a whole file in turn: the reader must refuse every one (and only with
    SnapshotError: a traceback of another type would be a parser bug)."""
    data = _file()
    for pos in range(len(data)):
        bad = bytearray(data)
        bad[pos] ^= 0x5A
        with pytest.raises(SnapshotError):
            _read_all(bytes(bad))


def test_every_truncation_and_any_trailing_byte_is_refused() -> None:
    data = _file()
    for cut in range(len(data)):
        with pytest.raises(SnapshotError):
            _read_all(data[:cut])
    with pytest.raises(SnapshotError, match="trailing bytes"):
        _read_all(data + b"\0")


def test_a_snapshot_of_another_host_is_refused_by_name() -> None:
    with pytest.raises(SnapshotError, match="another host"):
        _read_all(_file(), OTHER_KEY)


def test_a_forged_header_is_refused_even_with_a_matching_key_id() -> None:
    """Re-point the snapshot at another VM (or launch digest) by rewriting the header: the host key's wrap
    covers the header, so the DEK no longer unwraps."""
    data = _file()
    (hlen,) = struct.unpack_from("<I", data, 8)
    for field, value in (("vm_id", "vm-2"), ("launch_digest", "c" * 64), ("bulkhead", "0.0.9")):
        forged = json.dumps(_header(**{field: value}), sort_keys=True, separators=(",", ":")).encode()
        bad = data[:8] + struct.pack("<I", len(forged)) + forged + data[12 + hlen :]
        with pytest.raises(SnapshotError, match="authentication failed"):
            _read_all(bad)


def test_chunks_swapped_or_spliced_from_another_snapshot_are_refused() -> None:
    data = _file()
    other = _file(_header(snapshot_id="f" * 32))  # same keys, another snapshot: its chunks must not fit
    a = SnapshotReader(data)
    a.open(HOST_KEY)
    start = a._pos  # the first memory chunk
    size = 12 + PAGE + 16
    with pytest.raises(SnapshotError):
        _read_all(data[:start] + other[start : start + size] + data[start + size :])
    second = start + size
    swapped = data[:start] + data[second : second + size] + data[start:second] + data[second + size :]
    with pytest.raises(SnapshotError):
        _read_all(swapped)


def test_a_chunk_dropped_with_its_run_is_refused() -> None:
    """An attacker who removes a chunk cannot also remove it from the authenticated state's run list, and
    the end block counts and hashes the chunks."""
    data = _file()
    r = SnapshotReader(data)
    r.open(HOST_KEY)
    start, size = r._pos, 12 + PAGE + 16
    with pytest.raises(SnapshotError):
        _read_all(data[:start] + data[start + size :])


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"format": 1}, r"format 1 is not supported \(this bulkhead reads 2\)"),  # before virtio state
        ({"format": 3}, "format 3 is not supported"),
        ({"mem_bytes": 4097}, "multiple of 4 KiB"),
        ({"cpus": 0}, "cpus 0"),
        ({"vm_id": "../etc"}, "vm_id is not a valid identifier"),
        ({"launch_digest": "XYZ"}, "launch_digest"),
        ({"created": True}, "wrong type"),
    ],
)
def test_header_schema(change: dict[str, object], match: str) -> None:
    with pytest.raises(SnapshotError, match=match):
        check_header(_header(**change))
    with pytest.raises(SnapshotError, match="wrong fields"):
        check_header({**_header(), "extra": 1})


@pytest.mark.parametrize(
    ("runs", "match"),
    [
        ([[5, 1], [5, 1]], "out of order"),
        ([[4095, 2]], "out of range"),
        ([[1, 0]], "out of range"),
        ([[1, CHUNK_PAGES + 1]], "out of range"),
        ([[1, "2"]], "is not \\[pfn, npages\\]"),
        ("all", "not a list"),
    ],
)
def test_state_run_list_schema(runs: object, match: str) -> None:
    state = {**STATE, "memory": {"runs": runs}}
    with pytest.raises(SnapshotError, match=match):
        check_state(state, _header(), page_frames=4096)


def test_state_sections_and_vcpu_count_are_checked() -> None:
    with pytest.raises(SnapshotError, match="wrong sections"):
        check_state({**STATE, "pickle": 1}, _header(), page_frames=4096)
    with pytest.raises(SnapshotError, match="number of vCPUs"):
        check_state(dict(STATE), _header(cpus=2), page_frames=4096)


def test_not_a_snapshot_and_another_container_version() -> None:
    with pytest.raises(SnapshotError, match="bad magic"):
        SnapshotReader(b"\x7fELF" + bytes(64))
    with pytest.raises(SnapshotError, match="unsupported container version"):
        SnapshotReader(MAGIC[:6] + b"\x00\x02" + bytes(64))
    with pytest.raises(SnapshotError, match="too short"):
        SnapshotReader(b"")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 2000))
def test_arbitrary_bytes_after_a_valid_prefix_only_raise_snapshot_error(tail: bytes, cut: int) -> None:
    data = _file()
    try:
        _read_all(data[: min(cut, len(data))] + tail)
    except SnapshotError:
        pass
