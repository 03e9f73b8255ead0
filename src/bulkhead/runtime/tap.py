"""Tap devices for virtio-net: the only module that opens /dev/net/tun.

A tap is opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, the vnet header size is set to 12 bytes
(virtio_net_hdr_v1) and all offloads are turned off (TUNSETOFFLOAD 0: the device offers none, so the
host kernel never hands the guest a GSO or partially-checksummed frame). The fd is non-blocking and
close-on-exec. An already-open tap fd (passed in by the jailer) is accepted after checking with
TUNGETIFF that it really is a tap with exactly those flags.

`FdFrameBackend` implements `bulkhead.devices.virtio.net.NetBackend` with readv/writev on any
message-preserving fd (a tap, or a SOCK_SEQPACKET/SOCK_DGRAM socket in tests).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from bulkhead.errors import ConfigError, HostError

__all__ = ["FdFrameBackend", "TapBackend", "open_tap"]

TUNSETIFF = 0x4004_54CA
TUNGETIFF = 0x8004_54D2
TUNSETOFFLOAD = 0x4004_54D0
TUNSETVNETHDRSZ = 0x4004_54D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16
VNET_HDR_SIZE = 12
_IFREQ = struct.Struct("16sH22x")  # struct ifreq: name + flags, padded to 40 bytes
_WANT = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR


class FdFrameBackend:
    """Frames over a message-preserving, non-blocking fd. Owns the fd (close() closes it)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)

    def fileno(self) -> int:
        return self.fd

    def read_frame_into(self, views: list[memoryview]) -> int | None:
        """readv one frame straight into the views; None when nothing is queued.
        Raises OSError on errors other than EAGAIN/EINTR."""
        while True:
            try:
                return os.readv(self.fd, views)
            except BlockingIOError:
                return None
            except InterruptedError:
                continue

    def write_frame(self, views: list[memoryview]) -> None:
        """writev one frame. Raises OSError (EAGAIN when the host queue is full: the frame is lost,
        as on a real wire)."""
        while True:
            try:
                os.writev(self.fd, views)
                return
            except InterruptedError:
                continue

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class TapBackend(FdFrameBackend):
    """A tap with a 12-byte vnet header. Build it with `open_tap(name)` or `TapBackend.adopt(fd)`."""

    def __init__(self, fd: int, name: str) -> None:
        super().__init__(fd)
        self.name = name

    @classmethod
    def adopt(cls, fd: int) -> TapBackend:
        """Accept an already-open tap fd. Raises ConfigError if it is not a tap with
        IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, HostError when it was a tap whose interface the host has
        since removed (TUNGETIFF answers EBADFD for a detached tun file: the host's doing, not the
        caller's configuration; issue 12 soak finding F)."""
        try:
            buf = bytearray(fcntl.ioctl(fd, TUNGETIFF, bytes(_IFREQ.size)))
        except OSError as exc:
            if exc.errno == errno.EBADFD:
                raise HostError(f"the tap behind fd {fd} was removed from the host") from None
            raise ConfigError(f"fd {fd} is not a tap device ({exc.strerror})") from None
        raw_name, flags = _IFREQ.unpack(buf)
        if flags & (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) != _WANT:
            raise ConfigError(f"fd {fd} is not a tap opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR")
        _configure(fd)
        fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
        return cls(fd, raw_name.rstrip(b"\0").decode(errors="replace"))


def _configure(fd: int) -> None:
    fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
    fcntl.ioctl(fd, TUNSETOFFLOAD, 0)


def open_tap(name: str) -> TapBackend:
    """Open (or attach to) tap `name`. Raises ConfigError for a bad name, HostError when the host
    refuses (no /dev/net/tun, no CAP_NET_ADMIN, the name is a non-tap interface)."""
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ or b"/" in raw or b"\0" in raw:
        raise ConfigError(f"tap name {name!r} must be 1-15 bytes without '/'")
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise HostError(f"cannot open /dev/net/tun: {exc.strerror}") from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(raw, _WANT))
        _configure(fd)
    except OSError as exc:
        os.close(fd)
        why = "permission denied (needs CAP_NET_ADMIN)" if exc.errno == errno.EPERM else exc.strerror
        raise HostError(f"cannot attach to tap {name!r}: {why}") from None
    return TapBackend(fd, name)
