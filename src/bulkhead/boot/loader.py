"""load_kernel: place a kernel, initrd, command line and every boot structure in guest memory (pure).

Formats are selected by magic: "\\x7fELF" -> ELF, 0xAA55 at 0x1fe + "HdrS" at 0x202 -> bzImage.

    protocol="auto":  ELF with a PVH note -> "pvh"; ELF without -> "linux-elf"; bzImage -> "linux-bzimage"
    protocol="pvh":   the ELF must carry XEN_ELFNOTE_PHYS32_ENTRY
    protocol="linux": Linux 64-bit entry (boot_params in RSI) even for an ELF that has a PVH note

Everything is validated before the first byte is written into guest memory: the image itself, the
command line against the protocol's limit (bzImage: its cmdline_size; Linux ELF: 2047 bytes; PVH:
4095 bytes), the kernel's placement (inside guest RAM, clear of every structure of the loader table
that this protocol writes, below 4 GiB; like rust-vmm's linux-loader, nothing else is reserved), the
initrd's placement (page aligned at the top of the first RAM region, below
min(initrd_addr_max + 1, end of the first region, 3 GiB), above the kernel) and the vCPU count.
The loader table (every structure written, its slot and owner) is bulkhead.boot.layout.LOADER_TABLE.

No I/O: the caller reads the files; this module only reads the bytes it is given and writes guest
memory through GuestMemory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from bulkhead.boot import layout as L
from bulkhead.boot.acpi import VirtioSlot, build_acpi
from bulkhead.boot.bzimage import BzImage, is_bzimage, parse_bzimage
from bulkhead.boot.elf import ElfImage, check_entry, check_placement, is_elf, parse_elf
from bulkhead.boot.mptable import build_mptable
from bulkhead.boot.params import (
    E820Entry,
    build_boot_params,
    build_e820,
    build_memmap,
    build_modlist,
    build_start_info,
)
from bulkhead.boot.pvh import find_pvh_entry
from bulkhead.boot.x86 import (
    CR0_ET,
    CR0_NE,
    CR0_PE,
    CR0_PG,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    RFLAGS_RESERVED,
    Segment,
    build_gdt,
    build_page_tables,
    segments_for,
)
from bulkhead.config import BOOT_PROTOCOLS, MAX_CPUS
from bulkhead.errors import ConfigError, ImageError
from bulkhead.memory import GuestMemory
from bulkhead.memory.layout import HIMEM_START, MMIO32_END, MMIO32_START

__all__ = [
    "CMDLINE_LIMIT_LINUX_ELF",
    "CMDLINE_LIMIT_PVH",
    "PROTOCOLS",
    "BootPlan",
    "load_kernel",
]

PROTOCOLS = BOOT_PROTOCOLS  # bulkhead.config: the one list
CMDLINE_LIMIT_LINUX_ELF = 2047
CMDLINE_LIMIT_PVH = 4095
PAGE = 0x1000
FOUR_GIB = 1 << 32
# boot.rst: a protocol 2.02 or earlier kernel, or one with initrd_addr_max 0, takes 0x37ffffff.
DEFAULT_INITRD_ADDR_MAX = 0x37FF_FFFF


class BootPlan(NamedTuple):
    """Everything the runtime needs to set the boot vCPU's state, plus what was placed where.

    Registers are final values for KVM_SET_REGS / KVM_SET_SREGS. `kernel_range` is the guest
    physical range [start, end) reserved for the kernel (bzImage: load address + max(init_size,
    file size); ELF: lowest to highest loaded byte), `initrd_range` the initrd's [start, end).
    """

    protocol: str  # "linux-bzimage", "linux-elf" or "pvh"
    long_mode: bool
    rip: int
    rsp: int
    rsi: int  # boot_params (Linux), 0 for PVH
    rbx: int  # hvm_start_info (PVH), 0 for Linux
    rflags: int
    cr0: int
    cr3: int
    cr4: int
    efer: int
    gdt: tuple[int, int]  # (base, limit)
    idt: tuple[int, int]  # (base, limit)
    cs: Segment
    ds: Segment
    es: Segment
    fs: Segment
    gs: Segment
    ss: Segment
    tr: Segment
    kernel_range: tuple[int, int]
    initrd_range: tuple[int, int] | None
    cmdline: str
    e820: tuple[E820Entry, ...]
    boot_info: int  # guest address of the zero page or hvm_start_info
    mptable: int  # guest address of the MP floating pointer
    cpus: int
    acpi_rsdp: int  # guest address of the ACPI RSDP
    structures: tuple[tuple[str, int, int], ...]  # (loader-table name, start, end) actually written


_Write = tuple[int, bytes | int]  # (guest address, bytes to copy, or a length to zero-fill)


def _cmdline_bytes(cmdline: str, limit: int, what: str, error: type[ConfigError] = ConfigError) -> bytes:
    """The command line's bytes. `error`: ImageError where the limit comes from the image itself (a
    bzImage's cmdline_size), so a mutated image can only raise ImageError (tests/test_boot_fuzz.py)."""
    if "\0" in cmdline:
        raise ConfigError("the kernel command line must not contain a NUL character")
    raw = cmdline.encode("utf-8")
    if len(raw) > limit:
        raise error(f"the kernel command line is {len(raw)} bytes; {what} accepts at most {limit}")
    return raw


