"""The boot tables docs/GUEST_KERNEL.md prints, generated from the code that boots guests.

`render_cpu_state()` loads a minimal PVH ELF and a minimal Linux ELF with the real loader and prints
the register values of the two BootPlans, each with the rule it follows; `render_loader_table()`
(bulkhead.boot.layout) prints the loader table. tests/test_boot_layout.py checks the document holds
exactly these texts, between the markers `<!-- NAME:begin -->` and `<!-- NAME:end -->`.

    python -m bulkhead.boot.docs    # rewrite those sections of docs/GUEST_KERNEL.md in place
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from bulkhead.boot import layout as L
from bulkhead.boot.craft import make_elf
from bulkhead.boot.loader import BootPlan, load_kernel
from bulkhead.boot.msrs import MCE_BANKS_DEF, boot_msrs
from bulkhead.boot.x86 import Segment
from bulkhead.memory import GuestMemory

__all__ = ["SECTIONS", "render_cpu_state", "rewrite", "sections"]

_PVH = "PVH ABI (xen docs/misc/pvh.pandoc)"
_LNX = 'Linux boot.rst "64-bit BOOT PROTOCOL"'
_FC = "Firecracker (arch/x86_64/regs.rs, gdt.rs)"


def _plans() -> tuple[BootPlan, BootPlan]:
    code = b"\xf4" * 16
    with GuestMemory.for_size(16 << 20) as mem:
        pvh = load_kernel(mem, make_elf([(0x100000, code, 16)], 0x100000, pvh_entry=0x100000),
                          initrd=None, cmdline="", cpus=1)
    with GuestMemory.for_size(16 << 20) as mem:
        lnx = load_kernel(mem, make_elf([(0x100000, code, 16)], 0x100000), initrd=None, cmdline="", cpus=1)
    return pvh, lnx


def _seg(s: Segment) -> str:
    kind = "TSS" if not s.s else ("code" if s.type & 8 else "data")
    bits = "64-bit" if s.l else ("32-bit" if s.db else "")
    return f"`{s.selector:#x}` {bits} {kind}, base {s.base:#x}, limit {s.limit:#x}, type {s.type:#x}".replace(
        "  ", " "
    )


def render_cpu_state() -> str:
    """The boot vCPU's registers for PVH and for the Linux 64-bit protocol, with their sources."""
    pvh, lnx = _plans()
    rows: list[tuple[str, str, str, str]] = [
        ("RIP", "PVH note entry", "ELF `e_entry` / bzImage load address + 0x200", f"{_PVH}; {_LNX}"),
        ("EBX / RBX", f"`{pvh.rbx:#x}` (hvm_start_info)", f"`{lnx.rbx:#x}`", _PVH),
        ("ESI / RSI", f"`{pvh.rsi:#x}`", f"`{lnx.rsi:#x}` (boot_params)", _LNX),
        ("ESP / RSP", f"`{pvh.rsp:#x}`", f"`{lnx.rsp:#x}`",
         "unspecified by both; the boot stack of the loader table (Firecracker: 0x8ff0)"),
        ("RFLAGS", f"`{pvh.rflags:#x}`", f"`{lnx.rflags:#x}`", f"IF, TF, VM clear ({_PVH}; {_LNX})"),
        ("CR0", f"`{pvh.cr0:#x}` (PE, ET)", f"`{lnx.cr0:#x}` (PG, NE, ET, PE)",
         f"PE set, PG clear ({_PVH}); paging on ({_LNX}); NE as Linux itself sets it"),
        ("CR3", f"`{pvh.cr3:#x}`", f"`{lnx.cr3:#x}` (PML4 of the identity map of 0..4 GiB)", _LNX),
        ("CR4", f"`{pvh.cr4:#x}`", f"`{lnx.cr4:#x}` (PAE)", f"{_PVH}: all clear; PAE for long mode ({_FC})"),
        ("EFER", f"`{pvh.efer:#x}`", f"`{lnx.efer:#x}` (LME, LMA)", f"{_PVH}: long mode off; {_FC}"),
        ("CS", _seg(pvh.cs), _seg(lnx.cs), f"flat 4 GiB code ({_PVH}); `__BOOT_CS` 0x10 ({_LNX})"),
        ("DS, ES, SS, FS, GS", _seg(pvh.ds), _seg(lnx.ds),
         f"flat 4 GiB data ({_PVH}); `__BOOT_DS` 0x18 ({_LNX})"),
        ("TR", _seg(pvh.tr), _seg(lnx.tr),
         f"a busy 32-bit TSS. Linux: Firecracker's descriptor (regs.rs: 0x808b, limit 0xfffff pages). "
         f"PVH: the same, deliberately: {_PVH} asks limit 0x67 (Firecracker's PVH path follows it), but "
         "that TSS has no I/O bitmap and ring-3 port I/O at IOPL 3 faults on PVM hosts, while it runs "
         "on QEMU, whose firmware leaves TR's reset value (limit 0xffff)"),
        ("GDTR", f"`{pvh.gdt[0]:#x}`, limit `{pvh.gdt[1]:#x}`", f"`{lnx.gdt[0]:#x}`, limit `{lnx.gdt[1]:#x}`",
         "null, 32-bit code 0x08, 64-bit code 0x10, data 0x18, TSS 0x20 (16 bytes)"),
        ("IDTR", f"`{pvh.idt[0]:#x}`, limit `{pvh.idt[1]:#x}`", f"`{lnx.idt[0]:#x}`, limit `{lnx.idt[1]:#x}`",
         f"one zero entry: the guest loads its own before enabling interrupts ({_FC})"),
        ("x87 FCW, MXCSR", "`0x37f`, `0x1f80`", "`0x37f`, `0x1f80`",
         "the reset values (Intel SDM vol. 1 8.1.5, 10.2.3.1), as Firecracker's setup_fpu and QEMU"),
        ("IA32_MCG_CAP", f"MCG_CTL_P, MCG_SER_P (as KVM supports), {MCE_BANKS_DEF} banks", "same",
         "QEMU (target/i386/cpu.c mce_init, kvm.c KVM_X86_SETUP_MCE); KVM's default is 32 banks"),
        ("MSRs", ", ".join(f"`{i:#x}`=`{v:#x}`" for i, v in boot_msrs()), "same", "bulkhead.boot.msrs"),
        ("LAPIC", "LINT0 ExtINT, LINT1 NMI", "same", "the MP specification's virtual wire mode (as Firecracker)"),
        ("APs", "reset state, wait for INIT-SIPI-SIPI", "same", "as hardware; Firecracker and QEMU"),
    ]
    out = ["| register | PVH | Linux 64-bit | source |", "|---|---|---|---|"]
    out += [f"| {r} | {p} | {lx} | {src} |" for r, p, lx, src in rows]
    return "\n".join(out) + "\n"


SECTIONS = {"loader-table": L.render_loader_table, "cpu-state": render_cpu_state}


def sections(text: str) -> dict[str, str]:
    """The generated sections found in a document: name -> text between its markers."""
    out = {}
    for name in SECTIONS:
        m = re.search(rf"<!-- {name}:begin -->\n(.*?)<!-- {name}:end -->", text, re.S)
        if m:
            out[name] = m.group(1)
    return out


def rewrite(text: str) -> str:
    """`text` with every generated section replaced by its current rendering."""
    for name, render in SECTIONS.items():
        text = re.sub(
            rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)",
            lambda m, r=render: m.group(1) + r() + m.group(2),  # type: ignore[misc]
            text,
            flags=re.S,
        )
    return text


if __name__ == "__main__":
    doc = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/GUEST_KERNEL.md")
    doc.write_text(rewrite(doc.read_text()))
