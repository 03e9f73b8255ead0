"""virtio-vsock packets and connections (virtio 1.2 §5.10), pure: no I/O, no sockets, no clocks.

The 44-byte `struct virtio_vsock_hdr` (§5.10.6) is parsed and validated here; `Connection` is the
per-stream state machine with the credit accounting of §5.10.6.3 (buf_alloc / fwd_cnt, all counters u32
with wraparound), modelled on Firecracker's `csm/connection.rs`. The device (`vsock_device.py`) moves
packets between the virtqueues and a host backend (`runtime/vsock.py`, Firecracker's unix-socket muxer
model: `CONNECT <port>\\n` / `OK <host_port>\\n`, listeners at `<path>_<port>`).

Every number from the guest is hostile (Firecracker CVE-2019-18960 was a vsock length bug): the
header's `len` is checked against the bytes the descriptor chain really carries and against
`MAX_PKT_LEN`; `type` must be STREAM, `dst_cid` the host (2), `src_cid` the guest's own cid; a peer
that ignores our credit is reset instead of making the host buffer grow (`TX_BUF_SIZE` per
connection, `MAX_CONNECTIONS` per device).
"""

from __future__ import annotations

import struct
from enum import Enum
from typing import NamedTuple

__all__ = [
    "BUF_ALLOC",
    "CREDIT_UPDATE_THRESHOLD",
    "FLAG_SHUTDOWN_RCV",
    "FLAG_SHUTDOWN_SEND",
    "HDR",
    "HDR_SIZE",
    "HOST_CID",
    "MAX_CONNECTIONS",
    "MAX_PKT_LEN",
    "OP",
    "TYPE_STREAM",
    "U32",
    "ConnState",
    "Connection",
    "Header",
    "HeaderError",
    "check_guest_cid",
    "format_ok_line",
    "parse_connect_line",
    "parse_header",
    "rst_for",
]

HDR = struct.Struct("<QQIIIHHIII")  # src_cid dst_cid src_port dst_port len type op flags buf_alloc fwd_cnt
HDR_SIZE = HDR.size  # 44 (§5.10.6)
assert HDR_SIZE == 44

HOST_CID = 2  # §5.10.4: VMADDR_CID_HOST
TYPE_STREAM = 1  # §5.10.6: VIRTIO_VSOCK_TYPE_STREAM (SEQPACKET is not offered)
U32 = 0xFFFF_FFFF


class OP:
    """§5.10.6 operation codes."""

    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7
    ALL = frozenset(range(1, 8))


FLAG_SHUTDOWN_RCV = 1  # §5.10.6.5
FLAG_SHUTDOWN_SEND = 2
MAX_PKT_LEN = 64 << 10  # payload bytes per packet (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE)
BUF_ALLOC = 256 << 10  # our receive buffer per connection (Firecracker CONN_TX_BUF_SIZE)
CREDIT_UPDATE_THRESHOLD = BUF_ALLOC - (64 << 10)  # Firecracker CONN_CREDIT_UPDATE_THRESHOLD
MAX_CONNECTIONS = 64  # per device: 64 x 256 KiB = 16 MiB of host buffer at most
MAX_CID = (1 << 32) - 1  # §5.10.4: the upper 32 bits of guest_cid must be 0
MAX_CONNECT_LINE = 32  # "CONNECT 4294967295\n" is 19 bytes


class HeaderError(ValueError):
    """A header the host must answer with RST (or drop when it cannot be answered)."""


class Header(NamedTuple):
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int

    def pack(self) -> bytes:
        return HDR.pack(*self)


def check_guest_cid(cid: int) -> int:
    """§5.10.4: a guest cid is 3..2**32-2 (0, 1, 2 are reserved, U32 is VMADDR_CID_ANY). Raises ValueError."""
    if not 3 <= cid < MAX_CID:
        raise ValueError(f"guest cid must be between 3 and {MAX_CID - 1}, not {cid}")
    return cid


def parse_header(raw: bytes, *, guest_cid: int, available: int) -> Header:
    """Parse and validate a driver-sent header (§5.10.6). `available` is how many payload bytes the
    chain holds after the header. Raises HeaderError naming the violation."""
    if len(raw) != HDR_SIZE:
        raise HeaderError(f"header is {len(raw)} bytes, not {HDR_SIZE}")
    h = Header(*HDR.unpack(raw))
    if h.type != TYPE_STREAM:
        raise HeaderError(f"type {h.type} is not STREAM")
    if h.op not in OP.ALL:
        raise HeaderError(f"unknown op {h.op}")
    if h.src_cid != guest_cid:
        raise HeaderError(f"src_cid {h.src_cid} is not the guest's cid {guest_cid}")
    if h.dst_cid != HOST_CID:
        raise HeaderError(f"dst_cid {h.dst_cid} is not the host")
    if h.len > MAX_PKT_LEN:
        raise HeaderError(f"len {h.len} exceeds {MAX_PKT_LEN}")
    if h.len > available:
        raise HeaderError(f"len {h.len} exceeds the {available} bytes the chain carries")
    if h.op != OP.RW and h.len:
        raise HeaderError(f"op {h.op} carries {h.len} payload bytes")
    return h


