"""virtio-vsock through the daemon (issue 19): `POST /vms {vsock_cid}` / `bulkhead vm create --vsock-cid`
gives the VM a vsock device in its jailed worker, with the host side in Firecracker's model (docs/VSOCK.md,
Firecracker docs/vsock.md): a unix socket under the VM's own state directory, `CONNECT <port>` for
host-initiated streams, `<socket>_<port>` listeners for guest-initiated ones. The guest is the same
driver payload as tests/test_vsock_guest.py (tests/payloads/virtio_vsock.c).

Checked here: both directions round-trip through a real jailed VM started by the API; the socket is root's
only (its directory 0700) and gone when the VM stops; the CID is validated (virtio 1.2 section 5.10.4,
vsock(7): 0, 1, 2 and U32_MAX are reserved) and unique on the host; the CID is part of the launch digest
(the guest reads it from the device); fleet VMs refuse vsock with a clear error.
"""

from __future__ import annotations

import os
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.test_vsock_guest import GUEST_PORT, HOST_PORT, _host_connects, _host_listens
from tests.virtio_payloads import CACHE, build_virtio

from bulkhead.daemon.backend import BackendStatus
from bulkhead.daemon.testkit import Harness
from bulkhead.sandbox.backend import JailedBackend
from bulkhead.sandbox.supervisor import JailOptions

pytestmark = [pytest.mark.kvm]


