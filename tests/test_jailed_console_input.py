"""Console input typed before the jailed VM is built reaches the guest (it was dropped: the worker had no
serial device yet when the first ConsoleIn arrived). The unjailed path always kept it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bulkhead.guests.build import build

pytestmark = [pytest.mark.kvm, pytest.mark.root]
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("jail", [True, False], ids=["jailed", "unjailed"])
def test_input_waiting_on_stdin_at_start_reaches_the_guest(jail: bool) -> None:
    if jail and os.geteuid() != 0:
        pytest.skip("the jail needs root")
    kernel = build(str(ROOT / "bench" / "payloads" / "wait_input.c"))
    cmd = [sys.executable, "-m", "bulkhead", "run", "-q", *([] if jail else ["--no-jail"]), "--kernel", str(kernel)]
    p = subprocess.run(cmd, input="x", capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr
    assert p.stdout.splitlines() == ["READY", "GOT x"]
