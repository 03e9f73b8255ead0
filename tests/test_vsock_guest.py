"""virtio-vsock round trips with a real guest driver (tests/payloads/virtio_vsock.c), both directions, in
process (`bulkhead run --no-jail --vsock`) and jailed as root (`run_jailed`).

Peer oracle: none can run here. QEMU's `vhost-vsock-device` needs /dev/vhost-vsock and the vhost_vsock
module (this PVM guest kernel has neither: `modprobe vhost_vsock` finds no module), and Firecracker is not
installed (no binary, not in Debian). The checks below follow virtio 1.2 §5.10.6 (REQUEST/RESPONSE,
RW, SHUTDOWN then RST, credit in every header) and Firecracker's docs/vsock.md host protocol
(`CONNECT <port>\\n` -> `OK <host_port>\\n`; guest connects to port P -> unix socket `<path>_<P>`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.kvm]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.virtio_payloads import CACHE, build_virtio  # noqa: E402

GUEST_PORT = 1234
HOST_PORT = 4321


@pytest.fixture(scope="module", autouse=True)
def _guest_cache() -> Iterator[None]:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BULKHEAD_CACHE", str(CACHE))
        yield


def _host_connects(path: str, payload: bytes, result: dict[str, object]) -> None:
    """Host-initiated: CONNECT, expect OK <port>, send payload, read the guest's echo, close."""
    c = socket.socket(socket.AF_UNIX)
    c.settimeout(60)
    for _ in range(600):
        try:
            c.connect(path)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            threading.Event().wait(0.05)
    c.sendall(b"CONNECT %d\n" % GUEST_PORT)
    f = c.makefile("rb")
    result["ok"] = f.readline()
    c.sendall(payload)
    echo = b""
    while len(echo) < len(payload):
        chunk = c.recv(65536)
        if not chunk:
            break
        echo += chunk
    result["echo"] = echo
    c.close()


def _host_listens(path: str, result: dict[str, object]) -> socket.socket:
    """Guest-initiated: a listener at <path>_<port> that echoes one line."""
    lst = socket.socket(socket.AF_UNIX)
    lst.bind(f"{path}_{HOST_PORT}")
    os.chmod(f"{path}_{HOST_PORT}", 0o666)
    lst.listen(1)
    lst.settimeout(60)

    def serve() -> None:
        s, _ = lst.accept()
        s.settimeout(60)
        line = s.makefile("rb").readline()
        result["line"] = line
        s.sendall(line)
        result["after"] = s.recv(100)  # the guest's SHUTDOWN: EOF
        s.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    result["thread"] = t
    return lst


def _run(tmp_path: Path, mode: int, *, jail: bool) -> tuple[str, str]:
    img = build_virtio("virtio_vsock")
    path = str(tmp_path / "v.sock")
    port = GUEST_PORT if mode == 1 else HOST_PORT
    cmdline = f"vsock_mode={mode} vsock_port={port} seed=42"
    if jail:
        from bulkhead.config import VmConfig, VsockConfig
        from bulkhead.sandbox.supervisor import leftovers, run_jailed

        out: list[bytes] = []
        vm_id = f"t-vsock-{uuid.uuid4().hex[:8]}"
        cfg = VmConfig(kernel=str(img), cmdline=cmdline, mem_mib=32, vsock=VsockConfig(path, 7))
        reason = run_jailed(cfg, console=out.append, vm_id=vm_id)
        assert leftovers(vm_id) == []
        assert not os.path.exists(path)  # the VM's socket went with the worker
        return b"".join(out).decode(errors="replace"), f"{reason.kind} {reason.status}"
    argv = [sys.executable, "-m", "bulkhead", "run", "--no-jail", "-q", "--kernel", str(img), "--mem", "32",
            "--cmdline", cmdline, "--vsock", f"{path},cid=7"]
    p = subprocess.run(argv, capture_output=True, timeout=120, stdin=subprocess.DEVNULL, check=False)
    return p.stdout.decode(errors="replace"), f"debug-exit {p.returncode}"


