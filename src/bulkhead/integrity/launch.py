"""Guest launch digest (pure): what a guest is launched with, as one SHA-256.

Canonical encoding (version 1)::

    digest = SHA-256( b"bulkhead-launch/1\\0"
                      || F("kernel",  SHA-256(kernel bytes))
                      || F("initrd",  SHA-256(initrd bytes) or b"" when there is no initrd)
                      || F("cmdline", UTF-8 command line)
                      || F("mem_mib", u64 little-endian)
                      || F("cpus",    u32 little-endian)
                      || F("boot",    ASCII boot protocol: auto | linux | pvh)
                      || F("devices", "\\n".join(sorted device strings), UTF-8) )
    F(name, value) = u32le(len(name)) || name || u64le(len(value)) || value

Device strings: "virtio-blk:id=<id>,ro=<0|1>" per drive, "virtio-net:mac=<mac>" per NIC,
"virtio-rng" when enabled, "virtio-vsock:cid=<cid>" with vsock (the guest reads its CID from the
device's config space, virtio 1.2 section 5.10.4). Host-local details (file paths, tap names, rate limits) are not measured:
they do not change what the guest is given. Disk *contents* are not measured (they are mutable).

The runtime must read the kernel and initrd ONCE and pass the same bytes to both launch_digest() and
the loader: computing the digest from a path and loading from the path again would be a TOCTOU race.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Iterable

from bulkhead.config import VmConfig
from bulkhead.integrity.errors import IntegrityError, LaunchDigestMismatch

__all__ = [
    "LAUNCH_DOMAIN",
    "check_expected_digest",
    "config_devices",
    "launch_digest",
    "launch_digest_for_config",
]

LAUNCH_DOMAIN = b"bulkhead-launch/1\x00"
Blob = bytes | bytearray | memoryview | str | os.PathLike[str]


def _field(name: str, value: bytes) -> bytes:
    n = name.encode("ascii")
    return struct.pack("<I", len(n)) + n + struct.pack("<Q", len(value)) + value


def _hash_blob(blob: Blob) -> bytes:
    if isinstance(blob, (bytes, bytearray, memoryview)):
        return hashlib.sha256(blob).digest()
    h = hashlib.sha256()
    try:
        with open(blob, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError as exc:
        raise IntegrityError(f"cannot read {blob} to measure it: {exc.strerror}", path=str(blob)) from None
    return h.digest()


def config_devices(config: VmConfig) -> list[str]:
    """The canonical device strings of a VmConfig (see the module docstring)."""
    devices = [f"virtio-blk:id={d.drive_id},ro={int(d.read_only)}" for d in config.drives]
    devices += [f"virtio-net:mac={n.mac.lower()}" for n in config.nets]
    if config.rng:
        devices.append("virtio-rng")
    if config.vsock is not None:  # the guest sees the device and its CID; the host socket path is local
        devices.append(f"virtio-vsock:cid={config.vsock.guest_cid}")
    return devices


def launch_digest(
    kernel: Blob,
    initrd: Blob | None,
    cmdline: str,
    mem_mib: int,
    cpus: int,
    devices: Iterable[str] = (),
    boot: str = "auto",
) -> str:
    """SHA-256 hex of the canonical launch encoding. `kernel`/`initrd` are bytes or a path.

    Raises IntegrityError if a path cannot be read or a number does not fit its field.
    """
    if not 0 <= mem_mib < 1 << 64 or not 0 <= cpus < 1 << 32:
        raise IntegrityError("mem_mib or cpus out of range for the launch digest")
    devs = sorted(devices)
    for d in devs:
        if "\n" in d:
            raise IntegrityError("a device string must not contain a newline")
    parts = [
        LAUNCH_DOMAIN,
        _field("kernel", _hash_blob(kernel)),
        _field("initrd", _hash_blob(initrd) if initrd is not None else b""),
        _field("cmdline", cmdline.encode("utf-8")),
        _field("mem_mib", struct.pack("<Q", mem_mib)),
        _field("cpus", struct.pack("<I", cpus)),
        _field("boot", boot.encode("ascii")),
        _field("devices", "\n".join(devs).encode("utf-8")),
    ]
    return hashlib.sha256(b"".join(parts)).hexdigest()


def launch_digest_for_config(
    config: VmConfig, kernel: Blob | None = None, initrd: Blob | None = None
) -> str:
    """Launch digest of a VmConfig. Pass the kernel/initrd bytes you will load to avoid a TOCTOU race;
    otherwise the files named in the config are read. Raises IntegrityError if they cannot be read."""
    k = kernel if kernel is not None else config.kernel
    i = initrd if initrd is not None else config.initrd
    return launch_digest(k, i, config.cmdline, config.mem_mib, config.cpus, config_devices(config),
                         config.boot_protocol)


def check_expected_digest(config: VmConfig, actual: str) -> None:
    """Refuse a launch whose digest differs from config.expected_digest (no-op when none is set).

    Raises LaunchDigestMismatch with the reason, e.g. when the kernel file was swapped after create.
    """
    expected = config.expected_digest
    if expected is None:
        return
    exp = expected.strip().lower()
    if not hmac.compare_digest(exp.encode(), actual.lower().encode()):
        raise LaunchDigestMismatch(
            f"launch refused: the launch digest {actual} differs from the expected digest {exp} "
            "(the kernel, initrd, command line, memory, vCPUs or devices changed since the VM was created)",
            expected=exp,
            actual=actual,
        )
