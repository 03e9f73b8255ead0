"""QEMU `isa-debug-exit` compatible device, so the same test payloads end on bulkhead and on QEMU.

QEMU (hw/misc/debugexit.c) maps the device at `iobase` for `iosize` ports with valid access widths
1-4 and, on any write of value v (zero-extended from the access width), requests shutdown with
code `(v << 1) | 1`; older QEMU calls `exit((v << 1) | 1)` directly. The process exit status a
parent sees is that code truncated to 8 bits by the OS, so:

    status = ((v << 1) | 1) & 0xff        e.g. v=0 -> 1, v=1 -> 3, v=0x7f -> 255, v=0x80 -> 1,
                                              v=0xff -> 255, v=0x1234 (16-bit write) -> 0x69

Reads return 0 (QEMU's `debug_exit_read` returns 0; they are not all ones).

bulkhead registers it at `DEBUG_EXIT_BASE` (0xf4) for `DEBUG_EXIT_LEN` (4) ports, as
`-device isa-debug-exit,iobase=0xf4,iosize=4`. A write at any offset inside the range with width
1, 2 or 4 calls `on_exit(status)` once: the first write wins, later writes (another vCPU racing
the stop) are counted in `late_writes` and ignored. Other widths, or accesses reaching past the
range, are contained and counted in `bad_access`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["DEBUG_EXIT_BASE", "DEBUG_EXIT_LEN", "DebugExit", "declare_surfaces", "exit_status"]

DEBUG_EXIT_BASE = 0xF4
DEBUG_EXIT_LEN = 4
_SIZES = (1, 2, 4)


def exit_status(value: int) -> int:
    """The 8-bit process exit status QEMU ends with after a debug-exit write of `value`."""
    return ((value << 1) | 1) & 0xFF


class DebugExit:
    """The debug-exit port. `on_exit(status)` receives the 8-bit exit status (see `exit_status`);
    `value` and `code` keep the written value and QEMU's untruncated code `(v << 1) | 1`."""

    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self._on_exit = on_exit
        self._lock = threading.Lock()
        self.value: int | None = None
        self.code: int | None = None
        self.status: int | None = None
        self.late_writes = 0
        self.bad_access = 0

    def read(self, offset: int, size: int) -> int:
        """Reads return 0, as QEMU's. Bad accesses read as all ones and are counted. Never raises."""
        if size not in _SIZES or offset < 0 or offset + size > DEBUG_EXIT_LEN:
            with self._lock:
                self.bad_access += 1
            return (1 << (8 * size)) - 1 if 0 < size <= 8 else 0
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        """A write of v ends the VM with status ((v << 1) | 1) & 0xff. Raises only what `on_exit`
        raises."""
        with self._lock:
            if size not in _SIZES or offset < 0 or offset + size > DEBUG_EXIT_LEN:
                self.bad_access += 1
                return
            if self.status is not None:
                self.late_writes += 1
                return
            v = value & ((1 << (8 * size)) - 1)
            self.value = v
            self.code = (v << 1) | 1
            self.status = exit_status(v)
            status = self.status
        self._on_exit(status)


def declare_surfaces() -> None:
    """Declare the debug-exit port (see `bulkhead.surface`)."""
    from bulkhead.surface import declare

    declare(
        "pio",
        "debug-exit",
        owner=__name__,
        boundary="guest-vmm",
        accepts="reads and writes of width 1, 2 or 4 inside the range; any write stops the VM with "
        "status ((v << 1) | 1) & 0xff",
        base=DEBUG_EXIT_BASE,
        length=DEBUG_EXIT_LEN,
        handler="DebugExit.read/DebugExit.write",
    )