@pytest.fixture
def h(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    monkeypatch.setenv("BULKHEAD_CACHE", str(CACHE))
    backend = None
    if os.geteuid() == 0 and os.path.exists("/dev/kvm"):
        backend = JailedBackend(status_type=BackendStatus, options=JailOptions())
    # a short root: the socket path must fit sun_path with room for `_<port>`
    root = Path("/tmp") / f"bh-vs-{uuid.uuid4().hex[:6]}"
    harness = Harness(root, backend=backend)
    (root / "images" / "vsock").write_bytes(build_virtio("virtio_vsock").read_bytes())
    try:
        yield harness
    finally:
        harness.close()
        shutil.rmtree(root, ignore_errors=True)


def _create(h: Harness, name: str, mode: int, cid: Any = 7) -> Any:
    t = h.tenant(f"t-{uuid.uuid4().hex[:6]}")
    port = GUEST_PORT if mode == 1 else HOST_PORT
    with h.client() as c:
        return c.post("/v1/vms", json={"tenant": t, "name": name, "kernel": "vsock", "mem_mib": 32,
                                       "cmdline": f"vsock_mode={mode} vsock_port={port} seed=42", "vsock_cid": cid})


def _run_to_exit(h: Harness, vm: str) -> str:
    with h.client() as c:
        r = c.post(f"/v1/vms/{vm}/start")
        assert r.status_code == 200, r.text
        end = time.monotonic() + 120
        while c.get(f"/v1/vms/{vm}").json()["state"] != "exited":
            assert time.monotonic() < end, "the guest did not exit"
            time.sleep(0.05)
        return str(c.get(f"/v1/vms/{vm}/console").json()["data"])


def _jail_only(h: Harness) -> None:
    if not isinstance(h.backend, JailedBackend):
        pytest.skip("needs root and /dev/kvm (the jailed backend)")


def test_host_connects_to_a_jailed_daemon_vm_and_the_guest_echoes(h: Harness) -> None:
    _jail_only(h)
    r = _create(h, "vs1", 1)
    assert r.status_code == 201, r.text
    vm = r.json()
    sock = vm["vsock_socket"]
    assert vm["vsock_cid"] == 7 and sock == str(h.root / "vms" / vm["id"] / "vsock" / "v.sock")
    result: dict[str, object] = {}
    payload = b"through the daemon " * 400
    t = threading.Thread(target=_host_connects, args=(sock, payload, result), daemon=True)
    t.start()
    text = _run_to_exit(h, vm["id"])
    t.join(10)
    assert "PASS" in text.splitlines(), text
    assert result["ok"] == b"OK 1073741824\n" and result["echo"] == payload
    assert "VSOCK cid=7" in text and f"dst=7:{GUEST_PORT}" in text, text
    mode = os.stat(os.path.dirname(sock)).st_mode
    assert stat.S_IMODE(mode) == 0o700 and os.stat(os.path.dirname(sock)).st_uid == 0  # root's only
    assert not os.path.exists(sock)  # gone with the worker


def test_a_jailed_daemon_vm_connects_to_a_host_listener(h: Harness) -> None:
    _jail_only(h)
    r = _create(h, "vs2", 2, cid=9)
    assert r.status_code == 201, r.text
    vm = r.json()
    os.makedirs(os.path.dirname(vm["vsock_socket"]), mode=0o700, exist_ok=True)
    result: dict[str, object] = {}
    lst = _host_listens(vm["vsock_socket"], result)
    try:
        text = _run_to_exit(h, vm["id"])
    finally:
        lst.close()
    assert "PASS" in text.splitlines() and "VSOCK echo=ping 42" in text, text
    assert result["line"] == b"ping 42\n" and result["after"] == b""


@pytest.mark.parametrize("cid", [0, 1, 2, 0xFFFF_FFFF, -1, 1 << 32, "seven", 3.5])
def test_reserved_or_malformed_cids_are_refused(h: Harness, cid: Any) -> None:
    r = _create(h, "bad", 1, cid=cid)
    assert r.status_code == 422, r.text
    assert "vsock_cid" in r.text


def test_a_cid_is_unique_on_the_host_and_part_of_the_launch_digest(h: Harness) -> None:
    first = _create(h, "a", 1, cid=11)
    assert first.status_code == 201, first.text
    again = _create(h, "b", 1, cid=11)
    assert again.status_code == 409 and "CID 11 is already used" in again.text, again.text
    other = _create(h, "c", 1, cid=12)
    assert other.status_code == 201
    with h.client() as c:
        d1 = c.get(f"/v1/vms/{first.json()['id']}/measurement").json()["digest"]
        d2 = c.get(f"/v1/vms/{other.json()['id']}/measurement").json()["digest"]
    assert d1 != d2  # same kernel and command line; only the CID differs, and the guest can read it
    with h.client() as c:
        assert c.delete(f"/v1/vms/{first.json()['id']}").status_code == 204
    assert _create(h, "d", 1, cid=11).status_code == 201  # a deleted VM's CID is free again


def test_the_cli_creates_a_vsock_vm_and_vm_get_shows_its_socket(h: Harness) -> None:
    """`bulkhead vm create --vsock-cid N` over the local socket; `vm get --json` names the socket; a
    reserved CID is a usage error from the API, not a traceback."""
    import json
    import subprocess
    import sys

    from bulkhead.daemon.testkit import ServerThread

    t = h.tenant("cli")
    base = [sys.executable, "-m", "bulkhead", "vm"]
    where = ["--state-dir", str(h.root), "--socket", str(h.sd.socket)]
    with ServerThread(h):
        made = subprocess.run([*base, "create", "--tenant", t, "--name", "v", "--kernel", "vsock", "--mem", "32",
                               "--vsock-cid", "21", "--json", *where], capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        vm = json.loads(made.stdout)
        got = subprocess.run([*base, "get", vm["id"], "--json", *where], capture_output=True, text=True, timeout=60)
        bad = subprocess.run([*base, "create", "--tenant", t, "--name", "w", "--kernel", "vsock",
                              "--vsock-cid", "2", *where], capture_output=True, text=True, timeout=60)
    assert json.loads(got.stdout)["vsock_socket"] == str(h.root / "vms" / vm["id"] / "vsock" / "v.sock")
    assert json.loads(got.stdout)["vsock_cid"] == 21
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "vsock_cid" in bad.stderr, bad.stderr