def _detect(kernel: bytes) -> ElfImage | BzImage:
    if is_elf(kernel):
        return parse_elf(kernel)
    if is_bzimage(kernel):
        return parse_bzimage(kernel)
    raise ImageError("unrecognised kernel image: neither an ELF file nor a bzImage (no 'HdrS' header)")


def _place_initrd(size: int, limit_end: int, kernel_end: int) -> tuple[int, int]:
    if size == 0:
        raise ImageError("the initrd is empty")
    start = (limit_end - size) & ~(PAGE - 1)
    if limit_end < size or start < max(kernel_end, HIMEM_START):
        raise ImageError(
            f"the initrd ({size} bytes) does not fit between the kernel (ending at {kernel_end:#x}) "
            f"and {limit_end:#x}"
        )
    return start, start + size


def _check_in_ram(what: str, start: int, end: int, ram: list[tuple[int, int]]) -> None:
    """Raise ImageError unless [start, end) lies in one guest RAM region; say whether it is in the
    32-bit MMIO hole or beyond the end of RAM."""
    if any(base <= start and end <= base + size for base, size in ram):
        return
    if start < MMIO32_END and end > MMIO32_START:
        raise ImageError(
            f"{what} [{start:#x}, {end:#x}) is not inside guest RAM: it overlaps the 32-bit MMIO hole "
            f"[{MMIO32_START:#x}, {MMIO32_END:#x})"
        )
    top = max(base + size for base, size in ram)
    raise ImageError(f"{what} [{start:#x}, {end:#x}) is not inside guest RAM (guest RAM ends at {top:#x})")


def _check_structures(what: str, start: int, end: int, written: list[tuple[str, int, int]]) -> None:
    """Raise ImageError when [start, end) overlaps a boot structure in `written` (name, start, end)."""
    for name, s0, s1 in written:
        if start < s1 and s0 < end:
            raise ImageError(
                f"{what} [{start:#x}, {end:#x}) overlaps the {name} [{s0:#x}, {s1:#x}) that bulkhead "
                "writes at boot (see the loader table in docs/GUEST_KERNEL.md)"
            )


class _Kernel(NamedTuple):
    """The kernel as one boot protocol loads it: what to write, where it lies, how it is entered."""

    protocol: str  # linux-bzimage | linux-elf | pvh
    entry: int
    raw_cmdline: bytes
    writes: list[_Write]
    parts: list[tuple[str, int, int]]  # (what, start, end) of guest RAM the kernel takes
    loaded: tuple[int, int]
    initrd_max_end: int
    setup_header: bytes | None


