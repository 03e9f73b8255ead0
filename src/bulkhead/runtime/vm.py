"""build_vm / run_vm: the one wiring recipe (Firecracker builder.rs style).

`Machine.build()` validates and wires everything before any vCPU runs: guest memory, KVM VM with in-kernel
irqchip and PIT, buses and devices (attach_* functions), the kernel and boot structures, vCPU state.
`Machine.run()` starts the I/O thread and one thread per vCPU and blocks until the VM stops, returning an
ExitReason. Teardown always scrubs guest memory and closes every fd, whatever way the VM stopped.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from bulkhead.bus import Bus
from bulkhead.errors import ConfigError, GuestFault, HostError
from bulkhead.memory import GuestMemory
from bulkhead.memory.layout import (
    VIRTIO_FIRST_IRQ,
    VIRTIO_MMIO_BASE,
    VIRTIO_MMIO_SIZE,
    VIRTIO_MMIO_SLOTS,
    VIRTIO_MMIO_STRIDE,
)
from bulkhead.runtime.config import VmConfig
from bulkhead.runtime.eventloop import EventFd, EventLoop
from bulkhead.runtime.exits import ExitReason
from bulkhead.runtime.shutdown import attach_ged
from bulkhead.runtime.vcpu import VcpuRunner, install_kick_handler

__all__ = ["Machine", "run_vm"]

from bulkhead.devices import COM1_BASE, COM1_IRQ, SERIAL_LEN

DEBUG_EXIT_BASE, DEBUG_EXIT_LEN = 0xF4, 4
POST_PORT = 0x80
TSS_ADDR = 0xFFFB_D000
IDENTITY_MAP_ADDR = 0xFFFB_C000
MAX_IMAGE = 512 << 20
HALT_POLL = 0.2
MAX_EVENTS = 1000

EventSink = Callable[[str, dict[str, Any]], None]


class _PostSink:
    """Port 0x80 (POST codes): write-only, no side effects; the last code is kept for diagnostics."""

    last = 0
    writes = 0

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        self.last = value
        self.writes += 1


def _read_image(path: str, what: str) -> bytes:
    """Read a kernel or initrd file whole. Raises ConfigError with the reason."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what} {path} is not a regular file")
        if st.st_size > MAX_IMAGE:
            raise ConfigError(f"{what} {path} is larger than {MAX_IMAGE >> 20} MiB")
        chunks = []
        while chunk := os.read(fd, 1 << 24):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def _launch_digest(cfg: VmConfig, kernel: bytes, initrd: bytes | None) -> str | None:
    """The launch digest of the bytes being loaded, or None where the integrity module is not installed."""
    try:
        from bulkhead.integrity.launch import launch_digest_for_config
    except ImportError:
        return None
    return launch_digest_for_config(cfg, kernel, initrd)


def _check_launch_digest(cfg: VmConfig, kernel: bytes, initrd: bytes | None) -> None:
    """Refuse to build when the launch digest of these exact bytes differs from cfg.expected_digest.
    Raises ConfigError with the reason (also when the integrity module is unavailable: fail closed)."""
    try:
        from bulkhead.integrity.errors import IntegrityError
        from bulkhead.integrity.launch import check_expected_digest, launch_digest_for_config
    except ImportError as exc:
        raise ConfigError(f"cannot check the expected launch digest: {exc}") from None
    try:
        check_expected_digest(cfg, launch_digest_for_config(cfg, kernel, initrd))
    except IntegrityError as exc:
        raise ConfigError(str(exc)) from None


