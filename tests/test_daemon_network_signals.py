"""The daemon survives hundreds of network and NIC operations in one life (issue 12, hole 1).

Before the fix every netlink socket into a tenant namespace came from a forked pyroute2 helper
(`IPRoute(netns=...)`, `netns.create`). The fork inherited the asyncio loop's signal wakeup fd
(`loop.add_signal_handler` -> `signal.set_wakeup_fd`), so the SIGTERM pyroute2 sends its helper was
written into the daemon's own loop, which ran `Serving.stop`: the daemon logged `daemon.stop` and exited
0 after a few dozen network operations. This test drives a real `bulkhead serve` (its own signal
handlers installed, as in production) through the local API: networks created and deleted, VMs with a NIC
created, started (a tap is born in the tenant namespace), stopped and deleted; the daemon must still
answer at the end and must never have logged `daemon.stop`.

The daemon runs inside a named namespace that plays the host, so the real host's links and rules are
never touched; its tenant namespaces are real named namespaces under a private prefix.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from bulkhead.daemon.auditlog import query_records
from bulkhead.daemon.testkit import Harness, wait_serve_info
from bulkhead.network import host
from bulkhead.network.state import HostConfig

pytestmark = [pytest.mark.timeout(300)]

CYCLES = int(os.environ.get("BULKHEAD_NETOPS_CYCLES", "10"))  # 10 API operations per cycle (500: set 50)


def _cycle(c: httpx.Client, tenant: str, i: int) -> list[httpx.Response]:
    """10 operations: a network, two VMs with a NIC on it started (taps), stopped, deleted, the network deleted."""
    steps: list[httpx.Response] = []
    r = c.post(f"/tenants/{tenant}/networks", json={"name": f"n{i}", "ipv4_subnet": "10.9.0.0/24"})
    steps.append(r)
    net = r.json()["id"]
    vms = []
    for j in range(2):
        r = c.post("/vms", json={"tenant": tenant, "name": f"v{i}-{j}", "kernel": "vmlinux",
                                 "nics": [{"network": net}]})
        steps.append(r)
        vms.append(r.json()["id"])
    steps += [c.post(f"/vms/{vm}/start") for vm in vms]
    steps += [c.post(f"/vms/{vm}/stop") for vm in vms]
    steps += [c.delete(f"/vms/{vm}") for vm in vms]
    steps.append(c.delete(f"/networks/{net}"))
    return steps


@pytest.mark.root
def test_hundreds_of_network_and_nic_operations_do_not_stop_the_daemon(tmp_path: Path) -> None:
    prefix = "s" + secrets.token_hex(1)
    hns = f"{prefix}host"
    state = tmp_path / "state"
    Harness(state).close()  # an initialized state directory with images/vmlinux
    subprocess.run(["ip", "netns", "add", hns], check=True)
    env = {**os.environ, "BULKHEAD_DEV_SKIP_INTEGRITY": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    log = open(tmp_path / "daemon.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{hns}", "--", sys.executable, "-m", "bulkhead", "serve",
         "--state-dir", str(state), "--port", "0", "--backend", "fake", "--integrity", "off",
         "--network", "host", "--net-prefix", prefix],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    ops = 0
    try:
        info = wait_serve_info(state, proc)
        elapsed = 0.0
        with httpx.Client(transport=httpx.HTTPTransport(uds=info["socket"]), base_url="http://b/v1",
                          timeout=60) as c:
            tenant = c.post("/tenants", json={"name": "acme"}).json()["id"]
            t0 = time.monotonic()
            for i in range(CYCLES):
                try:
                    steps = _cycle(c, tenant, i)
                except httpx.TransportError as exc:
                    raise AssertionError(f"the daemon stopped answering after {ops} operations: {exc}") from None
                ops += len(steps)
                bad = [(s.request.method, s.request.url.path, s.status_code, s.text) for s in steps
                       if s.status_code >= 300]
                assert not bad, bad
                assert proc.poll() is None, f"the daemon exited ({proc.returncode}) after {ops} operations"
            elapsed = time.monotonic() - t0
            assert c.get("/integrity").status_code == 200
        assert proc.poll() is None, f"the daemon exited ({proc.returncode}) after {ops} operations"
        print(f"{ops} network/NIC operations in {elapsed:.1f} s")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        log.close()
        with contextlib.suppress(Exception):
            host.teardown(HostConfig(prefix=prefix, host_netns=hns))
        with contextlib.suppress(Exception):
            subprocess.run(["ip", "netns", "del", hns], check=False)
    # exactly one daemon.stop by this daemon: the one our SIGTERM caused, as its last record
    recs = list(query_records(state / "audit.db", limit=None))
    stops = [i for i, r in enumerate(recs) if r["action"] == "daemon.stop" and json.loads(r["detail"])["pid"] == proc.pid]
    assert stops == [len(recs) - 1], ("the daemon stopped by itself", (tmp_path / "daemon.log").read_text()[-2000:])



_FORK_PROBE = """
import asyncio, os, signal, sys, threading, time
from bulkhead.daemon import server
hit = []

async def main():
    if sys.argv[1] == "guard":
        server.guard_forks()  # what Serving installs with its signal handlers
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, lambda: hit.append(1))
    status = []

    def fork_and_kill():  # what pyroute2 did: fork a helper from a daemon thread, SIGTERM it
        pid = os.fork()
        if pid == 0:
            time.sleep(2)
            os._exit(0)
        time.sleep(0.2)
        os.kill(pid, signal.SIGTERM)
        status.append(os.waitpid(pid, 0)[1])

    t = threading.Thread(target=fork_and_kill)
    t.start()
    while t.is_alive():
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    print(f"{'ran' if hit else 'quiet'} {os.WTERMSIG(status[0]) if os.WIFSIGNALED(status[0]) else 'exit'}")

asyncio.run(main())
"""


@pytest.mark.parametrize("guard", ["guard", "none"])
def test_a_signal_sent_to_a_forked_child_never_reaches_the_daemons_handler(guard: str) -> None:
    """The mechanism itself, on any fork the daemon might still make: without the guard the child's SIGTERM
    is written to the parent's wakeup fd and runs the parent's handler (the child survives it); with the
    guard (Serving installs it with its handlers) the child dies of SIGTERM and the parent hears nothing."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = subprocess.run([sys.executable, "-c", _FORK_PROBE, guard], capture_output=True, text=True, timeout=30,
                         env=env, check=True).stdout.split()
    if guard == "guard":
        assert out == ["quiet", str(int(signal.SIGTERM))]
    else:  # the hole as it was: shows the probe really can see it
        assert out == ["ran", "exit"]
