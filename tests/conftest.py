"""Shared fixtures and skips. KVM tests need /dev/kvm; root tests need uid 0."""

from __future__ import annotations

import os
import shutil

import pytest

# Tests run from a working tree that changes under them, so the code-integrity check of daemons and workers
# is skipped explicitly (and loudly) here; the tests of that check clear this variable themselves.
os.environ.setdefault("BULKHEAD_DEV_SKIP_INTEGRITY", "1")


def kvm_available() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def is_pvm_host() -> bool:
    """True on PVM-based KVM (module kvm_pvm), where guest ring-0 code is emulated."""
    return os.path.isdir("/sys/module/kvm_pvm")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_kvm = pytest.mark.skip(reason="/dev/kvm is missing or not accessible")
    no_root = pytest.mark.skip(reason="needs root")
    no_qemu = pytest.mark.skip(reason="qemu-system-x86_64 is not installed")
    for item in items:
        if "kvm" in item.keywords and not kvm_available():
            item.add_marker(no_kvm)
        if "root" in item.keywords and os.geteuid() != 0:
            item.add_marker(no_root)
        if "qemu" in item.keywords and shutil.which("qemu-system-x86_64") is None:
            item.add_marker(no_qemu)
