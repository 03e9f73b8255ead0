"""A real VM through the management plane: the ProcessBackend starts `python -m bulkhead run` with the
shipped demo guest, the console output arrives through the API, and the guest's own exit is noticed
(state `exited`, its status kept, a `vm.exit` audit record). Needs /dev/kvm and a working `bulkhead run`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

from bulkhead.daemon.backend import ProcessBackend
from bulkhead.daemon.testkit import Harness


def _runtime_available() -> bool:
    try:
        out = subprocess.run([sys.executable, "-m", "bulkhead", "run", "--help"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and b"--serial" in out.stdout


@pytest.mark.kvm
def test_demo_guest_runs_under_the_daemon(tmp_path):
    if not _runtime_available():
        pytest.skip("`bulkhead run` is not available yet")
    from bulkhead.guests.build import build

    try:
        image = build("demo.c")
    except Exception as exc:  # no gcc/ld: the runtime tests report that separately
        pytest.skip(f"cannot build the demo guest: {exc}")
    h = Harness(tmp_path / "s", backend=ProcessBackend())
    try:
        shutil.copy(image, h.root / "images" / "demo")
        t = h.tenant("e2e")
        with h.client() as c:
            vm = c.post("/v1/vms", json={"tenant": t, "name": "demo", "kernel": "demo", "cpus": 1, "mem_mib": 128,
                                         "cmdline": "console=ttyS0 demo=1"}).json()["id"]
            assert c.post(f"/v1/vms/{vm}/start").json()["state"] == "running"
            deadline = time.monotonic() + 60
            state = "running"
            while state == "running" and time.monotonic() < deadline:
                time.sleep(0.2)
                state = c.get(f"/v1/vms/{vm}").json()["state"]
            got = c.get(f"/v1/vms/{vm}").json()
            console = c.get(f"/v1/vms/{vm}/console").json()["data"]
            assert got["state"] == "exited", console
            assert got["exit_status"] == 1, console  # the demo guest writes 0 to the debug-exit port
            assert "Goodbye." in console
            assert any(r["action"] == "vm.exit" for r in c.get("/v1/audit", params={"vm": vm}).json())
    finally:
        h.close()