def load_kernel(
    mem: GuestMemory,
    kernel: bytes,
    *,
    initrd: bytes | None,
    cmdline: str,
    cpus: int,
    protocol: str = "auto",
    virtio: Sequence[VirtioSlot] = (),
) -> BootPlan:
    """Validate `kernel` (and `initrd`, `cmdline`) and write everything needed to boot into `mem`.

    `virtio` lists the populated virtio-mmio slots, described in the ACPI DSDT.
    Raises ImageError (a ConfigError) for a malformed or unsuitable image or initrd (among them one
    that overlaps a structure of the loader table, bulkhead.boot.layout.LOADER_TABLE, or leaves guest
    RAM), ConfigError for a bad protocol name, command line or vCPU count, or guest RAM too small for
    the layout; ValueError when `mem` is already closed. Guest memory is untouched when anything is
    rejected.
    """
    if mem.closed:
        raise ValueError("load_kernel needs open guest memory; this GuestMemory is closed")
    if protocol not in PROTOCOLS:
        raise ConfigError(f"boot protocol must be one of {', '.join(PROTOCOLS)}, not {protocol!r}")
    if not 1 <= cpus <= MAX_CPUS:
        raise ConfigError(f"the boot loader supports 1 to {MAX_CPUS} vCPUs, not {cpus}")
    kernel = bytes(kernel)
    ram = [(r.base, r.size) for r in mem.regions]
    e820 = build_e820(ram)
    region0_end = ram[0][0] + ram[0][1]
    image = _detect(kernel)
    if isinstance(image, BzImage):
        k = _bzimage_kernel(image, kernel, protocol, cmdline, region0_end)
    else:
        k = _elf_kernel(image, kernel, protocol, cmdline, ram)
    writes = list(k.writes)
    for what, a0, a1 in k.parts:
        _check_in_ram(what, a0, a1, ram)
    initrd_range: tuple[int, int] | None = None
    if initrd is not None:
        limit_end = min(k.initrd_max_end, region0_end, MMIO32_START)
        initrd_range = _place_initrd(len(initrd), limit_end, k.loaded[1])
        writes.append((initrd_range[0], bytes(initrd)))
    structs, boot_info, gdt = _boot_structures(k, cpus, virtio, e820, initrd_range)
    written = _check_slots(k, structs, initrd_range)
    _write_all(mem, writes + [(addr, item) for _, addr, item in structs])
    return _plan(k, boot_info, gdt, initrd_range, cmdline, e820, cpus, written)


def _bzimage_kernel(image: BzImage, kernel: bytes, protocol: str, cmdline: str, region0_end: int) -> _Kernel:
    """The Linux boot protocol's 64-bit entry of a bzImage (Documentation/arch/x86/boot.rst)."""
    if protocol == "pvh":
        raise ImageError("a bzImage has no PVH entry point; PVH needs an ELF kernel with a PVH note")
    hdr = image.header
    limit = min(hdr.cmdline_size, L.CMDLINE_MAX - 1)
    raw_cmdline = _cmdline_bytes(cmdline, limit, "this bzImage", ImageError)
    k0, k1 = image.load_address, image.load_address + image.memory_needed
    if k1 > region0_end:
        raise ImageError(
            f"bzImage needs [{k0:#x}, {k1:#x}) (init_size {hdr.init_size:#x}) but guest RAM below "
            f"the MMIO hole ends at {region0_end:#x}"
        )
    writes: list[_Write] = [(k0, kernel[image.kernel_offset : image.kernel_offset + image.kernel_size]),
                            (k0 + image.kernel_size, image.memory_needed - image.kernel_size)]
    return _Kernel("linux-bzimage", image.entry64, raw_cmdline, writes,
                   [("bzImage kernel (load address + init_size)", k0, k1)], (k0, k1),
                   (hdr.initrd_addr_max or DEFAULT_INITRD_ADDR_MAX) + 1, image.header_bytes(kernel))


