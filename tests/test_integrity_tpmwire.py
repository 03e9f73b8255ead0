"""TPM 2.0 wire structures (TPM 2.0 Library Part 2: TPMT_PUBLIC 12.2.4, TPMT_SIGNATURE 11.3.4,
TPMS_ATTEST 10.12.12), marshalled by hand here and parsed by bulkhead.integrity.tpmwire: field values,
exact size limits, both key types, typed refusals. Written for the mutation floors (issue 15)."""

from __future__ import annotations

import hashlib
import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from bulkhead.integrity import IntegrityError
from bulkhead.integrity import tpmwire as w

MSG = b"quoted TPMS_ATTEST bytes"


def b2(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def rsa_public(key: rsa.RSAPublicKey, exponent: int = 0, name_alg: int = w.ALG_SHA256, policy: bytes = b"") -> bytes:
    n = key.public_numbers().n.to_bytes(key.key_size // 8, "big")
    return (struct.pack(">HHI", w.ALG_RSA, name_alg, w.ATTR_SIGN | w.ATTR_FIXED_TPM) + b2(policy)
            + struct.pack(">HHH", w.ALG_NULL, w.ALG_RSASSA, w.ALG_SHA256)
            + struct.pack(">HI", key.key_size, exponent) + b2(n))


def ecc_public(key: ec.EllipticCurvePublicKey, curve: int = w.ECC_NIST_P256, scheme: bytes | None = None,
               attrs: int = w.ATTR_SIGN | w.ATTR_RESTRICTED) -> bytes:
    nums = key.public_numbers()
    scheme = struct.pack(">HH", w.ALG_ECDSA, w.ALG_SHA256) if scheme is None else scheme
    return (struct.pack(">HHI", w.ALG_ECC, w.ALG_SHA256, attrs) + b2(b"")
            + struct.pack(">H", w.ALG_NULL) + scheme + struct.pack(">HH", curve, w.ALG_NULL)
            + b2(nums.x.to_bytes(32, "big")) + b2(nums.y.to_bytes(32, "big")))


def rsa_sig(priv: rsa.RSAPrivateKey, msg: bytes = MSG, hash_alg: int = w.ALG_SHA256) -> bytes:
    return struct.pack(">HH", w.ALG_RSASSA, hash_alg) + b2(priv.sign(msg, padding.PKCS1v15(), hashes.SHA256()))


def ecdsa_sig(priv: ec.EllipticCurvePrivateKey, msg: bytes = MSG) -> bytes:
    r, s = decode_dss_signature(priv.sign(msg, ec.ECDSA(hashes.SHA256())))
    return struct.pack(">HH", w.ALG_ECDSA, w.ALG_SHA256) + b2(r.to_bytes(32, "big")) + b2(s.to_bytes(32, "big"))


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ecc_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def test_rsa_public_area_fields_key_and_signature(rsa_key) -> None:
    raw = rsa_public(rsa_key.public_key(), policy=b"\x11" * 64)  # authPolicy at its 64-byte limit
    a = w.parse_public(raw)
    assert (a.type, a.name_alg, a.attributes, a.auth_policy, a.scheme, a.scheme_hash, a.curve, a.rsa_bits,
            a.rsa_exponent, a.raw) == (w.ALG_RSA, w.ALG_SHA256, w.ATTR_SIGN | w.ATTR_FIXED_TPM, b"\x11" * 64,
                                       w.ALG_RSASSA, w.ALG_SHA256, 0, 2048, 0, raw)
    assert a.public_key().public_numbers() == rsa_key.public_key().public_numbers()  # exponent 0 = 65537
    w.verify_signature(a, rsa_sig(rsa_key), MSG)
    with pytest.raises(IntegrityError, match=r"^the quote signature is invalid$"):
        w.verify_signature(a, rsa_sig(rsa_key), MSG + b"x")
    with pytest.raises(IntegrityError, match="does not use SHA-256"):
        w.verify_signature(a, rsa_sig(rsa_key, hash_alg=0x0004), MSG)


def test_rsa_explicit_exponent_is_used() -> None:
    k3 = rsa.generate_private_key(public_exponent=3, key_size=1024)
    a = w.parse_public(rsa_public(k3.public_key(), exponent=3))
    assert a.rsa_exponent == 3 and a.public_key().public_numbers().e == 3
    w.verify_signature(a, rsa_sig(k3), MSG)


def test_ecc_public_area_fields_key_and_signature(ecc_key, rsa_key) -> None:
    raw = ecc_public(ecc_key.public_key())
    a = w.parse_public(raw)
    assert (a.type, a.scheme, a.scheme_hash, a.curve, a.rsa_bits) == (w.ALG_ECC, w.ALG_ECDSA, w.ALG_SHA256,
                                                                     w.ECC_NIST_P256, 0)
    assert a.unique == (ecc_key.public_key().public_numbers().x.to_bytes(32, "big"),
                        ecc_key.public_key().public_numbers().y.to_bytes(32, "big"))
    assert a.public_key().public_numbers() == ecc_key.public_key().public_numbers()
    w.verify_signature(a, ecdsa_sig(ecc_key), MSG)
    with pytest.raises(IntegrityError, match=r"^the quote signature is invalid$"):
        w.verify_signature(a, ecdsa_sig(ecc_key, b"other"), MSG)
    with pytest.raises(IntegrityError, match="does not match the key type"):
        w.verify_signature(a, rsa_sig(rsa_key), MSG)
    rsa_area = w.parse_public(rsa_public(rsa_key.public_key()))
    with pytest.raises(IntegrityError, match="does not match the key type"):
        w.verify_signature(rsa_area, ecdsa_sig(ecc_key), MSG)


def test_ecdaa_scheme_carries_a_count_and_null_scheme_none(ecc_key) -> None:
    a = w.parse_public(ecc_public(ecc_key.public_key(), scheme=struct.pack(">HHH", w.ALG_ECDAA, w.ALG_SHA256, 7)))
    assert (a.scheme, a.scheme_hash) == (w.ALG_ECDAA, w.ALG_SHA256)
    n = w.parse_public(ecc_public(ecc_key.public_key(), scheme=struct.pack(">H", w.ALG_NULL)))
    assert (n.scheme, n.scheme_hash) == (w.ALG_NULL, 0)


def test_unsupported_curve_and_invalid_point_are_typed_errors(ecc_key) -> None:
    with pytest.raises(IntegrityError, match="unsupported ECC curve 0x0004"):
        w.parse_public(ecc_public(ecc_key.public_key(), curve=0x0004)).public_key()
    raw = bytearray(ecc_public(ecc_key.public_key()))
    raw[-1] ^= 1  # y no longer on the curve
    with pytest.raises(IntegrityError, match="not a valid key"):
        w.parse_public(bytes(raw)).public_key()


def test_public_size_limits_trailing_bytes_and_truncation(rsa_key) -> None:
    pub = rsa_key.public_key()
    with pytest.raises(IntegrityError, match=r"^TPMT_PUBLIC: field of 65 bytes exceeds the limit of 64$"):
        w.parse_public(rsa_public(pub, policy=b"\x00" * 65))
    with pytest.raises(IntegrityError, match=r"^TPMT_PUBLIC: 1 trailing bytes$"):
        w.parse_public(rsa_public(pub) + b"\x00")
    with pytest.raises(IntegrityError, match=r"^TPMT_PUBLIC: truncated"):
        w.parse_public(rsa_public(pub)[:-1])
    with pytest.raises(IntegrityError, match="unsupported key type 0x0008"):
        w.parse_public(struct.pack(">HHI", 0x0008, w.ALG_SHA256, 0) + b2(b""))


def test_public_name_known_answer_and_sha1_names_refused(rsa_key) -> None:
    raw = rsa_public(rsa_key.public_key())
    assert w.public_name(raw) == b"\x00\x0b" + hashlib.sha256(raw).digest()
    with pytest.raises(IntegrityError, match="only SHA-256 object names"):
        w.public_name(rsa_public(rsa_key.public_key(), name_alg=0x0004))


def test_signature_parsing() -> None:
    s = w.parse_signature(struct.pack(">HH", w.ALG_ECDSA, w.ALG_SHA256) + b2(b"r" * 32) + b2(b"s" * 32))
    assert (s.alg, s.hash_alg, s.parts) == (w.ALG_ECDSA, w.ALG_SHA256, (b"r" * 32, b"s" * 32))
    s = w.parse_signature(struct.pack(">HH", w.ALG_RSASSA, w.ALG_SHA256) + b2(b"x" * 512))
    assert s.parts == (b"x" * 512,)
    with pytest.raises(IntegrityError, match="exceeds the limit of 512"):
        w.parse_signature(struct.pack(">HH", w.ALG_RSASSA, w.ALG_SHA256) + b2(b"x" * 513))
    with pytest.raises(IntegrityError, match="unsupported signature algorithm 0x0016"):
        w.parse_signature(struct.pack(">HH", 0x0016, w.ALG_SHA256))
    with pytest.raises(IntegrityError, match=r"^TPMT_SIGNATURE: 2 trailing bytes$"):
        w.parse_signature(struct.pack(">HH", w.ALG_RSASSA, w.ALG_SHA256) + b2(b"x") + b"\x00\x00")


def attest(signer: bytes = b"\x00\x0b" + b"n" * 32, extra: bytes = b"nonce", sels: list[tuple[int, bytes]] | None = None,
           digest: bytes = b"d" * 32, magic: int = w.TPM_GENERATED, typ: int = w.ST_ATTEST_QUOTE,
           count: int | None = None) -> bytes:
    sels = [(w.ALG_SHA256, b"\x00\x40\x80")] if sels is None else sels
    body = b"".join(struct.pack(">HB", h, len(bm)) + bm for h, bm in sels)
    return (struct.pack(">IH", magic, typ) + b2(signer) + b2(extra)
            + struct.pack(">QIIB", 123456, 7, 8, 1) + struct.pack(">Q", 0x2023_0001)
            + struct.pack(">I", len(sels) if count is None else count) + body + b2(digest))


def test_quote_attest_fields() -> None:
    q = w.parse_quote_attest(attest())
    assert (q.qualified_signer, q.extra_data, q.clock, q.reset_count, q.restart_count, q.safe,
            q.firmware_version, q.pcr_digest) == (b"\x00\x0b" + b"n" * 32, b"nonce", 123456, 7, 8, True,
                                                  0x2023_0001, b"d" * 32)
    assert q.selections == (w.PcrSelection(w.ALG_SHA256, (14, 23)),)
    q = w.parse_quote_attest(attest(sels=[(w.ALG_SHA256, b"\x01" + b"\x00" * 6 + b"\x80"), (0x0004, b"")]))
    assert q.selections == (w.PcrSelection(w.ALG_SHA256, (0, 63)), w.PcrSelection(0x0004, ()))


def test_quote_attest_exact_limits() -> None:
    w.parse_quote_attest(attest(signer=b"s" * 68, extra=b"e" * 64, digest=b"d" * 64))
    for bad in (attest(signer=b"s" * 69), attest(extra=b"e" * 65), attest(digest=b"d" * 65)):
        with pytest.raises(IntegrityError, match="exceeds the limit"):
            w.parse_quote_attest(bad)
    assert len(w.parse_quote_attest(attest(sels=[(w.ALG_SHA256, b"")] * 16)).selections) == 16
    with pytest.raises(IntegrityError, match="17 PCR selections"):
        w.parse_quote_attest(attest(sels=[(w.ALG_SHA256, b"")] * 17))
    with pytest.raises(IntegrityError, match="PCR select of 9 bytes"):
        w.parse_quote_attest(attest(sels=[(w.ALG_SHA256, b"\x00" * 9)]))
    with pytest.raises(IntegrityError, match="not a quote"):
        w.parse_quote_attest(attest(typ=0x8017))
    with pytest.raises(IntegrityError, match="magic"):
        w.parse_quote_attest(attest(magic=0xFF544348))


def test_pcr_composite_digest_known_answer() -> None:
    assert w.pcr_composite_digest([b"\x00" * 32, b"\x01" * 32]) == hashlib.sha256(b"\x00" * 32 + b"\x01" * 32).digest()


def test_key_and_signature_field_limits_are_exact(ecc_key, rsa_key) -> None:
    def ecc_raw(x: bytes, y: bytes) -> bytes:
        return (struct.pack(">HHI", w.ALG_ECC, w.ALG_SHA256, 0) + b2(b"") + struct.pack(">HHHHH", w.ALG_NULL,
                w.ALG_ECDSA, w.ALG_SHA256, w.ECC_NIST_P256, w.ALG_NULL) + b2(x) + b2(y))
    assert w.parse_public(ecc_raw(b"x" * 128, b"y" * 128)).unique == (b"x" * 128, b"y" * 128)
    for x, y in ((b"x" * 129, b"y"), (b"x", b"y" * 129)):
        with pytest.raises(IntegrityError, match="exceeds the limit of 128"):
            w.parse_public(ecc_raw(x, y))

    def rsa_raw(n: bytes) -> bytes:
        return (struct.pack(">HHI", w.ALG_RSA, w.ALG_SHA256, 0) + b2(b"")
                + struct.pack(">HHHHI", w.ALG_NULL, w.ALG_RSASSA, w.ALG_SHA256, 4096, 0) + b2(n))
    assert w.parse_public(rsa_raw(b"n" * 512)).unique == (b"n" * 512,)
    with pytest.raises(IntegrityError, match="exceeds the limit of 512"):
        w.parse_public(rsa_raw(b"n" * 513))
    ecdsa = struct.pack(">HH", w.ALG_ECDSA, w.ALG_SHA256)
    assert w.parse_signature(ecdsa + b2(b"r" * 128) + b2(b"s" * 128)).parts == (b"r" * 128, b"s" * 128)
    for r, s in ((b"r" * 129, b"s"), (b"r", b"s" * 129)):
        with pytest.raises(IntegrityError, match="exceeds the limit of 128"):
            w.parse_signature(ecdsa + b2(r) + b2(s))


def test_quote_attest_errors_name_the_structure() -> None:
    with pytest.raises(IntegrityError, match=r"^TPMS_ATTEST: truncated"):
        w.parse_quote_attest(attest()[:-1])
