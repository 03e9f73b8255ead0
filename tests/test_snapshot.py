"""Snapshot and restore through `bulkhead run` (issue 20): a guest interrupted at a moment the test does
not choose, saved with --snapshot-on-exit and resumed with --restore, prints exactly what an uninterrupted
run prints; every altered, foreign, repeated or disallowed restore is refused before the guest runs."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.vmrun import payload

pytestmark = [pytest.mark.kvm]

CMDLINE = "count=24 delay=200000000"  # ~0.1 s a line: the SIGTERM always lands before the end


def _cmd(*args: str, jail: bool = False) -> list[str]:
    return [sys.executable, "-m", "bulkhead", "run", *([] if jail else ["--no-jail"]), *args]


def _run(*args: str, timeout: float = 120, jail: bool = False) -> subprocess.CompletedProcess[str]:
    """Output is decoded without newline translation: the guest sends "\r\n", and a snapshot may fall between
    the two bytes (universal newlines would turn that lone "\r" into a line of its own)."""
    p = subprocess.run(_cmd(*args, jail=jail), capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return subprocess.CompletedProcess(p.args, p.returncode, p.stdout.decode(), p.stderr.decode())


def _popen(cmd: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


def _finish(p: subprocess.Popen[bytes], seen: list[bytes]) -> subprocess.CompletedProcess[str]:
    out, err = p.communicate(timeout=60)
    return subprocess.CompletedProcess(p.args, p.returncode, b"".join(seen).decode() + out.decode(), err.decode())


def _root() -> None:
    if os.geteuid() != 0:
        pytest.skip("the jailed path needs root")


def _interrupted(kernel: Path, snap: Path, key: Path, after_lines: int, *, jail: bool = False,
                 ) -> subprocess.CompletedProcess[str]:
    """Start the counter guest with --snapshot-on-exit and SIGTERM it once it printed `after_lines` lines
    plus a random extra delay (the moment is not chosen by the test: mid-delay or mid-print)."""
    return sigterm_after(_popen(_cmd("--kernel", str(kernel), "--cmdline", CMDLINE, "--snapshot-on-exit", str(snap),
                                     "--snapshot-key", str(key), jail=jail)), after_lines)


def sigterm_after(p: subprocess.Popen[bytes], after_lines: int) -> subprocess.CompletedProcess[str]:
    """SIGTERM `p` once it printed `after_lines` lines plus a random delay (the sleep is not a
    synchronisation: it makes the moment of the signal one the test does not choose)."""
    assert p.stdout is not None
    seen: list[bytes] = []
    while len(seen) < after_lines:
        line = p.stdout.readline()
        assert line, f"guest ended early: {seen}"
        seen.append(line)
    time.sleep(random.uniform(0, 0.05))
    p.send_signal(signal.SIGTERM)
    return _finish(p, seen)


@pytest.fixture(scope="module")
def kernel() -> Path:
    return payload("counter")


@pytest.fixture(scope="module")
def reference(kernel: Path) -> str:
    r = _run("--kernel", str(kernel), "--cmdline", CMDLINE)
    assert r.returncode == 1, r.stderr
    assert r.stdout.splitlines()[-1].startswith("DONE sum=")
    return r.stdout


@pytest.mark.parametrize(("save_jailed", "restore_jailed"), [(False, False), (True, True), (True, False)],
                         ids=["unjailed", "jailed", "jailed-then-unjailed"])
def test_interrupted_and_restored_prints_what_an_uninterrupted_run_prints(
    kernel: Path, reference: str, tmp_path: Path, save_jailed: bool, restore_jailed: bool
) -> None:
    """The jailed default path (as root) and the development path give the same guest, and a snapshot of
    one restores on the other: the file format and the memfd layout are the same."""
    if save_jailed or restore_jailed:
        _root()
    seed = int.from_bytes(os.urandom(4), "little")
    random.seed(seed)
    snap, key = tmp_path / "vm.bhs", tmp_path / "host.key"
    first = _interrupted(kernel, snap, key, random.randint(1, 16), jail=save_jailed)
    assert first.returncode == 24, (seed, first.stderr)
    assert "snapshotted" in first.stderr and snap.exists()
    assert (snap.stat().st_mode & 0o777) == 0o600 and (key.stat().st_mode & 0o777) == 0o600
    second = _run("--restore", str(snap), "--snapshot-key", str(key), jail=restore_jailed)
    assert second.returncode == 1, (seed, second.stderr)
    assert first.stdout + second.stdout == reference, f"seed {seed}"


def test_a_snapshot_can_be_snapshotted_again(kernel: Path, reference: str, tmp_path: Path) -> None:
    """Restore, interrupt again, restore the second snapshot: three pieces make the whole output."""
    key = tmp_path / "k"
    a = _interrupted(kernel, tmp_path / "1.bhs", key, 3)
    p = _popen(_cmd("--restore", str(tmp_path / "1.bhs"), "--snapshot-key", str(key), "--snapshot-on-exit",
                    str(tmp_path / "2.bhs")))
    assert p.stdout is not None
    lines = [p.stdout.readline() for _ in range(4)]
    p.send_signal(signal.SIGTERM)
    b = _finish(p, lines)
    assert b.returncode == 24, b.stderr
    c = _run("--restore", str(tmp_path / "2.bhs"), "--snapshot-key", str(key))
    assert c.returncode == 1, c.stderr
    assert a.stdout + b.stdout + c.stdout == reference


@pytest.fixture
def saved(kernel: Path, tmp_path: Path) -> tuple[Path, Path]:
    snap, key = tmp_path / "vm.bhs", tmp_path / "host.key"
    r = _interrupted(kernel, snap, key, 2)
    assert r.returncode == 24, r.stderr
    return snap, key


def test_a_second_restore_needs_clone(saved: tuple[Path, Path]) -> None:
    snap, key = saved
    assert _run("--restore", str(snap), "--snapshot-key", str(key)).returncode == 1
    again = _run("--restore", str(snap), "--snapshot-key", str(key))
    assert again.returncode == 2
    assert "restored before" in again.stderr and "--clone" in again.stderr
    assert again.stdout == "" and "Traceback" not in again.stderr
    clone = _run("--restore", str(snap), "--snapshot-key", str(key), "--clone")
    assert clone.returncode == 1, clone.stderr


@pytest.mark.parametrize("where", ["header", "state", "memory", "end"])
def test_a_flipped_byte_is_refused_and_the_guest_never_runs(saved: tuple[Path, Path], where: str) -> None:
    snap, key = saved
    data = bytearray(snap.read_bytes())
    hlen = int.from_bytes(data[8:12], "little")
    pos = {"header": 20, "state": 12 + hlen + 60 + 10, "memory": len(data) - 3000, "end": len(data) - 5}[where]
    data[pos] ^= 1
    snap.write_bytes(bytes(data))
    r = _run("--restore", str(snap), "--snapshot-key", str(key))
    assert r.returncode == 2, r.stderr
    assert r.stdout == "", "the guest ran from an altered snapshot"
    assert "snapshot" in r.stderr and "Traceback" not in r.stderr
    # refused restores are not recorded: the intact file would still restore without --clone


def test_truncated_foreign_and_wrong_digest_snapshots_are_refused(saved: tuple[Path, Path], tmp_path: Path) -> None:
    snap, key = saved
    data = snap.read_bytes()
    short = tmp_path / "short.bhs"
    short.write_bytes(data[: len(data) // 2])
    r = _run("--restore", str(short), "--snapshot-key", str(key))
    assert r.returncode == 2 and "truncated" in r.stderr and r.stdout == ""
    other = tmp_path / "other.key"
    other.write_bytes(os.urandom(32))
    other.chmod(0o600)
    r = _run("--restore", str(snap), "--snapshot-key", str(other))
    assert r.returncode == 2 and "another host" in r.stderr and r.stdout == ""
    r = _run("--restore", str(snap), "--snapshot-key", str(key), "--expected-digest", "0" * 64)
    assert r.returncode == 2 and "launch digest" in r.stderr and r.stdout == ""
    r = _run("--restore", str(tmp_path / "none.bhs"), "--snapshot-key", str(key))
    assert r.returncode == 2 and "does not exist" in r.stderr
    # after all these refusals the intact snapshot still restores once without --clone
    assert _run("--restore", str(snap), "--snapshot-key", str(key)).returncode == 1


def test_a_key_file_readable_by_others_is_refused(saved: tuple[Path, Path]) -> None:
    snap, key = saved
    key.chmod(0o644)
    r = _run("--restore", str(snap), "--snapshot-key", str(key))
    assert r.returncode == 2 and "mode 0600" in r.stderr


def test_bad_snapshot_flags_are_usage_errors(kernel: Path, tmp_path: Path) -> None:
    r = _run("--restore", str(tmp_path / "x"), "--kernel", str(kernel))
    assert r.returncode == 2 and "--kernel cannot be given" in r.stderr
    r = _run("--kernel", str(kernel), "--clone")
    assert r.returncode == 2 and "--clone only applies" in r.stderr
    r = _run("--kernel", str(kernel), "--vsock", str(tmp_path / "v.sock"), "--snapshot-on-exit", str(tmp_path / "s"))
    assert r.returncode == 2 and "do not support virtio-vsock" in r.stderr  # blk, net and rng: test_snapshot_virtio_vm.py
    r = _run("--restore", str(tmp_path / "x"), "--rng")
    assert r.returncode == 2 and "--rng cannot be given" in r.stderr
    r = _run("--restore", str(kernel), "--snapshot-key", str(tmp_path / "k"))
    assert r.returncode == 2 and "bad magic" in r.stderr


def test_jailed_restore_refuses_a_tampered_snapshot_before_a_worker_starts(saved: tuple[Path, Path]) -> None:
    """The host authenticates every byte before it spawns the jailed worker: the altered memory never
    reaches a VMM process."""
    _root()
    snap, key = saved
    data = bytearray(snap.read_bytes())
    data[len(data) - 3000] ^= 0x80
    snap.write_bytes(bytes(data))
    r = _run("--restore", str(snap), "--snapshot-key", str(key), jail=True)
    assert r.returncode == 2 and "guest memory" in r.stderr and r.stdout == ""


@pytest.mark.parametrize("jail", [False, True], ids=["unjailed", "jailed"])
def test_two_vcpus_with_the_lapic_timer_ticking_resume_as_if_never_paused(tmp_path: Path, jail: bool) -> None:
    """2 vCPUs: the BSP sleeps in hlt between LAPIC timer interrupts and hands work to the AP, which spins.
    A restore that lost the timer's state, the AP's registers or the IDT hangs or prints otherwise."""
    if jail:
        _root()
    kernel = payload("ticker")
    args = ("--kernel", str(kernel), "--cpus", "2", "--cmdline", "count=40")
    ref = _run(*args, jail=jail)
    assert ref.returncode == 1, ref.stderr
    seed = int.from_bytes(os.urandom(4), "little")
    random.seed(seed)
    snap, key = tmp_path / "t.bhs", tmp_path / "k"
    p = _popen(_cmd(*args, "--snapshot-on-exit", str(snap), "--snapshot-key", str(key), jail=jail))
    assert p.stdout is not None
    seen = [p.stdout.readline() for _ in range(random.randint(2, 25))]
    time.sleep(random.uniform(0, 0.03))
    p.send_signal(signal.SIGTERM)
    first = _finish(p, seen)
    assert first.returncode == 24, (seed, first.stderr)
    rest = _run("--restore", str(snap), "--snapshot-key", str(key), jail=jail)
    assert rest.returncode == 1, (seed, rest.stderr)
    assert first.stdout + rest.stdout == ref.stdout, f"seed {seed}"
