"""virtio-vsock device (virtio 1.2 §5.10) with the mock virtqueue driver and an in-memory host backend.

Each guest-side attack is attempted and must fail: headers with a wrong type/cid/op, a `len` larger than
the chain (CVE-2019-18960's class), RW beyond the granted credit, more connections than the cap, u32
wraparound of fwd_cnt, RX chains that are readable or short. The device answers with RST or drops the
packet, never buffers without bound, and keeps serving valid streams.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bulkhead.devices.virtio import mmio
from bulkhead.devices.virtio.faults import FaultReason
from bulkhead.devices.virtio.mmio import MmioTransport
from bulkhead.devices.virtio.vsock import (
    BUF_ALLOC,
    HDR,
    HDR_SIZE,
    HOST_CID,
    MAX_CONNECTIONS,
    OP,
    TYPE_STREAM,
    Connection,
    ConnState,
    Header,
    HeaderError,
    parse_connect_line,
    parse_header,
)
from bulkhead.devices.virtio.vsock_device import EVENTQ, RXQ, TXQ, VsockDevice
from bulkhead.memory import GuestMemory
from bulkhead.testing import FakeIrq
from bulkhead.testing.virtqueue import setup_transport
from bulkhead.testing.vsock import FakeStream, FakeVsockBackend

CID = 3


@pytest.fixture
def mem():
    m = GuestMemory([(0, 8 << 20)])
    yield m
    m.close()


def hdr(op, src_port=5000, dst_port=80, length=0, *, src_cid=CID, dst_cid=HOST_CID, type_=TYPE_STREAM,
        flags=0, buf_alloc=65536, fwd_cnt=0) -> bytes:
    return HDR.pack(src_cid, dst_cid, src_port, dst_port, length, type_, op, flags, buf_alloc, fwd_cnt)


class Rig:
    def __init__(self, mem, listeners=(80,)):
        self.be = FakeVsockBackend(listeners)
        self.dev = VsockDevice(self.be, CID)
        self.events: list = []
        self.t = MmioTransport(self.dev, mem, FakeIrq(), on_event=lambda k, d: self.events.append((k, d)))
        self.rx, self.tx, self.ev = setup_transport(self.t, data_size=0x80000, stride=0x100000)

    def send(self, raw: bytes, payload: bytes = b"") -> None:
        self.tx.add_chain([raw + payload])
        self.t.notify(TXQ)

    def give_rx(self, n: int = 4, size: int = HDR_SIZE + 4096) -> None:
        for _ in range(n):
            self.rx.add_chain(writable=[size])
        self.t.notify(RXQ)

    def packets(self) -> list[tuple[Header, bytes]]:
        out = []
        for head, length in self.rx.used():
            addr = self.rx.mem.read_u64(self.rx.desc_table + 16 * head)
            raw = self.rx.read(addr, length)
            out.append((Header(*HDR.unpack(raw[:HDR_SIZE])), raw[HDR_SIZE:]))
        return out

    def host_ready(self) -> None:
        ((_fd, cb),) = self.t.poll_fds()
        cb()

    def faulted(self) -> bool:
        return bool(self.t.read(mmio.STATUS, 4) & mmio.STATUS_NEEDS_RESET)

    def connect(self, src_port=5000, dst_port=80) -> FakeStream:
        self.send(hdr(OP.REQUEST, src_port, dst_port))
        self.give_rx(1)
        ((h, _),) = self.packets()
        assert h.op == OP.RESPONSE
        return self.be.connected[-1]


def test_config_space_is_the_guest_cid(mem):
    r = Rig(mem)
    assert r.t.read(mmio.DEVICE_ID, 4) == 19
    assert r.dev.read_config(0, 8) == CID and r.dev.read_config(4, 4) == 0
    assert r.dev.read_config(8, 1) is None  # nothing past le64 guest_cid


def test_guest_connect_rw_and_credit_in_every_header(mem):
    r = Rig(mem)
    s = r.connect()
    r.send(hdr(OP.RW, length=5), b"hello")
    assert bytes(s.received) == b"hello"
    s.inbox += b"world"
    r.be.readable.append(s.fd)
    r.host_ready()
    r.give_rx(1)
    ((h, data),) = r.packets()
    assert (h.op, data, h.src_cid, h.dst_cid, h.src_port, h.dst_port) == (OP.RW, b"world", 2, CID, 80, 5000)
    assert (h.buf_alloc, h.fwd_cnt) == (BUF_ALLOC, 5)  # our credit: 5 guest bytes forwarded


def test_host_connect_handshake_writes_ok_line(mem):
    r = Rig(mem)
    s = r.be.host_connect(1234)
    r.host_ready()
    r.give_rx(1)
    ((h, _),) = r.packets()
    assert (h.op, h.dst_port, h.src_port) == (OP.REQUEST, 1234, 1 << 30)
    r.send(hdr(OP.RESPONSE, 1234, 1 << 30))
    assert bytes(s.received) == b"OK 1073741824\n"
    assert r.dev.conns[(1 << 30, 1234)].fwd_cnt == 0  # the OK line is not guest payload


@pytest.mark.parametrize(
    ("field", "raw"),
    [
        ("type", hdr(OP.REQUEST, type_=2)),  # SEQPACKET is not offered
        ("src_cid", hdr(OP.REQUEST, src_cid=4)),  # spoofing another guest's cid
        ("src_cid-high", hdr(OP.REQUEST, src_cid=CID | 1 << 32)),
        ("dst_cid", hdr(OP.REQUEST, dst_cid=5)),  # guest-to-guest is not a thing here
        ("op", hdr(0)),
        ("op-high", hdr(99)),
        ("len-on-control", hdr(OP.REQUEST, length=4)),
    ],
)
def test_invalid_headers_get_rst_and_no_host_connect(mem, field, raw):
    r = Rig(mem)
    r.send(raw, b"xxxx" if field == "len-on-control" else b"")
    r.give_rx(1)
    ((h, _),) = r.packets()
    assert h.op == OP.RST and h.dst_cid == CID
    assert r.be.connected == [] and r.dev.stats["tx_invalid"] == 1 and not r.faulted()


def test_len_beyond_the_chain_is_refused_not_read(mem):
    """CVE-2019-18960's class: a header claiming more payload than its descriptors carry."""
    r = Rig(mem)
    s = r.connect()
    r.send(hdr(OP.RW, length=4096), b"only-ten-b")
    r.give_rx(1)
    ((h, _),) = r.packets()
    assert h.op == OP.RST and bytes(s.received) == b"" and s.closed
    assert r.dev.conns == {}
    r.send(hdr(OP.RW, length=0xFFFF_FFFF), b"x")  # huge len on no connection: RST, nothing read
    r.give_rx(1)
    assert [h.op for h, _ in r.packets()] == [OP.RST]


