"""Markers and skips shared by the conformance tests (QEMU is the oracle; bulkhead runs its default,
jailed path, which needs root)."""

from __future__ import annotations

import os
import shutil

import pytest

needs_both = [
    pytest.mark.kvm,
    pytest.mark.qemu,
    pytest.mark.root,
    pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64"),
    pytest.mark.skipif(os.geteuid() != 0, reason="bulkhead's default path is jailed only as root"),
]
