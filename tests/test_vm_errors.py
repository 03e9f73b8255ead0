"""User mistakes and malformed images get one clear line and a distinct status, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.vmrun import payload, run

from bulkhead.errors import HostError
from bulkhead.hypervisor.kvm import Kvm


def _no_traceback(err: str) -> None:
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2, err


def test_missing_kernel_file() -> None:
    r = run("--kernel", "/nonexistent/vmlinux")
    assert r.status == 2
    assert "does not exist" in r.err
    _no_traceback(r.err)


@pytest.mark.parametrize(
    "flags",
    [
        ["--mem", "1"],
        ["--cpus", "0"],
        ["--cpus", "999"],
        ["--mem", "lots"],
        ["--drive", ""],
        ["--net", "tap=bad name"],
    ],
)
def test_bad_flags(flags: list[str]) -> None:
    r = run("--kernel", "/bin/true", *flags)
    assert r.status == 2, r.err
    _no_traceback(r.err)


@pytest.mark.kvm
@pytest.mark.parametrize(
    "mangle",
    [
        lambda b: b[:40],  # truncated ELF header
        lambda b: b"\x7fELF" + b"\x00" * 200,  # ELF magic, nothing valid
        lambda b: b"MZ" + b[2:],  # wrong magic
        lambda b: b"",  # empty file
    ],
)
def test_malformed_images_are_rejected_before_any_vcpu_runs(tmp_path: Path, mangle) -> None:  # type: ignore[no-untyped-def]
    good = payload("bootinfo").read_bytes()
    bad = tmp_path / "bad.elf"
    bad.write_bytes(mangle(good))
    r = run("--kernel", str(bad))
    assert r.status == 2, r.out + r.err
    assert r.out == ""  # the guest never ran
    _no_traceback(r.err)


@pytest.mark.kvm
def test_command_line_too_long_for_the_protocol() -> None:
    r = run("--kernel", str(payload("bootinfo", "bzimage")), "--cmdline", "x" * 3000)
    assert r.status == 2
    assert "command line" in r.err.lower()
    _no_traceback(r.err)


@pytest.mark.kvm
def test_initrd_too_large(tmp_path: Path) -> None:
    big = tmp_path / "initrd"
    with big.open("wb") as f:
        f.truncate(200 << 20)
    r = run("--kernel", str(payload("bootinfo")), "--initrd", str(big), "--mem", "64")
    assert r.status == 2, r.err
    assert "initrd" in r.err.lower()
    _no_traceback(r.err)


def test_missing_dev_kvm_is_a_clear_host_error() -> None:
    with pytest.raises(HostError, match="does not exist"):
        Kvm("/nonexistent/kvm")


def test_inaccessible_dev_kvm_is_a_clear_host_error() -> None:
    """As an unprivileged user (nobody), /dev/kvm (mode 0600 root) must give one clear line."""
    import os
    import subprocess
    import sys

    if not os.path.exists("/dev/kvm") or os.stat("/dev/kvm").st_mode & 0o006:
        pytest.skip("/dev/kvm is missing or world-accessible here")
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged uid")
    src = Path(__file__).resolve().parents[1] / "src"
    # The venv's interpreter may live under /root (mode 0700); use a system-wide python for uid 65534.
    py = next((p for p in ("/usr/bin/python3", sys.executable) if os.access(p, os.X_OK)), sys.executable)
    p = subprocess.run(
        [py, "-c", "from bulkhead.hypervisor.kvm import Kvm; Kvm()"],
        capture_output=True,
        text=True,
        user=65534,
        group=65534,
        env={"PYTHONPATH": str(src)},
        timeout=30,
    )
    assert p.returncode != 0
    assert "HostError" in p.stderr and "not accessible to uid 65534" in p.stderr


def test_not_a_kvm_device_is_a_clear_host_error(tmp_path: Path) -> None:
    node = tmp_path / "kvm"
    node.write_text("")
    with pytest.raises(HostError):
        Kvm(str(node))
