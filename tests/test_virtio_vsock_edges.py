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

from bulkhead.devices.virtio import mmio
from bulkhead.devices.virtio.vsock import (
    BUF_ALLOC,
    CREDIT_UPDATE_THRESHOLD,
    HDR_SIZE,
    HOST_CID,
    MAX_CONNECTIONS,
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
from bulkhead.devices.virtio.vsock_device import FIRST_LOCAL_PORT, RXQ, TXQ
from bulkhead.testing.vsock import FakeStream


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
    assert not s.shut_write  # drained bytes are no EOF: the guest has not shut its send side


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


# ---------------------------------------------------------------- the device: orders, errors, counters
class _Broken(FakeStream):
    """A host socket whose send and recv fail (the peer process died)."""

    def send(self, data: bytes) -> int:
        raise OSError("EPIPE")

    def recv(self, n: int) -> bytes | None:
        raise OSError("ECONNRESET")


def _stats(r: Rig, *keys: str) -> tuple[int, ...]:
    return tuple(r.dev.stats.get(k, 0) for k in keys)


def _ops(r: Rig) -> list[int]:
    return [h.op for h, _ in r.packets()]


def test_tx_chains_are_returned_with_used_length_0_and_counted(mem):  # noqa: F811
    """§2.7.8: the used length is what the device wrote; a TX chain is only read."""
    r = Rig(mem)
    s = r.connect()
    r.send(hdr(OP.RW, length=3), b"abc")
    assert [n for _, n in r.tx.used()] == [0, 0]
    assert _stats(r, "tx_packets", "tx_bytes") == (2, 3) and bytes(s.received) == b"abc"


def test_a_host_socket_failing_on_send_or_recv_resets_the_stream(mem):  # noqa: F811
    for op in ("send", "recv"):
        r = Rig(mem)
        r.connect()
        conn = r.dev.conns[(80, 5000)]
        bad = _Broken(80)
        r.dev.streams[conn.key] = bad  # the host peer died behind the stream
        r.dev.by_fd[bad.fd] = conn.key
        if op == "send":
            r.send(hdr(OP.RW, length=2), b"hi")
        else:
            r.be.readable.append(bad.fd)
            r.host_ready()
        r.give_rx(2)
        assert _ops(r) == [OP.RST] and r.dev.conns == {} and bad.closed, op
        assert _stats(r, "host_errors", "rst_sent") == (1, 1), op


def test_an_invalid_header_naming_a_live_stream_resets_it_with_one_rst(mem):  # noqa: F811
    r = Rig(mem)
    s = r.connect()
    r.send(hdr(OP.RW, length=2, type_=2), b"hi")  # the stream's ports, a bad type
    r.give_rx(3)
    assert _ops(r) == [OP.RST] and s.closed and r.dev.conns == {} and _stats(r, "rst_sent") == (1,)


@pytest.mark.parametrize("op", [OP.REQUEST, OP.RESPONSE])
def test_a_second_request_or_a_stray_response_on_a_live_stream_resets_it(mem, op):  # noqa: F811
    r = Rig(mem)
    s = r.connect()
    r.send(hdr(op))
    r.give_rx(2)
    assert _ops(r) == [OP.RST] and s.closed and r.dev.conns == {}


def test_shutdown_flags_close_one_direction_each(mem):  # noqa: F811
    """§5.10.6.5: SHUTDOWN RCV: the guest takes no more data (it may still send); SHUTDOWN SEND: it sends
    no more (the host socket is shut for writing once nothing is pending; it still receives)."""
    r = Rig(mem)
    s = r.connect()
    r.send(hdr(OP.SHUTDOWN, flags=1))  # RCV only
    assert (80, 5000) in r.dev.conns and not s.shut_write and not s.closed
    s.inbox += b"unwanted"
    r.be.readable.append(s.fd)
    r.host_ready()
    r.give_rx(1)
    assert r.packets() == []  # nothing is delivered to a guest that shut its receive side
    r.send(hdr(OP.RW, length=2), b"ok")
    assert bytes(s.received) == b"ok"

    r2 = Rig(mem)
    s2 = r2.connect(src_port=6000)
    s2.capacity = 0
    r2.send(hdr(OP.RW, src_port=6000, length=3), b"end")  # pending: the host socket is full
    r2.send(hdr(OP.SHUTDOWN, src_port=6000, flags=2))  # SEND only
    assert not s2.shut_write  # the host must not see EOF before the guest's last bytes
    assert (80, 6000) in r2.dev.conns and not s2.closed
    s2.inbox += b"reply"
    r2.be.readable.append(s2.fd)
    r2.host_ready()
    r2.give_rx(1)
    assert [(h.op, d) for h, d in r2.packets()] == [(OP.RW, b"reply")]  # the guest still receives
    r2.send(hdr(OP.RW, src_port=6000, length=1), b"x")  # data after its own SHUTDOWN SEND: reset
    r2.give_rx(1)
    assert _ops(r2) == [OP.RST] and s2.closed

    r4 = Rig(mem)  # SHUTDOWN SEND with bytes pending: EOF reaches the host once they are out
    s4 = r4.connect(src_port=6500)
    s4.capacity = 0
    r4.send(hdr(OP.RW, src_port=6500, length=4), b"last")
    r4.send(hdr(OP.SHUTDOWN, src_port=6500, flags=2))
    assert not s4.shut_write
    s4.capacity = 1 << 20
    r4.be.writable.append(s4.fd)
    r4.host_ready()
    assert bytes(s4.received) == b"last" and s4.shut_write and not s4.closed

    r3 = Rig(mem)
    s3 = r3.connect(src_port=7000)
    r3.send(hdr(OP.SHUTDOWN, src_port=7000, flags=2))  # nothing pending: shut the host side at once
    assert s3.shut_write and not s3.closed


def test_credit_request_is_answered_with_a_credit_update(mem):  # noqa: F811
    """§5.10.6.3: VIRTIO_VSOCK_OP_CREDIT_REQUEST asks for our buf_alloc/fwd_cnt."""
    r = Rig(mem)
    r.connect()
    r.send(hdr(OP.RW, length=4), b"data")
    r.send(hdr(OP.CREDIT_REQUEST))
    r.give_rx(2)
    ((h, _),) = r.packets()
    assert (h.op, h.buf_alloc, h.fwd_cnt) == (OP.CREDIT_UPDATE, BUF_ALLOC, 4)


def test_host_initiated_stream_carries_data_both_ways_after_the_handshake(mem):  # noqa: F811
    r = Rig(mem)
    s = r.be.host_connect(52)
    r.host_ready()
    assert r.be.watching[s.fd] is False  # not watched for writability while nothing is pending
    r.give_rx(1)
    ((req, _),) = r.packets()
    port = req.src_port
    r.send(hdr(OP.RESPONSE, 52, port))
    r.give_rx(1)
    assert r.packets() == []  # the handshake owes the guest nothing (no credit update)
    s.inbox += b"ping"
    r.be.readable.append(s.fd)
    r.host_ready()  # RX buffers are already there: delivered without another notify
    assert [(h.op, h.dst_port, d) for h, d in r.packets()] == [(OP.RW, 52, b"ping")]
    r.send(hdr(OP.RW, 52, port, length=4), b"pong")
    assert bytes(s.received) == b"OK %d\npong" % port


def test_guest_initiated_stream_is_not_watched_for_writability_while_idle(mem):  # noqa: F811
    r = Rig(mem)
    s = r.connect()
    assert r.be.watching[s.fd] is False


def test_a_spurious_writable_event_does_not_inflate_our_credit(mem):  # noqa: F811
    r = Rig(mem)
    s = r.connect()
    r.send(hdr(OP.RW, length=3), b"abc")
    r.be.writable.append(s.fd)  # nothing pending
    r.host_ready()
    s.inbox += b"x"
    r.be.readable.append(s.fd)
    r.host_ready()
    r.give_rx(1)
    ((h, _),) = r.packets()
    assert h.fwd_cnt == 3


def test_every_host_stream_beyond_the_cap_in_one_poll_is_closed(mem):  # noqa: F811
    r = Rig(mem)
    for i in range(MAX_CONNECTIONS):
        r.send(hdr(OP.REQUEST, src_port=10000 + i))
    extra = [r.be.host_connect(1), r.be.host_connect(2)]
    r.host_ready()
    assert all(s.closed for s in extra) and _stats(r, "conn_limit") == (2,)


def test_the_allocator_finds_the_last_free_port_among_63_live_ones(mem):  # noqa: F811
    """63 host streams to guest port 52 hold FIRST..FIRST+62; after the counter wraps to the base the
    64th still gets a port (FIRST+63) instead of failing."""
    r = Rig(mem)
    for _ in range(MAX_CONNECTIONS - 1):
        r.be.host_connect(52)
    r.host_ready()
    r.dev.next_port = FIRST_LOCAL_PORT
    s = r.be.host_connect(52)
    r.host_ready()
    assert not s.closed and (FIRST_LOCAL_PORT + MAX_CONNECTIONS - 1, 52) in r.dev.conns


def test_a_reset_sends_and_counts_no_rst(mem):  # noqa: F811
    r = Rig(mem)
    s = r.connect()
    r.t.write(mmio.STATUS, 4, 0)
    assert s.closed and _stats(r, "rst_sent") == (0,)


def test_rx_counters_and_the_exact_header_size_chain(mem):  # noqa: F811
    """An RX chain of exactly 44 bytes holds a control packet; without RX buffers the wait is counted."""
    r = Rig(mem, listeners=())
    r.send(hdr(OP.REQUEST, dst_port=81))  # refused: an RST to deliver, no RX buffer yet
    assert _stats(r, "rx_no_buffers") == (1,)
    r.give_rx(1, size=HDR_SIZE)
    assert _ops(r) == [OP.RST] and not r.faulted() and _stats(r, "rx_packets") == (1,)


def test_a_small_rx_chain_splits_host_data_without_losing_a_byte(mem):  # noqa: F811
    r = Rig(mem)
    s = r.connect()
    s.inbox += bytes(range(25))
    r.be.readable.append(s.fd)
    r.host_ready()
    r.give_rx(3, size=HDR_SIZE + 10)
    assert [d for _, d in r.packets()] == [bytes(range(10)), bytes(range(10, 20)), bytes(range(20, 25))]
    assert not r.faulted()


def test_a_readable_stream_with_nothing_to_read_does_not_stall_the_next(mem):  # noqa: F811
    r = Rig(mem)
    a = r.connect(src_port=5000)
    b = r.connect(src_port=5001)
    b.inbox += b"from-b"
    r.be.readable += [a.fd, b.fd]  # a's readiness was spurious: its recv finds nothing
    r.host_ready()
    r.give_rx(2)
    assert [(h.dst_port, d) for h, d in r.packets()] == [(5001, b"from-b")]


@pytest.mark.parametrize("q", [TXQ, RXQ])
def test_buffers_the_driver_adds_while_we_reenable_notifications_are_processed(mem, q):  # noqa: F811
    """The race virtio 1.2 §2.7.10 describes: a buffer made available after our last pop but before
    notifications are enabled again must be handled now, not left waiting for a notify that never comes."""
    r = Rig(mem)
    s = r.connect()
    queue = r.dev.queues[q]
    orig = queue.enable_notification
    raced: list[bool] = []

    def racing(m):  # the driver adds one more buffer just as we re-enable notifications
        if not raced:
            raced.append(True)
            if q == TXQ:
                r.tx.add_chain([hdr(OP.RW, length=5) + b"raced"])
            else:
                r.rx.add_chain(writable=[HDR_SIZE + 64])
        return orig(m)

    queue.enable_notification = racing
    if q == TXQ:
        r.send(hdr(OP.RW, length=5), b"first")
        assert bytes(s.received) == b"firstraced"
    else:
        s.inbox += b"0123456789"
        r.be.readable.append(s.fd)
        r.host_ready()  # no RX buffer left, but one races in while notifications are re-enabled
        assert [d for _, d in r.packets()] == [b"0123456789"]  # delivered now, without a notify
    assert raced


def test_a_guest_fault_names_the_vsock_device(mem):  # noqa: F811
    r = Rig(mem)
    r.send(hdr(OP.REQUEST, dst_port=81))
    r.rx.add_chain(writable=[HDR_SIZE - 1])
    r.t.notify(RXQ)
    assert r.faulted() and [d.get("device") for k, d in r.events if k == "guest-fault"] == ["virtio-vsock"]
