"""The interactive console and the graceful lifecycle end to end: a real guest (tests/payloads/console.c,
built with bulkhead.guests.build) in a jailed worker, the real servers (mTLS + local socket), and the
`bulkhead` command driven through a pty with pexpect, as a user types.

- `bulkhead vm console NAME` attaches read-write: the guest's output arrives, typed input reaches the
  guest's 16550 receive path through the worker protocol and the guest echoes it; a `--follow` reader
  sees the same output; a second writer is refused; Ctrl-] detaches; a principal without the
  permission is refused over mTLS.
- `vm reboot` keeps the VM (a new boot's output appears after the old one); `vm shutdown` is graceful for
  a guest that handles Ctrl-Alt-Del and force-stops one that ignores it after the timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest

from bulkhead.daemon.backend import make_backend
from bulkhead.daemon.testkit import Harness, Identity, ServerThread

pytestmark = [pytest.mark.root, pytest.mark.kvm, pytest.mark.slow, pytest.mark.timeout(300)]

BOOT_S = 120  # ring-0 guest code is emulated on PVM hosts (docs: GUIDE): allow a slow boot


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Harness, ServerThread]]:
    if os.geteuid() != 0 or not os.path.exists("/dev/kvm"):
        pytest.skip("needs root and /dev/kvm (the jailed backend)")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.vmrun import payload

    h = Harness(tmp_path_factory.mktemp("console"), backend=make_backend("jail"))
    (h.root / "images" / "console").write_bytes(payload("console").read_bytes())
    with ServerThread(h) as s:
        yield h, s
    h.close()


def _cli_args(h: Harness, s: ServerThread, who: Identity | None) -> list[str]:
    if who is None:
        return ["--state-dir", str(h.root), "--socket", str(h.sd.socket)]
    return ["--state-dir", str(h.root), "--url", s.url, "--ca", str(h.sd.ca_cert), "--cert", str(who.cert_path),
            "--key", str(who.key_path)]


def _spawn(h: Harness, s: ServerThread, *args: str, who: Identity | None = None) -> Any:
    return pexpect.spawn(sys.executable, ["-m", "bulkhead", "vm", *args, *_cli_args(h, s, who)],
                         env=dict(os.environ), timeout=BOOT_S, encoding="utf-8", codec_errors="replace")


def _cli(h: Harness, s: ServerThread, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bulkhead", "vm", *args, *_cli_args(h, s, None)],
                          capture_output=True, text=True, timeout=BOOT_S + 60, stdin=subprocess.DEVNULL)


def _start(h: Harness, name: str, cmdline: str = "") -> tuple[str, str]:
    t = h.tenant(f"t-{name}")
    vm = h.vm(t, name, kernel="console", cmdline=cmdline, mem_mib=16)
    with h.client() as c:
        r = c.post(f"/v1/vms/{vm}/start")
        assert r.status_code == 200, r.text
    return t, vm


def _console(h: Harness, vm: str) -> str:
    with h.client() as c:
        return str(c.get(f"/v1/vms/{vm}/console").json()["data"])


def _wait_console(h: Harness, vm: str, needle: str, count: int = 1) -> str:
    end = time.monotonic() + BOOT_S
    while (text := _console(h, vm)).count(needle) < count:
        assert time.monotonic() < end, text[-500:]
        time.sleep(0.2)
    return text


def test_an_interactive_console_session_through_a_pty(srv: tuple[Harness, ServerThread]) -> None:
    h, s = srv
    t, vm = _start(h, "echo")
    writer = _spawn(h, s, "console", "echo", "--offset", "0")
    try:
        writer.expect("Connected to the console of echo .read-write, escape character is")
        writer.expect("CONSOLE READY")
        reader = _spawn(h, s, "console", "echo", "--follow", "--offset", "0")
        reader.expect("read-only")
        reader.expect("CONSOLE READY")
        writer.send("hello bulkhead\r")
        writer.expect("GOT hello bulkhead")  # typed input went to the guest, which echoed it
        reader.expect("GOT hello bulkhead")  # and every attached reader sees the same output

        second = _spawn(h, s, "console", "echo")
        second.expect("refused \\(409\\): root@local holds this VM's console for writing")
        second.expect(pexpect.EOF)
        second.close()
        assert second.exitstatus == 1

        reader.sendline("typed by a reader")  # --follow never sends: nothing reaches the guest
        time.sleep(1.0)

        writer.sendcontrol("]")  # the detach key
        writer.expect("detached")
        writer.expect(pexpect.EOF)
        writer.close()
        assert writer.exitstatus == 0
        reader.sendcontrol("c")
        reader.expect(pexpect.EOF)
        reader.close()
        assert "GOT typed by a reader" not in _console(h, vm)

        nosy = h.principal("nosy", ("Reader", f"/tenants/{t}"))  # sees the VM, not its console
        refused = _spawn(h, s, "console", vm, who=nosy)
        refused.expect("refused \\(403\\): nosy may not vm/console/read")
        refused.expect(pexpect.EOF)
        refused.close()
        assert refused.exitstatus == 1
    finally:
        for child in ("writer", "reader"):
            p = locals().get(child)
            if p is not None and p.isalive():
                p.terminate(force=True)
        with h.client() as c:
            c.post(f"/v1/vms/{vm}/stop")
    with h.client() as c:
        recs = c.get("/v1/audit", params={"vm": vm, "limit": 10000}).json()
    assert [r["action"] for r in recs if r["result"] == "attached"] == ["vm/console/write", "vm/console/read"]
    assert len([r for r in recs if r["action"] == "vm.console.detach"]) >= 2


def test_reboot_then_a_graceful_shutdown_by_the_acpi_power_button(srv: tuple[Harness, ServerThread]) -> None:
    h, s = srv
    _, vm = _start(h, "graceful")
    _wait_console(h, vm, "CONSOLE READY")
    r = _cli(h, s, "reboot", "graceful")
    assert r.returncode == 0, r.stderr
    _wait_console(h, vm, "CONSOLE READY", count=2)  # the same VM booted again; the old output is kept
    with h.client() as c:
        assert c.get(f"/v1/vms/{vm}").json()["state"] == "running"
    r = _cli(h, s, "shutdown", "graceful", "--timeout", "90")
    assert r.returncode == 0, r.stderr
    assert "the guest powered off" in r.stderr
    text = _console(h, vm)
    assert "POWER BUTTON\n" in text.replace("\r", "") and "POWER OFF" in text  # the GED event reached it
    with h.client() as c:
        got = c.get(f"/v1/vms/{vm}").json()
        assert got["state"] == "stopped"
        recs = c.get("/v1/audit", params={"vm": vm, "limit": 10000}).json()
    shut = [r for r in recs if r["action"] == "vm.shutdown"]
    assert [r["result"] for r in shut] == ["intent", "graceful"]
    assert json.loads(shut[-1]["detail"])["method"] == "acpi-power-button"
    assert [r["result"] for r in recs if r["action"] == "vm.reboot"] == ["intent"]


def test_a_guest_without_acpi_gets_ctrl_alt_del(srv: tuple[Harness, ServerThread]) -> None:
    h, s = srv
    _, vm = _start(h, "noacpi", cmdline="acpi=off")
    _wait_console(h, vm, "CONSOLE READY")
    r = _cli(h, s, "shutdown", "noacpi", "--timeout", "90", "--json")
    assert r.returncode == 0, r.stderr
    assert '"method": "ctrl-alt-del"' in r.stdout and '"graceful": true' in r.stdout
    text = _console(h, vm).replace("\r", "")
    assert "CTRL-ALT-DEL\n" in text and "POWER BUTTON" not in text and "POWER OFF" in text


def test_shutdown_force_stops_a_guest_that_ignores_the_power_button(srv: tuple[Harness, ServerThread]) -> None:
    h, s = srv
    _, vm = _start(h, "stubborn", cmdline="shutdown=ignore")
    _wait_console(h, vm, "CONSOLE READY")
    t0 = time.monotonic()
    r = _cli(h, s, "shutdown", "stubborn", "--timeout", "3")
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 >= 3
    assert "did not power off within 3 s: stopped by force" in r.stderr
    assert "POWER BUTTON ignored" in _console(h, vm)  # it was asked, and said no
    with h.client() as c:
        assert c.get(f"/v1/vms/{vm}").json()["state"] == "stopped"
        recs = c.get("/v1/audit", params={"vm": vm, "limit": 10000}).json()
    assert [r["result"] for r in recs if r["action"] == "vm.shutdown"] == ["intent", "forced"]
