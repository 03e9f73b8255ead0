"""16550A UART register model (COM1), in the style of rust-vmm vm-superio's `serial.rs`.

The device sees byte offsets 0-7 inside its own 8-port range; the runtime registers it at
`COM1_BASE` (0x3f8) and wires `irq` to an irqfd on `COM1_IRQ` (4).

Registers (offset: read / write):

    0  RBR (receive buffer)          / THR (transmit holding)     DLAB=1: DLL (divisor latch low)
    1  IER (interrupt enable, 4 bits)/ IER                        DLAB=1: DLM (divisor latch high)
    2  IIR (interrupt identification)/ FCR (FIFO control)
    3  LCR (line control; bit 7 = DLAB)
    4  MCR (modem control; bit 4 = loopback)
    5  LSR (line status: DR, THRE, TEMT) / ignored (factory test register)
    6  MSR (modem status; loopback mirrors MCR) / ignored
    7  SCR (scratch)

Behaviour a guest can rely on (what Linux's 8250 driver probes):
- IER keeps its low 4 bits; SCR reads back what was written; DLL/DLM are reachable with LCR.DLAB.
- FCR bit 0 enables the FIFOs; while enabled IIR bits 7-6 read as 11 (0xc0), the 16550A signature.
  FCR bit 1 (and toggling bit 0) discards the receive FIFO: at most `FIFO_DEPTH` (16) pending input
  bytes, as on hardware; input beyond that is host backlog (like QEMU's chardev) and is kept.
- Transmission is instantaneous: LSR.THRE and LSR.TEMT are always set. After every THR write the
  "THR empty" interrupt becomes pending again, and enabling IER.THRI makes it pending at once.
  Reading IIR while it is the reported source clears it, as on a 16550A.
- Host input is appended to a bounded receive queue (`rx_capacity`, 64 KiB by default); bytes that
  do not fit are dropped and counted. LSR.DR is set while the queue is non-empty; RBR reads 0 when
  it is empty.
- Interrupt priority: receive data (IIR 0x04) > THR empty (0x02) > modem status (0x00); none = 0x01.
  Receiver line status (0x06) never fires: the model has no parity, framing or overrun errors.
- The line is edge-triggered (irqfd): `irq.trigger()` fires once whenever the device goes from "no
  interrupt pending" to "an enabled interrupt is pending", which is exactly when a level-triggered
  16550A would raise its output. Linux's ISR loops until IIR reads "no interrupt", so edges are never
  lost. The modem-status delta bits (MSR 3-0) are set when MCR changes the modem lines (loopback) and
  cleared by reading MSR.
- Guest output is buffered and handed to `sink` on a newline, when `flush_threshold` bytes are
  pending, when the guest disables IER.THRI (Linux does this when its transmit queue drains), and on
  `flush()`. The runtime must call `flush()` when the VM stops and periodically while it idles, so
  a prompt without a newline is shown. A sink raising OSError loses that chunk (counted in
  `tx_lost`); the guest is never blocked or told.
- Any access that is not 1 byte wide, or at an offset outside 0-7, is contained: reads return all
  ones of the access width, writes are dropped, and `bad_access` is counted. Write values are masked
  to 8 bits.

Thread safety: all register state is guarded by one lock, so a vCPU thread can access registers
while a host input thread calls `enqueue_input`. `irq.trigger()` is called after the lock is
released; the sink is called with the lock held (output order is the guest's write order).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bulkhead.devices.irq import IrqLine

__all__ = [
    "COM1_BASE",
    "COM1_IRQ",
    "FIFO_DEPTH",
    "RX_CAPACITY",
    "SERIAL_LEN",
    "Serial",
    "SerialMetrics",
    "declare_surfaces",
    "load_state",
    "save_state",
]

COM1_BASE = 0x3F8
COM1_IRQ = 4
SERIAL_LEN = 8
RX_CAPACITY = 64 * 1024
FIFO_DEPTH = 16
FLUSH_THRESHOLD = 4096

# Register offsets.
DATA = 0  # RBR / THR, DLL with DLAB
IER = 1  # DLM with DLAB
IIR = 2  # read: IIR, write: FCR
FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDI = 0x01
IER_THRI = 0x02
IER_RLSI = 0x04
IER_MSI = 0x08
IER_MASK = 0x0F

IIR_MSI = 0x00
IIR_NO_INT = 0x01
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_FIFO_ENABLED = 0xC0

FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_CLEAR_TX = 0x04
FCR_KEEP = 0xC9  # enable, DMA mode, trigger level: what a 16550A latches

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

LSR_DR = 0x01
LSR_THRE = 0x20
LSR_TEMT = 0x40

MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_LINES_IDLE = MSR_DCD | MSR_DSR | MSR_CTS  # a connected terminal, outside loopback

_COMPACT_AT = 4096


def _ones(size: int) -> int:
    return (1 << (8 * size)) - 1 if 0 < size <= 8 else 0


class SerialMetrics:
    """Counters of one UART. Pass one in to aggregate elsewhere; updated under the device lock.

    A plain class, not a dataclass: `dataclasses` costs ~15 ms of every VM start (docs/PERFORMANCE.md)."""

    __slots__ = (
        "bad_access",
        "bytes_in",
        "bytes_out",
        "bytes_read",
        "irq_triggers",
        "rx_cleared",
        "rx_dropped",
        "tx_lost",
    )

    def __init__(self) -> None:
        self.bytes_out = 0  # bytes the guest transmitted (accepted into the output buffer)
        self.bytes_in = 0  # host input bytes accepted into the receive queue
        self.bytes_read = 0  # bytes the guest read from RBR
        self.rx_dropped = 0  # host input (or loopback) bytes dropped because the queue was full
        self.rx_cleared = 0  # pending bytes discarded by the guest through FCR
        self.tx_lost = 0  # output bytes lost because the sink raised OSError
        self.bad_access = 0  # accesses of the wrong width or outside offsets 0-7
        self.irq_triggers = 0  # interrupt edges raised

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}

    def __repr__(self) -> str:
        return f"SerialMetrics({self.as_dict()})"


class Serial:
    """A 16550A UART. See the module docstring for the register model.

    `irq`: edge-triggered interrupt line. `sink`: receives guest output in chunks (called with the
    device lock held; it must not call back into the device). `rx_capacity`: bound of the receive
    queue in bytes. `flush_threshold`: output bytes buffered before a forced flush.
    Raises ValueError when `rx_capacity` or `flush_threshold` is smaller than 1.
    """

    def __init__(
        self,
        irq: IrqLine,
        sink: Callable[[bytes], None],
        *,
        metrics: SerialMetrics | None = None,
        rx_capacity: int = RX_CAPACITY,
        flush_threshold: int = FLUSH_THRESHOLD,
    ) -> None:
        if rx_capacity < 1 or flush_threshold < 1:
            raise ValueError("rx_capacity and flush_threshold must be at least 1")
        self._irq = irq
        self._sink = sink
        self.metrics = metrics if metrics is not None else SerialMetrics()
        self._rx_capacity = rx_capacity
        self._flush_threshold = flush_threshold
        self._lock = threading.Lock()
        self._dll = 0x0C  # 9600 baud
        self._dlm = 0x00
        self._ier = 0
        self._fcr = 0
        self._lcr = 0x03  # 8N1
        self._mcr = 0
        self._scr = 0
        self._msr_delta = 0
        self._thr_ipending = False
        self._level = False  # whether an enabled interrupt is pending (the line a 16550A drives)
        self._rx = bytearray()
        self._rx_head = 0
        self._out = bytearray()

    # ----------------------------------------------------------------- bus interface

    def read(self, offset: int, size: int) -> int:
        """Read the register at `offset`. Never raises; bad accesses read as all ones."""
        with self._lock:
            if size != 1 or not 0 <= offset < SERIAL_LEN:
                self.metrics.bad_access += 1
                return _ones(size)
            value = self._read_reg(offset)
            fire = self._update_irq()
        if fire:
            self._irq.trigger()
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        """Write `value` (masked to 8 bits) to the register at `offset`. Never raises, except
        what `sink` raises other than OSError; bad accesses are dropped."""
        with self._lock:
            if size != 1 or not 0 <= offset < SERIAL_LEN:
                self.metrics.bad_access += 1
                return
            fire = self._write_reg(offset, value & 0xFF)
        if fire:
            self._irq.trigger()

    # ----------------------------------------------------------------- host interface

    def enqueue_input(self, data: bytes) -> int:
        """Queue host input for the guest; returns how many bytes were accepted. Bytes beyond the
        queue's capacity are dropped and counted in `metrics.rx_dropped`. Raises nothing."""
        with self._lock:
            accepted = min(self._rx_capacity - self._rx_len(), len(data))
            if accepted:
                self._rx += data[:accepted]
            self.metrics.bytes_in += accepted
            self.metrics.rx_dropped += len(data) - accepted
            fire = self._update_irq()
        if fire:
            self._irq.trigger()
        return accepted

    def flush(self) -> None:
        """Hand all buffered guest output to the sink. Call it when the VM stops."""
        with self._lock:
            self._flush_locked()

    @property
    def pending_output(self) -> int:
        """Guest output bytes buffered and not yet handed to the sink."""
        with self._lock:
            return len(self._out)

    @property
    def rx_pending(self) -> int:
        """Input bytes queued and not yet read by the guest."""
        with self._lock:
            return self._rx_len()

    @property
    def rx_capacity(self) -> int:
        return self._rx_capacity

    # ----------------------------------------------------------------- registers

    def _read_reg(self, offset: int) -> int:
        dlab = bool(self._lcr & LCR_DLAB)
        if offset == DATA:
            if dlab:
                return self._dll
            return self._rx_pop()
        if offset == IER:
            return self._dlm if dlab else self._ier
        if offset == IIR:
            iid = self._iid()
            if iid == IIR_THRI:
                self._thr_ipending = False  # reading IIR acknowledges THR empty
            return iid | (IIR_FIFO_ENABLED if self._fcr & FCR_ENABLE else 0)
        if offset == LCR:
            return self._lcr
        if offset == MCR:
            return self._mcr
        if offset == LSR:
            return (LSR_DR if self._rx_len() else 0) | LSR_THRE | LSR_TEMT
        if offset == MSR:
            value = self._msr_lines(self._mcr) | self._msr_delta
            self._msr_delta = 0
            return value
        return self._scr  # SCR

    def _write_reg(self, offset: int, value: int) -> bool:
        """Apply a register write; returns whether an interrupt edge must be raised."""
        dlab = bool(self._lcr & LCR_DLAB)
        fire = False
        if offset == DATA:
            if dlab:
                self._dll = value
                return False
            self._thr_ipending = False
            fire |= self._update_irq()  # the line drops while THR is full, as on a 16550A
            if self._mcr & MCR_LOOP:
                self._rx_push_loopback(value)
            else:
                self._emit(value)
            self._thr_ipending = True  # transmitted at once: THR is empty again
        elif offset == IER:
            if dlab:
                self._dlm = value
                return False
            changed = (self._ier ^ value) & IER_MASK
            self._ier = value & IER_MASK
            if changed & IER_THRI:
                self._thr_ipending = bool(self._ier & IER_THRI)  # THR is always empty
                if not self._ier & IER_THRI:
                    self._flush_locked()  # Linux stops transmitting: show what it wrote
        elif offset == FCR:
            if (value ^ self._fcr) & FCR_ENABLE:
                value |= FCR_CLEAR_RX | FCR_CLEAR_TX  # toggling the FIFOs resets them
            if value & FCR_CLEAR_RX:
                self._rx_clear_fifo()
            self._fcr = value & FCR_KEEP if value & FCR_ENABLE else 0
        elif offset == LCR:
            self._lcr = value
        elif offset == MCR:
            old_lines = self._msr_lines(self._mcr)
            self._mcr = value & MCR_MASK
            self._note_msr_change(old_lines, self._msr_lines(self._mcr))
        elif offset == SCR:
            self._scr = value
        # LSR and MSR writes are ignored (factory test registers).
        fire |= self._update_irq()
        return fire

    # ----------------------------------------------------------------- interrupts

    def _iid(self) -> int:
        if self._ier & IER_RDI and self._rx_len():
            return IIR_RDI
        if self._ier & IER_THRI and self._thr_ipending:
            return IIR_THRI
        if self._ier & IER_MSI and self._msr_delta:
            return IIR_MSI
        return IIR_NO_INT

    def _update_irq(self) -> bool:
        level = self._iid() != IIR_NO_INT
        fire = level and not self._level
        self._level = level
        if fire:
            self.metrics.irq_triggers += 1
        return fire

    # ----------------------------------------------------------------- modem lines

    @staticmethod
    def _msr_lines(mcr: int) -> int:
        if not mcr & MCR_LOOP:
            return MSR_LINES_IDLE
        lines = 0
        if mcr & MCR_RTS:
            lines |= MSR_CTS
        if mcr & MCR_DTR:
            lines |= MSR_DSR
        if mcr & MCR_OUT1:
            lines |= MSR_RI
        if mcr & MCR_OUT2:
            lines |= MSR_DCD
        return lines

    def _note_msr_change(self, old: int, new: int) -> None:
        changed = old ^ new
        if changed & MSR_CTS:
            self._msr_delta |= MSR_DCTS
        if changed & MSR_DSR:
            self._msr_delta |= MSR_DDSR
        if old & MSR_RI and not new & MSR_RI:
            self._msr_delta |= MSR_TERI  # trailing edge of ring indicator
        if changed & MSR_DCD:
            self._msr_delta |= MSR_DDCD

    # ----------------------------------------------------------------- receive queue

    def _rx_len(self) -> int:
        return len(self._rx) - self._rx_head

    def _rx_pop(self) -> int:
        if not self._rx_len():
            return 0
        byte = self._rx[self._rx_head]
        self._rx_head += 1
        self.metrics.bytes_read += 1
        if self._rx_head == len(self._rx):
            self._rx.clear()
            self._rx_head = 0
        elif self._rx_head >= _COMPACT_AT and 2 * self._rx_head >= len(self._rx):
            del self._rx[: self._rx_head]
            self._rx_head = 0
        return byte

    def _rx_push_loopback(self, byte: int) -> None:
        if self._rx_len() < self._rx_capacity:
            self._rx.append(byte)
        else:
            self.metrics.rx_dropped += 1

    def _rx_clear_fifo(self) -> None:
        n = min(FIFO_DEPTH, self._rx_len())
        self._rx_head += n
        self.metrics.rx_cleared += n
        if self._rx_head == len(self._rx):
            self._rx.clear()
            self._rx_head = 0

    # ----------------------------------------------------------------- output

    def _emit(self, byte: int) -> None:
        self._out.append(byte)
        self.metrics.bytes_out += 1
        if byte == 0x0A or len(self._out) >= self._flush_threshold:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if not self._out:
            return
        chunk = bytes(self._out)
        self._out.clear()
        try:
            self._sink(chunk)
        except OSError:
            self.metrics.tx_lost += len(chunk)


