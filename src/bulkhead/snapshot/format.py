"""The snapshot file: authenticated, encrypted, versioned, schema-checked. Pure: bytes in, bytes out.

Why not Firecracker's format: its state file is protected by a 64-bit CRC only and its docs
(docs/snapshotting/snapshot-support.md, "Snapshot security") warn that a snapshot is not secure against
tampering and that restoring one twice clones guest secrets. Here every byte is authenticated, the
memory is encrypted at rest, and parsing treats the file as hostile input (fuzz/fuzz_snapshot.py).

Layout (all integers little-endian):

    magic      8   b"BHSNAP\\0\\1"
    hlen       4   length of the header (at most MAX_HEADER)
    header  hlen   canonical JSON (sorted keys, no spaces): format, bulkhead version, snapshot id, VM id,
                   launch digest, host key id, creation time, memory size, vCPU count
    key block 60   nonce(12) || AES-256-GCM(host key, DEK)(48); AAD = "key" || H
    state     4+n  length || AES-256-GCM(DEK, nonce 0, state JSON); AAD = "state" || H
    chunks         per run of non-zero guest pages: pfn(8) npages(4) || AES-256-GCM(DEK, nonce i+1,
                   pages); AAD = "mem" || H || i || pfn || npages
    end       8+16 chunk count(8) || AES-256-GCM(DEK, nonce 2^64-1, empty); AAD = "end" || H || count ||
                   SHA-256 of every chunk's (pfn, npages, tag)

H = SHA-256(magic || hlen || header). The DEK is a fresh random 256-bit key per snapshot, so counter nonces
never repeat under one key (NIST SP 800-38D 8.2.1, deterministic construction). The host key wraps the DEK
with the header as associated data, so the host key authenticates the header (VM id, launch digest,
bulkhead version), and the DEK authenticates and encrypts everything after it; the end block binds the
number and the order of the memory chunks (a truncated, reordered or spliced file is refused).

Pages never written by the guest (all zero) are not stored: a restore starts from zeroed memory.
The state JSON is checked field by field (check_state) before anything of it reaches KVM or a device.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
from collections.abc import Iterable, Iterator
from typing import Any

from bulkhead.errors import SnapshotError

__all__ = [
    "CHUNK_PAGES",
    "FORMAT",
    "MAGIC",
    "PAGE",
    "SnapshotReader",
    "check_state",
    "key_id",
    "write_snapshot",
]

MAGIC = b"BHSNAP\x00\x01"
FORMAT = 2  # 2: virtio-blk/virtio-rng transport and queue state (devices.virtio), drives and rng in config
PAGE = 4096
CHUNK_PAGES = 256  # 1 MiB of guest memory per encrypted chunk
MAX_HEADER = 64 * 1024
MAX_STATE = 16 * 1024 * 1024
MAX_MEM = 1 << 40
MAX_CPUS = 256
_TAG = 16
_KEYBLOCK = 12 + 32 + _TAG
_HLEN = struct.Struct("<I")
_CHUNK = struct.Struct("<QI")
_END = struct.Struct("<Q")
_END_NONCE = b"\xff" * 12
_HEX64 = re.compile(r"[0-9a-f]{64}")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")

HEADER_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format": int,
    "bulkhead": str,
    "snapshot_id": str,
    "vm_id": str,
    "launch_digest": (str, type(None)),
    "host_key_id": str,
    "created": int,
    "mem_bytes": int,
    "cpus": int,
}


def _aesgcm(key: bytes) -> Any:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


def _nonce(i: int) -> bytes:
    return i.to_bytes(12, "big")


def key_id(host_key: bytes) -> str:
    """A public name for a host key (it says which host made a snapshot, reveals nothing of the key)."""
    return hashlib.sha256(b"bulkhead snapshot host key id\n" + host_key).hexdigest()[:32]


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: object, what: str, size: int | None = None, *, max_size: int = MAX_STATE) -> bytes:
    """Decode a base64 field of the state; exact `size` when given. Raises SnapshotError naming it."""
    if not isinstance(text, str) or len(text) > (max_size * 4) // 3 + 4:
        raise SnapshotError(f"snapshot state: {what} is not a base64 string of at most {max_size} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError:
        raise SnapshotError(f"snapshot state: {what} is not valid base64") from None
    if size is not None and len(data) != size:
        raise SnapshotError(f"snapshot state: {what} has {len(data)} bytes, not {size}")
    return data


def check_header(header: object) -> dict[str, Any]:
    """Schema of the header. Raises SnapshotError naming the first bad field."""
    if not isinstance(header, dict) or set(header) != set(HEADER_FIELDS):
        got = sorted(header) if isinstance(header, dict) else type(header).__name__
        raise SnapshotError(f"snapshot header has the wrong fields ({got}, expected {sorted(HEADER_FIELDS)})")
    for name, kind in HEADER_FIELDS.items():
        value = header[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise SnapshotError(f"snapshot header field {name} has the wrong type")
    if header["format"] != FORMAT:
        raise SnapshotError(f"snapshot format {header['format']} is not supported (this bulkhead reads {FORMAT})")
    for name in ("snapshot_id", "vm_id", "host_key_id", "bulkhead"):
        if not _ID.fullmatch(header[name]):
            raise SnapshotError(f"snapshot header field {name} is not a valid identifier")
    if header["launch_digest"] is not None and not _HEX64.fullmatch(header["launch_digest"]):
        raise SnapshotError("snapshot header launch_digest is not a lowercase SHA-256 hex digest")
    mem = header["mem_bytes"]
    if not 0 < mem <= MAX_MEM or mem % PAGE:
        raise SnapshotError(f"snapshot header mem_bytes {mem} is not a positive multiple of 4 KiB")
    if not 0 < header["cpus"] <= MAX_CPUS:
        raise SnapshotError(f"snapshot header cpus {header['cpus']} is out of range")
    if header["created"] < 0:
        raise SnapshotError("snapshot header created is negative")
    return header


def _runs_ok(runs: object, mem_pages: int) -> list[tuple[int, int]]:
    if not isinstance(runs, list):
        raise SnapshotError("snapshot state: memory.runs is not a list")
    out: list[tuple[int, int]] = []
    prev_end = 0
    for i, run in enumerate(runs):
        if (
            not isinstance(run, list)
            or len(run) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in run)
        ):
            raise SnapshotError(f"snapshot state: memory.runs[{i}] is not [pfn, npages]")
        pfn, n = run
        if not 0 < n <= CHUNK_PAGES or pfn < prev_end or pfn + n > mem_pages:
            raise SnapshotError(f"snapshot state: memory.runs[{i}] [{pfn}, {n}] is out of order or out of range")
        prev_end = pfn + n
        out.append((pfn, n))
    return out


def check_state(state: object, header: dict[str, Any], *, page_frames: int) -> dict[str, Any]:
    """The top-level schema of the decrypted state; per-part checks live with their owners
    (bulkhead.snapshot.machine for vCPUs and chips, each device's load_state for devices).
    `page_frames`: the highest guest page frame number + 1 the memory layout of `mem_bytes` has."""
    expected = {"config", "vcpus", "vm", "devices", "memory", "cpuid"}
    if not isinstance(state, dict) or set(state) != expected:
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise SnapshotError(f"snapshot state has the wrong sections ({got}, expected {sorted(expected)})")
    if not isinstance(state["vcpus"], list) or len(state["vcpus"]) != header["cpus"]:
        raise SnapshotError("snapshot state: the number of vCPUs differs from the header")
    for part in ("config", "vm", "devices", "memory"):
        if not isinstance(state[part], dict):
            raise SnapshotError(f"snapshot state: {part} is not an object")
    state["memory"]["runs"] = _runs_ok(state["memory"].get("runs"), page_frames)
    state["devices"]["virtio"] = _virtio_ok(state["devices"].get("virtio"), state["config"], header["mem_bytes"])
    return state


def _virtio_ok(docs: object, config: dict[str, Any], mem_bytes: int) -> list[dict[str, Any]]:
    """devices.virtio: one transport document per virtio device of the config, in attach order (drives,
    NICs, then rng: runtime/virtio.py), each checked against the guest's RAM layout (devices/virtio/state.py)."""
    from bulkhead.devices.virtio.device import DEVICE_ID_BLOCK, DEVICE_ID_NET, DEVICE_ID_RNG
    from bulkhead.devices.virtio.state import check_doc
    from bulkhead.memory.layout import ram_regions

    drives, nets, rng = config.get("drives"), config.get("nets"), config.get("rng")
    if not isinstance(drives, list) or not isinstance(nets, list) or not isinstance(rng, bool):
        raise SnapshotError("snapshot state: config.drives or config.nets is not a list, or config.rng is not a boolean")
    if not isinstance(docs, list) or len(docs) != len(drives) + len(nets) + rng:
        raise SnapshotError("snapshot state: devices.virtio is not one document per drive, NIC and rng of the config")
    if not docs:
        return []
    try:
        regions = ram_regions(mem_bytes)
    except ValueError as exc:
        raise SnapshotError(f"snapshot state: {exc}") from None
    want = [DEVICE_ID_BLOCK] * len(drives) + [DEVICE_ID_NET] * len(nets) + [DEVICE_ID_RNG] * rng
    out = []
    for i, (doc, device_id) in enumerate(zip(docs, want, strict=True)):
        try:
            checked = check_doc(doc, regions, f"devices.virtio[{i}]")
        except ValueError as exc:
            raise SnapshotError(f"snapshot state: {exc}") from None
        if checked["device_id"] != device_id:
            raise SnapshotError(f"snapshot state: devices.virtio[{i}] is device {checked['device_id']}, "
                                f"the config has device {device_id} there")
        out.append(checked)
    return out


class _Writer:
    def __init__(self, header: dict[str, Any], host_key: bytes, dek: bytes, key_nonce: bytes) -> None:
        check_header(header)
        raw = _canonical(header)
        if len(raw) > MAX_HEADER:
            raise SnapshotError("snapshot header too large")
        self.head = MAGIC + _HLEN.pack(len(raw)) + raw
        self.h = hashlib.sha256(self.head).digest()
        self.dek = _aesgcm(dek)
        wrapped = _aesgcm(host_key).encrypt(key_nonce, dek, b"key" + self.h)
        self.key_block = key_nonce + wrapped
        self.chunks = 0
        self.chunk_digest = hashlib.sha256()


def write_snapshot(
    header: dict[str, Any],
    state: dict[str, Any],
    pages: Iterable[tuple[int, int, bytes | memoryview]],
    *,
    host_key: bytes,
    dek: bytes,
    key_nonce: bytes,
) -> Iterator[bytes]:
    """Yield the file's bytes. `pages`: (pfn, npages, data) per run, in the order of state memory.runs
    (at most CHUNK_PAGES each). `dek` and `key_nonce` come from the caller's CSPRNG (os.urandom), so that
    this module stays free of I/O and deterministic under test."""
    if len(host_key) != 32 or len(dek) != 32 or len(key_nonce) != 12:
        raise ValueError("host key and DEK are 32 bytes, the key nonce 12")
    w = _Writer(header, host_key, dek, key_nonce)
    yield w.head
    yield w.key_block
    body = _canonical(state)
    if len(body) > MAX_STATE:
        raise SnapshotError(f"snapshot state is larger than {MAX_STATE} bytes")
    sealed = w.dek.encrypt(_nonce(0), body, b"state" + w.h)
    yield _HLEN.pack(len(sealed)) + sealed
    for pfn, npages, data in pages:
        if not 0 < npages <= CHUNK_PAGES or len(data) != npages * PAGE:
            raise ValueError("a memory chunk is 1..CHUNK_PAGES whole pages")
        head = _CHUNK.pack(pfn, npages)
        w.chunks += 1
        ct = w.dek.encrypt(_nonce(w.chunks), bytes(data), b"mem" + w.h + _END.pack(w.chunks) + head)
        w.chunk_digest.update(head + ct[-_TAG:])
        yield head + ct
    count = _END.pack(w.chunks)
    yield count + w.dek.encrypt(_END_NONCE, b"", b"end" + w.h + count + w.chunk_digest.digest())


class SnapshotReader:
    """Parse and authenticate a snapshot held in `data` (e.g. a read-only mmap of the file).

        r = SnapshotReader(data)             # magic, header schema; nothing decrypted yet
        r.header                             # checked header (VM id, launch digest, host key id, ...)
        state = r.open(host_key)             # unwraps the DEK, decrypts and parses the state JSON
        for pfn, npages, plain in r.chunks(runs): ...   # decrypted memory, authenticated chunk by chunk
        r.finish()                           # the end block: count and order of chunks, no trailing bytes

    Every failure raises SnapshotError with the reason; nothing of a chunk is returned before its tag
    is checked. The caller must call finish() before the restored guest runs."""

    def __init__(self, data: Any) -> None:  # bytes, memoryview or mmap
        self._data = memoryview(data)
        try:
            self._parse_header()
        except BaseException:
            self._data.release()
            raise

    def _parse_header(self) -> None:
        if len(self._data) < len(MAGIC) + 4:
            raise SnapshotError("not a bulkhead snapshot: the file is too short")
        if bytes(self._data[: len(MAGIC)]) != MAGIC:
            if bytes(self._data[:6]) == MAGIC[:6]:
                raise SnapshotError("bulkhead snapshot of an unsupported container version")
            raise SnapshotError("not a bulkhead snapshot (bad magic)")
        (hlen,) = _HLEN.unpack_from(self._data, len(MAGIC))
        if hlen > MAX_HEADER:
            raise SnapshotError(f"snapshot header length {hlen} is larger than {MAX_HEADER}")
        end = len(MAGIC) + 4 + hlen
        raw = self._need(len(MAGIC) + 4, hlen, "header")
        try:
            header = json.loads(raw.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise SnapshotError("snapshot header is not valid JSON") from None
        self.header = check_header(header)
        if _canonical(header) != raw:
            raise SnapshotError("snapshot header is not in canonical form")
        self._h = hashlib.sha256(self._data[:end]).digest()
        self._pos = end
        self._dek: Any = None
        self._chunks = 0
        self._chunk_digest = hashlib.sha256()
        self._finished = False

    def _need(self, pos: int, n: int, what: str) -> bytes:
        if pos + n > len(self._data):
            raise SnapshotError(f"snapshot is truncated (in the {what})")
        return bytes(self._data[pos : pos + n])

    def open(self, host_key: bytes) -> dict[str, Any]:
        """Unwrap the DEK with `host_key` and return the decrypted state document (top level unchecked:
        see check_state)."""
        from cryptography.exceptions import InvalidTag

        if key_id(host_key) != self.header["host_key_id"]:
            raise SnapshotError(
                f"snapshot was made on another host (its key id {self.header['host_key_id']}, this host's "
                f"{key_id(host_key)}): a snapshot restores only where its host key is"
            )
        block = self._need(self._pos, _KEYBLOCK, "key block")
        try:
            dek = _aesgcm(host_key).decrypt(block[:12], block[12:], b"key" + self._h)
        except InvalidTag:
            raise SnapshotError("snapshot authentication failed: the header or the key block was altered") from None
        self._dek = _aesgcm(dek)
        self._pos += _KEYBLOCK
        (slen,) = _HLEN.unpack(self._need(self._pos, 4, "state length"))
        if slen > MAX_STATE + _TAG:
            raise SnapshotError("snapshot state length is out of range")
        sealed = self._need(self._pos + 4, slen, "state")
        try:
            body = self._dek.decrypt(_nonce(0), sealed, b"state" + self._h)
        except InvalidTag:
            raise SnapshotError("snapshot authentication failed: the machine state was altered") from None
        self._pos += 4 + slen
        try:
            state = json.loads(body)
        except ValueError:
            raise SnapshotError("snapshot state is not valid JSON") from None
        if not isinstance(state, dict):
            raise SnapshotError("snapshot state is not an object")
        return state

    def chunks(self, runs: list[tuple[int, int]]) -> Iterator[tuple[int, int, bytes]]:
        """Decrypt the memory chunks, which must be exactly `runs` (from the authenticated state)."""
        from cryptography.exceptions import InvalidTag

        if self._dek is None:
            raise RuntimeError("open() first")
        for pfn, npages in runs:
            head = self._need(self._pos, _CHUNK.size, "memory")
            got = _CHUNK.unpack(head)
            if got != (pfn, npages):
                raise SnapshotError(f"snapshot memory chunk {self._chunks} is {got}, the state says {(pfn, npages)}")
            n = npages * PAGE + _TAG
            ct = self._need(self._pos + _CHUNK.size, n, "memory")
            self._chunks += 1
            try:
                plain = self._dek.decrypt(_nonce(self._chunks), ct, b"mem" + self._h + _END.pack(self._chunks) + head)
            except InvalidTag:
                raise SnapshotError(
                    f"snapshot authentication failed: guest memory at page {pfn:#x} was altered"
                ) from None
            self._chunk_digest.update(head + ct[-_TAG:])
            self._pos += _CHUNK.size + n
            yield pfn, npages, plain

    def finish(self) -> None:
        """Check the end block and that nothing follows it."""
        from cryptography.exceptions import InvalidTag

        if self._dek is None:
            raise RuntimeError("open() first")
        block = self._need(self._pos, _END.size + _TAG, "end block")
        count = block[: _END.size]
        if _END.unpack(count)[0] != self._chunks:
            raise SnapshotError("snapshot memory has a different number of chunks than its end block says")
        try:
            self._dek.decrypt(_END_NONCE, block[_END.size :], b"end" + self._h + count + self._chunk_digest.digest())
        except InvalidTag:
            raise SnapshotError("snapshot authentication failed: the end block was altered") from None
        if self._pos + len(block) != len(self._data):
            raise SnapshotError("snapshot has trailing bytes after its end block")
        self._finished = True

    def release(self) -> None:
        """Drop the view of the data (so the caller can close its mmap)."""
        self._data.release()

    @property
    def finished(self) -> bool:
        return self._finished


def declare_surfaces() -> None:
    """The snapshot file is user-supplied input to the restore path (see `bulkhead.surface`)."""
    from bulkhead.surface import declare

    declare(
        "boot-parser",
        "snapshot-file",
        owner=__name__,
        boundary="image-vmm",
        accepts="a snapshot file given to --restore: magic, bounded canonical JSON header, AES-256-GCM key, "
        "state and memory blocks authenticated before use, state schema-checked; anything else -> SnapshotError, "
        "nothing restored",
        handler="SnapshotReader, check_header, check_state",
        fuzz="fuzz/fuzz_snapshot.py",
        spec="docs/SNAPSHOT.md; NIST SP 800-38D (GCM)",
    )