def test_malformed_chains_are_dropped_and_counted(mem):
    r = Rig(mem)
    r.tx.add_chain([b"short"])  # < 44 bytes: no header to answer
    r.tx.add_chain([hdr(OP.REQUEST)], writable=[64])  # a device-writable part in a TX chain
    r.t.notify(TXQ)
    assert r.dev.stats["tx_malformed"] == 2 and not r.faulted() and r.be.connected == []
    assert len(r.tx.used()) == 2  # both chains given back


def test_credit_abuse_resets_instead_of_buffering(mem):
    """A guest ignoring our buf_alloc while the host socket takes nothing: the host buffer stops at BUF_ALLOC."""
    r = Rig(mem)
    s = r.connect()
    s.capacity = 0  # host socket full
    chunk = bytes(60000)
    for _ in range(BUF_ALLOC // len(chunk)):
        r.send(hdr(OP.RW, length=len(chunk)), chunk)
    conn = r.dev.conns[(80, 5000)]
    assert len(conn.pending) <= BUF_ALLOC
    r.send(hdr(OP.RW, length=len(chunk)), chunk)  # beyond the credit we granted
    assert r.dev.conns == {} and s.closed and r.dev.stats["credit_violation"] == 1
    r.give_rx(1)
    assert [h.op for h, _ in r.packets()] == [OP.RST]


def test_connection_cap(mem):
    r = Rig(mem)
    for i in range(MAX_CONNECTIONS):
        r.send(hdr(OP.REQUEST, src_port=10000 + i))
    r.send(hdr(OP.REQUEST, src_port=20000))
    assert len(r.dev.conns) == MAX_CONNECTIONS and r.dev.stats["conn_limit"] == 1
    extra = r.be.host_connect(1)
    r.host_ready()
    assert extra.closed and r.dev.stats["conn_limit"] == 2


def test_control_queue_is_bounded(mem):
    """A guest flooding invalid packets without RX buffers cannot grow the RST queue without bound."""
    r = Rig(mem)
    for i in range(200):
        r.tx.add_chain([hdr(OP.RW, src_port=i, length=0)])
    r.t.notify(TXQ)
    for i in range(200):
        r.tx.add_chain([hdr(OP.RW, src_port=1000 + i, length=0)])
    r.t.notify(TXQ)
    assert len(r.dev.control) == 256 and r.dev.stats["control_dropped"] == 144


def test_peer_credit_wraparound_and_lies():
    c = Connection(80, 5000, ConnState.ESTABLISHED)
    c.rx_cnt = 0xFFFF_FFF0  # we sent almost 4 GiB; the counters wrap
    c.update_peer_credit(Header(CID, 2, 5000, 80, 0, 1, OP.CREDIT_UPDATE, 0, 4096, 0xFFFF_FFF0))
    assert c.peer_free() == 4096
    c.sent_to_peer(0x20)  # rx_cnt wraps to 0x10
    assert c.rx_cnt == 0x10 and c.peer_free() == 4096 - 0x20
    # fwd_cnt claiming more than we ever sent: in u32, in-flight is huge -> no credit, not negative
    c.update_peer_credit(Header(CID, 2, 5000, 80, 0, 1, OP.CREDIT_UPDATE, 0, 4096, 0x1000))
    assert c.peer_free() == 0
    c.update_peer_credit(Header(CID, 2, 5000, 80, 0, 1, OP.CREDIT_UPDATE, 0, 0, 0x10))  # buf_alloc shrank
    assert c.peer_free() == 0


def test_host_data_respects_guest_credit(mem):
    r = Rig(mem)
    r.send(hdr(OP.REQUEST, buf_alloc=100))
    r.give_rx(1)
    r.packets()
    s = r.be.connected[-1]
    s.inbox += bytes(1000)
    r.be.readable.append(s.fd)
    r.host_ready()
    r.give_rx(4)
    got = r.packets()
    assert [len(d) for _, d in got] == [100]  # then nothing until the guest forwards
    r.send(hdr(OP.CREDIT_UPDATE, buf_alloc=100, fwd_cnt=100))
    assert [len(d) for _, d in r.packets()] == [100]


def test_host_eof_shutdown_then_guest_rst(mem):
    """The host closed its side (EOF): we send SHUTDOWN and wait for the guest's RST; bytes the guest
    still sends meanwhile reach the host (a half-close), they are not answered with a reset."""
    r = Rig(mem)
    s = r.connect()
    s.eof = True
    r.be.readable.append(s.fd)
    r.host_ready()
    r.give_rx(1)
    ((h, _),) = r.packets()
    assert (h.op, h.flags) == (OP.SHUTDOWN, 3) and r.dev.stats["rx_packets"] == 2  # RESPONSE, SHUTDOWN
    r.send(hdr(OP.RW, length=4), b"bye\n")
    assert bytes(s.received) == b"bye\n" and not s.closed and r.dev.stats.get("rst_sent", 0) == 0
    r.send(hdr(OP.RST))
    assert r.dev.conns == {} and s.closed


def test_guest_shutdown_both_is_answered_with_rst(mem):
    r = Rig(mem)
    s = r.connect()
    r.send(hdr(OP.SHUTDOWN, flags=3))
    r.give_rx(1)
    assert [h.op for h, _ in r.packets()] == [OP.RST] and s.closed


def test_refused_guest_connect_is_rst(mem):
    r = Rig(mem, listeners=())
    r.send(hdr(OP.REQUEST, dst_port=81))
    r.give_rx(1)
    assert [h.op for h, _ in r.packets()] == [OP.RST] and r.dev.stats["connect_refused"] == 1


@pytest.mark.parametrize(("kind", "reason"), [("readable", FaultReason.VSOCK_RX_READABLE),
                                              ("short", FaultReason.VSOCK_RX_SHORT)])
def test_bad_rx_chains_are_a_contained_fault(mem, kind, reason):
    r = Rig(mem)
    r.send(hdr(OP.REQUEST, dst_port=81))  # something to deliver (an RST)
    if kind == "readable":
        r.rx.add_chain([bytes(64)], writable=[64])
    else:
        r.rx.add_chain(writable=[HDR_SIZE - 1])
    r.t.notify(RXQ)
    assert r.faulted()
    assert any(d.get("reason") == reason.value for _, d in r.events), r.events


def test_reset_closes_every_host_stream(mem):
    r = Rig(mem)
    s = r.connect()
    r.t.write(mmio.STATUS, 4, 0)
    assert s.closed and r.dev.conns == {} and not r.dev.control


def test_event_queue_is_never_touched(mem):
    r = Rig(mem)
    r.ev.add_chain(writable=[8])
    r.t.notify(EVENTQ)
    assert r.ev.used() == []


def test_parse_header_rules():
    with pytest.raises(HeaderError):
        parse_header(b"\0" * 43, guest_cid=CID, available=0)
    h = parse_header(hdr(OP.RW, length=10), guest_cid=CID, available=10)
    assert h.len == 10
    with pytest.raises(HeaderError, match="exceeds the 9 bytes"):
        parse_header(hdr(OP.RW, length=10), guest_cid=CID, available=9)
    with pytest.raises(HeaderError, match="exceeds 65536"):
        parse_header(hdr(OP.RW, length=65537), guest_cid=CID, available=1 << 20)


@pytest.mark.parametrize(("line", "port"), [(b"CONNECT 52\n", 52), (b"CONNECT 4294967295\n", 0xFFFF_FFFF),
                                            (b"CONNECT 4294967296\n", None), (b"CONNECT -1\n", None),
                                            (b"CONNECT 52", None), (b"connect 52\n", None),
                                            (b"CONNECT " + b"9" * 40 + b"\n", None)])
def test_connect_line(line, port):
    assert parse_connect_line(line) == port


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.binary(min_size=HDR_SIZE, max_size=HDR_SIZE), st.binary(max_size=300)), max_size=12))
def test_random_tx_packets_never_escape(mem, pkts):
    r = Rig(mem)
    for raw, payload in pkts:
        # keep the src_cid right half the time so deeper states are reached
        if raw[0] & 1:
            raw = CID.to_bytes(8, "little") + HOST_CID.to_bytes(8, "little") + raw[16:]
        r.send(raw, payload)
    r.give_rx(8)
    r.packets()
    assert len(r.dev.conns) <= MAX_CONNECTIONS
    assert all(len(c.pending) <= BUF_ALLOC for c in r.dev.conns.values())
    assert not r.faulted()


def test_vsock_flag_errors_are_one_clear_sentence(tmp_path):
    from bulkhead.config import VmConfig, parse_vsock
    from bulkhead.errors import ConfigError
    from bulkhead.runtime.vsock import bind_listener

    assert parse_vsock("/run/v.sock,cid=9") == parse_vsock("/run/v.sock,cid=9")._replace(guest_cid=9)
    with pytest.raises(ConfigError, match="cid= must be between 3"):
        VmConfig(kernel="k", vsock=parse_vsock("/run/v.sock,cid=2"))
    with pytest.raises(ConfigError, match="unknown option"):
        parse_vsock("/run/v.sock,port=3")
    (tmp_path / "v.sock").write_text("")
    with pytest.raises(ConfigError, match="a file already exists there"):
        bind_listener(str(tmp_path / "v.sock"))
