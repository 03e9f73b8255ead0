"""The guest payloads on QEMU microvm: the reference behaviour bulkhead's own boot tests compare with.

Each test builds a payload from tests/payloads (or bench/payloads) with bulkhead.guests.build, boots it
with the QEMU command line of docs (GUIDE section 2), and asserts the documented output
(tests/payloads/README.md) and QEMU's exit status ((code << 1) | 1 for the debug-exit port).

QEMU boots ELF guests only through PVH, so the Linux 64-bit entry (e_entry, RSI = boot_params) is
exercised by tests/payloads/linux64_harness.c, a minimal C KVM runner compiled at test time.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bulkhead.guests.build import build
from bulkhead.guests.report import GuestReport, parse_report

pytestmark = pytest.mark.kvm

ROOT = Path(__file__).resolve().parent.parent
PAYLOADS = ROOT / "tests" / "payloads"
BENCH_PAYLOADS = ROOT / "bench" / "payloads"
MIB = 1 << 20


@pytest.fixture(scope="module", autouse=True)
def _guest_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BULKHEAD_CACHE", str(ROOT / "tests" / ".build" / "guests"))
        yield


def qemu(
    image: Path, append: str = "", *, smp: int = 1, mem_mib: int = 128, extra: tuple[str, ...] = ()
) -> tuple[int, GuestReport]:
    cmd = [
        "qemu-system-x86_64", "-M", "microvm", "-enable-kvm", "-cpu", "host,-arch-capabilities",
        "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
        "-m", f"{mem_mib}M", "-smp", str(smp), "-kernel", str(image), "-append", append, *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, timeout=120, stdin=subprocess.DEVNULL, check=False)
    return proc.returncode, parse_report(proc.stdout.decode("ascii", "replace"))


def payload(name: str, fmt: str = "elf") -> Path:
    return build(str(PAYLOADS / f"{name}.c"), fmt)


@pytest.mark.qemu
def test_demo_guest_greets_and_reports_what_it_found() -> None:
    rc, rep = qemu(build("demo"), "demo run", smp=2, mem_mib=256)
    assert rc == 1  # debug-exit code 0
    assert rep.lines[0] == "Hello from a bulkhead guest!"
    assert rep.protocol == "pvh"
    assert rep.cmdline == "demo run"
    assert "MEMORY usable_mib=255" in rep.lines  # 256 MiB minus the legacy hole below 1 MiB
    assert "CPUS 2 (from the MP table)" in rep.lines
    assert rep.lines[-1] == "Goodbye."


@pytest.mark.qemu
@pytest.mark.parametrize("mem_mib", [128, 300])
def test_pvh_memory_map_and_cmdline(mem_mib: int) -> None:
    cmdline = 'console=ttyS0 key=value  quoted="a b" last'
    rc, rep = qemu(payload("bootinfo"), cmdline, mem_mib=mem_mib)
    assert rc == 1 and rep.passed, rep.lines
    assert rep.protocol == "pvh"
    assert rep.cmdline == cmdline
    assert rep.e820_count == len(rep.e820)
    usable = {(e.addr, e.size) for e in rep.e820 if e.type == 1}
    assert (0, 0x9FC00) in usable
    assert (0x100000, mem_mib * MIB - 0x100000) in usable
    assert rep.usable_bytes() == 0x9FC00 + mem_mib * MIB - 0x100000  # no other usable entry


@pytest.mark.qemu
def test_bzimage_boots_through_real_mode_entry_on_qemu() -> None:
    rc, rep = qemu(payload("bootinfo", "bzimage"), "via bzImage", smp=2)
    assert rc == 1 and rep.passed, rep.lines
    # QEMU enters the setup code in real mode; the stub reaches the 32-bit entry with ESI = boot_params.
    assert rep.protocol == "linux32"
    assert rep.cmdline == "via bzImage"
    assert rep.e820_count == 0  # no BIOS e820 call on this path (documented)
    assert rep.cpus == 2


@pytest.mark.qemu
@pytest.mark.parametrize("smp", [1, 2])
def test_mptable_lists_every_vcpu(smp: int) -> None:
    rc, rep = qemu(payload("bootinfo"), smp=smp)
    assert rc == 1 and rep.passed
    assert rep.mptable is not None
    assert rep.cpus == smp
    assert sorted(rep.mp_cpus) == [(0, "bsp")] + [(i, "ap") for i in range(1, smp)]


@pytest.mark.qemu
@pytest.mark.parametrize("fmt", ["elf", "bzimage"])
def test_smp_every_ap_reports_its_apic_id(fmt: str) -> None:
    rc, rep = qemu(payload("smp", fmt), smp=2)
    assert rc == 1 and rep.passed and not rep.failures, rep.lines
    assert sorted(rep.apics) == [(0, "bsp"), (1, "ap")]
    assert rep.cpus_up == 2


@pytest.mark.qemu
def test_smp_single_cpu() -> None:
    rc, rep = qemu(payload("smp"), smp=1)
    assert rc == 1 and rep.passed
    assert rep.apics == [(0, "bsp")] and rep.cpus_up == 1


@pytest.mark.qemu
def test_unclaimed_accesses_are_survived() -> None:
    rc, rep = qemu(payload("unclaimed"))
    assert rc == 1 and rep.passed, rep.lines
    pio = [line.split() for line in rep.lines if line.startswith(("PIO ", "PIO_AFTER "))]
    assert len(pio) == 12
    for _tag, _port, width, value in pio:
        assert int(value, 16) == (1 << (8 * int(width))) - 1  # unclaimed ports read all ones
    mmio = {int(w.split()[2]): int(w.split()[3], 16) for w in rep.lines if w.startswith("MMIO ")}
    assert sorted(mmio) == [1, 2, 4, 8]
    after = next(line for line in rep.lines if line.startswith("MMIO_AFTER"))
    assert int(after.split()[3], 16) == mmio[4]  # the writes did not stick (QEMU reads 0 here)


@pytest.mark.qemu
def test_triple_fault_stops_the_vm() -> None:
    rc, rep = qemu(payload("triplefault"), extra=("-no-reboot",))
    assert rc == 0  # QEMU -no-reboot: a triple fault ends the process with status 0
    assert rep.lines == ["TRIPLEFAULT now"]


@pytest.mark.qemu
def test_i8042_reset_stops_the_vm() -> None:
    rc, rep = qemu(payload("reset"), extra=("-device", "i8042", "-no-reboot"))
    assert rc == 0
    assert rep.lines == ["RESET i8042"]


@pytest.mark.qemu
def test_reset_payload_reports_an_ignored_reset() -> None:
    rc, rep = qemu(payload("reset"))  # microvm has no i8042 unless asked for
    assert rc == 3  # debug-exit code 1
    assert rep.failures == ["reset ignored"]


@pytest.mark.qemu
@pytest.mark.parametrize(("arg", "code"), [("code=0", 0), ("code=5", 5), ("x code=0x20 y", 32), ("", 127)])
def test_exit_code_from_cmdline(arg: str, code: int) -> None:
    rc, _rep = qemu(payload("exit_code"), arg)
    assert rc == ((code << 1) | 1) & 0xFF


@pytest.mark.qemu
def test_bench_payloads_run() -> None:
    rc, rep = qemu(build(str(BENCH_PAYLOADS / "hello_exit.c")))
    assert rc == 1 and rep.lines == ["HELLO bulkhead"]
    rc, rep = qemu(build(str(BENCH_PAYLOADS / "pio.c")), "count=1000 port=0x3ff")
    assert rc == 1
    assert rep.lines[0] == "PIO_START port=0x3ff count=1000"
    assert rep.lines[1].startswith("PIO_DONE count=1000 tsc=")


@pytest.fixture(scope="module")
def harness() -> Path:
    out = ROOT / "tests" / ".build" / "linux64_harness"
    out.parent.mkdir(parents=True, exist_ok=True)
    src = PAYLOADS / "linux64_harness.c"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(out), str(src)], check=True, timeout=120)
    return out


def linux64(harness: Path, image: Path, cmdline: str = "", mem_mib: int = 64) -> tuple[int, GuestReport]:
    proc = subprocess.run(
        [str(harness), str(image), cmdline, str(mem_mib)], capture_output=True, timeout=120, check=False
    )
    return proc.returncode, parse_report(proc.stdout.decode("ascii", "replace"))


def test_linux64_entry_boot_params(harness: Path) -> None:
    rc, rep = linux64(harness, payload("bootinfo"), "root=/dev/vda  x=1", mem_mib=96)
    assert rc == 1 and rep.passed, rep.lines
    assert rep.protocol == "linux64"
    assert rep.lines[0] == "BOOT protocol=linux64 info=0x7000 valid=1"
    assert rep.cmdline == "root=/dev/vda  x=1"
    assert [(e.addr, e.size, e.type) for e in rep.e820] == [(0, 0x9FC00, 1), (0x100000, 95 * MIB, 1)]
    assert rep.mptable is None and rep.cpus == 0  # the harness builds no MP table


@pytest.mark.parametrize("fmt", ["elf", "bzimage"])
def test_linux64_entry_runs_the_demo_guest(harness: Path, fmt: str) -> None:
    # bzImage: protected-mode part at 0x100000, entered at +0x200 with the setup header in boot_params.
    rc, rep = linux64(harness, build("demo", fmt), "demo")
    assert rc == 1
    assert rep.lines[0] == "Hello from a bulkhead guest!" and rep.protocol == "linux64"
    assert "MEMORY usable_mib=63" in rep.lines and "CPUS unknown (no MP table)" in rep.lines


def test_linux64_unclaimed_mmio_reads_what_the_vmm_returns(harness: Path) -> None:
    rc, rep = linux64(harness, payload("unclaimed"))
    assert rc == 1 and rep.passed
    mmio = [line.split() for line in rep.lines if line.startswith("MMIO")]
    assert len(mmio) == 5
    for _tag, _addr, width, value in mmio:
        assert int(value, 16) == (1 << (8 * int(width))) - 1  # the harness answers all ones


def test_linux64_triple_fault_and_exit_code(harness: Path) -> None:
    rc, rep = linux64(harness, payload("triplefault"))
    assert rc == 5 and rep.lines == ["TRIPLEFAULT now"]  # KVM_EXIT_SHUTDOWN
    rc, rep = linux64(harness, payload("exit_code"), "code=33")
    assert rc == 67 and rep.lines == ["EXIT 33"]