def _elf_kernel(image: ElfImage, kernel: bytes, protocol: str, cmdline: str, ram: list[tuple[int, int]]) -> _Kernel:
    """An ELF kernel: entered through its PVH note (Xen's hvm_start_info) or, 64-bit, as Linux ELF."""
    pvh_entry = find_pvh_entry(image)
    if protocol == "pvh" or (protocol == "auto" and pvh_entry is not None):
        if pvh_entry is None:
            raise ImageError("the ELF kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")
        name = "pvh"
        entry = pvh_entry
        raw_cmdline = _cmdline_bytes(cmdline, CMDLINE_LIMIT_PVH, "the PVH boot protocol")
        check_entry(image, entry, "PVH entry point")
    else:
        if image.elf_class != 64:
            raise ImageError("a 32-bit ELF kernel can only boot through PVH, and it has no PVH note")
        name = "linux-elf"
        entry = image.entry
        raw_cmdline = _cmdline_bytes(cmdline, CMDLINE_LIMIT_LINUX_ELF, "the Linux ELF boot path")
        check_entry(image, entry)
    for seg in image.segments:
        if seg.memsz:
            _check_in_ram("ELF segment", seg.paddr, seg.end, ram)
    check_placement(image.segments, ram)
    k0, k1 = image.loaded_range
    if k1 > FOUR_GIB:
        raise ImageError(f"the ELF kernel ends at {k1:#x}, above the identity-mapped 4 GiB")
    writes: list[_Write] = []
    parts = []
    for seg in image.segments:
        if seg.memsz:
            writes.append((seg.paddr, kernel[seg.offset : seg.offset + seg.filesz]))
            writes.append((seg.paddr + seg.filesz, seg.memsz - seg.filesz))
            parts.append(("ELF segment", seg.paddr, seg.end))
    return _Kernel(name, entry, raw_cmdline, writes, parts, (k0, k1), FOUR_GIB, None)


def _boot_structures(k: _Kernel, cpus: int, virtio: Sequence[VirtioSlot], e820: tuple[E820Entry, ...],
                     initrd_range: tuple[int, int] | None) -> tuple[list[tuple[str, int, bytes | int]], int, bytes]:
    """The boot structures of the loader table, each tagged with its slot name; the address the entry
    gets in rsi/rbx (zero page or hvm_start_info); the GDT."""
    acpi = build_acpi(cpus, virtio)
    structs: list[tuple[str, int, bytes | int]] = [("command line", L.CMDLINE_START, k.raw_cmdline + b"\0")]
    cmdline_addr = L.CMDLINE_START
    if k.protocol == "pvh":
        modules = [(initrd_range[0], initrd_range[1] - initrd_range[0])] if initrd_range else []
        structs.append(("PVH memory map", L.MEMMAP_START, build_memmap(e820)))
        if modules:
            structs.append(("PVH module list", L.MODLIST_START, build_modlist(modules)))
        start_info = build_start_info(
            cmdline_addr=cmdline_addr,
            memmap_addr=L.MEMMAP_START,
            memmap_entries=len(e820),
            modlist_addr=L.MODLIST_START if modules else 0,
            nr_modules=len(modules),
            rsdp_addr=L.ACPI_RSDP_START,
        )
        structs.append(("PVH hvm_start_info", L.START_INFO_START, start_info))
        boot_info = L.START_INFO_START
    else:
        zero_page = build_boot_params(
            setup_header=k.setup_header,
            cmdline_addr=cmdline_addr,
            cmdline_size=CMDLINE_LIMIT_LINUX_ELF,
            e820=e820,
            initrd=(initrd_range[0], initrd_range[1] - initrd_range[0]) if initrd_range else None,
            code32_start=k.loaded[0] if k.setup_header is not None else 0,
            acpi_rsdp_addr=L.ACPI_RSDP_START,
        )
        structs.append(("Linux boot_params (zero page)", L.ZERO_PAGE_START, zero_page))
        structs.append(("page tables", L.PML4_START, build_page_tables(L.PML4_START)))
        boot_info = L.ZERO_PAGE_START
    gdt = build_gdt()
    structs.append(("boot TSS", L.BOOT_TSS_START, L.BOOT_TSS_SIZE))
    structs.append(("GDT", L.GDT_START, gdt))
    structs.append(("IDT", L.IDT_START, L.IDT_LIMIT + 1))
    structs.append(("boot stack", L.BOOT_STACK_POINTER & ~(PAGE - 1), PAGE))
    structs.append(("MP table", L.MPTABLE_START, build_mptable(cpus)))
    structs.extend(acpi.writes())
    return structs, boot_info, gdt