def parse_connect_line(line: bytes) -> int | None:
    """`CONNECT <port>\\n` (Firecracker's host-initiated handshake) -> port; None when malformed."""
    if len(line) > MAX_CONNECT_LINE or not line.startswith(b"CONNECT ") or not line.endswith(b"\n"):
        return None
    digits = line[8:-1].strip()
    if not digits.isdigit() or len(digits) > 10:
        return None
    port = int(digits)
    return port if port <= U32 else None


def format_ok_line(host_port: int) -> bytes:
    return b"OK %d\n" % host_port


class ConnState(Enum):
    LOCAL_INIT = "local-init"  # host connected: REQUEST queued/sent, waiting for the guest's RESPONSE
    ESTABLISHED = "established"
    CLOSING = "closing"  # we sent SHUTDOWN (host side closed), waiting for the guest's RST
    DEAD = "dead"


class Connection:
    """One stream, keyed by (host port, guest port). Counters follow §5.10.6.3:
    - `rx_cnt`: payload bytes we sent to the guest; `peer_buf_alloc`/`peer_fwd_cnt`: the guest's credit.
    - `fwd_cnt`: guest payload bytes we passed to the host socket; `pending`: bytes the host socket has
      not taken yet (at most BUF_ALLOC: the credit we granted)."""

    def __init__(self, local_port: int, peer_port: int, state: ConnState) -> None:
        self.local_port = local_port & U32
        self.peer_port = peer_port & U32
        self.state = state
        self.rx_cnt = 0
        self.fwd_cnt = 0
        self.last_fwd_cnt_sent = 0
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.pending = bytearray()
        self.credit_update_due = False
        self.peer_shut_send = False  # the guest will send no more (SHUTDOWN SEND)
        self.peer_shut_rcv = False  # the guest takes no more (SHUTDOWN RCV)
        self.host_readable = False
        self.host_eof = False

    @property
    def key(self) -> tuple[int, int]:
        return (self.local_port, self.peer_port)

    # -- credit -----------------------------------------------------------------------------------

    def update_peer_credit(self, h: Header) -> None:
        """Every guest packet carries its buf_alloc and fwd_cnt (§5.10.6.3)."""
        self.peer_buf_alloc = h.buf_alloc & U32
        self.peer_fwd_cnt = h.fwd_cnt & U32

    def peer_free(self) -> int:
        """Bytes we may still send to the guest: buf_alloc - (rx_cnt - fwd_cnt), in u32 arithmetic. A peer
        whose fwd_cnt claims more than we sent, or that shrank buf_alloc, gets 0, never a huge credit."""
        in_flight = (self.rx_cnt - self.peer_fwd_cnt) & U32
        if in_flight > self.peer_buf_alloc:
            return 0
        return self.peer_buf_alloc - in_flight

    def sent_to_peer(self, n: int) -> None:
        self.rx_cnt = (self.rx_cnt + n) & U32

    def accept_from_peer(self, n: int) -> bool:
        """May the guest send `n` more payload bytes? False when it ignored our credit (the caller resets)."""
        return len(self.pending) + n <= BUF_ALLOC

    def forwarded(self, n: int) -> None:
        """`n` guest bytes reached the host socket."""
        self.fwd_cnt = (self.fwd_cnt + n) & U32
        if (self.fwd_cnt - self.last_fwd_cnt_sent) & U32 >= CREDIT_UPDATE_THRESHOLD:
            self.credit_update_due = True

    def header(self, guest_cid: int, op: int, length: int = 0, flags: int = 0) -> Header:
        """A host-to-guest header carrying our credit (which clears a due credit update)."""
        self.last_fwd_cnt_sent = self.fwd_cnt
        self.credit_update_due = False
        return Header(HOST_CID, guest_cid, self.local_port, self.peer_port, length, TYPE_STREAM, op, flags,
                      BUF_ALLOC, self.fwd_cnt)

    def wants_rx(self) -> bool:
        """Has host data to deliver and credit to deliver it with."""
        return (self.state is ConnState.ESTABLISHED and self.host_readable and not self.peer_shut_rcv
                and self.peer_free() > 0)


def rst_for(h: Header, guest_cid: int) -> Header:
    """The RST answering guest packet `h` (ports swapped)."""
    return Header(HOST_CID, guest_cid, h.dst_port, h.src_port, 0, TYPE_STREAM, OP.RST, 0, 0, 0)