class Machine:
    """One VM. Not reusable: build() once, run() once, then it is closed."""

    def __init__(
        self,
        config: VmConfig,
        *,
        console: Callable[[bytes], None] | None = None,
        on_event: EventSink | None = None,
        console_input: bool = True,
        coalesce_post: bool = True,
        ioeventfd: bool = True,
        measure: bool = False,
        memory_fd: int = -1,
    ) -> None:
        self.config = config
        # Snapshots (runtime/snapshot.py): guest RAM in the host's memfd; measure: the launch digest at build.
        self.measure, self.memory_fd, self.mcg_cap = measure, memory_fd, 0
        self.launch_digest: str | None = None
        self.cpuid_tables: list[list[tuple[int, int, int, int, int, int, int]]] = []
        self.ioeventfd = ioeventfd
        self._console = console
        self._on_event = on_event
        self._console_input = console_input
        self._coalesce_post = coalesce_post
        self.events: list[tuple[float, str, dict[str, Any]]] = []
        self.mem: GuestMemory | None = None
        self.kvm: Any = None
        self.vm: Any = None
        self.pio = Bus.pio()
        self.mmio = Bus.mmio()
        self.runners: list[VcpuRunner] = []
        self.loop: EventLoop | None = None
        self.plan: Any = None
        self.serial: Any = None
        self.transports: list[Any] = []
        self._closers: list[Callable[[], None]] = []
        self._stop_reason: ExitReason | None = None
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._cmdline_extra: list[str] = []
        self._virtio_slots: list[tuple[int, int, int]] = []  # (base, size, irq), described in the ACPI DSDT

    # -- events -----------------------------------------------------------------------------------

    def record(self, event: str, **detail: Any) -> None:
        """Record a lifecycle or security event (bounded in memory, forwarded to the event sink)."""
        if len(self.events) < MAX_EVENTS:
            self.events.append((time.time(), event, detail))
        if self._on_event is not None:
            try:
                self._on_event(event, detail)
            except Exception:  # noqa: S110 - an event sink failure must not stop the VM
                pass

    def _on_fault(self, exc: GuestFault) -> None:
        self.record("guest-fault", device=exc.device, fault=exc.kind, message=str(exc))

    def request_stop(self, reason: ExitReason) -> None:
        """Stop the VM with `reason` (first reason wins). Safe from any thread and from signal handlers."""
        with self._lock:
            if self._stop_reason is None:
                self._stop_reason = reason
        for r in self.runners:
            r.stopping = True  # the calling vCPU leaves its loop at once; the others are kicked by run()
        self._stopped.set()

    # -- build ------------------------------------------------------------------------------------

    def build(self) -> None:
        """Validate and wire everything. Raises ConfigError, ImageError or HostError; nothing runs yet."""
        from bulkhead.boot import load_kernel
        from bulkhead.boot.acpi import VirtioSlot
        from bulkhead.hypervisor.kvm import Kvm

        cfg = self.config
        kernel = _read_image(cfg.kernel, "kernel")
        initrd = _read_image(cfg.initrd, "initrd") if cfg.initrd else None
        if cfg.expected_digest is not None:  # the bytes loaded below are the bytes measured: no TOCTOU
            _check_launch_digest(cfg, kernel, initrd)
        if self.measure:
            self.launch_digest = _launch_digest(cfg, kernel, initrd)
        self.kvm = Kvm()
        self._closers.append(self.kvm.close)
        max_vcpus = self.kvm.max_vcpus()
        if cfg.cpus > max_vcpus:
            raise HostError(f"--cpus {cfg.cpus} is more than this host's KVM allows ({max_vcpus})")
        self.platform()
        self.attach_virtio_devices()
        cmdline = " ".join(p for p in (cfg.cmdline, *self._cmdline_extra) if p)
        assert self.mem is not None
        self.plan = load_kernel(
            self.mem,
            kernel,
            initrd=initrd,
            cmdline=cmdline,
            cpus=cfg.cpus,
            protocol=cfg.boot_protocol,
            virtio=[VirtioSlot(*slot) for slot in self._virtio_slots],
        )
        self._setup_vcpus()
        self.record("vm-built", protocol=self.plan.protocol, cpus=cfg.cpus, mem_mib=cfg.mem_mib)

    def _setup_vm_platform(self) -> None:
        vm = self.vm
        assert self.mem is not None
        try:
            vm.set_tss_addr(TSS_ADDR)
            vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
        except HostError:
            pass  # not needed (or not offered) on every KVM flavour, e.g. AMD or PVM
        vm.create_irqchip()
        vm.create_pit2()
        for region in self.mem.regions:
            vm.set_user_memory_region(region.base, region.size, region.host_addr)

    # -- the builder API attach_* functions use (runtime/virtio.py: attach_virtio) -----------------

    def add_closer(self, closer: Callable[[], None]) -> None:
        """Run `closer` at teardown (in reverse order of registration)."""
        self._closers.append(closer)

    def irq_line(self, gsi: int) -> EventFd:
        """An irqfd-backed interrupt line to `gsi` (closed at teardown)."""
        efd = EventFd()
        self.vm.irqfd(efd.fd, gsi)
        self.add_closer(efd.close)
        return efd

    def attach_serial(self) -> None:
        from bulkhead.devices.serial import Serial
        from bulkhead.runtime.console import forward_stdin, open_serial

        cfg = self.config
        sink = self._console
        if sink is None:
            console = open_serial(cfg.serial)  # ConfigError for a file that cannot be opened
            self.add_closer(console.close)
            sink = console.write
        self.serial = Serial(self.irq_line(COM1_IRQ), sink)
        self.pio.register(COM1_BASE, SERIAL_LEN, self.serial, "serial-com1")
        if cfg.serial == "stdio" and self._console is None and self._console_input:
            assert self.loop is not None
            forward_stdin(self.loop, self.serial.enqueue_input)

    def attach_i8042(self) -> None:
        from bulkhead.devices.i8042 import I8042_BASE, I8042_KBD_IRQ, I8042_LEN, I8042Device

        self.i8042 = dev = I8042Device(  # kept for `vm shutdown` (runtime/shutdown.py: Ctrl-Alt-Del)
            on_reset=lambda: self.request_stop(ExitReason.of("reset", "guest reset the machine via the i8042")),
            kbd_irq=self.irq_line(I8042_KBD_IRQ),
        )
        self.pio.register(I8042_BASE, I8042_LEN, dev, "i8042")

    def attach_debug_exit(self) -> None:
        from bulkhead.devices.debug_exit import DebugExit

        dev = DebugExit(on_exit=lambda status: self.request_stop(ExitReason.debug_exit_status(status)))
        self.pio.register(DEBUG_EXIT_BASE, DEBUG_EXIT_LEN, dev, "debug-exit")

    def attach_post_port(self) -> None:
        self.post = _PostSink()
        self.pio.register(POST_PORT, 1, self.post, "post-code")
        if self._coalesce_post:
            # Write-only and side-effect free: KVM buffers the writes instead of exiting per `out`.
            self.vm.register_coalesced(POST_PORT, 1, pio=True)

    def attach_virtio_devices(self) -> None:
        """virtio-mmio devices (block, net, rng, vsock) from the config; announced on the kernel command line."""
        cfg = self.config
        if not (cfg.drives or cfg.nets or cfg.rng or cfg.vsock):
            return
        from bulkhead.runtime.virtio import attach_virtio

        attach_virtio(self)

    def next_virtio_slot(self) -> tuple[int, int]:
        """(MMIO base, IRQ) for the next virtio-mmio device, and its command-line announcement."""
        index = len(self.transports)
        if index >= VIRTIO_MMIO_SLOTS:  # one IOAPIC pin each (memory/layout.py)
            raise ConfigError(f"too many virtio devices (at most {VIRTIO_MMIO_SLOTS})")
        base, irq = VIRTIO_MMIO_BASE + index * VIRTIO_MMIO_STRIDE, VIRTIO_FIRST_IRQ + index
        self._cmdline_extra.append(f"virtio_mmio.device={VIRTIO_MMIO_SIZE:#x}@{base:#x}:{irq}")
        self._virtio_slots.append((base, VIRTIO_MMIO_SIZE, irq))
        return base, irq

    def _setup_vcpus(self) -> None:
        from bulkhead.boot.cpuid import CpuidEntry, filter_cpuid
        from bulkhead.boot.msrs import boot_msrs, mcg_cap_for
        from bulkhead.runtime.x86 import setup_vcpu

        supported = [CpuidEntry(*t) for t in self.kvm.supported_cpuid()]
        msrs = boot_msrs()
        try:
            mcg_cap = mcg_cap_for(*self.kvm.mce_cap_supported())
        except HostError:
            mcg_cap = 0  # no MCE emulation on this host: KVM's default stays
        self.mcg_cap = mcg_cap
        for index in range(self.config.cpus):
            vcpu = self.vm.create_vcpu(index)
            cpuid = [
                (e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                for e in filter_cpuid(supported, index, self.config.cpus)
            ]
            self.cpuid_tables.append(cpuid)
            refused = setup_vcpu(vcpu, self.plan, cpuid, msrs, boot_cpu=index == 0, mcg_cap=mcg_cap)
            if refused and index == 0:
                self.record("msr-refused", msrs=[f"{i:#x}" for i in refused])
            self.add_runner(vcpu)

    def platform(self) -> None:
        """Guest RAM, the KVM VM with its in-kernel chips, the I/O loop and the legacy devices."""
        try:
            self.mem = GuestMemory.for_size(self.config.mem_bytes, fd=self.memory_fd)
        except MemoryError as exc:
            raise HostError(str(exc)) from None
        self._closers.append(self.mem.close)
        self.vm = self.kvm.create_vm()
        self._closers.append(self.vm.close)
        self._setup_vm_platform()
        self.loop = EventLoop(self._on_fault, self._on_loop_error)
        self._closers.append(self.loop.close)
        self.attach_serial()
        self.attach_i8042()
        attach_ged(self)  # runtime/shutdown.py: the ACPI power button of `vm shutdown`
        self.attach_debug_exit()
        self.attach_post_port()

    def add_runner(self, vcpu: Any) -> None:
        """Run `vcpu` with this machine's buses and stop/fault handlers."""
        self.runners.append(
            VcpuRunner(vcpu, self.pio, self.mmio, self.request_stop, self._on_fault, coalesced=self._coalesce_post)
        )

    # -- run --------------------------------------------------------------------------------------

    def _on_loop_error(self, exc: BaseException) -> None:
        self.request_stop(ExitReason.of("internal-error", f"I/O thread: {type(exc).__name__}: {exc}"))

    def run(self) -> ExitReason:
        """Run until the VM stops. Must be called from the main thread (signal handling)."""
        if not self.runners or self.loop is None:
            raise RuntimeError("build() first")
        install_kick_handler()
        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(
                sig, lambda s, f: self.request_stop(ExitReason.of("interrupted", f"signal {s}"))
            )
        self.record("vm-started")
        try:
            self.loop.start()
            for r in self.runners:
                r.start()
            _supervise(self)
        finally:
            for r in self.runners:
                r.stop()
            for r in self.runners:
                r.join(2.0)
            self.loop.stop()
            if self.runners[0].coalesced:  # one ring per VM: writes still buffered reach their devices
                self.runners[0].drain_coalesced()
            if self.serial is not None:
                self.serial.flush()
            for sig, handler in old.items():
                signal.signal(sig, handler)
        reason = self._stop_reason or ExitReason.of("internal-error", "VM stopped without a reason")
        self.record("vm-stopped", kind=reason.kind, status=reason.status, detail=reason.detail)
        return reason

    def pause(self) -> None:
        for r in self.runners:
            r.pause()

    def resume(self) -> None:
        for r in self.runners:
            r.resume()

    def stats(self) -> dict[str, Any]:
        """Counters for diagnostics and benchmarks (call after run(), before close()): runtime/stats.py."""
        from bulkhead.runtime.stats import machine_stats

        return machine_stats(self, self._stop_reason)

    # -- teardown ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Scrub guest memory, close fds. Idempotent."""
        while self._closers:
            closer = self._closers.pop()
            try:
                closer()
            except Exception:  # noqa: S110 - best effort; teardown must run to the end
                pass


def _supervise(self: Machine) -> None:
    """Wait for a stop request; meanwhile detect a VM whose vCPUs all sit in HLT with interrupts off."""
    last = [-1] * len(self.runners)
    idle_rounds = 0
    while not self._stopped.wait(HALT_POLL):
        if self.serial is not None:
            self.serial.flush()  # a prompt without a newline must not wait for the VM to stop
        quiet = [r.exits == last[i] for i, r in enumerate(self.runners)]
        last = [r.exits for r in self.runners]
        for r, q in zip(self.runners, quiet, strict=True):
            if q:
                r.kick()
        time.sleep(0.005)
        if all(quiet) and all(r.halted_no_irq for r in self.runners):
            idle_rounds += 1
            if idle_rounds >= 2:
                self.request_stop(
                    ExitReason.of("halted", "every vCPU is halted with interrupts disabled")
                )
        else:
            idle_rounds = 0


def run_vm(
    config: VmConfig,
    *,
    console: Callable[[bytes], None] | None = None,
    on_event: EventSink | None = None,
    console_input: bool = True,
    stats_path: str | None = None,
    ioeventfd: bool = True,
    snapshot: Any = None,
    restore: Any = None,
) -> ExitReason:
    """Build and run one VM to completion. Raises ConfigError/ImageError/HostError before the guest runs.

    With `stats_path`, counters (see Machine.stats) are written there as JSON when the VM stops.
    `restore` (runtime/snapshot.py RestoreSource): rebuild the VM from the memfds the host decrypted a
    snapshot into, instead of booting `config`'s kernel. `snapshot` (SnapshotTarget): when the host stops
    the VM (SIGINT/SIGTERM), save it; the reason is then "snapshotted". A guest that stops by itself is
    not saved."""
    fds = restore if restore is not None else snapshot
    machine = Machine(
        config, console=console, on_event=on_event, console_input=console_input, ioeventfd=ioeventfd,
        measure=snapshot is not None, memory_fd=fds.memory_fd if fds is not None else -1,
    )
    try:
        if restore is not None:
            from bulkhead.runtime.snapshot import restore_machine

            # on_built: e.g. the restore ledger, which raises SnapshotError for a second restore
            restore_machine(machine, restore.header, restore.state, on_built=restore.on_built)
        else:
            machine.build()
        reason = machine.run()
        if snapshot is not None and reason.kind == "interrupted":
            from bulkhead.runtime.snapshot import save_state, seal_snapshot

            save_state(machine, snapshot.state_fd)
            info = seal_snapshot(snapshot, config=machine.config, launch_digest=machine.launch_digest)
            reason = ExitReason.of(
                "snapshotted", f"saved to {info['path']} ({info['pages']} pages, {info['bytes']} bytes, "
                f"snapshot {info['snapshot_id']})"
            )
        if stats_path:
            from bulkhead.runtime.stats import write_stats

            write_stats(stats_path, machine.stats())
        return reason
    finally:
        machine.close()


def declare_surfaces() -> None:
    """Declare the ranges this module registers itself (POST port) and the in-kernel KVM devices it
    creates (irqchip, PIT): guest-reachable, handled by the host kernel, not by bulkhead code."""
    from bulkhead.memory.layout import IOAPIC_BASE, LAPIC_BASE
    from bulkhead.surface import declare

    declare(
        "pio",
        "post-code",
        owner=__name__,
        boundary="guest-vmm",
        accepts="writes of any width are kept as the last POST code (coalesced by KVM, no exit per "
        "write); reads return all ones; no side effects",
        base=POST_PORT,
        length=1,
        handler="_PostSink.read/_PostSink.write",
    )
    in_kernel = "host kernel KVM (KVM_CREATE_IRQCHIP / KVM_CREATE_PIT2); never reaches bulkhead"
    for name, base, length, what in (
        ("kvm-pic-master", 0x20, 2, "8259A master PIC registers"),
        ("kvm-pit", 0x40, 4, "8254 PIT counters and mode register"),
        ("kvm-pit-speaker", 0x61, 1, "PIT channel 2 gate / speaker port"),
        ("kvm-pic-slave", 0xA0, 2, "8259A slave PIC registers"),
        ("kvm-pic-elcr", 0x4D0, 2, "PIC edge/level control registers"),
    ):
        declare(
            "pio",
            name,
            owner=__name__,
            boundary="guest-vmm",
            accepts=f"{what}, emulated in the host kernel",
            base=base,
            length=length,
            handler=in_kernel,
            in_kernel=True,
        )
    for name, base, length, what in (
        ("kvm-ioapic", IOAPIC_BASE, 0x100, "I/O APIC index/data window (24 pins)"),
        ("kvm-lapic", LAPIC_BASE, 0x1000, "local APIC page of each vCPU (xAPIC)"),
        ("kvm-tss-identity-map", IDENTITY_MAP_ADDR, 0x4000, "KVM's private TSS and identity page table"),
    ):
        declare(
            "mmio",
            name,
            owner=__name__,
            boundary="guest-vmm",
            accepts=f"{what}, emulated or backed in the host kernel",
            base=base,
            length=length,
            handler=in_kernel,
            in_kernel=True,
        )
