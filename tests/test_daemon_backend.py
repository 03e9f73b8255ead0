"""ProcessBackend with a stand-in VMM (a script taking the same arguments): argument construction, console
file, pause/resume as SIGSTOP/SIGCONT (interim), stop escalating from SIGTERM to SIGKILL, exit status."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from bulkhead.daemon.backend import ProcessBackend, VmSpec
from bulkhead.errors import HostError
from bulkhead.runtime.config import NetConfig, RateLimit

STANDIN = r"""#!/bin/sh
# invoked as: <this> -m bulkhead run ARGS...; writes its args to the --serial file, then waits
serial=""
prev=""
for a in "$@"; do
  if [ "$prev" = "--serial" ]; then serial="$a"; fi
  prev="$a"
done
echo "args: $*" >> "$serial"
case " $* " in *" --cmdline ignoreterm "*) trap '' TERM;; esac
case " $* " in *" --cmdline exit7 "*) exit 7;; esac
while true; do sleep 0.05; done
"""


def _spec(tmp: Path, cmdline: str = "") -> VmSpec:
    return VmSpec(kernel="/img/k", initrd="/img/i", cmdline=cmdline, mem_mib=64, cpus=2,
                  drives=(("/d/a.img", True), ("/d/b.img", False)), nics=(NetConfig("tap0", "52:54:00:00:00:01", RateLimit(125000, 0)),),
                  rng=True, console_path=str(tmp / "vm" / "console.log"))


@pytest.fixture
def standin(tmp_path: Path) -> Path:
    p = tmp_path / "vmm.sh"
    p.write_text(STANDIN)
    p.chmod(0o755)
    return p


def _proc_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _ignores_sigterm(pid: int) -> bool:
    """SIGTERM (15) is in the process's ignored-signal mask (/proc/PID/status SigIgn, proc(5))."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def _wait(pred, timeout=5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_run_args_are_the_runtime_flags(tmp_path):
    args = _spec(tmp_path, "console=ttyS0").run_args()
    assert args == ["--kernel", "/img/k", "--mem", "64", "--cpus", "2", "--initrd", "/img/i",
                    "--cmdline", "console=ttyS0", "--serial", str(tmp_path / "vm" / "console.log"),
                    "--drive", "/d/a.img,ro", "--drive", "/d/b.img", "--net", "tap=tap0,mac=52:54:00:00:00:01,bw=125000",
                    "--rng"]


def test_lifecycle_with_signals(tmp_path, standin):
    b = ProcessBackend(python=str(standin))
    pid = b.start("v", _spec(tmp_path))
    assert _wait(lambda: b.console("v", 0, 4096).startswith(b"args: -I -S -B "))  # through the integrity gate
    assert b"/bulkhead/_boot.py --root " in b.console("v", 0, 4096) and b" -- run --kernel /img/k" in b.console("v", 0, 4096)
    with pytest.raises(HostError, match="already running"):
        b.start("v", _spec(tmp_path))
    b.pause("v")
    assert _wait(lambda: _proc_state(pid) == "T")
    assert b.status("v").state == "paused"
    b.resume("v")
    assert _wait(lambda: _proc_state(pid) != "T")
    assert b.status("v").state == "running"
    b.pause("v")
    b.stop("v")  # a stopped process still gets SIGCONT first, then SIGTERM
    st = b.status("v")
    assert st.state == "exited" and st.exit_status == 128 + 15
    with pytest.raises(HostError):
        b.pause("v")


def test_stop_escalates_to_sigkill(tmp_path, standin):
    b = ProcessBackend(python=str(standin))
    pid = b.start("v", _spec(tmp_path, "ignoreterm"))
    assert _wait(lambda: _ignores_sigterm(pid))  # the event itself: the standin's trap '' TERM is in place
    t0 = time.monotonic()
    b.stop("v", grace=0.3)
    took = time.monotonic() - t0
    st = b.status("v")
    assert st.state == "exited" and st.exit_status == 128 + 9
    assert 0.3 <= took < 5


def test_console_survives_a_backend_restart(tmp_path, standin):
    b = ProcessBackend(python=str(standin), console_root=tmp_path / "vm-root")
    spec = _spec(tmp_path)
    spec = VmSpec(**{**spec.__dict__, "console_path": str(tmp_path / "vm-root" / "v" / "console.log")})
    b.start("v", spec)
    assert _wait(lambda: b.console("v", 0, 100) != b"")
    b.stop("v")
    fresh = ProcessBackend(python=str(standin), console_root=tmp_path / "vm-root")  # a restarted daemon
    assert fresh.console("v", 0, 100).startswith(b"args:")
    assert fresh.console("v", 6, 3) == b"-I "


def test_guest_exit_status_is_reported(tmp_path, standin):
    b = ProcessBackend(python=str(standin))
    b.start("v", _spec(tmp_path, "exit7"))
    assert _wait(lambda: b.status("v").state == "exited")
    assert b.status("v").exit_status == 7
    b.forget("v")
    assert b.status("v").state == "absent"
    assert b.console("v", 0, 10) == b""


def test_vmm_environment_is_clean(tmp_path, standin, monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "x")
    script = tmp_path / "env.sh"
    script.write_text('#!/bin/sh\nfor a in "$@"; do last="$a"; prev2="$prev"; prev="$a"; done\n'
                      'env > "$(dirname "$0")/env.out"\n')
    script.chmod(0o755)
    b = ProcessBackend(python=str(script))
    b.start("v", _spec(tmp_path))
    assert _wait(lambda: (tmp_path / "env.out").exists() and (tmp_path / "env.out").read_text())
    env = (tmp_path / "env.out").read_text()
    assert "SECRET_TOKEN" not in env and "PATH=" in env
    assert os.path.exists(tmp_path / "vm" / "console.log")
