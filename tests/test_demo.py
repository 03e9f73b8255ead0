"""`bulkhead demo`, the quick start's second command, works end to end (jailed when run as root)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.kvm


@pytest.mark.parametrize("jail", [False, True])
def test_demo_boots_greets_and_exits_cleanly(jail: bool) -> None:
    if jail and os.geteuid() != 0:
        pytest.skip("the jail needs root")
    args = [sys.executable, "-m", "bulkhead", "demo", *([] if jail else ["--no-jail"])]
    p = subprocess.run(args, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout.replace("\r", "")
    assert "Hello from a bulkhead guest!" in out
    assert "CPUS 2 (from the MP table)" in out
    assert "MEMORY usable_mib=127" in out
    assert "the guest ran and exited cleanly" in p.stderr
    assert "Traceback" not in p.stderr
