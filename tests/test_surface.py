"""The attack-surface registry: declarations, discovery from code, CLI output and the CI check."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from bulkhead import surface
from bulkhead.devices import COM1_BASE, DEBUG_EXIT_BASE, I8042_BASE
from bulkhead.surface import SurfaceError, declare


@pytest.fixture(autouse=True)
def _fresh_registry() -> Iterator[None]:
    surface.clear()
    yield
    surface.clear()


def _pio(name: str, base: int = 0x100, length: int = 4, **meta: object) -> None:
    declare(
        "pio", name, owner="tests", boundary="guest-vmm", accepts="bytes", base=base, length=length, **meta
    )


def test_inventory_is_sorted_by_kind_then_name_whatever_the_order() -> None:
    declare("api-route", "POST /vms", owner="d", boundary="client-daemon", accepts="JSON body")
    _pio("zeta")
    declare(
        "mmio", "virtio-0", owner="v", boundary="guest-vmm", accepts="4-byte", base=0xD000_0000, length=0x200
    )
    _pio("alpha")
    names = [(e["kind"], e["name"]) for e in surface.inventory()]
    assert names == [("pio", "alpha"), ("pio", "zeta"), ("mmio", "virtio-0"), ("api-route", "POST /vms")]


def test_entries_are_plain_copies() -> None:
    _pio("a", tags=("x", 1))
    entry = surface.inventory()[0]
    assert entry == {
        "kind": "pio",
        "name": "a",
        "owner": "tests",
        "boundary": "guest-vmm",
        "accepts": "bytes",
        "base": 0x100,
        "length": 4,
        "tags": ["x", 1],
    }
    entry["name"] = "mutated"
    assert surface.inventory()[0]["name"] == "a"


@pytest.mark.parametrize(
    "call",
    [
        lambda: declare("port", "x", owner="o", boundary="guest-vmm", accepts="a"),
        lambda: declare("msr", "x", owner="o", boundary="guest-host", accepts="a"),
        lambda: declare("msr", "", owner="o", boundary="guest-vmm", accepts="a"),
        lambda: declare("msr", "x", owner="o", boundary="guest-vmm", accepts="  "),
        lambda: declare("msr", "x", owner="", boundary="guest-vmm", accepts="a"),
        lambda: declare("msr", "x", owner="o", boundary="guest-vmm", accepts="a", fn=print),
        lambda: declare("msr", "x", owner="o", boundary="guest-vmm", accepts="a", l=[{}]),
        lambda: declare("pio", "x", owner="o", boundary="guest-vmm", accepts="a"),
        lambda: declare("pio", "x", owner="o", boundary="guest-vmm", accepts="a", base=1, length=0),
        lambda: declare("mmio", "x", owner="o", boundary="guest-vmm", accepts="a", base=-1, length=4),
        lambda: declare("mmio", "x", owner="o", boundary="guest-vmm", accepts="a", base="0x10", length=4),
    ],
)
def test_malformed_declarations_are_rejected(call: object) -> None:
    assert callable(call)
    with pytest.raises(SurfaceError):
        call()
    assert surface.inventory() == []


def test_redeclaring_is_idempotent_but_conflicts_are_errors() -> None:
    _pio("a")
    _pio("a")
    assert len(surface.inventory()) == 1
    with pytest.raises(SurfaceError, match="declared twice"):
        _pio("a", base=0x200)
    assert surface.inventory()[0]["base"] == 0x100


def test_discover_reads_source_without_importing(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("def declare_surfaces() -> None:\n    pass\n")
    (pkg / "dev.py").write_text(
        "raise SystemExit('must not be imported')\n\ndef declare_surfaces():\n    pass\n"
    )
    (pkg / "doc.py").write_text('"""Call\n    def declare_surfaces(): in your module."""\n')
    (pkg / "other.py").write_text("x = 1\n")
    assert surface.discover(pkg, "pkg") == ["pkg.dev", "pkg.sub"]


def test_discover_finds_the_device_modules() -> None:
    found = surface.discover()
    for mod in ("bulkhead.devices.serial", "bulkhead.devices.i8042", "bulkhead.devices.debug_exit"):
        assert mod in found
    assert "bulkhead.surface" not in found


def test_collect_declares_the_legacy_devices_at_their_ports() -> None:
    entries = surface.collect(
        ["bulkhead.devices.serial", "bulkhead.devices.i8042", "bulkhead.devices.debug_exit"]
    )
    pio = {e["name"]: (e["base"], e["length"], e["owner"]) for e in entries if e["kind"] == "pio"}
    assert pio == {
        "serial-com1": (COM1_BASE, 8, "bulkhead.devices.serial"),
        "i8042": (I8042_BASE, 5, "bulkhead.devices.i8042"),
        "debug-exit": (DEBUG_EXIT_BASE, 4, "bulkhead.devices.debug_exit"),
    }
    assert all(e["boundary"] == "guest-vmm" for e in entries)


def test_collect_starts_from_an_empty_registry() -> None:
    _pio("stale")
    entries = surface.collect(["bulkhead.devices.debug_exit"])
    assert [e["name"] for e in entries] == ["debug-exit"]


def test_collect_rejects_a_module_without_the_function() -> None:
    with pytest.raises(SurfaceError, match=r"bulkhead\.errors"):
        surface.collect(["bulkhead.errors"])


def test_uncovered_reports_bus_ranges_nobody_declared() -> None:
    entries = surface.collect(
        ["bulkhead.devices.serial", "bulkhead.devices.i8042", "bulkhead.devices.debug_exit"]
    )
    bus = [(0x3F8, 8, "serial"), (0x60, 5, "i8042"), (0xF4, 4, "debug-exit"), (0x64, 1, "inside i8042")]
    assert surface.uncovered("pio", bus) == []
    extra = [(0x2F8, 8, "com2"), (0x3F8, 9, "com1 grown by one"), (0x5F, 2, "straddles i8042")]
    assert surface.uncovered("pio", bus + extra, entries) == extra
    assert surface.uncovered("mmio", [(0x3F8, 8, "wrong space")]) == [(0x3F8, 8, "wrong space")]


def test_main_json_is_the_collected_inventory(capsys: pytest.CaptureFixture[str]) -> None:
    assert surface.main(["--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == surface.collect()
    assert {"serial-com1", "i8042", "debug-exit"} <= {e["name"] for e in printed}


def test_main_table_lists_every_entry(capsys: pytest.CaptureFixture[str]) -> None:
    assert surface.main([]) == 0
    out = capsys.readouterr().out
    n = len(surface.collect())
    assert out.splitlines()[0].split() == ["KIND", "NAME", "BOUNDARY", "OWNER"]
    assert "serial-com1" in out and "base=0x3f8" in out
    assert out.rstrip().endswith(")") and f"{n} surfaces" in out


def test_check_passes_on_match_and_prints_the_difference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reviewed = tmp_path / "attack-surface.json"
    reviewed.write_text(surface.render_json(surface.collect()))
    assert surface.main(["--check", str(reviewed)]) == 0
    capsys.readouterr()

    # Simulate a surface that landed without review: drop the serial port from the reviewed copy.
    data = [e for e in json.loads(reviewed.read_text()) if e["name"] != "serial-com1"]
    reviewed.write_text(surface.render_json(data))
    assert surface.main(["--check", str(reviewed)]) == 1
    out = capsys.readouterr().out
    assert '+    "name": "serial-com1",' in out
    assert "differs" in out

    assert surface.main(["--check", str(tmp_path / "missing.json")]) == 2
