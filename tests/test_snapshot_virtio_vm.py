"""Snapshots of a VM with virtio-blk, virtio-rng and virtio-net through `bulkhead run` (issue 20): a guest
that streams block writes, reads, entropy requests (and frames on a tap), interrupted at a moment the test does not choose, saved with
--snapshot-on-exit and resumed with --restore, prints what an uninterrupted run prints and leaves the
same disk. A snapshot whose virtio state is hostile (re-sealed with the host key: what a worker that
escaped its guest could hand the host, or a holder of the key) or whose drive changed is refused before
the guest runs."""

from __future__ import annotations

import json
import os
import random
import re
import selectors
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tests.test_snapshot import _cmd, _popen, _root, _run, sigterm_after
from tests.virtio_payloads import build_virtio, netns_with_tap

from bulkhead.snapshot.format import SnapshotReader, write_snapshot

pytestmark = [pytest.mark.kvm]

CMDLINE = "count=14 rounds=4 delay=100000000"
DISK = 64 << 10


def _disk(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(DISK)
    return path


@pytest.fixture(scope="module")
def kernel() -> Path:
    return build_virtio("snap_virtio")


@pytest.fixture(scope="module")
def reference(kernel: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, bytes]:
    disk = _disk(tmp_path_factory.mktemp("ref") / "disk.img")
    r = _run("--kernel", str(kernel), "--drive", str(disk), "--rng", "--cmdline", CMDLINE)
    assert r.returncode == 1, r.stderr
    assert r.stdout.splitlines()[-1].startswith("DONE sum="), r.stdout
    return r.stdout, disk.read_bytes()


def _interrupted(kernel: Path, disk: Path, snap: Path, key: Path, after_lines: int, *, jail: bool = False) -> Any:
    """SIGTERM once the guest printed `after_lines` lines, plus a random delay: mid-request or mid-wait."""
    return sigterm_after(_popen(_cmd("--kernel", str(kernel), "--drive", str(disk), "--rng", "--cmdline", CMDLINE,
                                     "--snapshot-on-exit", str(snap), "--snapshot-key", str(key), jail=jail)),
                         after_lines)


@pytest.mark.parametrize("jail", [False, True], ids=["unjailed", "jailed"])
def test_interrupted_mid_stream_and_restored_prints_and_writes_what_an_uninterrupted_run_does(
    kernel: Path, reference: tuple[str, bytes], tmp_path: Path, jail: bool
) -> None:
    if jail:
        _root()
    seed = int.from_bytes(os.urandom(4), "little")
    random.seed(seed)
    disk, snap, key = _disk(tmp_path / "disk.img"), tmp_path / "vm.bhs", tmp_path / "host.key"
    first = _interrupted(kernel, disk, snap, key, random.randint(4, 12), jail=jail)
    assert first.returncode == 24, (seed, first.stderr)
    assert "STEP" in first.stdout and "DONE" not in first.stdout, "the snapshot did not land mid-stream"
    second = _run("--restore", str(snap), "--snapshot-key", str(key), jail=jail)
    assert second.returncode == 1, (seed, second.stderr)
    assert first.stdout + second.stdout == reference[0], f"seed {seed}"
    assert disk.read_bytes() == reference[1], f"seed {seed}: the disk differs from an uninterrupted run's"


@pytest.fixture(scope="module")
def saved(kernel: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    d = tmp_path_factory.mktemp("saved")
    disk, snap, key = _disk(d / "disk.img"), d / "vm.bhs", d / "host.key"
    r = _interrupted(kernel, disk, snap, key, 5)
    assert r.returncode == 24, r.stderr
    return snap, key, disk


def _resealed(saved: tuple[Path, Path, Path], tmp_path: Path, edit: Any) -> Path:
    """The snapshot decrypted with the host key, its state edited, and sealed again with the same key and
    header: authentic to the host, hostile in content."""
    snap, key, _ = saved
    r = SnapshotReader(snap.read_bytes())
    state = r.open(key.read_bytes())
    pages = list(r.chunks([tuple(x) for x in state["memory"]["runs"]]))
    r.finish()
    edit(state)
    out = tmp_path / "hostile.bhs"
    out.write_bytes(b"".join(write_snapshot(r.header, state, pages, host_key=key.read_bytes(), dek=os.urandom(32),
                                            key_nonce=os.urandom(12))))
    return out


def _blk_queue(state: dict[str, Any]) -> dict[str, Any]:
    q: dict[str, Any] = state["devices"]["virtio"][0]["queues"][0]
    return q


def _set_all_rings_zero(state: dict[str, Any]) -> None:
    _blk_queue(state).update(desc=0, avail=0, used=0)


EDITS = {
    "ring-outside-ram": (lambda s: _blk_queue(s).update(used=(512 << 20)), "not inside guest RAM"),
    "size-not-power-of-two": (lambda s: _blk_queue(s).update(size=12), "not a power of two"),
    "ready-with-unset-rings": (_set_all_rings_zero, "overlaps"),
    "indices-in-flight": (lambda s: _blk_queue(s).update(next_avail=(_blk_queue(s)["next_used"] + 300) & 0xFFFF),
                          "requests in flight|differ"),
    "status-unreachable": (lambda s: s["devices"]["virtio"][1].update(status=0x05), "not one a driver can reach"),
    "rng-dropped": (lambda s: s["devices"]["virtio"].pop(), "one document per drive, NIC and rng"),
}


@pytest.mark.parametrize("case", sorted(EDITS))
def test_a_hostile_virtio_state_is_refused_before_the_guest_runs(
    saved: tuple[Path, Path, Path], tmp_path: Path, case: str
) -> None:
    edit, match = EDITS[case]
    hostile = _resealed(saved, tmp_path, edit)
    r = _run("--restore", str(hostile), "--snapshot-key", str(saved[1]))
    assert r.returncode == 2, r.stderr
    assert r.stdout == "", "the guest ran from a hostile snapshot"
    assert "snapshot state: devices.virtio" in r.stderr and "Traceback" not in r.stderr
    assert re.search(match, r.stderr), r.stderr


def test_a_restore_with_a_changed_or_missing_drive_is_refused(saved: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """The guest read the drive's capacity before the save; a drive of another size would lie to it."""
    snap, key, disk = saved
    original = disk.read_bytes()
    try:
        with open(disk, "ab") as f:
            f.write(bytes(4096))
        r = _run("--restore", str(snap), "--snapshot-key", str(key))
        assert r.returncode == 2 and r.stdout == "", r.stderr
        assert "must be the one the snapshot was taken with" in r.stderr and "Traceback" not in r.stderr
        disk.unlink()
        r = _run("--restore", str(snap), "--snapshot-key", str(key))
        assert r.returncode == 2 and r.stdout == "" and "does not exist" in r.stderr, r.stderr
    finally:
        disk.write_bytes(original)
    # refused restores are not recorded, and did not touch the drive: the snapshot still restores once
    r = _run("--restore", str(snap), "--snapshot-key", str(key))
    assert r.returncode == 1 and r.stdout.splitlines()[-1].startswith("DONE"), r.stderr


def test_the_saved_config_names_the_drive_by_absolute_path_and_the_rng(saved: tuple[Path, Path, Path]) -> None:
    snap, key, disk = saved
    r = SnapshotReader(snap.read_bytes())
    state = r.open(key.read_bytes())
    assert state["config"]["drives"] == [{"path": str(disk.resolve()), "read_only": False, "drive_id": "",
                                          "rate": [0, 0]}]
    assert state["config"]["rng"] is True
    kinds = [d["device_id"] for d in state["devices"]["virtio"]]
    assert kinds == [2, 4]
    assert all(d["status"] == 0x0F for d in state["devices"]["virtio"]), json.dumps(state["devices"]["virtio"])


FRAMES = r"""
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88b5))
s.bind((sys.argv[1], 0x88b5))
print("READY", flush=True)
while True:
    print(s.recv(4096)[14:].rstrip(bytes(1)).decode("ascii", "replace"), flush=True)
"""
NET_CMDLINE = "count=10 rounds=3 delay=100000000 net=1"


def _frames_until(proc: subprocess.Popen[bytes], last: str, timeout: float = 30) -> list[str]:
    """The payloads the guest sent on the tap, read until `last` arrived (the guest waits for each TX
    completion, so every frame is in the socket's queue by the time the VM exits). Unbuffered reads:
    a buffered readline would hide lines from select."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    data = b""
    while last.encode() + b"\n" not in data:
        assert sel.select(timeout), f"no frame for {timeout} s after {data[-60:]!r}"
        chunk = os.read(fd, 1 << 16)
        assert chunk, data
        data += chunk
    return data.decode().splitlines()


def test_a_nic_streaming_frames_sends_each_exactly_once_across_a_snapshot(kernel: Path, tmp_path: Path) -> None:
    """virtio-net on a tap (in a fresh network namespace): the guest sends one numbered frame per round.
    Interrupted and restored, it prints what an uninterrupted run prints, and the host receives every frame
    once: none lost at the save (drained: a TX notify the I/O thread had not read is sent before the state
    is read) and none sent twice after the restore."""
    _root()
    count, rounds = 10, 3
    expected = [f"snap {s} {r}" for s in range(count) for r in range(rounds)]
    with netns_with_tap() as (ns, tap):
        def bulkhead(*args: str) -> list[str]:
            # unjailed: `ip netns exec` remounts /sys, so the jail's cgroups are not visible in there
            return ["ip", "netns", "exec", ns, *_cmd(*args)]

        devices = ("--rng", "--net", f"tap={tap}", "--cmdline", NET_CMDLINE)

        sniffer = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", FRAMES, tap],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert _frames_until(sniffer, "READY") == ["READY"]
            ref_disk = _disk(tmp_path / "ref.img")
            ref = subprocess.run(bulkhead("--kernel", str(kernel), "--drive", str(ref_disk), *devices),
                                 capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
            assert ref.returncode == 1, ref.stderr.decode()
            assert _frames_until(sniffer, expected[-1]) == expected
            seed = int.from_bytes(os.urandom(4), "little")
            random.seed(seed)
            disk, snap, key = _disk(tmp_path / "disk.img"), tmp_path / "vm.bhs", tmp_path / "host.key"
            first = sigterm_after(_popen(bulkhead("--kernel", str(kernel), "--drive", str(disk), *devices,
                                                  "--snapshot-on-exit", str(snap), "--snapshot-key",
                                                  str(key))), random.randint(4, 9))
            assert first.returncode == 24, (seed, first.stderr)
            second = subprocess.run(bulkhead("--restore", str(snap), "--snapshot-key", str(key)), capture_output=True,
                                    timeout=120, stdin=subprocess.DEVNULL)
            assert second.returncode == 1, (seed, second.stderr.decode())
            assert first.stdout + second.stdout.decode() == ref.stdout.decode(), f"seed {seed}"
            assert _frames_until(sniffer, expected[-1]) == expected, f"seed {seed}"
            assert disk.read_bytes() == ref_disk.read_bytes()
        finally:
            sniffer.kill()
            sniffer.wait(timeout=30)
