"""The virtio payloads on QEMU microvm's virtio-mmio (modern v2) devices: the side-by-side reference.

Same payloads and checks as tests/test_virtio_payloads_bulkhead.py (helpers in tests/virtio_payloads.py);
QEMU 7.2 is the peer bulkhead's devices are compared with. The abuse test records QEMU's reactions
(QEMU accepts several malformed setups that bulkhead refuses) and asserts only that the device always
recovers after a reset.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.virtio_payloads import (
    ABUSE_CASES,
    CACHE,
    NET_ABUSE_CASES,
    RNG_ABUSE_CASES,
    Devices,
    Qemu,
    abuse_results,
    bench_phases,
    build_virtio,
    check_blk,
    netns_with_tap,
    run,
    stream_lines,
)

pytestmark = [pytest.mark.qemu, pytest.mark.kvm]

QEMU = Qemu()
MIB = 1 << 20


@pytest.fixture(scope="module", autouse=True)
def _guest_cache() -> Iterator[None]:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BULKHEAD_CACHE", str(CACHE))
        yield


def images(tmp_path: Path) -> tuple[Path, Path, bytes]:
    img0, img1 = tmp_path / "rw.img", tmp_path / "ro.img"
    with open(img0, "wb") as f:
        f.truncate(4 * MIB)
    content = os.urandom(MIB)
    img1.write_bytes(content)
    return img0, img1, content


def test_blk_write_flush_read_and_refusals(tmp_path: Path) -> None:
    img0, img1, ro_before = images(tmp_path)
    seed = 4242
    devs = Devices(drives=[(img0, False), (img1, True)], serials=["bhserial0", "bhserial1"])
    res = run(QEMU.argv(build_virtio("virtio_blk"), f"seed={seed}", devs))
    check_blk(res, QEMU, seed=seed, img0=img0, img1=img1, img1_before=ro_before)
    assert "BLK 0 get_id status=0 id=bhserial0" in res.lines
    assert "BLK 1 get_id status=0 id=bhserial1" in res.lines
    # VERSION_1, FLUSH and BLK_SIZE accepted; RO only on drive 1
    f0 = int(res.fields("BLK 0 capacity")["features"], 16)
    f1 = int(res.fields("BLK 1 capacity")["features"], 16)
    assert f0 >> 32 & 1 and f0 >> 9 & 1 and not f0 >> 5 & 1
    assert f1 >> 5 & 1


def test_abuse_every_case_recovers_after_reset(tmp_path: Path) -> None:
    img0, _, _ = images(tmp_path)
    res = run(QEMU.argv(build_virtio("virtio_abuse"), "set=own", Devices(drives=[(img0, False)])))
    assert res.status == QEMU.exit_status(0), (res.lines, res.stderr[-2000:])
    assert res.report.passed
    results = abuse_results(res)
    assert list(results) == list(ABUSE_CASES)
    assert all(rec == "recovered" for _, rec in results.values()), results
    # QEMU's own validation (virtio_error -> DEVICE_NEEDS_RESET) catches these ...
    needs_reset = ("chain_loop", "next_oob", "head_oob", "huge_len", "avail_jump", "indirect_len")
    for name in (*needs_reset, "status_readonly", "hdr_writable"):
        assert results[name][0] == "needs_reset", (name, results[name])
    # ... and reads past the config space give all ones without side effects
    assert results["config_oob"][0] == "refused"
    assert results["notify_unset"][0] == "ignored"
    assert results["indirect_ok"][0] == "completed"
    assert results["len_odd"][0] == "ioerr"
    assert results["config_write_ro"][0] == "refused"


def test_abuse_rng_cases_recover() -> None:
    fast = [c for c in RNG_ABUSE_CASES if c != "rng_huge_len"]
    res = run(QEMU.argv(build_virtio("virtio_abuse"), f"dev=rng case={','.join(fast)}", Devices(rng=True)))
    assert res.status == QEMU.exit_status(0) and res.report.passed, res.lines
    results = abuse_results(res)
    assert list(results) == fast
    assert all(rec == "recovered" for _, rec in results.values()), results
    for name in ("rng_chain_loop", "rng_avail_jump"):
        assert results[name][0] == "needs_reset", (name, results[name])


@pytest.mark.slow
def test_abuse_rng_huge_buffer_blocks_qemu_then_needs_reset() -> None:
    # QEMU handles the notify in the vCPU thread: the guest's QueueNotify write takes ~18 s here
    # before QEMU gives up on mapping the 4 GiB buffer ("bogus descriptor") and sets NEEDS_RESET.
    res = run(QEMU.argv(build_virtio("virtio_abuse"), "dev=rng case=rng_huge_len", Devices(rng=True)))
    assert res.report.passed, res.lines
    assert abuse_results(res) == {"rng_huge_len": ("needs_reset", "recovered")}


@pytest.mark.root
def test_abuse_net_tx_cases_recover() -> None:
    with netns_with_tap() as (ns, tap):
        res = run(QEMU.argv(build_virtio("virtio_abuse"), "dev=net set=own", Devices(tap=tap)), netns=ns)
    assert res.status == QEMU.exit_status(0) and res.report.passed, res.lines
    results = abuse_results(res)
    assert list(results) == list(NET_ABUSE_CASES)
    assert all(rec == "recovered" for _, rec in results.values()), results
    for name in ("net_tx_writable", "net_tx_short", "net_chain_loop"):
        assert results[name][0] == "needs_reset", (name, results[name])


def test_abuse_single_case_selection(tmp_path: Path) -> None:
    img0, _, _ = images(tmp_path)
    res = run(
        QEMU.argv(build_virtio("virtio_abuse"), "case=chain_loop,avail_jump", Devices(drives=[(img0, False)]))
    )
    assert res.report.passed
    assert list(abuse_results(res)) == ["chain_loop", "avail_jump"]
    assert "ABUSE_SUMMARY cases=2 recovered=2" in res.lines
    bad = run(QEMU.argv(build_virtio("virtio_abuse"), "case=nope", Devices(drives=[(img0, False)])))
    assert bad.status == QEMU.exit_status(1) and bad.report.failures == ["unknown case in nope"]


def test_blk_bench_small_image(tmp_path: Path) -> None:
    img = tmp_path / "bench.img"
    with open(img, "wb") as f:
        f.truncate(8 * MIB)
    argv = QEMU.argv(build_virtio("blk_bench"), "rand_count=50", Devices(drives=[(img, False)]))
    proc, lines = stream_lines(argv, timeout=120)
    assert proc.wait(timeout=30) == QEMU.exit_status(0), lines
    phases = bench_phases(lines)
    assert list(phases) == ["seq_write", "flush", "seq_read", "rand_read", "rand_write"]
    assert phases["seq_write"]["bytes"] == phases["seq_read"]["bytes"] == 8 * MIB
    assert phases["seq_read"]["requests"] == 8
    assert phases["rand_read"]["requests"] == phases["rand_write"]["requests"] == 50
    assert all(p["errors"] == 0 and p["seconds"] > 0 and p["tsc"] > 0 for p in phases.values())
    assert lines[-1][1] == "PASS"
