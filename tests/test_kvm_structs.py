"""The ctypes mirrors in bulkhead.hypervisor.kvm must match linux/kvm.h exactly.

A C program compiled against the host's headers prints sizeof/offsetof and every ioctl number and
capability we use; the test compares them with the Python side.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from bulkhead.hypervisor.kvm import constants as c
from bulkhead.hypervisor.kvm import structs as s

STRUCTS = {
    "kvm_userspace_memory_region": (
        s.KvmUserspaceMemoryRegion,
        ["slot", "guest_phys_addr", "userspace_addr"],
    ),
    "kvm_regs": (s.KvmRegs, ["rax", "rsi", "rip", "rflags"]),
    "kvm_segment": (s.KvmSegment, ["base", "limit", "selector", "type", "l", "unusable"]),
    "kvm_dtable": (s.KvmDtable, ["base", "limit"]),
    "kvm_sregs": (
        s.KvmSregs,
        ["cs", "tr", "gdt", "idt", "cr0", "cr3", "efer", "apic_base", "interrupt_bitmap"],
    ),
    "kvm_fpu": (s.KvmFpu, ["fcw", "ftwx", "last_ip", "xmm", "mxcsr"]),
    "kvm_msr_entry": (s.KvmMsrEntry, ["index", "data"]),
    "kvm_cpuid_entry2": (s.KvmCpuidEntry2, ["function", "flags", "edx", "padding"]),
    "kvm_lapic_state": (s.KvmLapicState, ["regs"]),
    "kvm_mp_state": (s.KvmMpState, ["mp_state"]),
    "kvm_irq_level": (s.KvmIrqLevel, ["irq", "level"]),
    "kvm_irqfd": (s.KvmIrqfd, ["fd", "gsi", "flags", "resamplefd", "pad"]),
    "kvm_ioeventfd": (s.KvmIoeventfd, ["datamatch", "addr", "len", "fd", "flags", "pad"]),
    "kvm_pit_config": (s.KvmPitConfig, ["flags", "pad"]),
    "kvm_coalesced_mmio_zone": (s.KvmCoalescedMmioZone, ["addr", "size"]),
    "kvm_coalesced_mmio": (s.KvmCoalescedMmio, ["phys_addr", "len", "data"]),
    "kvm_enable_cap": (s.KvmEnableCap, ["cap", "flags", "args", "pad"]),
    "kvm_run": (
        s.KvmRunHeader,
        ["request_interrupt_window", "immediate_exit", "exit_reason", "if_flag", "cr8", "apic_base"],
    ),
}
CONSTANTS = [
    name
    for name in dir(c)
    if name.startswith(("KVM_CAP_", "KVM_EXIT_", "KVM_MP_STATE_", "KVM_IOEVENTFD_FLAG_", "KVM_API_VERSION"))
    or name
    in [
        "KVM_GET_API_VERSION",
        "KVM_CREATE_VM",
        "KVM_GET_MSR_INDEX_LIST",
        "KVM_CHECK_EXTENSION",
        "KVM_GET_VCPU_MMAP_SIZE",
        "KVM_GET_SUPPORTED_CPUID",
        "KVM_CREATE_VCPU",
        "KVM_SET_USER_MEMORY_REGION",
        "KVM_SET_TSS_ADDR",
        "KVM_SET_IDENTITY_MAP_ADDR",
        "KVM_CREATE_IRQCHIP",
        "KVM_IRQ_LINE",
        "KVM_REGISTER_COALESCED_MMIO",
        "KVM_UNREGISTER_COALESCED_MMIO",
        "KVM_IRQFD",
        "KVM_CREATE_PIT2",
        "KVM_IOEVENTFD",
        "KVM_ENABLE_CAP",
        "KVM_RUN",
        "KVM_GET_REGS",
        "KVM_SET_REGS",
        "KVM_GET_SREGS",
        "KVM_SET_SREGS",
        "KVM_GET_MSRS",
        "KVM_SET_MSRS",
        "KVM_SET_FPU",
        "KVM_GET_LAPIC",
        "KVM_SET_LAPIC",
        "KVM_SET_CPUID2",
        "KVM_GET_MP_STATE",
        "KVM_SET_MP_STATE",
        "KVM_X86_GET_MCE_CAP_SUPPORTED",
        "KVM_X86_SETUP_MCE",
        "KVM_COALESCED_MMIO_PAGE_OFFSET",
    ]
]


@pytest.fixture(scope="module")
def header_facts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    if shutil.which("gcc") is None or not Path("/usr/include/linux/kvm.h").exists():
        pytest.skip("gcc or linux/kvm.h (linux-libc-dev) is not installed")
    src = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>", "int main(void){"]
    for cname, (_, fields) in STRUCTS.items():
        src.append(f'printf("sizeof.{cname} %zu\\n", sizeof(struct {cname}));')
        for f in fields:
            src.append(f'printf("offsetof.{cname}.{f} %zu\\n", offsetof(struct {cname}, {f}));')
    src.append('printf("offsetof.kvm_run.exit_union %zu\\n", offsetof(struct kvm_run, io));')
    for name in CONSTANTS:
        if name.startswith("KVM_EXIT_IO_") or name in ("KVM_RUN_EXIT_OFFSET",):
            continue
        src.append(f'printf("const.{name} %llu\\n", (unsigned long long)({name}));')
    src.append("return 0;}")
    d = tmp_path_factory.mktemp("kvmh")
    (d / "t.c").write_text("\n".join(src))
    subprocess.run(["gcc", "-o", str(d / "t"), str(d / "t.c")], check=True)
    out = subprocess.run([str(d / "t")], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


@pytest.mark.parametrize("cname", [n for n in STRUCTS if n != "kvm_run"])
def test_struct_size_and_offsets(header_facts: dict[str, int], cname: str) -> None:
    cls, fields = STRUCTS[cname]
    assert ctypes.sizeof(cls) == header_facts[f"sizeof.{cname}"]
    for f in fields:
        assert getattr(cls, f).offset == header_facts[f"offsetof.{cname}.{f}"], f


def test_kvm_run_header_offsets(header_facts: dict[str, int]) -> None:
    for f in STRUCTS["kvm_run"][1]:
        assert getattr(s.KvmRunHeader, f).offset == header_facts[f"offsetof.kvm_run.{f}"], f
    assert header_facts["offsetof.kvm_run.exit_union"] == c.KVM_RUN_EXIT_OFFSET


@pytest.mark.parametrize("name", [n for n in CONSTANTS if not n.startswith("KVM_EXIT_IO_")])
def test_constant_matches_header(header_facts: dict[str, int], name: str) -> None:
    assert getattr(c, name) == header_facts[f"const.{name}"], name


def test_variable_length_structs() -> None:
    assert ctypes.sizeof(s.cpuid2_type(3)) == 8 + 3 * 40
    assert ctypes.sizeof(s.msrs_type(2)) == 8 + 2 * 16
