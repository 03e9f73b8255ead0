"""Pure integrity core: launch digest encoding, event log + replay, policy, TPM wire parsers, gate."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bulkhead.integrity import IntegrityError, LaunchDigestMismatch, check_expected_digest, launch_digest
from bulkhead.integrity.attest import Verdict, verify_evidence
from bulkhead.integrity.canonical import canonical_json
from bulkhead.integrity.eventlog import Event, format_event, parse_event_log, replay
from bulkhead.integrity.gate import GateCore
from bulkhead.integrity.launch import config_devices, launch_digest_for_config
from bulkhead.integrity.policy import evaluate_events, parse_enrollment, parse_policy
from bulkhead.integrity.tpmwire import parse_public, parse_quote_attest, parse_signature
from bulkhead.runtime.config import DriveConfig, NetConfig, VmConfig

# ---- launch digest ----------------------------------------------------------------------------


def _f(name: str, value: bytes) -> bytes:
    return struct.pack("<I", len(name)) + name.encode() + struct.pack("<Q", len(value)) + value


def test_launch_digest_matches_documented_encoding() -> None:
    kernel, initrd = b"KERNEL" * 100, b"INITRD"
    want = hashlib.sha256(
        b"bulkhead-launch/1\x00"
        + _f("kernel", hashlib.sha256(kernel).digest())
        + _f("initrd", hashlib.sha256(initrd).digest())
        + _f("cmdline", b"console=ttyS0")
        + _f("mem_mib", struct.pack("<Q", 256))
        + _f("cpus", struct.pack("<I", 2))
        + _f("boot", b"pvh")
        + _f("devices", b"virtio-blk:id=root,ro=1\nvirtio-rng")
    ).hexdigest()
    got = launch_digest(kernel, initrd, "console=ttyS0", 256, 2, ["virtio-rng", "virtio-blk:id=root,ro=1"], "pvh")
    assert got == want


def test_every_launch_field_changes_the_digest() -> None:
    base = dict(kernel=b"k", initrd=None, cmdline="a", mem_mib=128, cpus=1, devices=[], boot="auto")
    d0 = launch_digest(**base)  # type: ignore[arg-type]
    variants = [("kernel", b"k2"), ("initrd", b""), ("cmdline", "a "), ("mem_mib", 129), ("cpus", 2),
                ("devices", ["virtio-rng"]), ("boot", "pvh")]
    seen = {d0}
    for key, value in variants:
        d = launch_digest(**{**base, key: value})  # type: ignore[arg-type]
        assert d not in seen, key
        seen.add(d)


def test_config_digest_reads_files_and_devices(tmp_path: Path) -> None:
    k = tmp_path / "vmlinux"
    k.write_bytes(b"kernel v1")
    cfg = VmConfig(kernel=str(k), cmdline="x", mem_mib=64, cpus=1, rng=True,
                   drives=(DriveConfig("/dev/null", True, "d0"),), nets=(NetConfig("tap0", "52:54:00:AA:bb:cc"),))
    assert config_devices(cfg) == ["virtio-blk:id=d0,ro=1", "virtio-net:mac=52:54:00:aa:bb:cc", "virtio-rng"]
    assert launch_digest_for_config(cfg) == launch_digest_for_config(cfg, kernel=b"kernel v1")
    with pytest.raises(IntegrityError, match="cannot read"):
        launch_digest_for_config(VmConfig(kernel=str(tmp_path / "missing")))


def test_kernel_swapped_after_digest_is_refused(tmp_path: Path) -> None:
    k = tmp_path / "vmlinux"
    k.write_bytes(b"good kernel")
    expected = launch_digest_for_config(VmConfig(kernel=str(k)))
    cfg = VmConfig(kernel=str(k), expected_digest=expected)
    check_expected_digest(cfg, launch_digest_for_config(cfg))  # unchanged: allowed
    k.write_bytes(b"evil kernel")
    with pytest.raises(LaunchDigestMismatch) as err:
        check_expected_digest(cfg, launch_digest_for_config(cfg))
    assert err.value.expected == expected and "kernel" in str(err.value)


# ---- event log ----------------------------------------------------------------------------------


def test_event_log_roundtrip_and_replay() -> None:
    evs = [Event(14, "manifest", "a" * 64, "m"), Event(14, "config", "b" * 64), Event(15, "vm-launch", "c" * 64)]
    text = "\n".join(format_event(e) for e in evs) + "\n"
    assert parse_event_log(text) == evs
    pcrs = replay(evs)
    v14 = hashlib.sha256(bytes(32) + evs[0].extend_value).digest()
    v14 = hashlib.sha256(v14 + evs[1].extend_value).digest()
    assert pcrs[14] == v14
    assert pcrs[15] == hashlib.sha256(bytes(32) + evs[2].extend_value).digest()
    # the kind is bound: same digest under another kind extends a different value
    assert Event(14, "config", "a" * 64).extend_value != evs[0].extend_value


@pytest.mark.parametrize("line", [
    '{"pcr": 24, "kind": "manifest", "digest": "' + "a" * 64 + '"}',
    '{"pcr": true, "kind": "manifest", "digest": "' + "a" * 64 + '"}',
    '{"pcr": 14, "kind": "other", "digest": "' + "a" * 64 + '"}',
    '{"pcr": 14, "kind": "manifest", "digest": "' + "A" * 64 + '"}',
    '{"pcr": 14, "kind": "manifest", "digest": "' + "a" * 63 + '"}',
    '{"pcr": 14, "kind": "manifest", "digest": "' + "a" * 64 + '", "extra": 1}',
    '{"pcr": 14, "kind": "manifest", "digest": "' + "a" * 64 + '", "description": "' + "x" * 2000 + '"}',
    "[1, 2]",
    "{not json",
])
def test_hostile_event_lines_are_refused(line: str) -> None:
    with pytest.raises(IntegrityError, match="event log"):
        parse_event_log(line)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_event_log_parser_only_raises_integrity_error(text: str) -> None:
    try:
        parse_event_log(text)
    except IntegrityError:
        pass


# ---- policy -----------------------------------------------------------------------------------


def _policy(**over: object) -> dict[str, object]:
    p: dict[str, object] = {"format": "bulkhead-policy/1", "ek_sha256": "e" * 64,
                            "allowed": {"manifest": ["a" * 64], "config": ["b" * 64]}}
    p.update(over)
    return p


def test_policy_parse_and_evaluate() -> None:
    pol = parse_policy(json.dumps(_policy()))
    assert pol.pcrs == (14, 15) and pol.running_vms_when_untrusted == "keep"
    ok = [Event(14, "manifest", "a" * 64), Event(14, "config", "b" * 64)]
    assert evaluate_events(pol, ok) == []
    bad = [Event(15, "manifest", "a" * 64), Event(14, "config", "c" * 64), Event(15, "vm-launch", "d" * 64)]
    reasons = evaluate_events(pol, bad)
    assert len(reasons) == 3
    assert "PCR 15" in reasons[0] and "not allowed" in reasons[1] and "vm-launch" in reasons[2]


@pytest.mark.parametrize(("over", "why"), [
    ({"format": "x"}, "format must be bulkhead-policy/1"), ({"ek_sha256": "E" * 64}, "ek_sha256 must be the SHA-256"),
    ({"pcrs": {"host": 30, "vm": 15}}, "PCR indexes must be integers 0..23"),
    ({"allowed": {"bogus": []}}, "allowed must map event kinds"),
    ({"allowed": {"manifest": ["zz"]}}, "allowed.manifest must be a list of SHA-256 hex digests"),
    ({"max_age_s": 0}, "max_age_s must be a number between 1 and 86400"),
    ({"interval_s": 400, "max_age_s": 300}, "interval_s must be shorter than max_age_s"),
    ({"running_vms_when_untrusted": "ignore"}, "running_vms_when_untrusted must be keep or stop"),
    ({"surprise": 1}, "unknown policy field"),
])
def test_bad_policies_are_refused(over: dict[str, object], why: str) -> None:
    with pytest.raises(IntegrityError, match=why):
        parse_policy(_policy(**over))


def test_bad_enrollment_is_refused() -> None:
    with pytest.raises(IntegrityError, match="enrollment ek_public must be hex"):
        parse_enrollment({"format": "bulkhead-enrollment/1", "ek_public": "zz", "ak_public": "", "ak_name": ""})
    with pytest.raises(IntegrityError, match="the enrollment is not a JSON object"):
        parse_enrollment("[]")


# ---- wire parsers -------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_wire_parsers_only_raise_integrity_error(data: bytes) -> None:
    for fn in (parse_public, parse_signature, parse_quote_attest):
        try:
            fn(data)
        except IntegrityError:
            pass


def test_quote_attest_rejects_bad_magic_and_trailing_bytes() -> None:
    body = struct.pack(">IH", 0xFF544347, 0x8018) + b"\x00\x00" + b"\x00\x00" + bytes(8 + 4 + 4 + 1) + bytes(8)
    body += struct.pack(">I", 1) + struct.pack(">HB", 0x000B, 3) + bytes([0, 0xC0, 0]) + b"\x00\x20" + bytes(32)
    info = parse_quote_attest(body)
    assert info.selections[0].pcrs == (14, 15)
    with pytest.raises(IntegrityError, match="trailing"):
        parse_quote_attest(body + b"\x00")
    with pytest.raises(IntegrityError, match="TPM_GENERATED"):
        parse_quote_attest(b"\x00" + body[1:])


def test_verify_evidence_never_raises_on_garbage() -> None:
    for ev in (b"", b"{}", b"[]", json.dumps({"format": "bulkhead-quote/1", "attest": "zz"}).encode()):
        v = verify_evidence(ev, _policy(), {}, "n")
        assert not v.trusted and v.reasons


def test_canonical_json_refuses_floats() -> None:
    assert canonical_json({"b": 1, "a": [True, None]}) == b'{"a":[true,null],"b":1}'
    with pytest.raises(IntegrityError, match=r"canonical JSON: value at \$\.x has unsupported type float"):
        canonical_json({"x": 1.5})


# ---- gate state machine -------------------------------------------------------------------------


def test_gate_starts_untrusted_and_only_a_pass_makes_it_trusted() -> None:
    g = GateCore(max_age_s=10)
    assert not g.can_start_vm(0.0) and g.reasons == ["no attestation yet"]
    assert g.record(Verdict(False, ["bad"]), 1.0) is not None
    assert not g.can_start_vm(1.0)
    tr = g.record(Verdict(True, [], ["ok"]), 2.0)
    assert tr is not None and tr.new == "trusted" and g.can_start_vm(2.0)
    # a verdict claiming trusted but carrying a reason is not trusted
    g.record(Verdict(True, ["inconsistent"]), 3.0)
    assert not g.can_start_vm(3.0)


def test_gate_goes_untrusted_when_attestation_stops_arriving() -> None:
    """Keylime CVE-2022-3500: silence must not keep a host trusted."""
    g = GateCore(max_age_s=10, running_vms_when_untrusted="stop")
    g.record(Verdict(True, [], ["ok"]), 100.0)
    assert g.can_start_vm(110.0)
    assert not g.can_start_vm(110.5)
    assert "stale" in g.reasons[0]
    assert g.should_stop_running(111.0)
    assert g.status(111.0)["state"] == "untrusted"
    g.record_error("TPM unavailable", 112.0)
    assert g.reasons == ["TPM unavailable"]
    g.record(Verdict(True, [], ["ok"]), 113.0)
    assert g.can_start_vm(113.0) and not g.should_stop_running(113.0)


# ---- mutation-testing survivors (issue 15): policy/enrollment boundaries, round trips, event bounds ---

def test_policy_round_trips_and_its_defaults_are_documented() -> None:
    pol = parse_policy(_policy())
    assert (pol.host_pcr, pol.vm_pcr, pol.max_age_s, pol.interval_s, pol.running_vms_when_untrusted) == (
        14, 15, 300.0, 30.0, "keep")
    assert pol.to_dict() == {
        "format": "bulkhead-policy/1", "ek_sha256": "e" * 64, "pcrs": {"host": 14, "vm": 15},
        "allowed": {"config": ["b" * 64], "manifest": ["a" * 64], "vm-launch": []},
        "max_age_s": 300.0, "interval_s": 30.0, "running_vms_when_untrusted": "keep"}
    assert parse_policy(pol.to_dict()) == pol
    assert parse_policy(json.dumps(pol.to_dict())) == pol


@pytest.mark.parametrize(("over", "ok"), [
    ({"max_age_s": 1, "interval_s": 0.5}, True), ({"max_age_s": 86400}, True), ({"max_age_s": 0.99}, False),
    ({"max_age_s": 86401}, False), ({"max_age_s": True}, False), ({"max_age_s": "300"}, False),
    ({"interval_s": 0.05}, True), ({"interval_s": 0.049}, False), ({"max_age_s": 10, "interval_s": 10}, False),
    ({"max_age_s": 10, "interval_s": 9.99}, True),
    ({"pcrs": {"host": 0, "vm": 23}}, True), ({"pcrs": {"host": 0, "vm": 24}}, False),
    ({"pcrs": {"host": -1, "vm": 15}}, False), ({"pcrs": {"host": True, "vm": 15}}, False),
    ({"pcrs": {"host": 14}}, False), ({"pcrs": [14, 15]}, False),
    ({"running_vms_when_untrusted": "stop"}, True), ({"running_vms_when_untrusted": "kill"}, False),
])
def test_policy_field_boundaries(over: dict[str, object], ok: bool) -> None:
    if ok:
        parse_policy(_policy(**over))
    else:
        with pytest.raises(IntegrityError, match="policy"):
            parse_policy(_policy(**over))


def test_policy_and_enrollment_errors_name_the_document() -> None:
    with pytest.raises(IntegrityError, match=r"^the policy is not valid JSON$"):
        parse_policy("{")
    with pytest.raises(IntegrityError, match=r"^the enrollment is not a JSON object$"):
        parse_enrollment("[]")


def _enrollment(**over: object) -> dict[str, object]:
    e: dict[str, object] = {"format": "bulkhead-enrollment/1", "ek_public": "0a0b", "ak_public": "0c",
                            "ak_name": "000b" + "11" * 32,
                            "activation": {"verified": True, "challenge_sha256": "c" * 64}}
    e.update(over)
    return e


def test_enrollment_round_trips() -> None:
    enr = parse_enrollment(_enrollment())
    assert (enr.ek_public, enr.ak_public, enr.activation_verified, enr.challenge_sha256) == (
        b"\x0a\x0b", b"\x0c", True, "c" * 64)
    d = enr.to_dict()
    assert d["activation"] == {"method": "TPM2_MakeCredential/TPM2_ActivateCredential", "verified": True,
                               "challenge_sha256": "c" * 64}
    assert (d["ek_public"], d["ak_public"], d["ak_name"]) == ("0a0b", "0c", "000b" + "11" * 32)
    assert parse_enrollment(d) == enr and parse_enrollment(json.dumps(d)) == enr
    assert parse_enrollment(_enrollment(activation={})).activation_verified is False
    assert parse_enrollment(_enrollment(activation={"verified": "yes"})).activation_verified is False
    assert parse_enrollment(_enrollment(activation={"verified": True})).challenge_sha256 == ""


@pytest.mark.parametrize("over", [
    {"ek_public": "zz"}, {"ak_public": "abc"}, {"ak_name": 5}, {"ek_public": "ab" * 2049}, {"activation": None},
    {"activation": {"verified": True, "challenge_sha256": 7}}, {"format": "bulkhead-enrollment/2"},
])
def test_malformed_enrollment_is_refused(over: dict[str, object]) -> None:
    with pytest.raises(IntegrityError, match="enrollment"):
        parse_enrollment(_enrollment(**over))


def test_enrollment_hex_fields_up_to_4096_characters() -> None:
    assert parse_enrollment(_enrollment(ek_public="ab" * 2048)).ek_public == b"\xab" * 2048


def test_policy_violations_are_numbered_from_one() -> None:
    pol = parse_policy(_policy())
    reasons = evaluate_events(pol, [Event(14, "manifest", "a" * 64), Event(15, "config", "b" * 64)])
    assert reasons == ["event 2 (config) was extended into PCR 15, policy puts config in PCR 14"]


@pytest.mark.parametrize(("pcr", "ok"), [(0, True), (23, True), (24, False), (-1, False), (True, False)])
def test_event_pcr_bounds(pcr: int, ok: bool) -> None:
    if ok:
        assert Event(pcr, "config", "b" * 64).pcr == pcr
    else:
        with pytest.raises(IntegrityError, match="PCR index"):
            Event(pcr, "config", "b" * 64)


def test_event_description_up_to_1024_characters() -> None:
    assert len(Event(14, "config", "b" * 64, "d" * 1024).description) == 1024
    with pytest.raises(IntegrityError, match="description"):
        Event(14, "config", "b" * 64, "d" * 1025)


def test_extend_value_known_answer() -> None:
    """docs/INTEGRITY.md: extend value = SHA-256("bulkhead-event/1\\0" || kind || "\\0" || digest bytes)."""
    e = Event(14, "config", "b" * 64)
    assert e.extend_value == hashlib.sha256(b"bulkhead-event/1\x00config\x00" + b"\xbb" * 32).digest()
    assert e.extend_value.hex() == "75826a6528028c9f5913046cef9d837735018d0eac3748b34346f24766c06292"


def test_format_event_is_one_sorted_compact_line() -> None:
    line = format_event(Event(14, "config", "b" * 64, "x"))
    assert line == '{"description":"x","digest":"' + "b" * 64 + '","kind":"config","pcr":14}'


def test_event_log_parsing_keeps_every_entry_and_numbers_errors() -> None:
    a, b = format_event(Event(14, "manifest", "a" * 64, "with description")), format_event(Event(14, "config", "b" * 64))
    evs = parse_event_log(f"{a}\n\n   \n{b}\n")
    assert [e.kind for e in evs] == ["manifest", "config"] and evs[0].description == "with description"
    no_desc = parse_event_log([{"pcr": 14, "kind": "config", "digest": "b" * 64}])
    assert no_desc[0].description == ""
    with pytest.raises(IntegrityError, match=r"^event log line 2 is not valid JSON$"):
        parse_event_log(f"{a}\n{{\n")
    with pytest.raises(IntegrityError, match=r"^event log entry 2: event must have"):
        parse_event_log([json.loads(a), {"pcr": 14, "kind": "config"}])


def test_event_log_size_cap_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    from bulkhead.integrity import eventlog
    monkeypatch.setattr(eventlog, "MAX_EVENTS", 3)
    one = {"pcr": 14, "kind": "config", "digest": "b" * 64}
    assert len(parse_event_log([one] * 3)) == 3
    with pytest.raises(IntegrityError, match="more than 3 events"):
        parse_event_log([one] * 4)
