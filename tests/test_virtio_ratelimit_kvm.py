"""Per-drive token buckets (`--drive PATH,bw=BYTES_PER_S,iops=N`) cap what a real guest gets.

The guest (bench/payloads/blk_bench.c) times its phases by printing PHASE lines the host timestamps; with a
limit the phase must take at least (work - burst) / rate, and without one it must be clearly faster, so the
assertion cannot pass by accident on a slow machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.virtio_payloads import Bulkhead, Devices, bench_phases, build_virtio, stream_lines

pytestmark = pytest.mark.kvm
MIB = 1 << 20


def _phase_seconds(tmp_path: Path, drive_opts: str, append: str, phase: str) -> float:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(8 * MIB)
    vmm = Bulkhead()
    argv = vmm.argv(build_virtio("blk_bench"), append, Devices(drives=[(img, False)]))
    argv = [a if a != str(img) else f"{img}{drive_opts}" for a in argv]
    proc, lines = stream_lines(argv, timeout=120)
    assert proc.wait(timeout=60) == vmm.exit_status(0), lines[-5:]
    return bench_phases(lines)[phase]["seconds"]


def test_bytes_per_second_limit(tmp_path: Path) -> None:
    # 4 MiB read at 2 MiB/s: at least ~1.5 s even after the bucket's initial burst (one second's worth).
    limited = _phase_seconds(tmp_path, f",bw={2 * MIB}", "phases=seq_read seq_kib=4096", "seq_read")
    free = _phase_seconds(tmp_path, "", "phases=seq_read seq_kib=4096", "seq_read")
    assert limited >= 0.9, limited
    assert free < limited / 2, (free, limited)


def test_operations_per_second_limit(tmp_path: Path) -> None:
    # 150 random 4 KiB reads at 50 ops/s: at least (150 - 50 burst) / 50 = 2 s.
    limited = _phase_seconds(tmp_path, ",iops=50", "phases=rand_read rand_count=150", "rand_read")
    free = _phase_seconds(tmp_path, "", "phases=rand_read rand_count=150", "rand_read")
    assert limited >= 1.9, limited
    assert free < limited / 2, (free, limited)
