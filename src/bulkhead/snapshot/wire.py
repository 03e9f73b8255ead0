"""The live-migration stream (pure: bytes in, values out; docs/MIGRATION.md "The stream").

It runs inside a mutually authenticated TLS 1.3 connection between the two hosts (runtime/migrate.py), so
it needs no MAC of its own: TLS authenticates and encrypts every byte. It is still hostile input (the peer
host may be compromised), so every frame is length-capped and schema-checked before use.

frame = kind (1 byte) | length (u32 little-endian) | payload

| kind | from | payload |
|---|---|---|
| O offer | source | JSON: version, vm_id, launch_digest, mem_bytes, cpus, nonce (for the destination's quote) |
| E evidence | both | JSON: the sender's attestation evidence over the peer's nonce (+ the destination's nonce) |
| A accept | destination | JSON {} : the source's evidence verified; memory may follow |
| X abort | both | JSON: reason. The connection ends; the source resumes the VM |
| P pages | source | u64 first page frame, u32 page count, then count*4096 bytes |
| S state | source | JSON: the machine state document of runtime/snapshot.py (checked there) |
| R ready | destination | JSON {} : the VM is rebuilt, paused, waiting for commit |
| C commit | source | JSON {} : the source has given the VM up; run it |
| U running | destination | JSON {} : the destination's vCPUs are started |
"""

from __future__ import annotations

import json
import re
import struct
from typing import Any

from bulkhead.errors import SnapshotError
from bulkhead.snapshot.format import MAX_STATE, PAGE

__all__ = ["KINDS", "MAX_PAGES", "check_offer", "decode_pages", "encode", "encode_pages", "json_frame",
           "read_frame"]

KINDS = frozenset(b"OEAXPSRCU")
MAX_PAGES = 256  # per P frame: 1 MiB
_HEAD = struct.Struct("<BI")
_PAGES = struct.Struct("<QI")
MAX_FRAME = max(MAX_STATE, _PAGES.size + MAX_PAGES * PAGE)
_HEX = re.compile(r"[0-9a-f]{16,128}")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
OFFER_FIELDS: dict[str, Any] = {"version": str, "vm_id": str, "launch_digest": (str, type(None)), "mem_bytes": int, "cpus": int,
                "nonce": str}


def encode(kind: bytes, payload: bytes) -> bytes:
    if kind[0] not in KINDS or len(kind) != 1:
        raise ValueError(f"unknown frame kind {kind!r}")
    if len(payload) > MAX_FRAME:
        raise SnapshotError(f"migration frame of {len(payload)} bytes is over the limit")
    return _HEAD.pack(kind[0], len(payload)) + payload


def json_frame(kind: bytes, doc: dict[str, Any]) -> bytes:
    return encode(kind, json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())


def read_frame(recv_exact: Any) -> tuple[bytes, bytes]:
    """One frame from `recv_exact(n) -> bytes` (which raises EOFError on a short read).
    Raises SnapshotError for an unknown kind or an oversized length."""
    kind, length = _HEAD.unpack(recv_exact(_HEAD.size))
    if kind not in KINDS:
        raise SnapshotError(f"migration stream: unknown frame kind {kind:#x}")
    if length > MAX_FRAME:
        raise SnapshotError(f"migration stream: frame of {length} bytes is over the limit")
    return bytes([kind]), recv_exact(length) if length else b""


def parse_json(payload: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(payload)
    except ValueError:
        raise SnapshotError(f"migration stream: the {what} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise SnapshotError(f"migration stream: the {what} is not an object")
    return doc


def check_offer(doc: dict[str, Any], *, max_mem: int, max_cpus: int) -> dict[str, Any]:
    """The source's offer: exact fields and types, identifiers and sizes in range."""
    if set(doc) != set(OFFER_FIELDS):
        raise SnapshotError(f"migration offer has the wrong fields ({sorted(doc)})")
    for name, kind in OFFER_FIELDS.items():
        if not isinstance(doc[name], kind) or isinstance(doc[name], bool):
            raise SnapshotError(f"migration offer field {name} has the wrong type")
    if not _ID.fullmatch(doc["vm_id"]) or not _ID.fullmatch(doc["version"]):
        raise SnapshotError("migration offer: vm_id or version is not a valid identifier")
    if doc["launch_digest"] is not None and not _HEX64.fullmatch(doc["launch_digest"]):
        raise SnapshotError("migration offer: launch_digest is not a lowercase SHA-256 hex digest")
    if not _HEX.fullmatch(doc["nonce"]):
        raise SnapshotError("migration offer: the nonce is not 16 to 128 hex digits")
    if not 0 < doc["mem_bytes"] <= max_mem or doc["mem_bytes"] % PAGE:
        raise SnapshotError(f"migration offer: mem_bytes {doc['mem_bytes']} is out of range")
    if not 0 < doc["cpus"] <= max_cpus:
        raise SnapshotError(f"migration offer: cpus {doc['cpus']} is out of range")
    return doc


def encode_pages(pfn: int, data: bytes | memoryview) -> bytes:
    n = len(data) // PAGE
    if len(data) % PAGE or not 0 < n <= MAX_PAGES:
        raise ValueError("a pages frame holds 1 to MAX_PAGES whole pages")
    return _HEAD.pack(ord("P"), _PAGES.size + len(data)) + _PAGES.pack(pfn, n) + bytes(data)


def decode_pages(payload: bytes, *, page_frames: int) -> tuple[int, int, memoryview]:
    """(first pfn, count, data) of a P frame, checked to lie inside guest RAM's `page_frames`."""
    if len(payload) < _PAGES.size:
        raise SnapshotError("migration stream: a pages frame is too short")
    pfn, n = _PAGES.unpack_from(payload)
    if not 0 < n <= MAX_PAGES or len(payload) != _PAGES.size + n * PAGE:
        raise SnapshotError("migration stream: a pages frame's count disagrees with its length")
    if pfn + n > page_frames:
        raise SnapshotError(f"migration stream: pages {pfn:#x}+{n} are outside guest RAM")
    return pfn, n, memoryview(payload)[_PAGES.size:]


def declare_surfaces() -> None:
    """The migration stream a destination host reads from a source host (see `bulkhead.surface`)."""
    from bulkhead.surface import declare

    declare(
        "net-frame",
        "migration-stream",
        owner=__name__,
        boundary="underlay-host",
        accepts="frames of a live migration, inside mutual TLS 1.3 between the hosts' daemons and after both "
        "hosts' attestation: kind byte, u32 length <= the frame limit, offer/state JSON schema-checked, page "
        "frames inside guest RAM; the state goes through the snapshot state checks; anything else -> "
        "SnapshotError, the migration is aborted and nothing runs",
        handler="read_frame, check_offer, decode_pages, runtime.migrate.receive_vm",
        fuzz="fuzz/fuzz_migration_stream.py",
        spec="docs/MIGRATION.md",
    )
