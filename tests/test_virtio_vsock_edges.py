"""virtio-vsock at its edges (issue 15): the boundaries and orders the mutation check found untested.

virtio 1.2 §5.10.6.3 (flow control): every packet carries buf_alloc and fwd_cnt; a sender "MUST only"
send RW payload the peer has room for, and a receiver tells the peer about freed space with
VIRTIO_VSOCK_OP_CREDIT_UPDATE. §5.10.6.5 (shutdown): SHUTDOWN flags are hints, RST ends a stream and is
never answered with an RST. Here: the credit we grant is accepted exactly and refused one byte past, a
header's `len` one byte past what the chain carries is refused (CVE-2019-18960's class), a credit update
is sent once the guest's bytes we forwarded reach the threshold (Firecracker's
CONN_CREDIT_UPDATE_THRESHOLD) and not one byte before, the host socket drains when it becomes writable,
and the host-port allocator wraps to its base and never reuses a live (host port, guest port) pair.
(A host half-close still taking the guest's last bytes: test_virtio_vsock.py's EOF test.)
"""

from __future__ import annotations

import pytest
from tests.test_virtio_vsock import CID, Rig, hdr, mem  # noqa: F401  (mem: the fixture)

from bulkhead.devices.virtio.vsock import (
    BUF_ALLOC,
    CREDIT_UPDATE_THRESHOLD,
    HDR_SIZE,
    HOST_CID,
    OP,
    TYPE_STREAM,
    U32,
    Connection,
    ConnState,
    Header,
    check_guest_cid,
    parse_connect_line,
    rst_for,
)
from bulkhead.devices.virtio.vsock_device import FIRST_LOCAL_PORT


def test_a_new_connection_grants_nothing_and_owes_no_credit_update():
    """Before the peer's first header we know no buf_alloc: no byte may be sent (§5.10.6.3)."""
    c = Connection(80, 5000, ConnState.LOCAL_INIT)
    assert c.peer_free() == 0 and not c.wants_rx()
    assert c.credit_update_due is False
    c.forwarded(CREDIT_UPDATE_THRESHOLD - 1)
    assert c.credit_update_due is False  # one byte short of the threshold
    c.forwarded(1)
    assert c.credit_update_due is True
    h = c.header(CID, OP.CREDIT_UPDATE)  # announcing our credit clears it
    assert (h.fwd_cnt, h.buf_alloc, c.credit_update_due) == (CREDIT_UPDATE_THRESHOLD, BUF_ALLOC, False)
    c.forwarded(CREDIT_UPDATE_THRESHOLD - 1)  # counted from the last announced fwd_cnt, not from 0
    assert c.credit_update_due is False


def test_the_credit_threshold_counts_across_u32_wraparound():
    c = Connection(80, 5000, ConnState.ESTABLISHED)
    c.fwd_cnt = c.last_fwd_cnt_sent = U32 - 9  # 10 bytes before fwd_cnt wraps
    c.forwarded(CREDIT_UPDATE_THRESHOLD)
    assert c.fwd_cnt == CREDIT_UPDATE_THRESHOLD - 10 and c.credit_update_due is True


