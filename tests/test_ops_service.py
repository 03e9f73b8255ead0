"""Issue 19, service: the systemd unit (systemd-analyze verify), sd_notify READY=1/STOPPING=1 over a real
datagram socket from a real `bulkhead serve`, and the unit's hardening applied around a real jailed guest
(no_new_privs + a read-only file system but for the unit's ReadWritePaths + a private /tmp): the jail
still works under them."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bulkhead.daemon.sdnotify import notify
from bulkhead.daemon.testkit import spawn_daemon

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "bulkhead.service"


def _unit() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            k, _, v = line.partition("=")
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def _verify(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)], capture_output=True, text=True,
                          timeout=60, cwd=path.parent)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_unit_verifies(tmp_path: Path) -> None:
    text = UNIT.read_text()
    if not os.access("/usr/local/bin/bulkheadd", os.X_OK):  # before install.sh: any executable will do
        stand_in = tmp_path / "bulkheadd"
        stand_in.write_text("#!/bin/sh\n")
        stand_in.chmod(0o755)
        text = text.replace("/usr/local/bin/bulkheadd", str(stand_in))
    unit = tmp_path / "bulkhead.service"
    unit.write_text(text)
    res = _verify(unit)
    assert res.returncode == 0 and res.stderr.strip() == "", res.stderr
    unit.write_text(text.replace("Type=notify", "Type=notfy").replace("ProtectSystem=strict", "ProtectSystm=strict"))
    bad = _verify(unit)  # the check sees a mistake (systemd only warns, so stderr is what counts)
    assert "notfy" in bad.stderr and "ProtectSystm" in bad.stderr


def test_the_unit_matches_the_code() -> None:
    from bulkhead.daemon.daemon import default_state_dir
    from bulkhead.network.host import NETNS_DIR
    from bulkhead.sandbox.supervisor import JailOptions

    u = _unit()
    assert u["Type"] == ["notify"] and u["NoNewPrivileges"] == ["yes"] and u["ProtectSystem"] == ["strict"]
    writable = u["ReadWritePaths"][0].split()
    for path in (str(default_state_dir()), JailOptions().base_dir, NETNS_DIR):
        assert path in writable, path
    for broken in ("PrivateDevices", "RestrictNamespaces", "ProtectControlGroups", "MemoryDenyWriteExecute"):
        assert broken not in u, f"{broken}= breaks the jail (see the unit's notes)"
    assert u["ExecStart"][0].split()[0] == "/usr/local/bin/bulkheadd"


@pytest.mark.parametrize("abstract", [False, True])
def test_sd_notify_sends_one_datagram(tmp_path: Path, abstract: bool) -> None:
    name = f"@bulkhead-test-{os.getpid()}" if abstract else str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name[1:] if abstract else name)
        s.settimeout(5)
        assert notify("READY=1", "STATUS=up", env={"NOTIFY_SOCKET": name})
        assert s.recv(4096) == b"READY=1\nSTATUS=up"
    assert not notify("READY=1", env={})  # not under systemd: nothing
    from bulkhead.daemon.sdnotify import watchdog_interval

    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None  # for another pid
    assert watchdog_interval({}) is None and watchdog_interval({"WATCHDOG_USEC": "x"}) is None
    assert not notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "gone")})  # unreachable: no error


def test_serve_notifies_ready_and_stopping(tmp_path: Path) -> None:
    from bulkhead.daemon.setup import init_state_dir

    init_state_dir(tmp_path / "s")
    sock_path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(sock_path))
        s.settimeout(30)
        proc, _info = spawn_daemon(tmp_path / "s", extra_env={"NOTIFY_SOCKET": str(sock_path),
                                                             "WATCHDOG_USEC": "200000"})
        try:
            got = [s.recv(4096).decode() for _ in range(4)]
            ready = next(m for m in got if m.startswith("READY=1")).split("\n")
            assert f"MAINPID={proc.pid}" in ready
            assert (tmp_path / "s" / "serve.json").exists()  # READY comes after the listeners are up
            assert got.count("WATCHDOG=1") >= 2  # pinged every WATCHDOG_USEC/2 from the event loop
            proc.send_signal(signal.SIGTERM)
            while (m := s.recv(4096).decode()) == "WATCHDOG=1":
                pass
            assert m.split("\n")[0] == "STOPPING=1"
            out = proc.communicate(timeout=30)[0].decode()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0
    assert "event=daemon.ready" in out and "event=daemon.stopping" in out and "event=daemon.stopped" in out


HARDEN = r"""
set -e
mount --make-rprivate /
mkdir -p /run/bulkhead /run/netns
for m in $(awk '{print $5}' /proc/self/mountinfo | sort -u); do
  case "$m" in /dev|/dev/*|/proc|/proc/*|/sys|/sys/*) continue;; esac
  mount -o remount,bind,ro "$m" 2>/dev/null || true
done
for p in /run/bulkhead /run/netns; do mount --bind "$p" "$p"; mount -o remount,bind,rw "$p"; done
mount -t tmpfs tmpfs /tmp
if touch /etc/bulkhead-rw-probe 2>/dev/null; then echo "ROOT WRITABLE"; exit 99; fi
exec setpriv --no-new-privs "$@"
"""


@pytest.mark.root
@pytest.mark.kvm
@pytest.mark.timeout(180)
@pytest.mark.skipif(shutil.which("setpriv") is None or shutil.which("unshare") is None,
                    reason="needs util-linux setpriv and unshare")
def test_the_unit_hardening_keeps_the_jail_working(tmp_path: Path) -> None:
    """NoNewPrivileges=yes, ProtectSystem=strict with the unit's ReadWritePaths, ProtectHome=read-only and
    PrivateTmp=yes, applied with unshare/mount/setpriv (no systemd here): a jailed guest still runs."""
    sys.path.insert(0, str(ROOT))
    from tests.vmrun import payload

    img = payload("exit_code")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = ["unshare", "-m", "sh", "-c", HARDEN, "harden", sys.executable, "-m", "bulkhead", "run",
           "--kernel", str(img), "--cmdline", "code=0x21", "--mem", "16"]
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env, stdin=subprocess.DEVNULL)
    assert p.returncode == (0x21 << 1) | 1, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    assert "EXIT 33" in p.stdout and "WITHOUT the jail" not in p.stderr, p.stderr
    assert time.monotonic() - t0 < 150
