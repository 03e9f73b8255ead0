"""The vCPU exit loop: one thread per vCPU, dispatching port-I/O and MMIO exits to the buses.

Hot path notes (measured, see docs/PERFORMANCE.md): KVM_RUN goes through libc's ioctl via ctypes (the GIL
is released while the guest runs); the exit union is decoded with one struct.unpack_from on the shared
kvm_run mapping; single-count port accesses take a fast path. Anything the guest does that the VMM does
not emulate is contained by the buses (all-ones reads, dropped writes, counted).
"""

from __future__ import annotations

import ctypes
import errno
import signal
import struct
import threading
from collections.abc import Callable

from bulkhead.bus import Bus
from bulkhead.errors import GuestFault
from bulkhead.hypervisor.kvm import constants as c
from bulkhead.hypervisor.kvm.system import Vcpu, _libc
from bulkhead.runtime.exits import ExitReason

__all__ = ["KICK_SIGNAL", "VcpuRunner"]

KICK_SIGNAL = signal.SIGUSR2
_IO = struct.Struct("<BBHIQ")  # direction, size, port, count, data_offset
_MMIO = struct.Struct("<Q8sIB")  # phys_addr, data, len, is_write
_INTERNAL = struct.Struct("<II")  # suberror, ndata
_SYSTEM_EVENT = struct.Struct("<I")
_COALESCED_ENTRY = struct.Struct("<QII8s")
_EXIT_OFF = c.KVM_RUN_EXIT_OFFSET
_RFLAGS_IF = 1 << 9
KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3
_COALESCED_MAX = (4096 - 8) // _COALESCED_ENTRY.size


def _noop(signum: int, frame: object) -> None:
    """The kick signal only needs to interrupt KVM_RUN (no SA_RESTART), nothing else."""


def install_kick_handler() -> None:
    """Must run in the main thread before vCPU threads start."""
    signal.signal(KICK_SIGNAL, _noop)
    signal.siginterrupt(KICK_SIGNAL, True)


