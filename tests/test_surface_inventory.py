"""The committed attack-surface inventory (security/attack-surface.json) is what the code declares,
every bus range a real Machine registers is declared, and every parsing surface names a fuzz harness.

When the first test fails, review the printed diff, then update the reviewed file with
`bulkhead surface --json > security/attack-surface.json` (see docs/ASSURANCE.md).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from bulkhead import surface

ROOT = Path(__file__).resolve().parent.parent
REVIEWED = ROOT / "security" / "attack-surface.json"

# Kinds whose every entry parses structured, attacker-controlled input: each must name a harness.
PARSING_KINDS = {"virtio-queue", "boot-parser", "worker-message", "api-route"}
# Register files (pio/mmio) parse guest accesses too: each needs a harness unless listed here with why.
NOT_PARSING = {
    ("pio", "debug-exit"): "any write stops the VM; reads return a constant; no state to parse",
    ("pio", "post-code"): "write-only sink keeping the last value; reads return all ones",
    ("virtio-config", "virtio-blk-config"): "read-only fixed struct; reads fuzzed via fuzz_virtio_mmio.py",
    ("virtio-config", "virtio-net-config"): "read-only fixed struct; reads fuzzed via fuzz_virtio_mmio.py",
}
# Entries handled by the host kernel (not bulkhead code) or with nothing guest-supplied to parse.
NO_HARNESS_KINDS = {"kvm-exit", "cpuid", "msr"}


@pytest.fixture
def entries() -> Iterator[list[surface.Entry]]:
    yield surface.collect()
    surface.clear()


def test_committed_inventory_matches_the_code(entries: list[surface.Entry]) -> None:
    current = surface.render_json(entries)
    reviewed = REVIEWED.read_text(encoding="utf-8")
    if current != reviewed:
        diff = "".join(
            difflib.unified_diff(
                reviewed.splitlines(keepends=True),
                current.splitlines(keepends=True),
                "security/attack-surface.json (reviewed)",
                "code (bulkhead surface --json)",
            )
        )
        pytest.fail(
            "the attack surface changed; review it and update security/attack-surface.json with "
            f"`bulkhead surface --json > security/attack-surface.json`:\n{diff}",
            pytrace=False,
        )


def test_reviewed_file_is_canonical_json() -> None:
    data = json.loads(REVIEWED.read_text(encoding="utf-8"))
    assert surface.render_json(data) == REVIEWED.read_text(encoding="utf-8")
    keys = [(e["kind"], e["name"]) for e in data]
    assert len(keys) == len(set(keys))


def test_inventory_covers_every_issue7_kind_bulkhead_owns(entries: list[surface.Entry]) -> None:
    kinds = {e["kind"] for e in entries}
    # api-route and worker-message are declared by the daemon and sandbox owners (see docs/ASSURANCE.md).
    for kind in ("pio", "mmio", "virtio-queue", "virtio-config", "kvm-exit", "msr", "cpuid", "boot-parser"):
        assert kind in kinds, f"no {kind} surface declared"
    exits = {e["name"] for e in entries if e["kind"] == "kvm-exit"}
    assert {"KVM_EXIT_IO", "KVM_EXIT_MMIO", "KVM_EXIT_SHUTDOWN", "KVM_EXIT_SYSTEM_EVENT"} <= exits


def test_every_parsing_surface_names_an_existing_fuzz_harness(entries: list[surface.Entry]) -> None:
    problems = []
    for e in entries:
        key = (str(e["kind"]), str(e["name"]))
        fuzz = e.get("fuzz")
        if fuzz is not None:
            path = ROOT / str(fuzz)
            if not (path.is_file() and path.name.startswith("fuzz_") and path.suffix == ".py"):
                problems.append(f"{key}: fuzz={fuzz!r} is not an existing fuzz/fuzz_*.py harness")
            continue
        if e["kind"] in NO_HARNESS_KINDS or e.get("in_kernel") is True or key in NOT_PARSING:
            continue
        if e["kind"] in PARSING_KINDS or e["kind"] in ("pio", "mmio"):
            problems.append(f"{key}: parses guest/client input but names no fuzz harness")
    assert problems == []


def test_exemptions_are_still_real(entries: list[surface.Entry]) -> None:
    """An exemption for an entry that no longer exists (or now has a harness) must be removed."""
    by_key = {(str(e["kind"]), str(e["name"])): e for e in entries}
    for key in NOT_PARSING:
        assert key in by_key, f"stale exemption {key}"
        assert "fuzz" not in by_key[key], f"{key} has a harness now; drop its exemption"


@pytest.mark.kvm
def test_every_bus_range_a_built_machine_registers_is_declared(tmp_path: Path) -> None:
    from tests.vmrun import payload

    from bulkhead.runtime.config import DriveConfig, VmConfig
    from bulkhead.runtime.vm import Machine

    disks = []
    for i in range(2):
        disk = tmp_path / f"d{i}.img"
        disk.write_bytes(b"\0" * (1 << 20))
        disks.append(DriveConfig(str(disk), read_only=i == 1))
    config = VmConfig(
        kernel=str(payload("exit_code")), mem_mib=32, serial="none", drives=tuple(disks), rng=True
    )
    machine = Machine(config, console_input=False)
    try:
        machine.build()
        pio = [(r.base, r.length, r.name) for r in machine.pio.ranges]
        mmio = [(r.base, r.length, r.name) for r in machine.mmio.ranges]
    finally:
        machine.close()
    names = {n for _, _, n in pio + mmio}
    assert {"serial-com1", "i8042", "debug-exit", "post-code", "virtio-blk0", "virtio-blk1", "acpi-ged"} <= names
    assert len(mmio) == 4  # two drives, the rng and the ACPI GED
    inventory = surface.collect()
    try:
        assert surface.uncovered("pio", pio, inventory) == []
        assert surface.uncovered("mmio", mmio, inventory) == []
    finally:
        surface.clear()


def test_uncovered_detects_an_undeclared_registration(entries: list[surface.Entry]) -> None:
    """The check above can fail: a range nobody declared (COM2) is reported."""
    assert surface.uncovered("pio", [(0x2F8, 8, "serial-com2")], entries) == [(0x2F8, 8, "serial-com2")]
    assert surface.uncovered("mmio", [(0xD000_0000, 0x200, "virtio-blk0")], entries) == []
