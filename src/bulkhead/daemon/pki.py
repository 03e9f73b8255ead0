"""The bulkhead certificate authority (cryptography): CA, server and client certificates, CSRs.

Keys are ECDSA P-256 (TLS 1.3 everywhere speaks it). The CA signs client certificates whose subject CN is
the principal's name; the daemon identifies a principal by CN + SHA-256 fingerprint of the DER
certificate, and checks revocation in its state database on every request. Raises ConfigError for bad
CSRs and names, HostError when key files cannot be written.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bulkhead.errors import ConfigError, HostError

__all__ = [
    "CertBundle",
    "Issued",
    "cert_pem",
    "csr_public_key",
    "fingerprint",
    "issue_client",
    "issue_server",
    "key_pem",
    "load_cert",
    "load_key",
    "make_ca",
    "make_csr",
    "new_key",
    "write_private",
]


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    fingerprint: str
    serial: str
    not_after: str


@dataclass(frozen=True)
class CertBundle:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert: x509.Certificate | bytes) -> str:
    """SHA-256 of the DER certificate, hex."""
    der = cert if isinstance(cert, bytes) else cert.public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "bulkhead"), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(days: int = 3650, cn: str = "bulkhead CA") -> CertBundle:
    key = new_key()
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertBundle(key, cert)


def _leaf(
    ca: CertBundle,
    cn: str,
    public_key: ec.EllipticCurvePublicKey,
    usage: x509.ObjectIdentifier,
    not_before: dt.datetime,
    not_after: dt.datetime,
    sans: list[x509.GeneralName] | None = None,
) -> Issued:
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = b.sign(ca.key, hashes.SHA256())
    return Issued(cert, fingerprint(cert), format(cert.serial_number, "x"), not_after.isoformat())


def issue_server(ca: CertBundle, hosts: list[str], days: int = 825) -> tuple[ec.EllipticCurvePrivateKey, Issued]:
    key = new_key()
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    now = _now()
    issued = _leaf(
        ca, "bulkheadd", key.public_key(), ExtendedKeyUsageOID.SERVER_AUTH,
        now - dt.timedelta(minutes=5), now + dt.timedelta(days=days), sans,
    )
    return key, issued


def issue_client(
    ca: CertBundle,
    name: str,
    public_key: ec.EllipticCurvePublicKey,
    days: int = 365,
    not_before: dt.datetime | None = None,
) -> Issued:
    """Sign a client certificate for principal `name`. `not_before` lets tests mint expired certificates."""
    start = not_before or (_now() - dt.timedelta(minutes=5))
    return _leaf(
        ca, name, public_key, ExtendedKeyUsageOID.CLIENT_AUTH, start, start + dt.timedelta(days=days)
    )


def make_csr(key: ec.EllipticCurvePrivateKey, name: str) -> bytes:
    csr = x509.CertificateSigningRequestBuilder().subject_name(_name(name)).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def csr_public_key(pem: str) -> ec.EllipticCurvePublicKey:
    """The public key of a PEM CSR after checking its signature. Raises ConfigError."""
    try:
        csr = x509.load_pem_x509_csr(pem.encode())
    except ValueError:
        raise ConfigError("csr_pem is not a PEM certificate signing request") from None
    if not csr.is_signature_valid:
        raise ConfigError("the CSR signature does not verify")
    pub = csr.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.curve.name != "secp256r1":
        raise ConfigError("the CSR key must be ECDSA P-256")
    return pub


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Raises HostError when the file is missing or is not an EC private key."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise HostError(f"cannot load private key {path}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise HostError(f"{path} is not an EC private key")
    return key


def load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise HostError(f"cannot load certificate {path}: {exc}") from None


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write a file atomically with `mode` (keys: 0600). Raises HostError."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        raise HostError(f"cannot write {path}: {exc}") from None
