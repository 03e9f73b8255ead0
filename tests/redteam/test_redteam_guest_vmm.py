"""Red team, boundary guest -> VMM: hostile guests booted through `bulkhead run --no-jail --stats`.

Each test asserts that the attack fails (nothing undeclared answers, nothing leaks, malformed input is
refused), that the VMM keeps running or only the attacked VM stops with a clean reason, that a VM next
to it is unaffected where that is the point, and that the attempt is recorded in the VMM's counters
and events (--stats). Payload sources: tests/redteam/*.c (see each file's header).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import is_pvm_host
from tests.redteam.common import CACHE, Vm, boot, declared, guest, inside

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

DEBUG_EXIT_OK = 1  # the payload returned 0: status (0 << 1) | 1
PORTS = 0x10000
SKIPPED_WRITE_PORTS = 4 + 1 + 8  # 0xf4-0xf7, 0x64, 0x3f8-0x3ff


@pytest.fixture(scope="module", autouse=True)
def _guest_cache() -> Iterator[None]:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BULKHEAD_CACHE", str(CACHE))
        yield


def _resp(lines: list[str]) -> list[tuple[int, int, int]]:
    out = []
    for line in lines:
        _, addr, width, value = line.split()
        out.append((int(addr, 16), int(width), int(value, 16)))
    return out


def _bystander_ok(vm: Vm, ms: int) -> None:
    res = vm.wait(60)
    assert res.status == DEBUG_EXIT_OK and res.passed, res.why()
    assert len(res.lines("ALIVE ")) == (ms + 99) // 100, res.why()


def test_io_port_scan_every_port_every_width() -> None:
    """All 65,536 ports, in/out of width 1, 2, 4: only declared ranges answer, the rest read all ones
    and are counted as contained; the VM ends normally and a VM next to it never notices."""
    bystander = Vm(guest("bystander"), cmdline="ms=3000", mem=64)
    res = boot(guest("portscan"), timeout=120)
    assert res.status == DEBUG_EXIT_OK and res.passed, res.why()
    reads, writes = 3 * PORTS, 3 * (PORTS - SKIPPED_WRITE_PORTS)
    assert f"SCAN reads={reads} writes={writes} resp={len(res.lines('RESP '))}" in res.lines("SCAN reads"), (
        res.why()
    )
    pio = declared("pio")
    undeclared = [(hex(p), w, hex(v)) for p, w, v in _resp(res.lines("RESP ")) if inside(p, w, pio) is None]
    assert undeclared == [], "ports answering without a declared surface"
    # Everything that reached the VMM and was not a declared device is contained and counted. The only
    # accesses not counted are those answered by a declared range (at most 3 per declared port).
    declared_ports = sum(length for _, length, _ in pio)
    unclaimed = res.stats["pio_unclaimed"]
    assert reads - 3 * declared_ports <= unclaimed["reads"] <= reads
    assert writes - 3 * declared_ports <= unclaimed["writes"] <= writes
    assert res.exit_kind == "debug-exit"
    _bystander_ok(bystander, 3000)


def test_mmio_hole_writes_every_width() -> None:
    """Reads and writes of 1/2/4/8 bytes sampled across 0xc0000000-0xffffffff (LAPIC and IOAPIC pages
    skipped) with a virtio device present: only declared ranges answer, the rest is contained, the
    device counts the bad register accesses and the VM ends normally."""
    res = boot(guest("mmioscan"), "--rng", timeout=120)
    assert res.status == DEBUG_EXIT_OK and res.passed, res.why()
    m = re.match(r"SCAN samples=(\d+) reads=(\d+) writes=(\d+) resp=(\d+)", res.lines("SCAN samples")[0])
    assert m, res.why()
    samples, reads, writes, resp = map(int, m.groups())
    assert samples > 16000 and reads == writes and reads > 4 * 16000
    assert resp == len(res.lines("RESP ")), "RESP lines were truncated; raise MAX_RESP_LINES"
    mmio = declared("mmio")
    undeclared = [(hex(a), w, hex(v)) for a, w, v in _resp(res.lines("RESP ")) if inside(a, w, mmio) is None]
    assert undeclared == [], "MMIO addresses answering without a declared surface"
    assert res.stats["mmio_unclaimed"]["writes"] >= writes - 4 * 0x200, res.stats["mmio_unclaimed"]
    dev = next(v for k, v in res.stats["devices"].items() if k.startswith("virtio-rng"))
    assert dev.get("bad_register_access", 0) > 0 and dev.get("config_write_refused", 0) > 0, dev
    assert dev.get("event_errors", 0) == 0, dev


def test_interrupt_and_notify_storm() -> None:
    """50k THR-empty interrupt enables, 50k notifies of a live queue, 50k notifies of a missing queue
    and 50k interrupt acks: the VM finishes, the storm is counted, and the device still serves."""
    res = boot(guest("irqstorm", virtio=True), "--rng", timeout=120)
    assert res.status == DEBUG_EXIT_OK and res.passed, res.why()
    assert "RNG after status=done bytes=64 all_zero=0" in res.lines("RNG after"), res.why()
    dev = next(v for k, v in res.stats["devices"].items() if k.startswith("virtio-rng"))
    assert dev["notify_ignored"] >= 50000 and dev["notify_mmio"] >= 50000, dev
    assert 1 <= dev["notifies"] <= 50000, dev  # ioeventfd coalesces the live-queue storm
    assert sum(res.stats["vcpu_exits"]) >= 2 * 50000 + 2 * 50000
    assert res.seconds < 60, f"storm took {res.seconds:.1f} s"


def test_triple_fault_stops_only_that_vm() -> None:
    bystander = Vm(guest("bystander"), cmdline="ms=1500", mem=64)
    res = boot(guest("triplefault"), timeout=60)
    assert res.status == 8, res.why()  # triple-fault
    assert res.lines("TRIPLEFAULT now") and not res.lines("FAIL")
    assert res.exit_kind == "triple-fault"
    stopped = res.events("vm-stopped")
    assert stopped and stopped[0]["kind"] == "triple-fault", res.stats.get("events")
    assert "VM stopped: triple-fault" in res.err
    _bystander_ok(bystander, 1500)


def _facts(res_lines: list[str]) -> dict[str, str]:
    return {
        ln.split(" ", 1)[0] + (" " + ln.split()[1] if ln.startswith("RAW") else ""): ln for ln in res_lines
    }


def test_cpuid_probe_leaks_no_host_model() -> None:
    """What bulkhead controls (and this PVM host honours): the brand string is the policy string and
    never the host's model name, the hypervisor bit and KVM signature are present, the serial number,
    PMU, frequency, SGX and PT leaves are zero and SVM is hidden. Not asserted on PVM hosts: leaf 1
    ECX / leaf 7 bits other than cx16 (PVM shows the host's values, docs/THREAT_MODEL.md)."""
    from bulkhead.boot.cpuid import DEFAULT_BRAND

    res = boot(guest("cpuid_probe"), timeout=60)
    assert res.status == DEBUG_EXIT_OK and res.passed, res.why()
    out = res.out
    assert f"BRAND {DEFAULT_BRAND}" in res.lines("BRAND"), res.why()
    host_models = {
        line.split(":", 1)[1].strip()
        for line in Path("/proc/cpuinfo").read_text().splitlines()
        if line.startswith("model name")
    }
    for model in host_models:
        assert model and model not in out, f"host model {model!r} visible to the guest"
    leaf1 = res.lines("LEAF1")[0]
    assert "hypervisor=1" in leaf1
    assert res.lines("HVSIG")[0].startswith("HVSIG KVMKVMKVM")
    for leaf in ("0x3", "0xa", "0x12", "0x14", "0x16"):
        line = next(ln for ln in res.lines("RAW ") if ln.split()[1] == leaf)
        assert line.endswith("absent") or line.split()[2:] == ["eax=0x0", "ebx=0x0", "ecx=0x0", "edx=0x0"], (
            line
        )
    leaf6 = next(ln for ln in res.lines("RAW ") if ln.split()[1] == "0x6")
    assert leaf6.split()[2] in ("eax=0x0", "eax=0x4") and leaf6.split()[3:] == [
        "ebx=0x0",
        "ecx=0x0",
        "edx=0x0",
    ]
    assert "svm=0" in res.lines("EXT1")[0]
    phys = res.lines("ADDR")[0]
    assert re.match(r"ADDR phys=(\d+) virt=(\d+)", phys), phys  # reported as KVM gives it (not configured)
    if not is_pvm_host():
        assert "vmx=0" in leaf1
        assert "sgx=0 pt=0" in res.lines("LEAF7")[0]


MSR_MUST_GP = ("0x40000200", "0x12345678", "0xdeadbeef", "0xffffffff")
MSR_NO_HOST_VALUE = ("0x17", "0x8b", "0x606", "0x611", "0x639", "0x641")  # platform id, microcode, RAPL


def test_msr_probe_is_contained() -> None:
    """RDMSR of MSRs that do not exist raises #GP inside the guest (its own handler runs; the VM goes
    on), writes to them too; host platform id, microcode revision and RAPL energy counters (a known
    power side channel) read as 0 or #GP; bulkhead's MISC_ENABLE boot value is what the guest sees."""
    res = boot(guest("msr_probe"), timeout=60)
    assert res.status == DEBUG_EXIT_OK and res.passed, res.why()
    msr = {ln.split()[1]: ln.split()[2] for ln in res.lines("MSR ")}
    for idx in MSR_MUST_GP:
        assert msr[idx] == "gp", (idx, msr[idx])
    for idx in MSR_NO_HOST_VALUE:
        assert msr[idx] in ("gp", "val=0x0"), (idx, msr[idx])
    assert all(ln.endswith(" gp") for ln in res.lines("WRMSR ")), res.lines("WRMSR ")
    gp = int(res.lines("GP_COUNT")[0].split()[1])
    assert gp == sum(v == "gp" for v in msr.values()) + len(res.lines("WRMSR "))
    assert int(msr["0x1a0"].removeprefix("val="), 16) & 1  # MISC_ENABLE fast strings (boot_msrs)
    if not is_pvm_host():  # this PVM host ignores the TSC reset (the guest reads the host TSC)
        assert int(msr["0x10"].removeprefix("val="), 16) < 60 * 5_000_000_000


def test_msr_boot_value_mtrr_def_type_is_applied() -> None:
    res = boot(guest("msr_probe"), timeout=60)
    msr = {ln.split()[1]: ln.split()[2] for ln in res.lines("MSR ")}
    from bulkhead.boot.msrs import MSR_MTRR_DEF_TYPE, boot_msrs

    assert msr["0x2ff"] == f"val={dict(boot_msrs())[MSR_MTRR_DEF_TYPE]:#x}"  # enable | write-back


def test_virtqueue_abuse_with_a_bystander(tmp_path: Path) -> None:
    """Every virtqueue abuse of tests/payloads/virtio_abuse.c ends refused / NEEDS_RESET (or the
    documented outcome), every fault is a guest-fault event, the device serves a normal request after
    each case, and a VM running next to it is unaffected."""
    from tests.virtio_payloads import ABUSE_CASES

    expected = {
        "notify_unset": {"ignored"},
        "indirect_ok": {"completed"},
        "len_odd": {"ioerr", "needs_reset"},
    }
    disk = tmp_path / "scratch.img"
    disk.write_bytes(b"\0" * (4 << 20))
    bystander = Vm(guest("bystander"), cmdline="ms=2000", mem=64)
    res = boot(guest("virtio_abuse", virtio=True), "--drive", str(disk), mem=128, timeout=150)
    assert res.status == DEBUG_EXIT_OK and res.passed, res.why()
    results = {}
    for line in res.lines("ABUSE "):
        w = line.split()
        results[w[1]] = (w[2], w[3])
    assert list(results) == list(ABUSE_CASES)
    for case, (outcome, recovery) in results.items():
        assert recovery == "recovered", (case, outcome)
        assert outcome in expected.get(case, {"needs_reset", "refused"}), (case, outcome)
    faults = res.events("guest-fault")
    needs_reset = sum(1 for o, _ in results.values() if o == "needs_reset")
    assert len(faults) >= needs_reset > 0
    assert all(f.get("device") == "virtio-blk0" and f.get("reason") for f in faults), faults[:3]
    assert res.stats["devices"]["virtio-blk0"]["guest_faults"] == needs_reset
    _bystander_ok(bystander, 2000)


@pytest.mark.root
def test_jailed_port_scan_and_triple_fault() -> None:
    """The same attacks against `bulkhead run` in its default, jailed mode (root): the scan is contained
    the same way and the triple fault stops only that VM with the same clean reason."""
    res = boot(guest("portscan"), timeout=120, jail=True)
    assert res.status == DEBUG_EXIT_OK and res.passed, res.why()
    assert "--no-jail" not in res.err and "running unjailed" not in res.err, res.err
    reads, writes = 3 * PORTS, 3 * (PORTS - SKIPPED_WRITE_PORTS)
    assert res.lines("SCAN reads")[0].startswith(f"SCAN reads={reads} writes={writes} ")
    pio = declared("pio")
    assert [r for r in _resp(res.lines("RESP ")) if inside(r[0], r[1], pio) is None] == []
    declared_ports = sum(length for _, length, _ in pio)  # counted in the jail as unjailed (--stats)
    assert reads - 3 * declared_ports <= res.stats["pio_unclaimed"]["reads"] <= reads, res.stats
    res = boot(guest("triplefault"), timeout=60, jail=True)
    assert res.status == 8 and "VM stopped: triple-fault" in res.err, res.why()
