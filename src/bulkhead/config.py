"""VM configuration (pure): the one declaration of a VM's fields and limits.

Built from CLI flags, the API (control/models.py takes its pydantic limits from the constants here) or
the worker protocol. Every field is checked here, once, so the layers below can trust the types and
ranges; memory/layout.py, boot/mptable.py and boot/loader.py use the same limits. Like cloud-hypervisor's
vm_config.rs, this module knows nothing of the VM that runs it: it imports only bulkhead.errors.
Raises ConfigError with one clear sentence on bad input. (`bulkhead.runtime.config` re-exports it.)
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from bulkhead.errors import ConfigError

__all__ = [
    "BOOT_PROTOCOLS",
    "MAX_CMDLINE",
    "MAX_CPUS",
    "MAX_MEM_MIB",
    "MIN_MEM_MIB",
    "DriveConfig",
    "NetConfig",
    "RateLimit",
    "VmConfig",
    "VsockConfig",
    "parse_drive",
    "parse_net",
    "parse_vsock",
    "vsock_of",
]

# These are NamedTuples (immutable records from the standard library), not dataclasses: importing
# `dataclasses` pulls in inspect and tokenize, ~15 ms of every `bulkhead run` start (docs/PERFORMANCE.md).

MIN_MEM_MIB = 2  # guest RAM, MiB
MAX_MEM_MIB = 64 * 1024
MAX_CPUS = 32  # the MP table for 32 vCPUs fits the 1 KiB EBDA slot (boot/mptable.py)
MAX_CMDLINE = 4096  # bytes, NUL included
BOOT_PROTOCOLS = ("auto", "linux", "pvh")
_PROTOCOL_LIST = ", ".join(BOOT_PROTOCOLS[:-1]) + " or " + BOOT_PROTOCOLS[-1]  # "auto, linux or pvh"
_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_TAP_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


class RateLimit(NamedTuple):
    """Token buckets: bytes per second and operations per second (0 = unlimited)."""

    bytes_per_sec: int = 0
    ops_per_sec: int = 0


class DriveConfig(NamedTuple):
    path: str
    read_only: bool = False
    drive_id: str = ""
    rate: RateLimit = RateLimit()


class NetConfig(NamedTuple):
    tap: str
    mac: str = ""
    rate: RateLimit = RateLimit()
    tap_fd: int = -1  # an already-open tap passed in by the jailer


class VsockConfig(NamedTuple):
    """virtio-vsock (virtio 1.2 §5.10) with Firecracker's host model: the VM's unix socket at `path`,
    guest-initiated streams to port P at `<path>_<P>`. `listen_fd`/`connect_prefix`: set by the jailer
    (the supervisor binds `path` and the worker connects through a bind of its directory)."""

    path: str
    guest_cid: int = 3
    listen_fd: int = -1
    connect_prefix: str = ""


class _VmConfigFields(NamedTuple):
    kernel: str
    initrd: str | None = None
    cmdline: str = ""
    mem_mib: int = 128
    cpus: int = 1
    serial: str = "stdio"  # "stdio", "none", or a file path
    boot_protocol: str = "auto"  # auto | linux | pvh
    drives: tuple[DriveConfig, ...] = ()
    nets: tuple[NetConfig, ...] = ()
    rng: bool = False
    expected_digest: str | None = None
    vsock: VsockConfig | None = None


class VmConfig(_VmConfigFields):
    """A validated VM configuration. Construction raises ConfigError on any bad value; so does _replace."""

    __slots__ = ()

    def __new__(cls, *args: Any, **kwargs: Any) -> VmConfig:
        self = super().__new__(cls, *args, **kwargs)
        self._validate()
        return self

    def _replace(self, **changes: Any) -> VmConfig:
        return type(self)(**{**self._asdict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts/lists (JSON-ready), drives and NICs included."""
        d = self._asdict()
        d["drives"] = [{**x._asdict(), "rate": x.rate._asdict()} for x in self.drives]
        d["nets"] = [{**x._asdict(), "rate": x.rate._asdict()} for x in self.nets]
        d["vsock"] = self.vsock._asdict() if self.vsock else None
        return d

    def _validate(self) -> None:
        if not self.kernel:
            raise ConfigError("a kernel image is required (--kernel PATH)")
        if not MIN_MEM_MIB <= self.mem_mib <= MAX_MEM_MIB:
            raise ConfigError(f"--mem must be between {MIN_MEM_MIB} and {MAX_MEM_MIB} MiB, not {self.mem_mib}")
        if not 1 <= self.cpus <= MAX_CPUS:
            raise ConfigError(f"--cpus must be between 1 and {MAX_CPUS}, not {self.cpus}")
        if len(self.cmdline.encode()) >= MAX_CMDLINE:
            raise ConfigError(
                f"--cmdline is too long ({len(self.cmdline.encode())} bytes, limit {MAX_CMDLINE - 1})"
            )
        if "\x00" in self.cmdline:
            raise ConfigError("--cmdline must not contain NUL bytes")
        if self.boot_protocol not in BOOT_PROTOCOLS:
            raise ConfigError(f"--boot must be {_PROTOCOL_LIST}, not {self.boot_protocol!r}")
        if not self.serial:
            raise ConfigError("--serial must be stdio, none or a file path")
        if self.vsock is not None and not 3 <= self.vsock.guest_cid < 0xFFFF_FFFF:
            raise ConfigError(f"--vsock cid= must be between 3 and {0xFFFF_FFFF - 1}, not {self.vsock.guest_cid}")

    @property
    def mem_bytes(self) -> int:
        return self.mem_mib << 20


