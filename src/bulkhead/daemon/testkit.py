"""Test helpers shipped with the daemon (used by tests/test_api_*, test_daemon_*, bench/bench_api.py).

- `Harness`: an initialized state directory + an in-process Daemon (FakeBackend by default) + helpers to
  register principals with real client certificates and call the ASGI app as them.
- `ServerThread`: the real uvicorn servers (mTLS + Unix socket) on 127.0.0.1 with an ephemeral port.
- `spawn_daemon`: `python -m bulkhead serve` as a child process, waiting for its serve.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bulkhead.daemon import pki
from bulkhead.daemon.app import build_app, inject_peer
from bulkhead.daemon.backend import FakeBackend, VmBackend
from bulkhead.daemon.daemon import Daemon, StateDir
from bulkhead.daemon.setup import init_state_dir, issue_local
from bulkhead.daemon.store import new_id


def fake_kernel(tag: bytes = b"") -> bytes:
    """A kernel image the loader accepts (a 64-bit ELF: `hlt` at 1 MiB), its bytes varied by `tag` so tests
    that swap kernels get different launch digests. The daemon validates images at `vm create` and `vm start`
    (docs/API.md), so API tests need loadable images even with the fake backend."""
    from bulkhead.boot.craft import make_elf

    return make_elf([(0x100000, b"\xf4" + tag, 0x1000)], 0x100000)

__all__ = ["Harness", "Identity", "ServerThread", "spawn_daemon", "wait_serve_info"]


@dataclass
class Identity:
    name: str
    principal_id: str
    cert_path: Path
    key_path: Path
    der: bytes


class Harness:
    def __init__(self, root: Path, backend: VmBackend | None = None, engine: str = "casbin",
                 checkpoint_every: int = 1000, integrity: Any = None, net: Any = None) -> None:
        """`integrity`: the daemon's HostIntegrity; default IntegrityOff("test harness") (accepted only
        in a pytest process or with the FakeBackend, see bulkhead.daemon.integrity).
        `net`: the daemon's NetworkService; default DryNetworkService() (validation, no host changes)."""
        self.root = root
        self.sd = init_state_dir(root) if not (root / "state.db").exists() else StateDir(root)
        self.backend = backend or FakeBackend()
        if integrity is None:
            from bulkhead.daemon.integrity import IntegrityOff

            integrity = IntegrityOff("test harness")
        if net is None:
            from bulkhead.daemon.networks import DryNetworkService

            net = DryNetworkService()
        self.daemon = Daemon.open(root, self.backend, engine, checkpoint_every, integrity=integrity, net=net)
        self.daemon.start()
        self.app = build_app(self.daemon)
        (root / "images" / "vmlinux").write_bytes(fake_kernel(b"fake kernel for API tests"))
        self.admin = self.identity_from_files("admin", self.sd.admin_cert, self.sd.admin_key)

    def close(self) -> None:
        self.daemon.close()

    def identity_from_files(self, name: str, cert: Path, key: Path) -> Identity:
        from cryptography.hazmat.primitives import serialization

        c = pki.load_cert(cert)
        row = self.daemon.store.q1("SELECT principal_id FROM certs WHERE fingerprint = ?", (pki.fingerprint(c),))
        return Identity(name, row["principal_id"] if row else "", cert, key, c.public_bytes(serialization.Encoding.DER))

    def principal(self, name: str, *grants: tuple[str, str], days: int = 365, register: bool = True) -> Identity:
        """A principal with a real client certificate, registered in the store, with role grants
        [(role name, scope)] written straight into the store (bypassing the API on purpose)."""
        key_pem, cert_pem, issued = issue_local(self.sd, name, days)
        d = self.root / "ids"
        d.mkdir(exist_ok=True)
        (d / f"{name}.key").write_bytes(key_pem)
        (d / f"{name}.pem").write_bytes(cert_pem)
        pid = ""
        store = self.daemon.store
        if register:
            row = store.q1("SELECT id FROM principals WHERE name = ?", (name,))
            pid = row["id"] if row else store.add_principal(name)
            store.add_cert(pid, issued.fingerprint, issued.serial, issued.not_after)
            for role, scope in grants:
                rrow = store.q1("SELECT id FROM roles WHERE name = ?", (role,))
                assert rrow is not None, f"no role {role!r}"
                rid = rrow["id"]
                with store.txn() as c:
                    c.execute("INSERT INTO assignments VALUES (?,?,?,?)", (new_id(), pid, rid, scope))
            self.daemon.rbac_changed()
        from cryptography.hazmat.primitives import serialization

        der = issued.cert.public_bytes(serialization.Encoding.DER)
        return Identity(name, pid, d / f"{name}.pem", d / f"{name}.key", der)

    @contextmanager
    def client(self, who: Identity | None = None) -> Iterator[Any]:
        """An in-process client calling the ASGI app as `who` (None: the local root socket peer)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from starlette.testclient import TestClient

            peer = {"kind": "local", "uid": 0} if who is None else {"kind": "tls", "der": who.der}
            with TestClient(inject_peer(self.app, peer), base_url="https://bulkheadd") as c:
                yield c

    def tenant(self, name: str) -> str:
        with self.client() as c:
            r = c.post("/v1/tenants", json={"name": name})
            assert r.status_code == 201, r.text
            return str(r.json()["id"])

    def vm(self, tenant: str, name: str, **kw: Any) -> str:
        with self.client() as c:
            r = c.post("/v1/vms", json={"tenant": tenant, "name": name, "kernel": "vmlinux", **kw})
            assert r.status_code == 201, r.text
            return str(r.json()["id"])


class ServerThread:
    """The real servers in a background thread (same process)."""

    def __init__(self, harness: Harness, unix: bool = True, ui: bool = False) -> None:
        from bulkhead.daemon.server import Serving

        self.serving = Serving(harness.daemon, harness.root, "127.0.0.1", 0, unix=unix, ui_port=0 if ui else None)
        self.port = self.serving.port
        self.url = f"https://127.0.0.1:{self.port}"
        self.ui_url = f"https://127.0.0.1:{self.serving.ui_port}" if ui else ""  # the web console listener
        self._thread = threading.Thread(target=self.serving.run, kwargs={"install_signals": False}, daemon=True)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        if not self.serving.started.wait(15):
            raise RuntimeError("server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.serving.stop()
        self._thread.join(15)


def wait_serve_info(root: Path, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> dict[str, Any]:
    info_path = root / "serve.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}: {proc.stdout.read().decode(errors='replace') if proc.stdout else ''}")
        try:
            info: dict[str, Any] = json.loads(info_path.read_text())
            if info.get("pid") == proc.pid:
                return info
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise RuntimeError("daemon did not write serve.json in time")


def spawn_daemon(root: Path, backend: str = "fake", extra_env: dict[str, str] | None = None,
                 extra_args: list[str] | None = None, stdout: Any = subprocess.PIPE,
                 ) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """`bulkhead serve` as a child. Unless `extra_args` say otherwise, a fake-backend daemon runs with
    the explicit test settings: the code check skipped (BULKHEAD_DEV_SKIP_INTEGRITY=1) and
    `--integrity off` (no guest can run with the fake backend). `stdout`: where its log goes (a file
    for a daemon that serves many requests: nobody drains the pipe)."""
    env = {**os.environ, **(extra_env or {})}
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    args = list(extra_args) if extra_args is not None else []
    if extra_args is None and backend == "fake":
        env.setdefault("BULKHEAD_DEV_SKIP_INTEGRITY", "1")
        args = ["--integrity", "off"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "bulkhead", "serve", "--state-dir", str(root), "--port", "0", "--backend", backend,
         *args],
        stdout=stdout, stderr=subprocess.STDOUT, env=env,
    )
    return proc, wait_serve_info(root, proc)
