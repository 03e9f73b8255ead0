"""Pure parsers for the few TPM 2.0 wire structures a verifier needs (TPM 2.0 Part 2, big-endian).

TPMT_PUBLIC (RSA and ECC keys), TPMT_SIGNATURE (RSASSA, ECDSA), TPMS_ATTEST of a quote, and object
names. The verifier does not need tpm2-pytss or libtss2: every byte is hostile input, every length is
checked against the remaining buffer, trailing bytes are refused. Raises IntegrityError on anything
malformed or unsupported.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any

from bulkhead.integrity.errors import IntegrityError

__all__ = [
    "ALG_ECC",
    "ALG_ECDSA",
    "ALG_RSA",
    "ALG_RSASSA",
    "ALG_SHA256",
    "ATTR_FIXED_PARENT",
    "ATTR_FIXED_TPM",
    "ATTR_RESTRICTED",
    "ATTR_SENSITIVE_DATA_ORIGIN",
    "ATTR_SIGN",
    "PcrSelection",
    "PublicArea",
    "QuoteInfo",
    "Signature",
    "parse_public",
    "parse_quote_attest",
    "parse_signature",
    "pcr_composite_digest",
    "public_name",
    "verify_signature",
]

ALG_RSA = 0x0001
ALG_SHA256 = 0x000B
ALG_NULL = 0x0010
ALG_RSASSA = 0x0014
ALG_ECDSA = 0x0018
ALG_ECDAA = 0x001A
ALG_ECC = 0x0023
ECC_NIST_P256 = 0x0003
TPM_GENERATED = 0xFF544347
ST_ATTEST_QUOTE = 0x8018

ATTR_FIXED_TPM = 1 << 1
ATTR_FIXED_PARENT = 1 << 4
ATTR_SENSITIVE_DATA_ORIGIN = 1 << 5
ATTR_RESTRICTED = 1 << 16
ATTR_DECRYPT = 1 << 17
ATTR_SIGN = 1 << 18


class _Reader:
    def __init__(self, data: bytes, what: str) -> None:
        self.data = bytes(data)
        self.pos = 0
        self.what = what

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise IntegrityError(f"{self.what}: truncated (needs {n} bytes at offset {self.pos})")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return int(self.take(1)[0])

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def tpm2b(self, limit: int = 4096) -> bytes:
        n = self.u16()
        if n > limit:
            raise IntegrityError(f"{self.what}: field of {n} bytes exceeds the limit of {limit}")
        return self.take(n)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise IntegrityError(f"{self.what}: {len(self.data) - self.pos} trailing bytes")


@dataclass(frozen=True)
class PublicArea:
    """A parsed TPMT_PUBLIC. `raw` is the exact marshalled bytes the name is computed over."""

    type: int
    name_alg: int
    attributes: int
    auth_policy: bytes
    scheme: int
    scheme_hash: int
    curve: int
    rsa_bits: int
    rsa_exponent: int
    unique: tuple[bytes, ...]
    raw: bytes

    def public_key(self) -> Any:
        """The key as a `cryptography` public key object. Raises IntegrityError if unsupported."""
        from cryptography.hazmat.primitives.asymmetric import ec, rsa

        try:
            if self.type == ALG_ECC:
                if self.curve != ECC_NIST_P256:
                    raise IntegrityError(f"unsupported ECC curve 0x{self.curve:04x} (only NIST P-256)")
                x, y = self.unique
                return ec.EllipticCurvePublicNumbers(
                    int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()
                ).public_key()
            exponent = self.rsa_exponent or 65537
            return rsa.RSAPublicNumbers(exponent, int.from_bytes(self.unique[0], "big")).public_key()
        except ValueError as exc:
            raise IntegrityError(f"the public key is not a valid key: {exc}") from None


def _parse_sym(r: _Reader) -> None:
    alg = r.u16()
    if alg != ALG_NULL:
        r.u16()  # keyBits
        r.u16()  # mode


def _parse_scheme(r: _Reader) -> tuple[int, int]:
    alg = r.u16()
    if alg == ALG_NULL:
        return alg, 0
    h = r.u16()
    if alg == ALG_ECDAA:
        r.u16()  # count
    return alg, h


def parse_public(data: bytes) -> PublicArea:
    """Parse a marshalled TPMT_PUBLIC (RSA or ECC). Raises IntegrityError when malformed/unsupported."""
    r = _Reader(data, "TPMT_PUBLIC")
    typ, name_alg, attrs = r.u16(), r.u16(), r.u32()
    policy = r.tpm2b(64)
    curve = bits = exponent = 0
    if typ == ALG_ECC:
        _parse_sym(r)
        scheme, scheme_hash = _parse_scheme(r)
        curve = r.u16()
        _parse_scheme(r)  # kdf
        unique: tuple[bytes, ...] = (r.tpm2b(128), r.tpm2b(128))
    elif typ == ALG_RSA:
        _parse_sym(r)
        scheme, scheme_hash = _parse_scheme(r)
        bits, exponent = r.u16(), r.u32()
        unique = (r.tpm2b(512),)
    else:
        raise IntegrityError(f"TPMT_PUBLIC: unsupported key type 0x{typ:04x}")
    r.end()
    return PublicArea(typ, name_alg, attrs, policy, scheme, scheme_hash, curve, bits, exponent, unique,
                      bytes(data))


def public_name(public_raw: bytes) -> bytes:
    """TPM object name: nameAlg (SHA-256) || SHA-256(TPMT_PUBLIC). Raises IntegrityError for other nameAlgs."""
    area = parse_public(public_raw)
    if area.name_alg != ALG_SHA256:
        raise IntegrityError("only SHA-256 object names are supported")
    return struct.pack(">H", ALG_SHA256) + hashlib.sha256(public_raw).digest()


@dataclass(frozen=True)
class Signature:
    alg: int
    hash_alg: int
    parts: tuple[bytes, ...]  # (r, s) for ECDSA, (sig,) for RSASSA


def parse_signature(data: bytes) -> Signature:
    """Parse a marshalled TPMT_SIGNATURE (ECDSA or RSASSA). Raises IntegrityError otherwise."""
    r = _Reader(data, "TPMT_SIGNATURE")
    alg, h = r.u16(), r.u16()
    if alg == ALG_ECDSA:
        parts: tuple[bytes, ...] = (r.tpm2b(128), r.tpm2b(128))
    elif alg == ALG_RSASSA:
        parts = (r.tpm2b(512),)
    else:
        raise IntegrityError(f"TPMT_SIGNATURE: unsupported signature algorithm 0x{alg:04x}")
    r.end()
    return Signature(alg, h, parts)


def verify_signature(public: PublicArea, signature: bytes, message: bytes) -> None:
    """Check `signature` (TPMT_SIGNATURE) over `message` with `public`. Raises IntegrityError if invalid."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    sig = parse_signature(signature)
    if sig.hash_alg != ALG_SHA256:
        raise IntegrityError("the quote signature does not use SHA-256")
    key = public.public_key()
    try:
        if sig.alg == ALG_ECDSA and isinstance(key, ec.EllipticCurvePublicKey):
            der = encode_dss_signature(int.from_bytes(sig.parts[0], "big"), int.from_bytes(sig.parts[1], "big"))
            key.verify(der, message, ec.ECDSA(hashes.SHA256()))
        elif sig.alg == ALG_RSASSA and isinstance(key, rsa.RSAPublicKey):
            key.verify(sig.parts[0], message, padding.PKCS1v15(), hashes.SHA256())
        else:
            raise IntegrityError("the signature algorithm does not match the key type")
    except InvalidSignature:
        raise IntegrityError("the quote signature is invalid") from None