@pytest.mark.parametrize("jail", [False, pytest.param(True, marks=pytest.mark.root)], ids=["in-process", "jailed"])
def test_host_connect_guest_echoes(tmp_path: Path, jail: bool) -> None:
    if jail and os.geteuid() != 0:
        pytest.skip("the jail needs root")
    result: dict[str, object] = {}
    payload = b"hello vsock " * 500  # 6000 bytes: more than one 4 KiB guest buffer
    t = threading.Thread(target=_host_connects, args=(str(tmp_path / "v.sock"), payload, result), daemon=True)
    t.start()
    text, status = _run(tmp_path, 1, jail=jail)
    t.join(10)
    assert status == "debug-exit 1", text
    assert "PASS" in text.splitlines(), text
    assert result["ok"] == b"OK 1073741824\n"  # Firecracker's first host-side port
    assert result["echo"] == payload
    assert "VSOCK cid=7" in text and f"dst=7:{GUEST_PORT}" in text


@pytest.mark.parametrize("jail", [False, pytest.param(True, marks=pytest.mark.root)], ids=["in-process", "jailed"])
def test_guest_connects_host_listener_echoes(tmp_path: Path, jail: bool) -> None:
    if jail and os.geteuid() != 0:
        pytest.skip("the jail needs root")
    result: dict[str, object] = {}
    lst = _host_listens(str(tmp_path / "v.sock"), result)
    try:
        text, status = _run(tmp_path, 2, jail=jail)
    finally:
        lst.close()
    assert status == "debug-exit 1", text
    assert "PASS" in text.splitlines() and "VSOCK echo=ping 42" in text, text
    assert result["line"] == b"ping 42\n" and result["after"] == b""


def test_guest_connect_to_missing_listener_is_reset(tmp_path: Path) -> None:
    """No `<path>_<port>` listener: the guest's REQUEST is answered with RST (§5.10.6.4)."""
    text, _status = _run(tmp_path, 2, jail=False)
    assert "VSOCK refused op=3" in text and "FAIL connect" in text, text


@pytest.mark.parametrize("jail", [False, pytest.param(True, marks=pytest.mark.root)], ids=["in-process", "jailed"])
def test_redteam_guest_malformed_vsock_is_contained(tmp_path: Path, jail: bool) -> None:
    """tests/payloads/vsock_redteam.c: every malformed header is answered with RST (or dropped when it has
    no header to answer), the credit abuser is reset, the connection flood stops at the cap, and the VMM
    (jailed: the seccomp-filtered worker) stays up; the guest exits through debug-exit, not a crash."""
    if jail and os.geteuid() != 0:
        pytest.skip("the jail needs root")
    path = str(tmp_path / "v.sock")
    lst = socket.socket(socket.AF_UNIX)
    lst.bind(f"{path}_{HOST_PORT}")
    os.chmod(f"{path}_{HOST_PORT}", 0o666)
    lst.listen(128)  # accepts (in the kernel's backlog) and never reads
    img = build_virtio("vsock_redteam")
    try:
        if jail:
            from bulkhead.config import VmConfig, VsockConfig
            from bulkhead.sandbox.supervisor import run_jailed

            out: list[bytes] = []
            cfg = VmConfig(kernel=str(img), cmdline=f"vsock_port={HOST_PORT}", mem_mib=32, vsock=VsockConfig(path))
            reason = run_jailed(cfg, console=out.append)
            text, status = b"".join(out).decode(errors="replace"), f"{reason.kind} {reason.status}"
        else:
            argv = [sys.executable, "-m", "bulkhead", "run", "--no-jail", "-q", "--kernel", str(img), "--mem", "32",
                    "--cmdline", f"vsock_port={HOST_PORT}", "--vsock", path]
            p = subprocess.run(argv, capture_output=True, timeout=300, stdin=subprocess.DEVNULL, check=False)
            text, status = p.stdout.decode(errors="replace"), f"debug-exit {p.returncode}"
    finally:
        lst.close()
    assert status == "debug-exit 1", text
    cases = {ln.split()[1]: ln for ln in text.splitlines() if ln.startswith("RT ")}
    for name in ("type_seqpacket", "src_cid_spoof", "dst_cid_other_guest", "len_past_chain", "len_u32_max",
                 "len_on_request", "op_unknown", "credit_request_no_stream"):
        assert "reply_op=3 " in cases[name] and "status=0xf" in cases[name], cases[name]  # RST, device OK
    for name in ("short_chain", "tx_writable"):
        assert "xfer=1 reply_op=0 " in cases[name], cases[name]  # dropped, chain given back, no answer
    assert "reset=1" in cases["credit_abuse"] and "connect_op=2" in cases["credit_abuse"], cases["credit_abuse"]
    flood = dict(kv.split("=") for kv in cases["conn_flood"].split()[2:])
    assert int(flood["responses"]) <= 64 and int(flood["rsts"]) >= 16, cases["conn_flood"]
    assert "PASS" in text.splitlines()
