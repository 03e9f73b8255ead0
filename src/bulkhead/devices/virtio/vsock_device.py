"""virtio-vsock device (virtio 1.2 §5.10, device id 19) over a host backend (Firecracker's muxer model).

Queues (§5.10.2): 0 rx (host -> guest, device-writable chains), 1 tx (guest -> host, device-readable
chains), 2 event (never used: no VIRTIO_VSOCK_EVENT_TRANSPORT_RESET is sent; snapshots of vsock
are not supported). Config space (§5.10.4): `guest_cid` u64.

The backend (`VsockBackend`, `runtime/vsock.py` at run time) owns the host's sockets; this module only
calls it. Host-initiated streams arrive from `backend.poll()` with the guest port the host asked for
(`CONNECT <port>`); guest-initiated ones go to `backend.connect(port)`. What the guest may do:
- a TX chain with device-writable parts or shorter than the header is dropped (used length 0) and
  counted (`tx_malformed`): its header cannot be trusted enough to answer;
- a header failing `vsock.parse_header` (type, cid, op, len) is answered with RST, and resets the
  connection it names (`tx_invalid`);
- RW beyond the credit we granted resets the connection (`credit_violation`): host-side buffering
  never exceeds BUF_ALLOC per connection, MAX_CONNECTIONS per device;
- control packets to the guest wait in a queue of at most MAX_CONTROL (`control_dropped` beyond);
- RX chains with device-readable parts or smaller than the header are a GuestFault (as virtio-net).
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence
from typing import Protocol

from bulkhead.devices.virtio.device import PollCallback, VirtioDevice
from bulkhead.devices.virtio.faults import FaultReason, VirtioFault
from bulkhead.devices.virtio.queue import DescriptorChain, Queue, gather, scatter
from bulkhead.devices.virtio.vsock import (
    FLAG_SHUTDOWN_RCV,
    FLAG_SHUTDOWN_SEND,
    HDR,
    HDR_SIZE,
    MAX_CONNECTIONS,
    MAX_PKT_LEN,
    OP,
    U32,
    Connection,
    ConnState,
    Header,
    HeaderError,
    check_guest_cid,
    format_ok_line,
    parse_header,
    rst_for,
)
from bulkhead.memory import GuestMemory

__all__ = [
    "DEVICE_ID_VSOCK",
    "EVENTQ",
    "MAX_CONTROL",
    "RXQ",
    "TXQ",
    "VsockBackend",
    "VsockDevice",
    "VsockStream",
    "declare_surfaces",
]

DEVICE_ID_VSOCK = 19
RXQ, TXQ, EVENTQ = 0, 1, 2
QUEUE_SIZE = 256
MAX_CONTROL = 256
MAX_CHAIN_BYTES = HDR_SIZE + MAX_PKT_LEN + 4096
FIRST_LOCAL_PORT = 1 << 30  # Firecracker's muxer allocates host ports for host-initiated streams from here


class VsockStream(Protocol):
    """One host-side stream socket (non-blocking)."""

    def fileno(self) -> int: ...

    def recv(self, n: int) -> bytes | None:
        """Up to n bytes; b"" at EOF; None when nothing is ready. Raises OSError."""
        ...

    def send(self, data: bytes) -> int:
        """Bytes the socket took (0 when it would block). Raises OSError."""
        ...

    def shutdown_write(self) -> None: ...

    def close(self) -> None: ...


class VsockBackend(Protocol):
    def fileno(self) -> int:
        """One fd that is readable whenever poll() has something (an epoll fd at run time)."""
        ...

    def poll(self) -> tuple[Sequence[tuple[VsockStream, int]], list[int], list[int]]:
        """(new host streams with the guest port they asked for, readable fds, writable fds)."""
        ...

    def connect(self, port: int) -> VsockStream | None:
        """A stream to the host listener of guest-initiated `port`, or None (nobody listens)."""
        ...

    def watch(self, stream: VsockStream, *, write: bool) -> None:
        """Watch `stream` for readability, and for writability too when `write`."""
        ...

    def forget(self, stream: VsockStream) -> None:
        """Stop watching and close `stream`."""
        ...


class VsockDevice(VirtioDevice):
    """virtio-vsock for a guest of cid `guest_cid` (3..2**32-2)."""

    device_id = DEVICE_ID_VSOCK
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, backend: VsockBackend, guest_cid: int, *, name: str = "virtio-vsock") -> None:
        super().__init__()
        self.backend = backend
        self.guest_cid = check_guest_cid(guest_cid)
        self.name = name
        self.conns: dict[tuple[int, int], Connection] = {}
        self.streams: dict[tuple[int, int], VsockStream] = {}
        self.by_fd: dict[int, tuple[int, int]] = {}
        self.control: deque[Header] = deque()
        self.next_port = FIRST_LOCAL_PORT

    def make_queues(self) -> list[Queue]:
        return [Queue(QUEUE_SIZE, max_chain_bytes=MAX_CHAIN_BYTES) for _ in range(3)]

    def config_bytes(self) -> bytes:
        """virtio_vsock_config (§5.10.4): le64 guest_cid."""
        return struct.pack("<Q", self.guest_cid)

    def reset(self) -> None:
        super().reset()
        for conn in list(self.conns.values()):
            self._kill(conn, rst=False)
        self.control.clear()

    def poll_fds(self) -> list[tuple[int, PollCallback]]:
        return [(self.backend.fileno(), self.on_backend_ready)]

    def process_queue(self, index: int) -> None:
        if not self.active or self.mem is None:
            return
        if index == TXQ:
            self._tx()
        if index in (RXQ, TXQ):
            self._rx()

    # -- host side ------------------------------------------------------------------------------------

    def activate(self, mem: GuestMemory, queues: list[Queue], features: int) -> None:
        super().activate(mem, queues, features)
        self.on_backend_ready()  # host streams that arrived before DRIVER_OK waited in the backend

    def on_backend_ready(self) -> None:
        """New host streams, readable or writable host sockets. Before DRIVER_OK nothing is taken from the
        backend (host connections wait in its listen backlog, as Firecracker's muxer does)."""
        if not self.active:
            return
        accepted, readable, writable = self.backend.poll()
        for stream, port in accepted:
            if len(self.conns) >= MAX_CONNECTIONS:
                self.count("conn_limit")
                self.backend.forget(stream)
                continue
            conn = Connection(self._alloc_port(port), port, ConnState.LOCAL_INIT)
            self._register(conn, stream, write=False)
            self._control(conn.header(self.guest_cid, OP.REQUEST))
        for fd in readable:
            key = self.by_fd.get(fd)
            if key is not None:
                self.conns[key].host_readable = True
        for fd in writable:
            key = self.by_fd.get(fd)
            if key is not None:
                self._flush(self.conns[key])
        if self.mem is not None:
            self._rx()

    def _alloc_port(self, peer_port: int) -> int:
        for _ in range(MAX_CONNECTIONS + 1):
            port, self.next_port = self.next_port, (self.next_port + 1) & U32 or FIRST_LOCAL_PORT
            if (port, peer_port) not in self.conns:
                return port
        raise AssertionError("unreachable: fewer than MAX_CONNECTIONS ports are in use")

    def _register(self, conn: Connection, stream: VsockStream, *, write: bool) -> None:
        self.conns[conn.key] = conn
        self.streams[conn.key] = stream
        self.by_fd[stream.fileno()] = conn.key
        self.backend.watch(stream, write=write)

    def _kill(self, conn: Connection, *, rst: bool) -> None:
        stream = self.streams.pop(conn.key, None)
        self.conns.pop(conn.key, None)
        if stream is not None:
            self.by_fd.pop(stream.fileno(), None)
            self.backend.forget(stream)
        conn.state = ConnState.DEAD
        if rst:
            self._control(conn.header(self.guest_cid, OP.RST))

    def _control(self, h: Header) -> None:
        if len(self.control) >= MAX_CONTROL:
            self.count("control_dropped")
            return
        if h.op == OP.RST:
            self.count("rst_sent")
        self.control.append(h)

    def _flush(self, conn: Connection) -> None:
        """Pending guest bytes -> the host socket, as far as it takes them."""
        stream = self.streams[conn.key]
        try:
            n = stream.send(bytes(conn.pending)) if conn.pending else 0
        except OSError:
            self.count("host_errors")
            self._kill(conn, rst=True)
            return
        del conn.pending[:n]
        conn.forwarded(n)
        self.backend.watch(stream, write=bool(conn.pending))
        if n and conn.peer_shut_send and not conn.pending:
            self._shut_host_write(conn)  # the guest shut its send side earlier: EOF once its bytes are out

    def _shut_host_write(self, conn: Connection) -> None:
        """virtio 1.2 5.10.6.5: the peer will send no more; the host socket reads EOF."""
        try:
            self.streams[conn.key].shutdown_write()
        except OSError:
            pass

    # -- TX: guest -> host ----------------------------------------------------------------------------

    def _tx(self) -> None:
        assert self.mem is not None
        q, mem = self.queues[TXQ], self.mem
        if not q.ready or q.broken:
            return
        while True:
            chain = q.pop(mem)
            if chain is None:
                if q.enable_notification(mem):
                    continue
                return
            self._tx_one(mem, chain)
            q.add_used(mem, chain.head, 0)

    def _tx_one(self, mem: GuestMemory, chain: DescriptorChain) -> None:
        if chain.write_len or chain.read_len < HDR_SIZE:
            self.count("tx_malformed")
            return
        raw = gather(mem, chain.readable, 0, HDR_SIZE)
        try:
            h = parse_header(raw, guest_cid=self.guest_cid, available=chain.read_len - HDR_SIZE)
        except HeaderError:
            self.count("tx_invalid")
            bad = Header(*HDR.unpack(raw))
            conn = self.conns.get((bad.dst_port, bad.src_port))
            if conn is not None:
                self._kill(conn, rst=False)
            if bad.op != OP.RST:  # never answer an RST with an RST
                self._control(rst_for(bad, self.guest_cid))
            return
        self.count("tx_packets")
        conn = self.conns.get((h.dst_port, h.src_port))
        if conn is not None:
            conn.update_peer_credit(h)
        if h.op == OP.REQUEST:
            self._on_request(h, conn)
        elif conn is None:
            if h.op != OP.RST:
                self._control(rst_for(h, self.guest_cid))
        elif h.op == OP.RESPONSE:
            self._on_response(conn)
        elif h.op == OP.RST:
            self._kill(conn, rst=False)
        elif h.op == OP.SHUTDOWN:
            self._on_shutdown(conn, h.flags)
        elif h.op == OP.RW:
            self._on_rw(mem, chain, conn, h.len)
        elif h.op == OP.CREDIT_REQUEST:
            conn.credit_update_due = True
        # CREDIT_UPDATE: the credit was taken above; delivery resumes in _rx

    def _on_request(self, h: Header, conn: Connection | None) -> None:
        if conn is not None:  # a second REQUEST for a live stream: both ends start over
            self._kill(conn, rst=True)
            return
        if len(self.conns) >= MAX_CONNECTIONS:
            self.count("conn_limit")
            self._control(rst_for(h, self.guest_cid))
            return
        try:
            stream = self.backend.connect(h.dst_port)
        except OSError:
            stream = None
        if stream is None:
            self.count("connect_refused")
            self._control(rst_for(h, self.guest_cid))
            return
        conn = Connection(h.dst_port, h.src_port, ConnState.ESTABLISHED)
        conn.update_peer_credit(h)
        self._register(conn, stream, write=False)
        self._control(conn.header(self.guest_cid, OP.RESPONSE))

    def _on_response(self, conn: Connection) -> None:
        if conn.state is not ConnState.LOCAL_INIT:
            self._kill(conn, rst=True)
            return
        conn.state = ConnState.ESTABLISHED
        conn.pending += format_ok_line(conn.local_port)
        self._flush(conn)
        # the OK line is ours, not the guest's: it does not count as forwarded guest payload
        conn.fwd_cnt = conn.last_fwd_cnt_sent = 0
        conn.credit_update_due = False

    def _on_shutdown(self, conn: Connection, flags: int) -> None:
        conn.peer_shut_send |= bool(flags & FLAG_SHUTDOWN_SEND)
        conn.peer_shut_rcv |= bool(flags & FLAG_SHUTDOWN_RCV)
        if conn.peer_shut_send and conn.peer_shut_rcv:
            self._kill(conn, rst=True)  # §5.10.6.5: the peer closed both ways; RST ends the stream
        elif conn.peer_shut_send and not conn.pending:
            self._shut_host_write(conn)

    def _on_rw(self, mem: GuestMemory, chain: DescriptorChain, conn: Connection, n: int) -> None:
        if conn.state not in (ConnState.ESTABLISHED, ConnState.CLOSING) or conn.peer_shut_send:
            self._kill(conn, rst=True)
            return
        if not conn.accept_from_peer(n):
            self.count("credit_violation")
            self._kill(conn, rst=True)
            return
        conn.pending += gather(mem, chain.readable, HDR_SIZE, n)
        self.count("tx_bytes", n)
        self._flush(conn)

    # -- RX: host -> guest ----------------------------------------------------------------------------

    def _rx(self) -> None:
        assert self.mem is not None
        q, mem = self.queues[RXQ], self.mem
        if not q.ready or q.broken:
            return
        while True:
            if not self.control:
                self._queue_credit_updates()
            if not self.control and not any(c.wants_rx() for c in self.conns.values()):
                return
            chain = q.pop(mem)
            if chain is None:
                if q.enable_notification(mem):
                    continue
                self.count("rx_no_buffers")
                return
            if chain.read_len:
                raise VirtioFault(FaultReason.VSOCK_RX_READABLE,
                                  "virtio-vsock RX chain has device-readable buffers", device=self.name)
            if chain.write_len < HDR_SIZE:
                raise VirtioFault(FaultReason.VSOCK_RX_SHORT,
                                  "virtio-vsock RX chain is smaller than the 44-byte header", device=self.name)
            n = self._rx_one(mem, chain)
            if n is None:
                q.undo_pop()
                continue
            q.add_used(mem, chain.head, n)

    def _queue_credit_updates(self) -> None:
        for conn in self.conns.values():
            if conn.credit_update_due and conn.state is not ConnState.LOCAL_INIT:
                self._control(conn.header(self.guest_cid, OP.CREDIT_UPDATE))

    def _rx_one(self, mem: GuestMemory, chain: DescriptorChain) -> int | None:
        """Fill one RX chain; its used length, or None to give the chain back (nothing was ready)."""
        if self.control:
            h = self.control.popleft()
            scatter(mem, chain.writable, 0, h.pack())
            self.count("rx_packets")
            return HDR_SIZE
        conn = next(c for c in self.conns.values() if c.wants_rx())
        room = min(conn.peer_free(), chain.write_len - HDR_SIZE, MAX_PKT_LEN)
        try:
            data = self.streams[conn.key].recv(room) if room else None
        except OSError:
            self.count("host_errors")
            self._kill(conn, rst=True)
            return None
        if data is None:
            conn.host_readable = False
            return None
        if not data:  # host closed: tell the guest both directions are done, wait for its RST
            conn.host_readable = False
            conn.state = ConnState.CLOSING
            h = conn.header(self.guest_cid, OP.SHUTDOWN, flags=FLAG_SHUTDOWN_RCV | FLAG_SHUTDOWN_SEND)
            scatter(mem, chain.writable, 0, h.pack())
            self.count("rx_packets")
            return HDR_SIZE
        h = conn.header(self.guest_cid, OP.RW, len(data))
        scatter(mem, chain.writable, 0, h.pack() + data)
        conn.sent_to_peer(len(data))
        self.count("rx_packets")
        self.count("rx_bytes", len(data))
        return HDR_SIZE + len(data)


def declare_surfaces() -> None:
    """Declare virtio-vsock's guest-reachable entry points (see `bulkhead.surface`)."""
    from bulkhead.surface import declare

    declare(
        "virtio-queue",
        "virtio-vsock-txq",
        owner=__name__,
        boundary="guest-vmm",
        accepts="device-readable chains: 44-byte virtio_vsock_hdr (type STREAM, src_cid = guest cid, dst_cid 2, "
        "len <= 64 KiB and <= the chain's bytes) + payload; invalid headers -> RST, credit overrun -> RST, "
        "malformed chains dropped and counted",
        handler="VsockDevice._tx",
        fuzz="fuzz/fuzz_vsock.py",
        spec="virtio 1.2 section 5.10",
    )
    declare(
        "virtio-queue",
        "virtio-vsock-rxq",
        owner=__name__,
        boundary="guest-vmm",
        accepts="device-writable chains of at least 44 bytes, filled with one packet each within the guest's "
        "credit; readable parts or short chains -> GuestFault",
        handler="VsockDevice._rx",
        fuzz="fuzz/fuzz_vsock.py",
        spec="virtio 1.2 section 5.10",
    )
    declare(
        "virtio-config",
        "virtio-vsock-config",
        owner=__name__,
        boundary="guest-vmm",
        accepts="reads of le64 guest_cid; writes are refused and counted",
        handler="VirtioDevice.read_config",
    )
