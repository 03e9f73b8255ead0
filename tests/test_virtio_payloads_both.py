"""Guest virtio driver checks that must hold the same on bulkhead and on QEMU (the side-by-side peer).

Each test runs once per VMM; the checks are identical, so a difference is a bulkhead bug (or a QEMU quirk
worth writing down). VMM-specific expectations stay in test_virtio_payloads_{bulkhead,qemu}.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tests.virtio_payloads import (
    Bulkhead,
    Devices,
    Qemu,
    Vmm,
    build_virtio,
    check_net,
    check_rng,
    flush_syscalls,
    kill,
    netns_with_tap,
    pattern,
    responder,
    run,
    stream_lines,
)

pytestmark = [pytest.mark.kvm]

VMMS = [pytest.param(Bulkhead(), id="bulkhead"), pytest.param(Qemu(), id="qemu", marks=pytest.mark.qemu)]


def _image(tmp_path: Path) -> Path:
    img = tmp_path / "disk0.img"
    with open(img, "wb") as f:
        f.truncate(4 << 20)  # as images() in the per-VMM files
    return img


@pytest.mark.parametrize("vmm", VMMS)
def test_blk_flushed_data_survives_sigkill(vmm: Vmm, tmp_path: Path) -> None:
    img0 = _image(tmp_path)
    seed = 977
    argv = vmm.argv(
        build_virtio("virtio_blk"), f"seed={seed} blk=write-flush-hang", Devices(drives=[(img0, False)])
    )
    proc, lines = stream_lines(argv, timeout=60, until="FLUSHED")
    status = kill(proc)
    assert lines and lines[-1][1] == f"FLUSHED seed={seed} sectors=8", lines
    assert status == -9  # killed, not exited
    assert img0.read_bytes()[:4096] == pattern(seed, 4096)


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
@pytest.mark.parametrize("vmm", VMMS)
def test_blk_flush_reaches_the_file_as_fdatasync(vmm: Vmm, tmp_path: Path) -> None:
    (tmp_path / "flush").mkdir()
    lines, calls, head = flush_syscalls(vmm, tmp_path / "flush", 61)
    assert lines[-1] == "FLUSHED seed=61 sectors=8", lines
    assert head == pattern(61, 4096)
    assert calls, "no fdatasync/fsync on the image before the guest saw FLUSH complete"
    # control: the same write without FLUSH syncs nothing
    (tmp_path / "noflush").mkdir()
    lines, calls, head = flush_syscalls(vmm, tmp_path / "noflush", 62, flush=False)
    assert lines[-1] == "WRITTEN seed=62 sectors=8", lines
    assert head == pattern(62, 4096)  # in the page cache, so it survives the kill anyway
    assert calls == ""


@pytest.mark.parametrize("vmm", VMMS)
def test_rng_two_reads_differ(vmm: Vmm) -> None:
    res = run(vmm.argv(build_virtio("virtio_rng"), "", Devices(rng=True)))
    check_rng(res, vmm)


@pytest.mark.root
@pytest.mark.parametrize("vmm", VMMS)
def test_net_frame_round_trip_through_tap(vmm: Vmm) -> None:
    seed = 31337
    with netns_with_tap() as (ns, tap), responder(ns, tap) as resp:
        res = run(vmm.argv(build_virtio("virtio_net"), f"seed={seed}", Devices(tap=tap)), netns=ns)
        check_net(res, vmm, resp, seed)
