"""The live-migration stream (bulkhead.snapshot.wire, pure): hostile frames are refused by name."""

from __future__ import annotations

import pytest

from bulkhead.errors import SnapshotError
from bulkhead.snapshot import wire

OFFER = {"version": "0.1.0", "vm_id": "vm-1", "launch_digest": None, "mem_bytes": 1 << 27, "cpus": 2,
         "nonce": "ab" * 16}


def _reader(data: bytes):  # type: ignore[no-untyped-def]
    pos = 0

    def recv(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise EOFError
        pos += n
        return data[pos - n : pos]

    return recv


def test_frames_round_trip() -> None:
    data = wire.json_frame(b"O", OFFER) + wire.encode_pages(5, bytes(8192))
    recv = _reader(data)
    kind, payload = wire.read_frame(recv)
    assert kind == b"O" and wire.check_offer(wire.parse_json(payload, "offer"), max_mem=1 << 40, max_cpus=8) == OFFER
    kind, payload = wire.read_frame(recv)
    pfn, n, pages = wire.decode_pages(payload, page_frames=100)
    assert (kind, pfn, n, len(pages)) == (b"P", 5, 2, 8192)


@pytest.mark.parametrize(("data", "why"), [
    (b"Z" + bytes(4), "unknown frame kind"),
    (b"P" + (wire.MAX_FRAME + 1).to_bytes(4, "little"), "over the limit"),
])
def test_unknown_kinds_and_oversized_frames_are_refused(data: bytes, why: str) -> None:
    with pytest.raises(SnapshotError, match=why):
        wire.read_frame(_reader(data))


def test_pages_outside_guest_ram_or_with_a_lying_count_are_refused() -> None:
    frame = wire.encode_pages(99, bytes(8192))[5:]
    with pytest.raises(SnapshotError, match="outside guest RAM"):
        wire.decode_pages(frame, page_frames=100)
    with pytest.raises(SnapshotError, match="disagrees"):
        wire.decode_pages(frame[:-1], page_frames=1000)
    huge = (1 << 64) - 1
    with pytest.raises(SnapshotError, match="outside guest RAM"):
        wire.decode_pages(huge.to_bytes(8, "little") + (1).to_bytes(4, "little") + bytes(4096), page_frames=1000)


@pytest.mark.parametrize("edit", [
    {"extra": 1}, {"cpus": 0}, {"cpus": True}, {"mem_bytes": 4097}, {"mem_bytes": 1 << 41}, {"vm_id": "../x"},
    {"launch_digest": "ABC"}, {"nonce": "short"}, {"version": 1},
])
def test_a_bad_offer_is_refused(edit: dict[str, object]) -> None:
    with pytest.raises(SnapshotError, match="migration offer"):
        wire.check_offer({**OFFER, **edit}, max_mem=1 << 40, max_cpus=8)


def test_json_frames_must_be_objects() -> None:
    for bad in (b"[1]", b"{", b"\xff"):
        with pytest.raises(SnapshotError):
            wire.parse_json(bad, "state")
