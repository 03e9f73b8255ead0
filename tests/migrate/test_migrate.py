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