class VcpuRunner:
    """Runs one vCPU until the VM stops; reports the stop through `on_stop`."""

    def __init__(
        self,
        vcpu: Vcpu,
        pio: Bus,
        mmio: Bus,
        on_stop: Callable[[ExitReason], None],
        on_fault: Callable[[GuestFault], None],
        *,
        coalesced: bool = False,
    ) -> None:
        self.vcpu = vcpu
        self.pio = pio
        self.mmio = mmio
        self.on_stop = on_stop
        self.on_fault = on_fault
        self.coalesced = coalesced
        self.stopping = False
        self.exits = 0
        self.halted_no_irq = False
        self.paused = False
        self._gate = threading.Event()
        self._gate.set()
        self.thread: threading.Thread | None = None

    # -- control from other threads --------------------------------------------------------------

    def start(self) -> None:
        self.thread = threading.Thread(target=self._thread_main, name=f"vcpu{self.vcpu.index}", daemon=True)
        self.thread.start()

    def kick(self) -> None:
        """Make KVM_RUN return promptly (immediate_exit + a signal to the thread)."""
        self.vcpu.run.immediate_exit = 1
        t = self.thread
        if t is not None and t.ident is not None and t.is_alive():
            try:
                signal.pthread_kill(t.ident, KICK_SIGNAL)
            except (ProcessLookupError, OSError):
                pass

    def stop(self) -> None:
        self.stopping = True
        self._gate.set()
        self.kick()

    def pause(self) -> None:
        """Hold the vCPU outside KVM_RUN until resume()."""
        self._gate.clear()
        self.kick()

    def resume(self) -> None:
        self._gate.set()

    def join(self, timeout: float | None = None) -> None:
        if self.thread is not None:
            self.thread.join(timeout)

    # -- the loop ---------------------------------------------------------------------------------

    def _thread_main(self) -> None:
        try:
            self._loop()
        except GuestFault as exc:
            self.on_stop(ExitReason.of("guest-fault", f"vCPU {self.vcpu.index}: {exc}"))
        except Exception as exc:  # a VMM bug must stop this VM with a reason, never hang it
            self.on_stop(
                ExitReason.of("internal-error", f"vCPU {self.vcpu.index}: {type(exc).__name__}: {exc}")
            )

    def drain_coalesced(self) -> None:
        """Replay writes KVM buffered in the coalesced MMIO/PIO ring (shared by all vCPUs of the VM)."""
        m = self.vcpu.run_map
        base = c.KVM_COALESCED_MMIO_PAGE_OFFSET * 4096
        first, last = struct.unpack_from("<II", m, base)
        while first != last:
            if first >= _COALESCED_MAX:
                first = 0
                continue
            addr, length, pio, data = _COALESCED_ENTRY.unpack_from(
                m, base + 8 + first * _COALESCED_ENTRY.size
            )
            length = min(length, 8)
            value = int.from_bytes(data[:length], "little")
            (self.pio if pio else self.mmio).write(addr, length, value)
            first = (first + 1) % _COALESCED_MAX
            struct.pack_into("<I", m, base, first)

    def _loop(self) -> None:
        vcpu = self.vcpu
        fd = vcpu.fd
        run = vcpu.run
        m = vcpu.run_map
        ioctl = _libc.ioctl
        req = ctypes.c_ulong(c.KVM_RUN)
        zero = ctypes.c_ulong(0)
        io_unpack = _IO.unpack_from
        mmio_unpack = _MMIO.unpack_from
        pio_read = self.pio.read
        pio_write = self.pio.write
        mmio_read = self.mmio.read
        mmio_write = self.mmio.write
        coalesced = self.coalesced
        from_bytes = int.from_bytes
        exit_io, exit_mmio = c.KVM_EXIT_IO, c.KVM_EXIT_MMIO
        while not self.stopping:
            ret = ioctl(fd, req, zero)
            if ret < 0:
                err = ctypes.get_errno()
                if err in (errno.EINTR, errno.EAGAIN):
                    run.immediate_exit = 0
                    if not self._gate.is_set():
                        self.paused = True
                        self._gate.wait()
                        self.paused = False
                    elif not self.stopping:
                        self._check_halted()
                    continue
                self.on_stop(ExitReason.of("internal-error", f"KVM_RUN failed: errno {err}"))
                return
            self.exits += 1
            if coalesced:
                self.drain_coalesced()
            reason = run.exit_reason
            try:
                if reason == exit_io:
                    direction, size, port, count, off = io_unpack(m, _EXIT_OFF)
                    if direction:  # OUT
                        if count == 1:
                            pio_write(port, size, from_bytes(m[off : off + size], "little"))
                        else:
                            for i in range(min(count, 4096 // max(size, 1))):
                                p = off + i * size
                                pio_write(port, size, from_bytes(m[p : p + size], "little"))
                    else:
                        for i in range(min(count, 4096 // max(size, 1))):
                            p = off + i * size
                            m[p : p + size] = pio_read(port, size).to_bytes(size, "little")
                elif reason == exit_mmio:
                    addr, data, length, is_write = mmio_unpack(m, _EXIT_OFF)
                    length = min(length, 8)
                    if is_write:
                        mmio_write(addr, length, from_bytes(data[:length], "little"))
                    else:
                        m[_EXIT_OFF + 8 : _EXIT_OFF + 8 + length] = mmio_read(addr, length).to_bytes(
                            length, "little"
                        )
                else:
                    if self._other_exit(reason):
                        return
            except GuestFault as exc:
                # A device rejected guest input. Devices contain their own faults; one that escapes to here
                # is recorded and the vCPU keeps running (the access is treated as unclaimed).
                self.on_fault(exc)

    def _other_exit(self, reason: int) -> bool:
        """Handle rare exits. Returns True when the VM must stop."""
        m = self.vcpu.run_map
        idx = self.vcpu.index
        if reason == c.KVM_EXIT_SHUTDOWN:
            self.on_stop(ExitReason.of("triple-fault", f"vCPU {idx} triple-faulted (KVM_EXIT_SHUTDOWN)"))
            return True
        if reason == c.KVM_EXIT_HLT:
            self.on_stop(ExitReason.of("halted", f"vCPU {idx} halted"))
            return True
        if reason == c.KVM_EXIT_INTERNAL_ERROR:
            sub, _ndata = _INTERNAL.unpack_from(m, _EXIT_OFF)
            names = {1: "emulation failure", 2: "simultaneous exception", 3: "delivery event failure"}
            rip = self._rip()
            self.on_stop(
                ExitReason.of(
                    "internal-error", f"vCPU {idx}: KVM internal error: {names.get(sub, sub)} at rip={rip}"
                )
            )
            return True
        if reason == c.KVM_EXIT_FAIL_ENTRY:
            (hw,) = struct.unpack_from("<Q", m, _EXIT_OFF)
            self.on_stop(
                ExitReason.of("internal-error", f"vCPU {idx}: VM entry failed (hardware reason {hw:#x})")
            )
            return True
        if reason == c.KVM_EXIT_SYSTEM_EVENT:
            (kind,) = _SYSTEM_EVENT.unpack_from(m, _EXIT_OFF)
            if kind == KVM_SYSTEM_EVENT_RESET:
                self.on_stop(ExitReason.of("reset", f"vCPU {idx} requested a reset"))
            elif kind == KVM_SYSTEM_EVENT_SHUTDOWN:
                self.on_stop(ExitReason.of("poweroff", f"vCPU {idx} powered the VM off"))
            else:
                self.on_stop(ExitReason.of("guest-fault", f"vCPU {idx}: guest crash event {kind}"))
            return True
        if reason in (c.KVM_EXIT_INTR, c.KVM_EXIT_IRQ_WINDOW_OPEN):
            return False
        name = c.EXIT_REASON_NAMES.get(reason, str(reason))
        self.on_stop(ExitReason.of("internal-error", f"vCPU {idx}: unhandled KVM exit {name}"))
        return True

    def _rip(self) -> str:
        try:
            return hex(self.vcpu.get_regs().rip)
        except Exception:
            return "?"

    def _check_halted(self) -> None:
        """After a kick: record whether this vCPU sits in HLT with interrupts disabled (it can never wake)."""
        try:
            state = self.vcpu.get_mp_state()
            if state == c.KVM_MP_STATE_HALTED:
                self.halted_no_irq = not (self.vcpu.get_regs().rflags & _RFLAGS_IF)
            elif state in (c.KVM_MP_STATE_UNINITIALIZED, c.KVM_MP_STATE_INIT_RECEIVED):
                self.halted_no_irq = True  # an AP never started by the guest counts as idle
            else:
                self.halted_no_irq = False
        except Exception:
            self.halted_no_irq = False


def declare_surfaces() -> None:
    """Declare every KVM exit reason the exit loop handles (see `bulkhead.surface`)."""
    from bulkhead.surface import declare

    def exit_(name: str, accepts: str, handler: str, **meta: object) -> None:
        declare(
            "kvm-exit", name, owner=__name__, boundary="guest-vmm", accepts=accepts, handler=handler, **meta
        )

    exit_(
        "KVM_EXIT_IO",
        "direction, size, port, count and data from the shared kvm_run page; string I/O is capped at "
        "one page of data; each access goes to the PIO bus, which checks the whole [port, port+size) "
        "against one range (unclaimed: all-ones read / dropped write, counted)",
        "VcpuRunner._loop",
        dispatch="bulkhead.bus.Bus.read/Bus.write",
    )
    exit_(
        "KVM_EXIT_MMIO",
        "phys_addr, length (clamped to 8) and data from kvm_run; dispatched to the MMIO bus "
        "(unclaimed: all-ones read / dropped write, counted); a GuestFault from a device is recorded "
        "as a guest-fault event and the vCPU keeps running",
        "VcpuRunner._loop",
        dispatch="bulkhead.bus.Bus.read/Bus.write",
    )
    exit_(
        "KVM_COALESCED_PIO",
        "the coalesced ring KVM fills with buffered guest writes to port 0x80; ring indices are "
        "bounded by the ring size and each entry's length clamped to 8 before it is replayed on the bus",
        "VcpuRunner.drain_coalesced",
    )
    exit_(
        "KVM_EXIT_SHUTDOWN",
        "a triple fault: only this VM stops, with reason triple-fault (status 8)",
        "VcpuRunner._other_exit",
    )
    exit_(
        "KVM_EXIT_HLT",
        "HLT without an in-kernel LAPIC to wake it: this VM stops with reason halted (status 10)",
        "VcpuRunner._other_exit",
    )
    exit_(
        "KVM_EXIT_INTERNAL_ERROR",
        "emulation failures and delivery errors: suberror decoded by table lookup; this VM stops "
        "with reason internal-error (status 12)",
        "VcpuRunner._other_exit",
    )
    exit_(
        "KVM_EXIT_FAIL_ENTRY",
        "a failed VM entry (hardware reason printed): this VM stops with reason internal-error",
        "VcpuRunner._other_exit",
    )
    exit_(
        "KVM_EXIT_SYSTEM_EVENT",
        "reset -> reason reset, shutdown -> poweroff, any other type -> guest-fault; only this VM stops",
        "VcpuRunner._other_exit",
    )
    exit_(
        "KVM_EXIT_INTR",
        "KVM_RUN interrupted (kick signal or IRQ window): ignored, the loop re-enters the guest",
        "VcpuRunner._other_exit",
        also="KVM_EXIT_IRQ_WINDOW_OPEN",
    )
    exit_(
        "KVM_EXIT_OTHER",
        "any other exit reason (debug, exception, hypercall, NMI, ...): this VM stops with reason "
        "internal-error naming the exit; nothing guest-supplied is interpreted",
        "VcpuRunner._other_exit",
    )
