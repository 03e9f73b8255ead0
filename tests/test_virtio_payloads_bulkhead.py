"""The virtio payloads on bulkhead's own virtio-mmio devices (`bulkhead run --drive/--net/--rng`).

Same payloads and checks as the QEMU reference (tests/test_virtio_payloads_qemu.py, helpers in
tests/virtio_payloads.py). The abuse test is stricter than on QEMU: every malformed queue or setup must
be refused or end in DEVICE_NEEDS_RESET, never be processed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.virtio_payloads import (
    ABUSE_CASES,
    CACHE,
    NET_ABUSE_CASES,
    RNG_ABUSE_CASES,
    Bulkhead,
    Devices,
    abuse_results,
    bench_phases,
    build_virtio,
    check_blk,
    check_rng,
    netns_with_tap,
    run,
    sniffer,
    stream_lines,
)

from bulkhead.devices.virtio.faults import FaultReason

pytestmark = [pytest.mark.kvm]

BULKHEAD = Bulkhead()
MIB = 1 << 20

# What bulkhead must do with each abuse case (tests/payloads/README.md, "virtio payloads").
EXPECTED_ABUSE = {name: {"needs_reset"} for name in ABUSE_CASES}
EXPECTED_ABUSE.update(
    {
        "config_oob": {"refused"},  # reads 0, writes dropped
        "notify_unset": {"ignored"},  # dropped, the device keeps working
        "status_order": {"refused"},
        "features_no_v1": {"refused"},
        # refusing QueueReady (reads back 0) is as good as NEEDS_RESET for a bad layout
        "qsize_npot": {"needs_reset", "refused"},
        "qsize_too_big": {"needs_reset", "refused"},
        "used_overlap": {"needs_reset", "refused"},
        "ring_unaligned": {"needs_reset", "refused"},
        "ring_oob": {"needs_reset", "refused"},
        "indirect_ok": {"completed"},  # the control: a valid indirect request works
        "len_odd": {"ioerr", "needs_reset"},  # 100-byte read: not a whole sector
        "config_write_ro": {"refused"},
        "queue_sel_oob": {"refused"},
        # §4.2.2.2: queue registers of a ready queue MUST NOT be written: the write is not applied and the
        # device needs a reset (QEMU applies it and keeps going: tests/conformance)
        "queue_change_live": {"needs_reset"},
    }
)
KNOWN_GAPS: dict[str, str] = {}  # case -> bulkhead bug, while one is open (strict xfail)


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


@pytest.mark.parametrize("jail", [False, pytest.param(True, marks=pytest.mark.root)], ids=["no-jail", "jail"])
def test_blk_write_flush_read_and_refusals(tmp_path: Path, jail: bool) -> None:
    vmm = Bulkhead(jail=jail)
    img0, img1, ro_before = images(tmp_path)
    seed = 4242
    res = run(
        vmm.argv(build_virtio("virtio_blk"), f"seed={seed}", Devices(drives=[(img0, False), (img1, True)]))
    )
    check_blk(res, vmm, seed=seed, img0=img0, img1=img1, img1_before=ro_before)
    ids = [
        line.split("id=", 1)[1]
        for line in res.lines
        if line.startswith(("BLK 0 get_id status=0", "BLK 1 get_id status=0"))
    ]
    assert len(ids) == 2 and all(ids) and ids[0] != ids[1], res.lines
    f0 = int(res.fields("BLK 0 capacity")["features"], 16)
    f1 = int(res.fields("BLK 1 capacity")["features"], 16)
    assert f0 >> 32 & 1 and f0 >> 9 & 1 and not f0 >> 5 & 1
    assert f1 >> 5 & 1


def test_all_devices_together(tmp_path: Path) -> None:
    """Drives and rng on one VM: each payload finds its device among the others."""
    img0, img1, ro_before = images(tmp_path)
    devs = Devices(drives=[(img0, False), (img1, True)], rng=True)
    res = run(BULKHEAD.argv(build_virtio("virtio_rng"), "", devs))
    check_rng(res, BULKHEAD)
    ids = [line.split()[6] for line in res.lines if line.startswith("VIRTIO dev")]
    assert ids == ["id=2", "id=2", "id=4"], res.lines
    res = run(BULKHEAD.argv(build_virtio("virtio_blk"), "seed=5", devs))
    check_blk(res, BULKHEAD, seed=5, img0=img0, img1=img1, img1_before=ro_before)


@pytest.fixture(scope="module")
def abuse_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[dict[str, tuple[str, str]], dict[str, object], int]:
    tmp = tmp_path_factory.mktemp("abuse")
    img0, _, _ = images(tmp)
    stats = tmp / "stats.json"
    vmm = Bulkhead(("--stats", str(stats)))
    res = run(vmm.argv(build_virtio("virtio_abuse"), "set=own", Devices(drives=[(img0, False)])))
    assert res.status == vmm.exit_status(0), (res.lines, res.stderr[-2000:])
    assert (
        res.report.passed
        and f"ABUSE_SUMMARY cases={len(ABUSE_CASES)} recovered={len(ABUSE_CASES)}" in res.lines
    ), res.lines
    results = abuse_results(res)
    assert list(results) == list(ABUSE_CASES)
    return results, json.loads(stats.read_text()), res.status


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[c])) if c in KNOWN_GAPS else c
        for c in ABUSE_CASES
    ],
)
def test_abuse_case_is_refused_or_needs_reset(
    abuse_run: tuple[dict[str, tuple[str, str]], dict[str, object], int], case: str
) -> None:
    results, _, _ = abuse_run
    result, recovery = results[case]
    assert recovery == "recovered"
    assert result in EXPECTED_ABUSE[case], (case, result)


def test_abuse_faults_are_recorded_as_security_events(
    abuse_run: tuple[dict[str, tuple[str, str]], dict[str, object], int],
) -> None:
    results, stats, _ = abuse_run
    dev = stats["devices"]["virtio-blk0"]  # type: ignore[index]
    assert dev.get("event_errors", 0) == 0, dev
    faults = [e for e in stats["events"] if e["event"] == "guest-fault"]  # type: ignore[attr-defined]
    needs_reset = sum(1 for r, _ in results.values() if r == "needs_reset")
    assert len(faults) >= needs_reset > 0, (faults, dev)


def test_abuse_faults_are_counted(
    abuse_run: tuple[dict[str, tuple[str, str]], dict[str, object], int],
) -> None:
    results, stats, _ = abuse_run
    dev = stats["devices"]["virtio-blk0"]  # type: ignore[index]
    needs_reset = sum(1 for r, _ in results.values() if r == "needs_reset")
    faults = [e for e in stats["events"] if e["event"] == "guest-fault"]  # type: ignore[attr-defined]
    # one first fault per case that ended in NEEDS_RESET (a case may break several rules after it)
    assert sum(1 for e in faults if e["first"]) == needs_reset, faults
    # every fault carries a typed reason, counted per reason in --stats
    reasons = Counter(e["reason"] for e in faults)
    assert set(reasons) <= {r.value for r in FaultReason}, reasons
    assert {k: v for k, v in dev.items() if k.startswith("fault.")} == {
        f"fault.{r}": n for r, n in reasons.items()
    }
    assert dev["guest_faults"] == len(faults) == sum(reasons.values()), dev
    assert reasons[FaultReason.DESC_CHAIN_LOOP] >= 1 and reasons[FaultReason.RING_OVERLAP] >= 1, reasons
    assert dev["status_rejected"] >= 2 and dev["features_rejected"] >= 1, dev


def test_abuse_rng_every_case_needs_reset(tmp_path: Path) -> None:
    stats = tmp_path / "stats.json"
    vmm = Bulkhead(("--stats", str(stats)))
    res = run(vmm.argv(build_virtio("virtio_abuse"), "dev=rng set=own", Devices(rng=True)))
    assert res.status == vmm.exit_status(0) and res.report.passed, (res.lines, res.stderr[-2000:])
    results = abuse_results(res)
    assert list(results) == list(RNG_ABUSE_CASES)
    assert results == {name: ("needs_reset", "recovered") for name in RNG_ABUSE_CASES}
    counters = next(
        v for k, v in json.loads(stats.read_text())["devices"].items() if k.startswith("virtio-rng")
    )
    assert counters["guest_faults"] == len(RNG_ABUSE_CASES), counters


@pytest.mark.root
def test_abuse_net_tx_cases(tmp_path: Path) -> None:
    stats = tmp_path / "stats.json"
    vmm = Bulkhead(("--stats", str(stats)))
    with netns_with_tap() as (ns, tap), sniffer(ns, tap) as frames:
        res = run(vmm.argv(build_virtio("virtio_abuse"), "dev=net set=own", Devices(tap=tap)), netns=ns)
    assert res.status == vmm.exit_status(0) and res.report.passed, (res.lines, res.stderr[-2000:])
    results = abuse_results(res)
    assert list(results) == list(NET_ABUSE_CASES)
    expected = {name: ("needs_reset", "recovered") for name in NET_ABUSE_CASES}
    expected["net_tx_huge"] = ("completed", "recovered")  # completed, but the frame is dropped ...
    assert results == expected
    # ... : only the 60-byte frames of the normal requests reached the host (one per recovery check,
    # one for the baseline, one per case that first brings the device up and then abuses it)
    ours = [n for n, etype in frames if etype == "88b5"]
    assert ours and set(ours) == {60}, frames
    counters = next(
        v for k, v in json.loads(stats.read_text())["devices"].items() if k.startswith("virtio-net")
    )
    assert counters["guest_faults"] == len(NET_ABUSE_CASES) - 1, counters


def test_blk_bench_small_image(tmp_path: Path) -> None:
    img = tmp_path / "bench.img"
    with open(img, "wb") as f:
        f.truncate(8 * MIB)
    argv = BULKHEAD.argv(build_virtio("blk_bench"), "rand_count=50", Devices(drives=[(img, False)]))
    proc, lines = stream_lines(argv, timeout=120)
    assert proc.wait(timeout=30) == BULKHEAD.exit_status(0), lines
    phases = bench_phases(lines)
    assert list(phases) == ["seq_write", "flush", "seq_read", "rand_read", "rand_write"]
    assert phases["seq_write"]["bytes"] == phases["seq_read"]["bytes"] == 8 * MIB
    assert phases["seq_read"]["requests"] == 8
    assert phases["rand_read"]["requests"] == phases["rand_write"]["requests"] == 50
    assert all(p["errors"] == 0 and p["seconds"] > 0 and p["tsc"] > 0 for p in phases.values())
    assert lines[-1][1] == "PASS"
