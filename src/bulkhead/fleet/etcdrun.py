"""Run a local etcd cluster (Debian's etcd-server 3.4): tests, benchmarks and the README's one-machine fleet.

Each member has its own data directory and listens for clients on HTTPS with client-certificate
authentication (certificates from bulkhead's own PKI, bulkhead.daemon.pki); members talk to each other
over plain HTTP on the listen host (loopback or a test bridge). `EtcdCluster(root, 3).start()` waits until
the cluster has a leader; `stop_member(i)` / `start_member(i)` take one member down and back.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bulkhead.errors import HostError

__all__ = ["ClientTls", "EtcdCluster", "free_port", "make_client_tls"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class ClientTls:
    """Paths of a client's TLS material for etcd: the CA that signed etcd's certificate, its own pair."""

    ca: str
    cert: str
    key: str


def _write(path: Path, data: bytes, mode: int = 0o600) -> None:
    path.write_bytes(data)
    os.chmod(path, mode)


def make_client_tls(root: Path, name: str) -> ClientTls:
    """Issue a client certificate `name` from the cluster CA under root/pki (created by EtcdCluster).

    The holder is named in a SAN (`name.etcd-client.bulkhead`), not in the subject's Common Name: with
    authentication enabled etcd's JSON gateway refuses every certificate that has a CN (docs/FLEET.md
    "etcd access control"); identity towards etcd's RBAC is then the etcd user's password token."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from bulkhead.daemon import pki

    d = root / "pki"
    ca = pki.CertBundle(pki.load_key(d / "ca.key"), pki.load_cert(d / "ca.pem"))
    key = pki.new_key()
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "bulkhead fleet")]))
            .issuer_name(ca.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(f"{name}.etcd-client.bulkhead")]),
                           critical=False)
            .sign(ca.key, hashes.SHA256()))
    _write(d / f"{name}.key", pki.key_pem(key))
    _write(d / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return ClientTls(str(d / "ca.pem"), str(d / f"{name}.pem"), str(d / f"{name}.key"))


def _member_cert(ca: Any, ips: list[str]) -> tuple[Any, Any]:
    """An etcd member's certificate: serverAuth for its clients and clientAuth too, because etcd 3.4's
    gRPC gateway dials its own client port with this certificate (without clientAuth every gateway
    request fails with "connection reset" under --client-cert-auth)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from bulkhead.daemon import pki

    key = pki.new_key()
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bulkhead etcd member")]))
            .issuer_name(ca.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(h)) for h in ips] + [x509.DNSName("localhost")]),
                critical=False)
            .sign(ca.key, hashes.SHA256()))
    return key, cert


class EtcdCluster:
    def __init__(self, root: Path, members: int = 3, host: str = "127.0.0.1", etcd: str = "etcd") -> None:
        self.root = root
        self.host = host
        self.n = members
        self.etcd = shutil.which(etcd) or shutil.which("etcd", path="/usr/bin:/usr/sbin")
        if self.etcd is None:
            raise HostError("etcd is not installed (Debian: apt-get install etcd-server; ./install.sh does it)")
        self.client_ports = [free_port(host) for _ in range(members)]
        self.peer_ports = [free_port(host) for _ in range(members)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * members
        self.token = f"bulkhead-{os.getpid()}-{int(time.time() * 1000)}"

    @property
    def endpoints(self) -> list[str]:
        return [f"https://{self.host}:{p}" for p in self.client_ports]

    def _pki(self) -> None:
        from cryptography.hazmat.primitives import serialization

        from bulkhead.daemon import pki

        d = self.root / "pki"
        d.mkdir(parents=True, exist_ok=True)
        ca = pki.make_ca(cn="bulkhead etcd CA")
        _write(d / "ca.key", pki.key_pem(ca.key))
        _write(d / "ca.pem", ca.cert.public_bytes(serialization.Encoding.PEM), 0o644)
        key, cert = _member_cert(ca, sorted({self.host, "127.0.0.1"}))
        _write(d / "server.key", pki.key_pem(key))
        _write(d / "server.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)

    def client_tls(self, name: str) -> ClientTls:
        return make_client_tls(self.root, name)

    def _argv(self, i: int, state: str) -> list[str]:
        d = self.root / "pki"
        cluster = ",".join(f"m{j}=http://{self.host}:{self.peer_ports[j]}" for j in range(self.n))
        cu = f"https://{self.host}:{self.client_ports[i]}"
        pu = f"http://{self.host}:{self.peer_ports[i]}"
        assert self.etcd is not None
        return [self.etcd, "--name", f"m{i}", "--data-dir", str(self.root / f"m{i}"),
                "--listen-client-urls", cu, "--advertise-client-urls", cu,
                "--listen-peer-urls", pu, "--initial-advertise-peer-urls", pu,
                "--initial-cluster", cluster, "--initial-cluster-state", state,
                "--initial-cluster-token", self.token,
                "--cert-file", str(d / "server.pem"), "--key-file", str(d / "server.key"),
                "--trusted-ca-file", str(d / "ca.pem"), "--client-cert-auth",
                "--heartbeat-interval", "100", "--election-timeout", "1000", "--log-level", "error"]

    def start_member(self, i: int) -> None:
        if self.procs[i] is not None and self.procs[i].poll() is None:  # type: ignore[union-attr]
            return
        log = open(self.root / f"m{i}.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            self.procs[i] = subprocess.Popen(self._argv(i, "new"), stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                             start_new_session=True)
        finally:
            log.close()

    def stop_member(self, i: int, sig: int = signal.SIGKILL) -> None:
        p = self.procs[i]
        if p is not None and p.poll() is None:
            p.send_signal(sig)
            p.wait(10)
        self.procs[i] = None

    def start(self, timeout: float = 30.0) -> EtcdCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        self._pki()
        for i in range(self.n):
            self.start_member(i)
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 30.0) -> None:
        from bulkhead.fleet.store import EtcdStore

        tls = self.client_tls("probe")
        store = EtcdStore(self.endpoints, tls, timeout=2.0)
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for i, p in enumerate(self.procs):
                if p is not None and p.poll() is not None:
                    tail = (self.root / f"m{i}.log").read_text(errors="replace")[-800:]
                    raise HostError(f"etcd member m{i} exited with status {p.returncode}: {tail}")
            try:
                store.put("/bulkhead-probe", "1")
                return
            except HostError as exc:
                last = str(exc)
            time.sleep(0.2)
        raise HostError(f"the etcd cluster did not become healthy in {timeout:.0f} s: {last}")

    def stop(self) -> None:
        for i in range(self.n):
            self.stop_member(i)

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
