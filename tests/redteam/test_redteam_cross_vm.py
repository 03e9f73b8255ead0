"""Red team, boundary guest -> guest: VM A holds a random secret in its RAM; VM B, running at the same
time, scans all of its own RAM and its disk for it and must not find it; after A stops its memory is
scrubbed, and a later VM C does not find the secret either.

Positive controls show the scanner finds the secret when it is really there (in its own RAM, on its
disk), so NOTFOUND means something. Payloads: tests/redteam/memfill.c (A), memscan.c (B, C).
"""

from __future__ import annotations

import ctypes
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.redteam.common import CACHE, Vm, boot, guest

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

DEBUG_EXIT_OK = 1
MIB = 1 << 20


@pytest.fixture(scope="module", autouse=True)
def _guest_cache() -> Iterator[None]:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BULKHEAD_CACHE", str(CACHE))
        yield


def _secret() -> int:
    return secrets.randbits(64) | (1 << 63)  # never 0, never a small number RAM is likely to hold


def _disk(path: Path, size: int = MIB, plant: tuple[int, int] | None = None) -> Path:
    data = bytearray(size)
    if plant is not None:
        offset, value = plant
        data[offset : offset + 8] = value.to_bytes(8, "little")
    path.write_bytes(bytes(data))
    return path


def _scan(secret: int, disk: Path | None, *, mem: int = 64, plant: bool = False) -> tuple[str, int, int]:
    args = ("--drive", str(disk)) if disk is not None else ()
    cmdline = f"secret={secret:#x}" + (" plant=1" if plant else "")
    res = boot(guest("memscan", virtio=True), *args, cmdline=cmdline, mem=mem, timeout=120)
    assert res.status == DEBUG_EXIT_OK and res.passed, res.why()
    scan = res.lines("SCAN ")[0].split()
    ram, dsk = (int(w.split("=")[1]) for w in scan[1:3])
    found = res.lines("FOUND") or res.lines("NOTFOUND")
    return found[0], ram, dsk


def test_scanner_finds_a_secret_that_is_there(tmp_path: Path) -> None:
    secret = _secret()
    verdict, _, _ = _scan(secret, _disk(tmp_path / "d.img", plant=(0x9008, secret)), mem=32)
    assert verdict == "FOUND disk 0x9008"
    verdict, ram, _ = _scan(secret, None, mem=32, plant=True)
    assert verdict == "FOUND ram 0x1800000" and ram > 16 * MIB


def test_concurrent_vm_cannot_find_another_vms_secret(tmp_path: Path) -> None:
    secret = _secret()
    a = Vm(guest("memfill"), cmdline=f"secret={secret:#x} mib=16", mem=64)
    try:
        done = a.wait_for_line("DONE", timeout=60)
        assert done == f"DONE secret={secret:#x} base=0x1000000 bytes={16 * MIB}"
        verdict, ram, disk = _scan(secret, _disk(tmp_path / "b.img"))
        assert a.proc.poll() is None, "VM A stopped while B scanned"
    finally:
        a.stop()
    res_a = a.wait(30)
    assert verdict == "NOTFOUND"
    assert ram > 60 * MIB and disk == MIB  # all of B's usable RAM below 4 GiB and its whole disk
    assert res_a.status == 130 and res_a.exit_kind == "interrupted", res_a.why()
    # VM C, started after A is gone, gets fresh memory: no trace of A's secret.
    verdict, _, _ = _scan(secret, _disk(tmp_path / "c.img"))
    assert verdict == "NOTFOUND"


def test_guest_memory_is_scrubbed_before_it_is_unmapped(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process: run VM A to completion, check its RAM holds the secret, then watch teardown. At the
    moment each guest region is unmapped, no byte of the secret pattern is left in it."""
    from bulkhead.memory import guest as guest_mem
    from bulkhead.runtime.config import VmConfig
    from bulkhead.runtime.vm import Machine

    secret = _secret()
    needle = secret.to_bytes(8, "little")
    config = VmConfig(
        kernel=str(guest("memfill")), cmdline=f"secret={secret:#x} mib=8 exit=1", mem_mib=32, serial="none"
    )
    out = bytearray()
    machine = Machine(config, console=out.extend)
    checked: list[tuple[int, bool]] = []
    real_munmap = guest_mem._libc.munmap

    def munmap(addr: int, size: int) -> int:
        checked.append((size, needle in ctypes.string_at(addr, size)))
        return int(real_munmap(addr, size))

    try:
        machine.build()
        reason = machine.run()
        assert reason.kind == "debug-exit" and reason.status == DEBUG_EXIT_OK, (reason, bytes(out))
        assert machine.mem is not None
        assert (
            machine.mem.read(0x1000000, 8) == needle
            and machine.mem.read(0x1000000 + 8 * MIB - 8, 8) == needle
        )
        monkeypatch.setattr(guest_mem._libc, "munmap", munmap)
    finally:
        machine.close()
    assert checked, "guest memory was never unmapped"
    assert sum(size for size, _ in checked) >= 32 * MIB
    assert not any(found for _, found in checked), "the secret was still in guest memory at unmap"