def _check_slots(k: _Kernel, structs: list[tuple[str, int, bytes | int]],
                 initrd_range: tuple[int, int] | None) -> list[tuple[str, int, int]]:
    """Each structure inside its loader-table slot (bulkhead.boot.layout), and neither the kernel nor the
    initrd over any of them. Returns (name, start, end) of each structure."""
    written: list[tuple[str, int, int]] = []
    for sname, addr, item in structs:
        length = item if isinstance(item, int) else len(item)
        slot = L.slot(sname)
        if k.protocol not in slot.protocols or not slot.start <= addr <= addr + length <= slot.end:
            raise AssertionError(f"{sname} [{addr:#x}, +{length:#x}) is outside its loader-table slot")
        written.append((sname, addr, addr + length))
    for what, a0, a1 in k.parts:
        _check_structures(what, a0, a1, written)
    if initrd_range is not None:
        _check_structures("initrd", initrd_range[0], initrd_range[1], written)
    return written


def _write_all(mem: GuestMemory, all_writes: list[_Write]) -> None:
    """Validate every destination before the first write (guest memory is untouched on a refusal)."""
    for addr, item in all_writes:
        length = item if isinstance(item, int) else len(item)
        if not mem.contains(addr, length):
            raise ImageError(f"boot data [{addr:#x}, +{length:#x}) does not fit in guest RAM")
    for addr, item in all_writes:
        if isinstance(item, int):
            if item:
                mem.fill(addr, item)
        else:
            mem.write(addr, item)


def _plan(k: _Kernel, boot_info: int, gdt: bytes, initrd_range: tuple[int, int] | None, cmdline: str,
          e820: tuple[E820Entry, ...], cpus: int, written: list[tuple[str, int, int]]) -> BootPlan:
    """The register state the entry expects: 64-bit long mode with paging (Linux), or 32-bit protected
    mode without paging (PVH, boot_info in ebx)."""
    long_mode = k.protocol != "pvh"
    segs = segments_for(long_mode)
    return BootPlan(
        protocol=k.protocol,
        long_mode=long_mode,
        rip=k.entry,
        rsp=L.BOOT_STACK_POINTER,
        rsi=boot_info if long_mode else 0,
        rbx=0 if long_mode else boot_info,
        rflags=RFLAGS_RESERVED,
        cr0=(CR0_PE | CR0_ET | CR0_NE | CR0_PG) if long_mode else (CR0_PE | CR0_ET),
        cr3=L.PML4_START if long_mode else 0,
        cr4=CR4_PAE if long_mode else 0,
        efer=(EFER_LME | EFER_LMA) if long_mode else 0,
        gdt=(L.GDT_START, len(gdt) - 1),
        idt=(L.IDT_START, L.IDT_LIMIT),
        cs=segs["cs"],
        ds=segs["ds"],
        es=segs["es"],
        fs=segs["fs"],
        gs=segs["gs"],
        ss=segs["ss"],
        tr=segs["tr"],
        kernel_range=k.loaded,
        initrd_range=initrd_range,
        cmdline=cmdline,
        e820=e820,
        boot_info=boot_info,
        mptable=L.MPTABLE_START,
        cpus=cpus,
        acpi_rsdp=L.ACPI_RSDP_START,
        structures=tuple(written),
    )


def declare_surfaces() -> None:
    """Declare the boot loader's image-facing entry point (see `bulkhead.surface`)."""
    from bulkhead.surface import declare

    declare(
        "boot-parser",
        "load-kernel",
        owner=__name__,
        boundary="image-vmm",
        accepts="user-supplied kernel bytes (format chosen by magic), initrd bytes and command line; "
        "every placement is validated before guest memory is written; bad input -> ImageError/ConfigError",
        handler="load_kernel",
        fuzz="fuzz/fuzz_boot_images.py",
        spec="Documentation/arch/x86/boot.rst; Xen PVH start info",
    )
