"""Behaviour of the 16550A model: what Linux's 8250 driver probes and relies on, and containment."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bulkhead.devices import COM1_BASE, SERIAL_LEN, IrqLine, Serial
from bulkhead.devices import serial as s
from bulkhead.testing import FakeIrq

DATA, IER, IIR, FCR, LCR, MCR, LSR, MSR, SCR = 0, 1, 2, 2, 3, 4, 5, 6, 7


class Uart:
    def __init__(self, **kw: int) -> None:
        self.irq = FakeIrq()
        self.out: list[bytes] = []
        self.dev = Serial(self.irq, self.out.append, **kw)

    def inb(self, off: int) -> int:
        return self.dev.read(off, 1)

    def outb(self, off: int, val: int) -> None:
        self.dev.write(off, 1, val)

    @property
    def output(self) -> bytes:
        return b"".join(self.out)


def test_fake_irq_satisfies_protocol_and_counts() -> None:
    irq = FakeIrq()
    assert isinstance(irq, IrqLine)
    irq.trigger()
    irq.trigger()
    assert irq.count == 2 and irq.take() == 2 and irq.take() == 0


def test_com1_constants() -> None:
    assert (COM1_BASE, SERIAL_LEN, s.COM1_IRQ) == (0x3F8, 8, 4)


def test_linux_8250_autoconfig_probe_detects_16550a() -> None:
    """The order of drivers/tty/serial/8250/8250_port.c autoconfig(): IER, loopback, FIFO."""
    u = Uart()
    # IER test: all-zero then low nibble must read back.
    u.outb(IER, 0)
    assert u.inb(IER) & 0x0F == 0
    u.outb(IER, 0x0F)
    assert u.inb(IER) & 0x0F == 0x0F
    u.outb(IER, 0)
    # Loopback: MCR = LOOP | OUT2 | RTS -> MSR high nibble DCD | CTS.
    save_mcr = u.inb(MCR)
    u.outb(MCR, s.MCR_LOOP | 0x0A)
    assert u.inb(MSR) & 0xF0 == 0x90
    u.outb(MCR, save_mcr)
    # FIFO: IIR >> 6 == 3 means 16550A.
    u.outb(LCR, 0)
    u.outb(FCR, s.FCR_ENABLE)
    assert u.inb(IIR) >> 6 == 3
    # 16750 check: FCR bit 5 (64-byte FIFO) must not be reported.
    u.outb(FCR, s.FCR_ENABLE | 0x20)
    assert u.inb(IIR) & 0xE0 == 0xC0
    # Scratch register
    for v in (0xA5, 0x5A, 0x00, 0xFF):
        u.outb(SCR, v)
        assert u.inb(SCR) == v
    assert u.output == b""


def test_fifo_bits_follow_fcr() -> None:
    u = Uart()
    assert u.inb(IIR) == s.IIR_NO_INT  # FIFOs disabled at reset: no 0xc0
    u.outb(FCR, 0x07)
    assert u.inb(IIR) == 0xC1
    u.outb(FCR, 0x00)
    assert u.inb(IIR) == 0x01


def test_dlab_divisor_latch_programming() -> None:
    u = Uart()
    u.outb(IER, 0x05)
    u.outb(LCR, 0x80 | 0x03)  # DLAB, 8N1
    u.outb(DATA, 0x01)  # 115200 baud
    u.outb(IER, 0x00)
    assert (u.inb(DATA), u.inb(IER)) == (0x01, 0x00)
    u.outb(LCR, 0x03)
    assert u.inb(LCR) == 0x03
    assert u.inb(IER) == 0x05  # IER untouched by the DLM write
    assert u.inb(DATA) == 0  # RBR (empty), not DLL
    assert u.output == b""  # divisor writes are not transmitted
    u.outb(LCR, 0x83)
    assert (u.inb(DATA), u.inb(IER)) == (0x01, 0x00)


def test_loopback_mirrors_mcr_into_msr_with_deltas() -> None:
    u = Uart()
    assert u.inb(MSR) == 0xB0  # DCD | DSR | CTS: a connected terminal
    u.outb(MCR, s.MCR_LOOP)
    # Entering loopback drops all lines: deltas for CTS, DSR, DCD.
    assert u.inb(MSR) == s.MSR_DCTS | s.MSR_DDSR | s.MSR_DDCD
    assert u.inb(MSR) == 0  # deltas clear on read
    u.outb(MCR, s.MCR_LOOP | 0x0F)  # DTR RTS OUT1 OUT2
    assert u.inb(MSR) == 0xF0 | s.MSR_DCTS | s.MSR_DDSR | s.MSR_DDCD
    u.outb(MCR, s.MCR_LOOP | s.MCR_DTR | s.MCR_RTS | s.MCR_OUT2)  # RI falls -> TERI
    assert u.inb(MSR) == 0xB0 | s.MSR_TERI


def test_modem_status_interrupt() -> None:
    u = Uart()
    u.outb(IER, s.IER_MSI)
    assert u.irq.take() == 0
    u.outb(MCR, s.MCR_LOOP | s.MCR_RTS)
    assert u.irq.take() == 1
    assert u.inb(IIR) == 0x00  # modem status is the source
    u.inb(MSR)
    assert u.inb(IIR) == 0x01


def test_loopback_data_stays_inside() -> None:
    u = Uart()
    u.outb(IER, s.IER_RDI)
    u.outb(MCR, s.MCR_LOOP)
    u.outb(DATA, ord("z"))
    assert u.irq.take() == 1
    assert u.inb(LSR) & s.LSR_DR
    assert u.inb(DATA) == ord("z")
    assert not u.inb(LSR) & s.LSR_DR
    u.dev.flush()
    assert u.output == b""


def test_thre_interrupt_on_enable_and_after_each_write() -> None:
    u = Uart()
    u.outb(FCR, 0x07)
    u.outb(DATA, ord("a"))
    assert u.irq.take() == 0  # THRI not enabled: no interrupt
    u.outb(IER, s.IER_THRI)
    assert u.irq.take() == 1  # enabling THRI with an empty THR interrupts at once
    assert u.inb(IIR) == 0xC2
    assert u.inb(IIR) == 0xC1  # reading IIR acknowledged it
    u.outb(DATA, ord("b"))
    assert u.irq.take() == 1
    u.outb(DATA, ord("c"))  # not acknowledged, but the THR write re-arms it: new edge
    assert u.irq.take() == 1
    assert u.inb(IIR) & 0x0F == s.IIR_THRI
    assert u.inb(LSR) & (s.LSR_THRE | s.LSR_TEMT) == s.LSR_THRE | s.LSR_TEMT
    u.outb(IER, 0)
    assert u.inb(IIR) & 0x0F == s.IIR_NO_INT
    assert u.output == b"abc"
    assert u.dev.metrics.bytes_out == 3


def test_rx_interrupt_on_input_and_priority_over_thre() -> None:
    u = Uart()
    u.outb(IER, s.IER_RDI)
    assert u.dev.enqueue_input(b"hi") == 2
    assert u.irq.take() == 1
    assert u.dev.enqueue_input(b"!") == 1
    assert u.irq.take() == 0  # still pending: no new edge
    assert u.inb(LSR) & s.LSR_DR
    assert u.inb(IIR) == s.IIR_RDI
    assert bytes(u.inb(DATA) for _ in range(3)) == b"hi!"
    assert not u.inb(LSR) & s.LSR_DR
    assert u.inb(IIR) == s.IIR_NO_INT
    assert u.inb(DATA) == 0  # empty RBR reads 0
    u.dev.enqueue_input(b"x")
    assert u.irq.take() == 1  # new edge after the guest drained the queue
    u.outb(IER, s.IER_RDI | s.IER_THRI)
    assert u.inb(IIR) == s.IIR_RDI  # receive data outranks THR empty
    u.inb(DATA)
    assert u.inb(IIR) == s.IIR_THRI


def test_input_before_ier_raises_when_enabled() -> None:
    u = Uart()
    u.dev.enqueue_input(b"early")
    assert u.irq.take() == 0
    u.outb(IER, s.IER_RDI)
    assert u.irq.take() == 1


def test_input_overflow_is_dropped_and_counted() -> None:
    u = Uart(rx_capacity=8)
    assert u.dev.enqueue_input(bytes(range(20))) == 8
    assert u.dev.enqueue_input(b"more") == 0
    m = u.dev.metrics
    assert (m.bytes_in, m.rx_dropped) == (8, 16)
    assert bytes(u.inb(DATA) for _ in range(8)) == bytes(range(8))
    assert u.dev.enqueue_input(b"ok") == 2


def test_default_queue_is_64k_and_keeps_order() -> None:
    u = Uart()
    data = bytes((i * 7) & 0xFF for i in range(70_000))
    assert u.dev.enqueue_input(data) == 64 * 1024
    assert u.dev.metrics.rx_dropped == 70_000 - 64 * 1024
    got = bytes(u.inb(DATA) for _ in range(64 * 1024))
    assert got == data[: 64 * 1024]
    assert u.dev.rx_pending == 0 and not u.inb(LSR) & s.LSR_DR


def test_fcr_clear_discards_only_the_hardware_fifo() -> None:
    u = Uart()
    u.dev.enqueue_input(bytes(range(40)))
    u.outb(FCR, s.FCR_ENABLE | s.FCR_CLEAR_RX)
    assert u.dev.rx_pending == 40 - s.FIFO_DEPTH
    assert u.dev.metrics.rx_cleared == s.FIFO_DEPTH
    assert u.inb(DATA) == s.FIFO_DEPTH
    u.outb(FCR, s.FCR_ENABLE)  # no toggle, no clear bit: nothing discarded
    assert u.dev.rx_pending == 40 - s.FIFO_DEPTH - 1


def test_output_is_buffered_until_newline_flush_or_threshold() -> None:
    u = Uart()
    for ch in b"hello":
        u.outb(DATA, ch)
    assert u.out == [] and u.dev.pending_output == 5
    u.outb(DATA, ord("\n"))
    assert u.out == [b"hello\n"]
    u.outb(DATA, ord("$"))
    u.dev.flush()
    assert u.out == [b"hello\n", b"$"]
    u.dev.flush()
    assert len(u.out) == 2  # nothing pending: no empty write

    small = Uart(flush_threshold=4)
    for ch in b"abcdefg":
        small.outb(DATA, ch)
    assert small.out == [b"abcd"]


def test_disabling_thri_flushes_a_prompt() -> None:
    u = Uart()
    u.outb(IER, s.IER_THRI)
    for ch in b"login: ":
        u.outb(DATA, ch)
    assert u.out == []
    u.outb(IER, 0)
    assert u.out == [b"login: "]


def test_sink_oserror_is_counted_not_raised() -> None:
    def broken(_: bytes) -> None:
        raise BrokenPipeError

    dev = Serial(FakeIrq(), broken)
    for ch in b"lost\n":
        dev.write(DATA, 1, ch)
    assert dev.metrics.tx_lost == 5
    assert dev.metrics.bytes_out == 5


@pytest.mark.parametrize(
    ("offset", "size"), [(0, 2), (0, 4), (1, 8), (8, 1), (255, 1), (-1, 1), (0, 0), (7, 3)]
)
def test_bad_accesses_are_contained(offset: int, size: int) -> None:
    u = Uart()
    u.outb(SCR, 0x42)
    expect = (1 << (8 * size)) - 1 if size > 0 else 0
    assert u.dev.read(offset, size) == expect
    u.dev.write(offset, size, 0x4141)
    assert u.dev.metrics.bad_access == 2
    assert u.inb(SCR) == 0x42
    u.dev.flush()
    assert u.output == b""


def test_write_values_are_masked_to_a_byte() -> None:
    u = Uart()
    u.dev.write(SCR, 1, 0x1_2345)
    assert u.inb(SCR) == 0x45
    u.dev.write(DATA, 1, -1)
    u.dev.flush()
    assert u.output == b"\xff"


def test_rejects_bad_construction() -> None:
    with pytest.raises(ValueError, match="rx_capacity and flush_threshold must be at least 1"):
        Serial(FakeIrq(), lambda _: None, rx_capacity=0)


def test_concurrent_input_and_register_reads_lose_nothing() -> None:
    u = Uart()
    u.outb(IER, s.IER_RDI)
    data = bytes(i & 0xFF for i in range(20_000))

    def feed() -> None:
        for i in range(0, len(data), 97):
            u.dev.enqueue_input(data[i : i + 97])

    t = threading.Thread(target=feed)
    t.start()
    got = bytearray()
    while len(got) < len(data):
        if u.inb(LSR) & s.LSR_DR:
            got.append(u.inb(DATA))
    t.join()
    assert bytes(got) == data
    assert u.dev.metrics.rx_dropped == 0
    assert u.irq.count == u.dev.metrics.irq_triggers >= 1


_op = st.one_of(
    st.tuples(st.just("r"), st.integers(-2, 10), st.sampled_from([0, 1, 2, 4, 8, 1, 1, 1])),
    st.tuples(
        st.just("w"),
        st.integers(-2, 10),
        st.sampled_from([0, 1, 2, 4, 8, 1, 1, 1]),
        st.integers(-(2**64), 2**64),
    ),
    st.tuples(st.just("in"), st.binary(max_size=40)),
    st.tuples(st.just("flush")),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_op, max_size=80))
def test_random_register_sequences_stay_in_range(ops: list[tuple[object, ...]]) -> None:
    u = Uart(rx_capacity=32)
    for op in ops:
        if op[0] == "r":
            _, off, size = op
            assert isinstance(off, int) and isinstance(size, int)
            v = u.dev.read(off, size)
            assert 0 <= v < (1 << (8 * size)) if size > 0 else v == 0
        elif op[0] == "w":
            _, off, size, val = op
            assert isinstance(off, int) and isinstance(size, int) and isinstance(val, int)
            u.dev.write(off, size, val)
        elif op[0] == "in":
            data = op[1]
            assert isinstance(data, bytes)
            assert 0 <= u.dev.enqueue_input(data) <= len(data)
        else:
            u.dev.flush()
        assert 0 <= u.dev.rx_pending <= 32
    lcr = u.inb(LCR)
    u.outb(LCR, lcr & 0x7F)
    assert u.inb(IER) <= 0x0F
    assert u.inb(IIR) & 0x3F in (0x00, 0x01, 0x02, 0x04)
    assert u.inb(LSR) & 0x60 == 0x60
    assert u.irq.count == u.dev.metrics.irq_triggers
    u.dev.flush()
    assert len(u.output) == u.dev.metrics.bytes_out


# --- mutation-testing survivors (issue 15): reset values, exact capacities, counters, IER/FCR edges ------

def test_register_values_after_reset() -> None:
    """Power-on state (16550A datasheet, with bulkhead's documented 9600 8N1 divisor/LCR)."""
    u = Uart()
    assert [u.inb(r) for r in (IER, IIR, LCR, MCR, SCR)] == [0, s.IIR_NO_INT, 0x03, 0, 0]
    u.outb(LCR, 0x03 | s.LCR_DLAB)
    assert (u.inb(DATA), u.inb(IER)) == (0x0C, 0x00)


def test_capacity_and_threshold_must_be_at_least_one() -> None:
    u = Uart(rx_capacity=1, flush_threshold=1)
    assert u.dev.rx_capacity == 1 and Uart().dev.rx_capacity == s.RX_CAPACITY
    for kw in ({"rx_capacity": 0}, {"flush_threshold": 0}):
        with pytest.raises(ValueError, match="at least 1"):
            Uart(**kw)


def test_metrics_known_answer() -> None:
    u = Uart(rx_capacity=2)
    assert u.dev.metrics.as_dict() == dict.fromkeys(s.SerialMetrics.__slots__, 0)
    u.outb(IER, s.IER_RDI)
    assert u.dev.enqueue_input(b"abc") == 2
    assert u.inb(DATA) == ord("a")
    u.outb(DATA, ord("x"))
    u.dev.read(0, 2)
    u.dev.flush()
    assert u.dev.metrics.as_dict() == {"bad_access": 1, "bytes_in": 2, "bytes_out": 1, "bytes_read": 1,
                                       "irq_triggers": 1, "rx_cleared": 0, "rx_dropped": 1, "tx_lost": 0}
    assert repr(u.dev.metrics) == f"SerialMetrics({u.dev.metrics.as_dict()})"


def test_first_interrupt_after_reset_is_an_edge() -> None:
    u = Uart()
    u.outb(IER, s.IER_RDI)
    u.dev.enqueue_input(b"k")
    assert u.irq.take() == 1 and u.inb(IIR) & 0x0F == s.IIR_RDI


def test_bad_widths_read_all_ones_of_their_width() -> None:
    d = Uart().dev
    assert [d.read(0, n) for n in (2, 4, 8)] == [0xFFFF, 0xFFFF_FFFF, (1 << 64) - 1]
    assert [d.read(0, n) for n in (0, 9)] == [0, 0] and d.read(8, 1) == 0xFF


def test_divisor_latch_writes_raise_no_interrupt() -> None:
    u = Uart()
    u.outb(LCR, s.LCR_DLAB)
    u.irq.take()
    u.outb(DATA, 0x01)
    u.outb(IER, 0x00)
    assert u.irq.take() == 0
    assert (u.inb(DATA), u.inb(IER)) == (0x01, 0x00)


def test_rewriting_ier_with_thri_still_set_does_not_rearm_it() -> None:
    u = Uart()
    u.outb(IER, s.IER_THRI)
    assert u.inb(IIR) & 0x0F == s.IIR_THRI  # reading IIR acknowledges it
    assert u.inb(IIR) & 0x0F == s.IIR_NO_INT
    u.outb(IER, s.IER_THRI | s.IER_RDI)  # THRI unchanged
    assert u.inb(IIR) & 0x0F == s.IIR_NO_INT


def test_modem_status_interrupt_needs_msi_enabled() -> None:
    u = Uart()
    u.outb(IER, s.IER_RDI)
    u.outb(MCR, s.MCR_LOOP | s.MCR_RTS)  # CTS changes: a modem-status delta is pending
    assert u.inb(IIR) & 0x0F == s.IIR_NO_INT
    u.outb(IER, s.IER_RDI | s.IER_MSI)
    assert u.inb(IIR) & 0x0F == s.IIR_MSI


def test_toggling_fifo_enable_clears_the_receive_fifo() -> None:
    u = Uart()
    u.dev.enqueue_input(b"xyz")
    u.outb(FCR, s.FCR_ENABLE)  # no clear bits: the toggle itself resets the FIFOs
    assert u.inb(LSR) & s.LSR_DR == 0 and u.dev.metrics.rx_cleared == 3
    assert u.inb(IIR) & s.IIR_FIFO_ENABLED == s.IIR_FIFO_ENABLED
    u.dev.enqueue_input(b"q")
    u.outb(FCR, s.FCR_ENABLE)  # no toggle, no clear bit: kept
    assert u.dev.rx_pending == 1


def test_loopback_fills_to_capacity_exactly() -> None:
    u = Uart(rx_capacity=2)
    u.outb(MCR, s.MCR_LOOP)
    for b in b"abc":
        u.outb(DATA, b)
    assert u.dev.rx_pending == 2 and u.dev.metrics.rx_dropped == 1
    assert bytes(u.inb(DATA) for _ in range(3)) == b"ab\x00"


def test_receive_buffer_memory_stays_bounded_while_the_queue_never_drains() -> None:
    """A guest that keeps one byte pending forever must not make the host buffer grow without bound."""
    u = Uart(rx_capacity=64)
    u.dev.enqueue_input(b"\x00")
    for i in range(3 * s._COMPACT_AT):
        u.dev.enqueue_input(bytes([i & 0xFF]))
        u.inb(DATA)
    assert u.dev.rx_pending == 1
    assert len(u.dev._rx) <= 2 * s._COMPACT_AT + 64  # compacted, not 3 * _COMPACT_AT bytes