def test_the_granted_credit_is_accepted_exactly_and_refused_one_byte_past(mem):  # noqa: F811
    """The guest may fill our whole buf_alloc while the host socket takes nothing; one byte more resets."""
    r = Rig(mem)
    s = r.connect()
    s.capacity = 0
    chunk = 64 << 10
    for _ in range(BUF_ALLOC // chunk):
        r.send(hdr(OP.RW, length=chunk), bytes(chunk))
    conn = r.dev.conns[(80, 5000)]
    assert len(conn.pending) == BUF_ALLOC and r.dev.stats.get("credit_violation", 0) == 0 and not s.closed
    r.send(hdr(OP.RW, length=1), b"x")
    assert r.dev.conns == {} and s.closed and r.dev.stats.get("credit_violation", 0) == 1
    r.give_rx(1)
    assert [h.op for h, _ in r.packets()] == [OP.RST]


def test_len_one_byte_past_the_chain_is_refused_and_exactly_the_chain_is_taken(mem):  # noqa: F811
    """CVE-2019-18960's class at its boundary: `len` = payload + 1 must not be read past the chain."""
    r = Rig(mem)
    s = r.connect()
    r.send(hdr(OP.RW, length=8), b"12345678")  # exactly what the chain carries
    assert bytes(s.received) == b"12345678"
    r.send(hdr(OP.RW, length=9), b"abcdefgh")  # one byte more than the chain carries
    assert bytes(s.received) == b"12345678" and s.closed and r.dev.conns == {}
    assert r.dev.stats.get("tx_invalid", 0) == 1
    r.give_rx(1)
    assert [h.op for h, _ in r.packets()] == [OP.RST]


def test_a_credit_update_is_sent_once_the_threshold_is_forwarded(mem):  # noqa: F811
    """§5.10.6.3: a sender blocked on our credit waits for CREDIT_UPDATE; we send one when the bytes we
    passed to the host since our last announcement reach CREDIT_UPDATE_THRESHOLD, not a byte earlier."""
    r = Rig(mem)
    s = r.connect()
    chunk = 64 << 10
    sent = 0
    while sent + chunk < CREDIT_UPDATE_THRESHOLD:
        r.send(hdr(OP.RW, length=chunk), bytes(chunk))
        sent += chunk
    rest = CREDIT_UPDATE_THRESHOLD - sent
    r.send(hdr(OP.RW, length=rest - 1), bytes(rest - 1))
    r.give_rx(1)
    assert r.packets() == []  # one byte short: nothing to announce, the RX buffer stays with us
    r.send(hdr(OP.RW, length=1), b"!")
    assert len(s.received) == CREDIT_UPDATE_THRESHOLD
    ((h, data),) = r.packets()
    assert (h.op, h.fwd_cnt, h.buf_alloc, data) == (OP.CREDIT_UPDATE, CREDIT_UPDATE_THRESHOLD, BUF_ALLOC, b"")
    assert (h.src_port, h.dst_port, h.dst_cid) == (80, 5000, CID)


def test_the_host_socket_drains_when_it_becomes_writable(mem):  # noqa: F811
    r = Rig(mem)
    s = r.connect()
    s.capacity = 3  # the host socket takes 3 bytes, then its buffer is full
    r.send(hdr(OP.RW, length=10), b"0123456789")
    assert bytes(s.received) == b"012" and r.be.watching[s.fd] is True  # watched for writability
    s.capacity = 1 << 20
    r.be.writable.append(s.fd)
    r.host_ready()
    assert bytes(s.received) == b"0123456789" and r.be.watching[s.fd] is False
    assert r.dev.conns[(80, 5000)].fwd_cnt == 10


def test_guest_rst_is_never_answered_with_rst(mem):  # noqa: F811
    r = Rig(mem)
    s = r.connect()
    r.send(hdr(OP.RST))
    assert s.closed and r.dev.conns == {} and r.dev.stats.get("rst_sent", 0) == 0
    r.give_rx(2)
    assert r.packets() == [] and not r.dev.control


def test_rx_packets_and_bytes_are_counted(mem):  # noqa: F811
    r = Rig(mem)
    s = r.connect()  # the RESPONSE: one control packet, no payload
    assert (r.dev.stats.get("rx_packets", 0), r.dev.stats.get("rx_bytes", 0)) == (1, 0)
    s.inbox += b"hello"
    r.be.readable.append(s.fd)
    r.host_ready()
    r.give_rx(1)
    ((h, data),) = r.packets()
    assert (h.op, data) == (OP.RW, b"hello")
    assert (r.dev.stats.get("rx_packets", 0), r.dev.stats.get("rx_bytes", 0)) == (2, 5)


def test_host_ports_are_consecutive_and_wrap_to_the_base_never_reusing_a_live_pair(mem):  # noqa: F811
    r = Rig(mem)
    streams = [r.be.host_connect(52), r.be.host_connect(52)]
    r.host_ready()
    r.give_rx(2)
    assert [(h.op, h.src_port, h.dst_port) for h, _ in r.packets()] == [
        (OP.REQUEST, FIRST_LOCAL_PORT, 52), (OP.REQUEST, FIRST_LOCAL_PORT + 1, 52)]
    assert not any(s.closed for s in streams)
    # after 3 billion host streams the counter reaches U32: the next port is the base again, skipping
    # (FIRST_LOCAL_PORT, 52) and (FIRST_LOCAL_PORT + 1, 52), which are still live
    r.dev.next_port = U32
    r.be.host_connect(52)
    r.be.host_connect(52)
    r.be.host_connect(7)
    r.host_ready()
    r.give_rx(3)
    got = [(h.op, h.src_port, h.dst_port) for h, _ in r.packets()]
    assert got == [(OP.REQUEST, U32, 52), (OP.REQUEST, FIRST_LOCAL_PORT + 2, 52), (OP.REQUEST, FIRST_LOCAL_PORT + 3, 7)]
    assert len(r.dev.conns) == 5


def test_an_rst_for_an_unknown_stream_is_not_answered(mem):  # noqa: F811
    r = Rig(mem)
    r.send(hdr(OP.RST, src_port=4444, dst_port=4445))
    r.send(hdr(OP.RST, src_port=4444, dst_port=4445, type_=2))  # invalid too: still no RST for an RST
    r.give_rx(2)
    assert r.packets() == [] and r.dev.stats.get("rst_sent", 0) == 0 and r.dev.stats.get("tx_invalid", 0) == 1


def test_header_round_trip_is_the_44_byte_layout():
    """§5.10.6: le64 src_cid, le64 dst_cid, le32 src_port, le32 dst_port, le32 len, le16 type, le16 op,
    le32 flags, le32 buf_alloc, le32 fwd_cnt."""
    h = Header(3, 2, 0x01020304, 0x05060708, 9, 1, 5, 2, 0x10000, 0xFFFFFFFF)
    raw = h.pack()
    assert len(raw) == HDR_SIZE
    assert raw.hex() == ("0300000000000000" "0200000000000000" "04030201" "08070605" "09000000" "0100" "0500"
                         "02000000" "00000100" "ffffffff")


def test_guest_cid_bounds():
    """§5.10.4: 0, 1 and 2 are reserved and U32 is VMADDR_CID_ANY; 3 and U32 - 1 are the extremes."""
    assert check_guest_cid(3) == 3 and check_guest_cid(U32 - 1) == U32 - 1
    for bad in (0, 1, 2, U32, U32 + 1):
        with pytest.raises(ValueError, match=f"between 3 and {U32 - 1}, not {bad}$"):
            check_guest_cid(bad)


def test_connect_line_length_and_digit_limits():
    """Firecracker's `CONNECT <port>\\n`: the line is at most 32 bytes (whitespace around the port
    allowed) and the port at most 10 digits, leading zeros counted."""
    pad = b"CONNECT " + b" " * 21 + b"52\n"
    assert len(pad) == 32 and parse_connect_line(pad) == 52
    assert parse_connect_line(b"CONNECT " + b" " * 22 + b"52\n") is None  # 33 bytes
    assert parse_connect_line(b"CONNECT 0000000052\n") == 52  # 10 digits
    assert parse_connect_line(b"CONNECT 00000000052\n") is None  # 11 digits, though the value is small


def test_one_byte_of_guest_credit_still_moves_data(mem):  # noqa: F811
    """§5.10.6.3 at its smallest: buf_alloc 1 lets exactly one payload byte through per credit update."""
    r = Rig(mem)
    r.send(hdr(OP.REQUEST, buf_alloc=1))
    r.give_rx(1)
    r.packets()
    s = r.be.connected[-1]
    s.inbox += b"ab"
    r.be.readable.append(s.fd)
    r.host_ready()
    r.give_rx(2)
    assert [d for _, d in r.packets()] == [b"a"]
    r.send(hdr(OP.CREDIT_UPDATE, buf_alloc=1, fwd_cnt=1))
    assert [d for _, d in r.packets()] == [b"b"]


def test_host_data_waits_for_the_backend_to_report_the_socket_readable(mem):  # noqa: F811
    r = Rig(mem)
    s = r.connect()
    s.inbox += b"early"  # bytes in the host socket, but the backend has not reported it readable
    r.give_rx(2)
    assert r.packets() == []
    r.be.readable.append(s.fd)
    r.host_ready()
    assert [(h.op, d) for h, d in r.packets()] == [(OP.RW, b"early")]


def test_rst_answer_is_the_exact_header(mem):  # noqa: F811
    """The RST for a refused REQUEST: host -> guest, ports swapped, len, flags and credit all 0."""
    r = Rig(mem, listeners=())
    r.send(hdr(OP.REQUEST, src_port=1234, dst_port=81, buf_alloc=777, fwd_cnt=55, flags=3))
    r.give_rx(1)
    ((h, data),) = r.packets()
    assert h == Header(HOST_CID, CID, 81, 1234, 0, TYPE_STREAM, OP.RST, 0, 0, 0) and data == b""
    assert h == rst_for(Header(CID, HOST_CID, 1234, 81, 0, TYPE_STREAM, OP.REQUEST, 3, 777, 55), CID)
