"""A minimal i8042 keyboard controller, after Firecracker's `devices/legacy/i8042.rs`: enough for a
guest to reset the machine and for Linux's i8042 driver to probe it without long timeouts.

Claimed ports: one 5-port range [0x60, 0x65) (`I8042_BASE`, `I8042_LEN`), as Firecracker registers it.
Offset 0 (port 0x60) is the data port, offset 4 (port 0x64) the status (read) / command (write) port.
Offsets 1-3 (ports 0x61-0x63) belong to the range but are not i8042 registers: reads return 0xff,
writes are dropped, both counted in `bad_access` (with KVM's in-kernel PIT, port 0x61 is handled by
KVM before it reaches us). Any access wider than 1 byte is contained the same way.

Commands written to port 0x64:
- 0xF0-0xFF "pulse output lines": an even value (bit 0 clear, e.g. 0xFE) pulses the CPU reset line,
  which calls `on_reset()` (the runtime stops the VM with its reset exit status). Odd values are
  harmless.
- 0x20 read control byte / 0x60 write control byte (next data write), 0xD0 read output port /
  0xD1 write output port (next data write; bit 0 clear asserts reset, as on a PC and in QEMU),
  0xAA controller self-test (replies 0x55), 0xAB keyboard interface test (replies 0x00).
- Everything else is ignored and counted in `unknown_commands`.
Data-port writes that are not a command parameter go to the "keyboard", which acknowledges every
byte with 0xFA. Data-port reads return the next queued reply, or 0 when none is queued. The status
byte has bit 0 (output buffer full) set while a reply is queued, bit 3 set while a command
parameter is expected, and bit 4 (keyboard enabled) always set.

At most one command reply is queued: a new reply replaces whatever is unread (as in Firecracker).
`kbd_irq` (IRQ 1), when given, is triggered when a keyboard acknowledgement is queued, if the
control byte enables the keyboard interrupt (bit 0).

Ctrl-Alt-Del (`trigger_ctrl_alt_del`, the host's graceful-shutdown request for guests without ACPI,
after Firecracker's `I8042Device::trigger_ctrl_alt_del`, used by its `SendCtrlAltDel` action): the
make codes of Ctrl, Alt and Del in scan code set 2 (0x14, 0x11, 0xe0 0x71) are queued in the output
buffer (at most `BUF_SIZE` bytes, as Firecracker's 16-byte buffer; a request that does not fit is
refused and counted) and the keyboard interrupt is raised. While bytes remain after a data-port read,
the output-buffer-full bit stays set and the interrupt is raised again, so a guest reading one byte
per interrupt (Linux's atkbd) gets all four. Linux turns the sequence into ctrl_alt_del() ->
orderly reboot (or poweroff, with `reboot=` settings / init's ctrlaltdel action).
`on_reset` and the IRQ are called after the device lock is released.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bulkhead.devices.irq import IrqLine

__all__ = ["BUF_SIZE", "CTRL_ALT_DEL", "I8042_BASE", "I8042_KBD_IRQ", "I8042_LEN", "I8042Device", "I8042Metrics",
           "declare_surfaces", "load_state", "save_state"]

I8042_BASE = 0x60
I8042_LEN = 5
I8042_KBD_IRQ = 1  # ISA IRQ 1: the keyboard (the DSDT's PNP0303 says the same)

OFS_DATA = 0
OFS_COMMAND = 4  # reads: status

CMD_READ_CTR = 0x20
CMD_WRITE_CTR = 0x60
CMD_SELF_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_READ_OUTP = 0xD0
CMD_WRITE_OUTP = 0xD1
CMD_RESET_CPU = 0xFE

SELF_TEST_OK = 0x55
KBD_TEST_OK = 0x00
KBD_ACK = 0xFA

SB_OUT_DATA_AVAIL = 0x01
SB_CMD_DATA = 0x08
SB_KBD_ENABLED = 0x10

CB_KBD_INT = 0x01
CB_POST_OK = 0x04

OUTP_RESET = 0x01  # output port bit 0: CPU reset line, active low
OUTP_DEFAULT = 0x03  # reset deasserted, A20 enabled

BUF_SIZE = 16  # output buffer bytes (Firecracker's BUF_SIZE)
# Scan code set 2 make codes: left Ctrl 0x14, left Alt 0x11, Delete 0xe0 0x71 (Firecracker KEY_CTRL,
# KEY_ALT, KEY_DEL).
CTRL_ALT_DEL = b"\x14\x11\xe0\x71"


class I8042Metrics:
    """Counters of the controller (a plain class: see SerialMetrics for why not a dataclass)."""

    __slots__ = ("bad_access", "ctrl_alt_del", "ctrl_alt_del_refused", "reads", "resets", "unknown_commands",
                 "writes")

    def __init__(self) -> None:
        self.ctrl_alt_del = 0  # host Ctrl-Alt-Del requests queued
        self.ctrl_alt_del_refused = 0  # requests refused: the output buffer had no room
        self.reads = 0
        self.writes = 0
        self.bad_access = 0
        self.resets = 0
        self.unknown_commands = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}

    def __repr__(self) -> str:
        return f"I8042Metrics({self.as_dict()})"


class I8042Device:
    """The controller. `on_reset` is called once per reset pulse; `kbd_irq` is optional."""

    def __init__(
        self,
        on_reset: Callable[[], None],
        *,
        kbd_irq: IrqLine | None = None,
        metrics: I8042Metrics | None = None,
    ) -> None:
        self._on_reset = on_reset
        self._kbd_irq = kbd_irq
        self.metrics = metrics if metrics is not None else I8042Metrics()
        self._lock = threading.Lock()
        self._status = SB_KBD_ENABLED
        self._control = CB_POST_OK | CB_KBD_INT
        self._outp = OUTP_DEFAULT
        self._cmd = 0
        self._buf = bytearray()

    def read(self, offset: int, size: int) -> int:
        """Read the data (offset 0) or status (offset 4) port. Never raises."""
        with self._lock:
            if size != 1 or offset not in (OFS_DATA, OFS_COMMAND):
                self.metrics.bad_access += 1
                return (1 << (8 * size)) - 1 if 0 < size <= 8 else 0
            self.metrics.reads += 1
            if offset == OFS_COMMAND:
                return self._status
            value = self._pop()
            more = bool(self._buf) and self._kbd_irq_enabled()
        if more and self._kbd_irq is not None:  # one interrupt per byte, as Firecracker does
            self._kbd_irq.trigger()
        return value

    def trigger_ctrl_alt_del(self) -> bool:
        """Queue the Ctrl-Alt-Del make codes (CTRL_ALT_DEL) and raise the keyboard interrupt. Returns
        False (and counts it) when the output buffer has no room for them. Never raises."""
        with self._lock:
            if len(self._buf) + len(CTRL_ALT_DEL) > BUF_SIZE:
                self.metrics.ctrl_alt_del_refused += 1
                return False
            self._buf += CTRL_ALT_DEL
            self._status |= SB_OUT_DATA_AVAIL
            self.metrics.ctrl_alt_del += 1
            irq = self._kbd_irq_enabled()
        if irq and self._kbd_irq is not None:
            self._kbd_irq.trigger()
        return True

    def write(self, offset: int, size: int, value: int) -> None:
        """Write a command (offset 4) or data byte (offset 0). Never raises, except what
        `on_reset` raises."""
        reset = irq = False
        with self._lock:
            if size != 1 or offset not in (OFS_DATA, OFS_COMMAND):
                self.metrics.bad_access += 1
                return
            self.metrics.writes += 1
            value &= 0xFF
            if offset == OFS_COMMAND:
                reset = self._command(value)
            elif self._status & SB_CMD_DATA:
                self._status &= ~SB_CMD_DATA
                if self._cmd == CMD_WRITE_CTR:
                    self._control = value
                elif self._cmd == CMD_WRITE_OUTP:
                    self._outp = value
                    reset = not value & OUTP_RESET
            else:
                self._reply(KBD_ACK)  # a command to the keyboard itself: always acknowledged
                irq = self._kbd_irq_enabled()
            if reset:
                self.metrics.resets += 1
        if irq and self._kbd_irq is not None:
            self._kbd_irq.trigger()
        if reset:
            self._on_reset()

    @property
    def control(self) -> int:
        with self._lock:
            return self._control

    def _command(self, cmd: int) -> bool:
        """Run a controller command; returns whether it pulses the reset line."""
        if cmd & 0xF0 == 0xF0:
            return not cmd & OUTP_RESET  # pulse output lines: bit 0 clear pulses reset
        if cmd == CMD_READ_CTR:
            self._reply(self._control)
        elif cmd == CMD_READ_OUTP:
            self._reply(self._outp)
        elif cmd in (CMD_WRITE_CTR, CMD_WRITE_OUTP):
            self._buf.clear()
            self._status = (self._status & ~SB_OUT_DATA_AVAIL) | SB_CMD_DATA
            self._cmd = cmd
        elif cmd == CMD_SELF_TEST:
            self._reply(SELF_TEST_OK)
        elif cmd == CMD_KBD_TEST:
            self._reply(KBD_TEST_OK)
        else:
            self.metrics.unknown_commands += 1
        return False

    def _reply(self, byte: int) -> None:
        """Make `byte` the only queued reply."""
        self._buf[:] = bytes((byte,))
        self._status |= SB_OUT_DATA_AVAIL

    def _pop(self) -> int:
        if not self._buf:
            return 0
        byte = self._buf.pop(0)
        if not self._buf:
            self._status &= ~SB_OUT_DATA_AVAIL
        return byte

    def _kbd_irq_enabled(self) -> bool:
        return self._kbd_irq is not None and bool(self._control & CB_KBD_INT)


def save_state(dev: I8042Device) -> dict[str, object]:
    """Controller registers and the queued reply, for a snapshot (the VM is paused)."""
    from bulkhead.devices.state import b64

    with dev._lock:
        return {"status": dev._status, "control": dev._control, "outp": dev._outp, "cmd": dev._cmd,
                "buf": b64(dev._buf)}


def load_state(dev: I8042Device, doc: object) -> None:
    """Restore save_state() output. Raises ValueError (nothing changed) for a bad document."""
    from bulkhead.devices.state import fields

    st = fields(doc, {"status": (0, 0xFF), "control": (0, 0xFF), "outp": (0, 0xFF), "cmd": (0, 0xFF),
                      "buf": f"blob:{BUF_SIZE}"}, "i8042")
    with dev._lock:
        dev._status, dev._control = int(st["status"]), int(st["control"])
        dev._outp, dev._cmd = int(st["outp"]), int(st["cmd"])
        dev._buf = bytearray(st["buf"])


def declare_surfaces() -> None:
    """Declare the controller's guest-reachable entry points (see `bulkhead.surface`)."""
    from bulkhead.surface import declare

    declare(
        "pio",
        "i8042",
        owner=__name__,
        boundary="guest-vmm",
        accepts="1-byte reads/writes: data port (offset 0) and status/command port (offset 4); "
        "offsets 1-3 and other widths are counted and contained",
        base=I8042_BASE,
        length=I8042_LEN,
        handler="I8042Device.read/I8042Device.write",
        fuzz="fuzz/fuzz_i8042.py",
    )
