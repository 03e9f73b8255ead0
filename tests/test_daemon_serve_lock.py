"""`bulkhead serve` holds its state directory, stops promptly, and reads `--tpm none` as documented
(issue 12, holes 6 and 7).

- A second daemon on the same state directory used to start, overwrite serve.json, delete the first one's
  socket when it exited and break its audit chain (UNIQUE constraint failed: records.seq). Now the first
  holds an flock on `<state>/serve.lock` for its life; the second is refused at once (HostError, exit 3,
  docs/ARCHITECTURE.md) naming the holder's pid, before it touches serve.json, the socket or the audit log.
- SIGTERM took ~30 s with one idle keep-alive TLS client connected (asyncio waits up to its 30 s SSL
  shutdown timeout for the peer's close_notify). Now idle connections are cut and the daemon exits in < 2 s.
- `--tpm none` means "no TPM configured" (serve --help, docs/INTEGRITY.md "Gate modes"): mode `none`,
  never an attempt to open a TPM at the path "none".
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from bulkhead.cli import main
from bulkhead.daemon.auditlog import query_records
from bulkhead.daemon.testkit import Harness, spawn_daemon

pytestmark = pytest.mark.timeout(120)


def _stop(proc: subprocess.Popen[bytes]) -> float:
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    return time.monotonic() - t0


def _uds(info: dict[str, Any]) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=info["socket"]), base_url="http://b/v1", timeout=30)


def test_a_second_daemon_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    Harness(state).close()
    first, info = spawn_daemon(state)
    try:
        serve_json = (state / "serve.json").read_bytes()
        sock_ino = (state / "bulkhead.sock").stat().st_ino
        audit_before = len(list(query_records(state / "audit.db", limit=None)))
        t0 = time.monotonic()
        second = subprocess.run(first.args, capture_output=True, text=True, timeout=60,
                                env={**os.environ, "BULKHEAD_DEV_SKIP_INTEGRITY": "1",
                                     "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")})
        took = time.monotonic() - t0
        assert second.returncode == 4, second  # HostError (bulkhead.exitstatus).stdout + second.stderr
        assert f"pid {first.pid}" in second.stderr and str(state) in second.stderr, second.stderr
        assert "Traceback" not in second.stderr
        assert took < 10, took  # refused at once (an interpreter start), no waiting on the lock
        # nothing of the first daemon's was touched
        assert (state / "serve.json").read_bytes() == serve_json
        assert (state / "bulkhead.sock").stat().st_ino == sock_ino
        assert len(list(query_records(state / "audit.db", limit=None))) == audit_before
        # the first still answers, and writes to its audit log
        with _uds(info) as c:
            assert c.post("/tenants", json={"name": "acme"}).status_code == 201
            assert c.get("/whoami").status_code == 200
        assert first.poll() is None
    finally:
        _stop(first)
    assert main(["audit", "verify", "--state-dir", str(state)]) == 0
    # the lock died with its holder: a new daemon starts on the same directory
    again, _ = spawn_daemon(state)
    _stop(again)


def test_sigterm_exits_within_two_seconds_with_an_idle_keep_alive_tls_client(tmp_path: Path) -> None:
    state = tmp_path / "state"
    Harness(state).close()
    proc, info = spawn_daemon(state)
    ctx = ssl.create_default_context(cafile=str(state / "ca.pem"))
    ctx.load_cert_chain(str(state / "admin.pem"), str(state / "admin.key"))
    try:
        raw = socket.create_connection(("127.0.0.1", info["port"]), timeout=10)
        tls = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        tls.sendall(b"GET /v1/whoami HTTP/1.1\r\nHost: bulkheadd\r\n\r\n")  # HTTP/1.1: keep-alive
        head = tls.recv(65536)
        assert head.startswith(b"HTTP/1.1 200"), head[:100]
        assert b"connection: close" not in head.lower()
        # the connection stays open and idle while the daemon is told to stop
        took = _stop(proc)
        assert took < 2.0, f"SIGTERM took {took:.1f} s with an idle keep-alive client"
        assert proc.returncode == 0
        tls.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stops = [r for r in query_records(state / "audit.db", limit=None) if r["action"] == "daemon.stop"]
    assert json.loads(stops[-1]["detail"])["pid"] == proc.pid


def test_tpm_none_means_no_tpm_configured(tmp_path: Path) -> None:
    state = tmp_path / "state"
    Harness(state).close()
    proc, info = spawn_daemon(state, extra_env={"BULKHEAD_DEV_SKIP_INTEGRITY": "1",
                                                "BULKHEAD_TCTI": "swtpm:host=127.0.0.1,port=1"},
                              extra_args=["--tpm", "none"])
    try:
        with _uds(info) as c:
            st = c.get("/integrity").json()
    finally:
        _stop(proc)
    assert st["mode"] == "none" and st["state"] == "untrusted", st
    assert any(r.startswith("no TPM configured") for r in st["reasons"]), st["reasons"]
    assert not any("none" in r and "cannot open" in r for r in st["reasons"]), st["reasons"]
    started = [json.loads(r["detail"]) for r in query_records(state / "audit.db", limit=None)
               if r["action"] == "daemon.start"][-1]
    assert started["integrity"]["mode"] == "none"


def test_init_force_refuses_a_served_state_dir(tmp_path: Path) -> None:
    """`bulkhead init --force` takes serve.lock too: it cannot wipe a directory a daemon serves."""
    state = tmp_path / "state"
    Harness(state).close()
    first, info = spawn_daemon(state)
    try:
        before = (state / "state.db").stat().st_ino
        res = subprocess.run([*first.args[:first.args.index("serve")], "init", "--force", "--state-dir", str(state)],
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, "BULKHEAD_DEV_SKIP_INTEGRITY": "1",
                                  "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")})
        assert res.returncode == 4 and f"pid {first.pid}" in res.stderr, res
        assert "Traceback" not in res.stderr
        assert (state / "state.db").stat().st_ino == before
        with _uds(info) as c:
            assert c.get("/whoami").status_code == 200
    finally:
        _stop(first)
    assert main(["audit", "verify", "--state-dir", str(state)]) == 0