_STATE_BYTES = ("dll", "dlm", "ier", "fcr", "lcr", "mcr", "scr", "msr_delta")


def save_state(dev: Serial) -> dict[str, object]:
    """Registers and pending input, for a snapshot (the VM is paused). Pending output is flushed to
    the sink first: what the guest wrote before the snapshot is shown before the VM stops."""
    from bulkhead.devices.state import b64

    with dev._lock:
        dev._flush_locked()
        doc: dict[str, object] = {name: getattr(dev, "_" + name) for name in _STATE_BYTES}
        doc["thr_ipending"] = dev._thr_ipending
        doc["level"] = dev._level
        doc["rx"] = b64(dev._rx[dev._rx_head :])
        return doc


def load_state(dev: Serial, doc: object) -> None:
    """Restore save_state() output. Raises ValueError (nothing changed) for a bad document."""
    from bulkhead.devices.state import fields

    spec: dict[str, tuple[int, int] | str] = {name: (0, 0xFF) for name in _STATE_BYTES}
    spec.update(thr_ipending="bool", level="bool", rx=f"blob:{dev._rx_capacity}")
    st = fields(doc, spec, "serial")
    if st["ier"] & ~IER_MASK or st["mcr"] & ~MCR_MASK or st["msr_delta"] & ~0x0F:
        raise ValueError("serial state has reserved register bits set")
    with dev._lock:
        for name in _STATE_BYTES:
            setattr(dev, "_" + name, st[name])
        dev._thr_ipending = bool(st["thr_ipending"])
        dev._level = bool(st["level"])
        dev._rx = bytearray(st["rx"])
        dev._rx_head = 0


def declare_surfaces() -> None:
    """Declare the UART's guest-reachable entry points (see `bulkhead.surface`)."""
    from bulkhead.surface import declare

    declare(
        "pio",
        "serial-com1",
        owner=__name__,
        boundary="guest-vmm",
        accepts="1-byte reads/writes at offsets 0-7 (16550A registers); other widths and offsets "
        "are counted and contained",
        base=COM1_BASE,
        length=SERIAL_LEN,
        handler="Serial.read/Serial.write",
        fuzz="fuzz/fuzz_serial.py",
    )
