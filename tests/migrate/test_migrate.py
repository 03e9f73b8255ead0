"""Live migration (issue 20, docs/MIGRATION.md): a guest migrated mid-run between two processes over mutually
authenticated TLS on loopback goes on without a gap or a repeat; a failed migration leaves it running on
the source; an unattested host and a client without a certificate are refused."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.vmrun import payload

from bulkhead.daemon import pki

pytestmark = [pytest.mark.kvm]
ROOT = Path(__file__).resolve().parents[2]
CMDLINE = "count=24 delay=200000000"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    ca = pki.make_ca()
    (d / "ca.crt").write_bytes(pki.cert_pem(ca.cert))
    key, issued = pki.issue_server(ca, ["localhost", "127.0.0.1"])
    (d / "server.key").write_bytes(pki.key_pem(key))
    (d / "server.crt").write_bytes(pki.cert_pem(issued.cert))
    ckey = pki.new_key()
    cissued = pki.issue_client(ca, "host-a", ckey.public_key())
    (d / "client.key").write_bytes(pki.key_pem(ckey))
    (d / "client.crt").write_bytes(pki.cert_pem(cissued.cert))
    return d


def _dir(certs: Path, tmp: Path) -> Path:
    for f in certs.iterdir():
        (tmp / f.name).write_bytes(f.read_bytes())
    return tmp


def _peer(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "tests.migrate.peer", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


def _wait_port(d: Path, p: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while not (d / "port").exists():
        assert p.poll() is None, p.communicate()[1].decode()
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.fixture(scope="module")
def kernel() -> Path:
    return payload("counter")


@pytest.fixture(scope="module")
def reference(kernel: Path) -> str:
    r = subprocess.run([sys.executable, "-m", "bulkhead", "run", "--no-jail", "--kernel", str(kernel),
                        "--cmdline", CMDLINE], capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 1, r.stderr
    return r.stdout.decode()


def _migrate(d: Path, kernel: Path, *, dest_attest: str = "good", src_attest: str = "good",
             after: int | None = None, jail: bool = False, cpus: int = 1, cmdline: str = CMDLINE,
             ) -> tuple[subprocess.CompletedProcess[bytes], subprocess.CompletedProcess[bytes]]:
    dst = _peer("dest", str(d), dest_attest, *(["jail"] if jail else []))
    _wait_port(d, dst)
    src = _peer("src", str(d), src_attest, str(kernel), cmdline, str(after or random.randint(2, 12)), str(cpus))
    so, se = src.communicate(timeout=180)
    do, de = dst.communicate(timeout=180)
    return (subprocess.CompletedProcess(src.args, src.returncode, so, se),
            subprocess.CompletedProcess(dst.args, dst.returncode, do, de))


def test_a_counting_guest_migrated_mid_run_goes_on_without_a_gap_or_a_repeat(
        certs: Path, kernel: Path, reference: str, tmp_path: Path) -> None:
    s, d = _migrate(_dir(certs, tmp_path), kernel)
    res = json.loads((tmp_path / "src.json").read_text())
    assert res["reason"] == "migrated", (res, s.stderr.decode(), d.stderr.decode())
    assert json.loads((tmp_path / "dest.json").read_text())["status"] == 1, d.stderr.decode()
    assert (s.stdout + d.stdout).decode() == reference
    assert res["downtime_ms"] <= res["total_ms"]
    print(res)


def test_a_two_vcpu_guest_with_the_lapic_timer_ticking_migrates(certs: Path, tmp_path: Path) -> None:
    kernel = payload("ticker")
    ref = subprocess.run([sys.executable, "-m", "bulkhead", "run", "--no-jail", "--kernel", str(kernel), "--cpus", "2",
                          "--cmdline", "count=40"], capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    assert ref.returncode == 1, ref.stderr
    s, d = _migrate(_dir(certs, tmp_path), kernel, cpus=2, cmdline="count=40", after=random.randint(2, 25))
    res = json.loads((tmp_path / "src.json").read_text())
    assert res["reason"] == "migrated", (res, s.stderr.decode(), d.stderr.decode())
    assert (s.stdout + d.stdout) == ref.stdout


def test_a_destination_killed_mid_transfer_leaves_the_guest_running_on_the_source(
        certs: Path, kernel: Path, reference: str, tmp_path: Path) -> None:
    s, d = _migrate(_dir(certs, tmp_path), kernel, dest_attest="die")
    assert d.returncode == -signal.SIGKILL
    res = json.loads((tmp_path / "src.json").read_text())
    assert res["resumed"] is True and "runs on here" in res["error"], res
    assert res["reason"] == "debug-exit" and res["status"] == 1, res  # it ran to its own end, here
    assert s.stdout.decode() == reference


@pytest.mark.parametrize("bad", ["dest", "src"])
def test_a_host_that_fails_attestation_is_refused(
        certs: Path, kernel: Path, reference: str, tmp_path: Path, bad: str) -> None:
    """A destination that fails is refused before a byte of guest memory is sent; a source that fails is
    refused by the destination. Either way the guest finishes on the source and nothing runs elsewhere."""
    s, d = _migrate(_dir(certs, tmp_path), kernel, dest_attest="bad" if bad == "dest" else "good",
                    src_attest="bad" if bad == "src" else "good")
    res = json.loads((tmp_path / "src.json").read_text())
    who = "destination" if bad == "dest" else "source"
    assert f"the {who} host failed attestation" in res["error"], res
    assert res["resumed"] is True and res["status"] == 1
    assert s.stdout.decode() == reference and d.stdout == b""
    assert "failed attestation" in json.loads((tmp_path / "dest.json").read_text())["error"]
    if bad == "dest":
        assert res.get("pages") is None  # send_vm never got to memory


def test_a_client_without_a_valid_certificate_is_refused(certs: Path, tmp_path: Path) -> None:
    """No certificate, and a certificate of another CA: the TLS handshake fails, no migration starts."""
    d = _dir(certs, tmp_path)
    dst = _peer("dest", str(d), "good")
    try:
        _wait_port(d, dst)
        port = int((d / "port").read_text())
        other = pki.make_ca(cn="another CA")
        okey = pki.new_key()
        (d / "o.key").write_bytes(pki.key_pem(okey))
        (d / "o.crt").write_bytes(pki.cert_pem(pki.issue_client(other, "host-x", okey.public_key()).cert))
        for cert in (None, "o"):
            ctx = ssl.create_default_context(cafile=str(d / "ca.crt"))
            if cert:
                ctx.load_cert_chain(str(d / f"{cert}.crt"), str(d / f"{cert}.key"))
            with socket.create_connection(("127.0.0.1", port)) as raw, pytest.raises((ssl.SSLError, OSError)), \
                    ctx.wrap_socket(raw, server_hostname="localhost") as c:
                c.sendall(bytes(16))
                assert c.recv(1) == b""  # TLS 1.3: the refusal arrives after the client's handshake
                raise OSError("closed")
            deadline = time.monotonic() + 10
            while not (d / "tls-refused.txt").exists():
                assert time.monotonic() < deadline
                time.sleep(0.05)
            os.unlink(d / "tls-refused.txt")
    finally:
        dst.kill()
        dst.wait()


def test_the_destination_restores_in_a_fresh_jailed_worker(
        certs: Path, kernel: Path, reference: str, tmp_path: Path) -> None:
    """The destination path of a start: run_jailed with the received memfds (jail, seccomp, integrity)."""
    if os.geteuid() != 0:
        pytest.skip("the jailed path needs root")
    s, d = _migrate(_dir(certs, tmp_path), kernel, jail=True)
    res = json.loads((tmp_path / "src.json").read_text())
    assert res["reason"] == "migrated", (res, s.stderr.decode(), d.stderr.decode())
    assert json.loads((tmp_path / "dest.json").read_text())["status"] == 1, d.stderr.decode()
    assert (s.stdout + d.stdout).decode() == reference