def _parse_rate(opts: dict[str, str], what: str) -> RateLimit:
    try:
        bw = int(opts.pop("bw", "0"))
        ops = int(opts.pop("iops", opts.pop("ops", "0")))
    except ValueError:
        raise ConfigError(f"{what}: bw= and iops= take integers") from None
    if bw < 0 or ops < 0:
        raise ConfigError(f"{what}: rate limits must not be negative")
    return RateLimit(bw, ops)


def _split_opts(spec: str, what: str) -> tuple[str, dict[str, str], set[str]]:
    parts = spec.split(",")
    head, opts, flags = parts[0], {}, set()
    for p in parts[1:]:
        if not p:
            raise ConfigError(f"{what} {spec!r}: empty option")
        if "=" in p:
            k, v = p.split("=", 1)
            opts[k] = v
        else:
            flags.add(p)
    return head, opts, flags


def parse_drive(spec: str) -> DriveConfig:
    """`path[,ro][,id=NAME][,bw=BYTES_PER_S][,iops=N]` -> DriveConfig."""
    path, opts, flags = _split_opts(spec, "--drive")
    if not path:
        raise ConfigError("--drive needs a path")
    ro = False
    if flags - {"ro", "rw"}:
        raise ConfigError(f"--drive {spec!r}: unknown option(s) {', '.join(sorted(flags - {'ro', 'rw'}))}")
    ro = "ro" in flags
    drive_id = opts.pop("id", "")
    if len(drive_id.encode()) > 20:
        raise ConfigError("--drive id= is at most 20 bytes (virtio-blk serial)")
    rate = _parse_rate(opts, "--drive")
    if opts:
        raise ConfigError(f"--drive {spec!r}: unknown option(s) {', '.join(sorted(opts))}")
    return DriveConfig(path, ro, drive_id, rate)


def parse_net(spec: str) -> NetConfig:
    """`tap=NAME[,mac=aa:bb:cc:dd:ee:ff][,bw=..][,ops=..]` -> NetConfig."""
    _, opts, flags = _split_opts("," + spec, "--net")
    if flags:
        raise ConfigError(f"--net {spec!r}: unknown option(s) {', '.join(sorted(flags))}")
    tap = opts.pop("tap", "")
    if not _TAP_RE.match(tap):
        raise ConfigError("--net needs tap=NAME (1-15 characters: letters, digits, _ . -)")
    mac = opts.pop("mac", "")
    if mac and not _MAC_RE.match(mac):
        raise ConfigError(f"--net mac={mac!r} is not a MAC address like 52:54:00:12:34:56")
    if mac and int(mac[:2], 16) & 1:
        raise ConfigError(f"--net mac={mac} is a multicast address")
    rate = _parse_rate(opts, "--net")
    if opts:
        raise ConfigError(f"--net {spec!r}: unknown option(s) {', '.join(sorted(opts))}")
    return NetConfig(tap, mac.lower(), rate)


def parse_vsock(spec: str) -> VsockConfig:
    """`PATH[,cid=N]` -> VsockConfig (cid 3 by default)."""
    path, opts, flags = _split_opts(spec, "--vsock")
    if not path or "\x00" in path:
        raise ConfigError("--vsock needs a unix socket path")
    if len(path.encode()) > 90:  # sun_path is 108 bytes; leave room for "_<port>"
        raise ConfigError(f"--vsock path is too long ({len(path.encode())} bytes, at most 90)")
    if flags:
        raise ConfigError(f"--vsock {spec!r}: unknown option(s) {', '.join(sorted(flags))}")
    try:
        cid = int(opts.pop("cid", "3"), 0)
    except ValueError:
        raise ConfigError("--vsock cid= takes an integer") from None
    if opts:
        raise ConfigError(f"--vsock {spec!r}: unknown option(s) {', '.join(sorted(opts))}")
    return VsockConfig(path, cid)


def vsock_of(spec: Any) -> VsockConfig | None:
    """The VsockConfig of a daemon VmSpec (duck-typed: its `vsock` is (socket path, guest CID) or None),
    so that both backends and the daemon's launch measurement build the same device."""
    v = getattr(spec, "vsock", None)
    return VsockConfig(str(v[0]), int(v[1])) if v else None