@dataclass(frozen=True)
class PcrSelection:
    hash_alg: int
    pcrs: tuple[int, ...]


@dataclass(frozen=True)
class QuoteInfo:
    """A parsed TPMS_ATTEST of type TPM_ST_ATTEST_QUOTE."""

    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    selections: tuple[PcrSelection, ...]
    pcr_digest: bytes


def parse_quote_attest(data: bytes) -> QuoteInfo:
    """Parse TPMS_ATTEST bytes of a quote. Raises IntegrityError on bad magic/type/lengths/trailing bytes."""
    r = _Reader(data, "TPMS_ATTEST")
    if r.u32() != TPM_GENERATED:
        raise IntegrityError("TPMS_ATTEST: magic is not TPM_GENERATED_VALUE (not produced by a TPM)")
    if r.u16() != ST_ATTEST_QUOTE:
        raise IntegrityError("TPMS_ATTEST: not a quote")
    signer = r.tpm2b(68)
    extra = r.tpm2b(64)
    clock, resets, restarts, safe = r.u64(), r.u32(), r.u32(), r.u8()
    fw = r.u64()
    count = r.u32()
    if count > 16:
        raise IntegrityError(f"TPMS_ATTEST: {count} PCR selections is more than any TPM has banks")
    sels = []
    for _ in range(count):
        h = r.u16()
        size = r.u8()
        if size > 8:
            raise IntegrityError(f"TPMS_ATTEST: PCR select of {size} bytes is too large")
        bitmap = r.take(size)
        pcrs = tuple(i * 8 + b for i, byte in enumerate(bitmap) for b in range(8) if byte >> b & 1)
        sels.append(PcrSelection(h, pcrs))
    digest = r.tpm2b(64)
    r.end()
    return QuoteInfo(signer, extra, clock, resets, restarts, bool(safe), fw, tuple(sels), digest)


def pcr_composite_digest(values: list[bytes]) -> bytes:
    """SHA-256 over the concatenated PCR values, in selection (ascending index) order."""
    return hashlib.sha256(b"".join(values)).digest()
