"""CLI entry points: `bulkhead manifest ...`, `bulkhead attest ...`, `bulkhead dev tpm`.

Each *_main(argv) returns an exit status: 0 success / trusted, 1 refused / untrusted / differences,
2 user error (bad flag or file), 4 host error (TPM or swtpm unavailable): the table is bulkhead.exitstatus.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bulkhead.errors import ConfigError, HostError
from bulkhead.integrity.errors import IntegrityError

__all__ = ["attest_main", "dev_main", "manifest_main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2, no usage dump on stderr noise
        print(f"{self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


def _write(path: str | None, data: str, mode: int = 0o644) -> None:
    if path is None or path == "-":
        sys.stdout.write(data if data.endswith("\n") else data + "\n")
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(data if data.endswith("\n") else data + "\n")


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise IntegrityError(f"cannot read the {what} {path}: {exc.strerror}") from None


def _run(fn: Any, argv: list[str]) -> int:
    try:
        return int(fn(argv))
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else 2
    except (IntegrityError, ConfigError, HostError) as exc:  # TpmError is an IntegrityError (a host error)
        from bulkhead.exitstatus import exit_status

        print(f"bulkhead: {exc}", file=sys.stderr)
        return exit_status(exc) or 1


# ---- manifest -----------------------------------------------------------------------------------


def _manifest(argv: list[str]) -> int:
    from bulkhead.integrity import manifest as m

    p = _Parser(prog="bulkhead manifest", description="build, sign and verify the code manifest")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="hash the installed bulkhead package, interpreter and entry point")
    b.add_argument("--root", help="package directory (default: the imported bulkhead package)")
    b.add_argument("--extra", action="append", default=[], metavar="PATH", help="another file to record")
    b.add_argument("--bytecode", action="store_true",
                   help="also record the cached bytecode now present (run compileall first; docs/INTEGRITY.md)")
    b.add_argument("-o", "--out", help="output file (default: stdout)")
    k = sub.add_parser("keygen", help="create an ed25519 release key pair: PREFIX.key and PREFIX.pub")
    k.add_argument("prefix")
    s = sub.add_parser("sign", help="sign a manifest with the ed25519 release key")
    s.add_argument("manifest")
    s.add_argument("--key", required=True)
    s.add_argument("-o", "--out")
    v = sub.add_parser("verify", help="verify the signature and the installed files")
    v.add_argument("--manifest", default=os.environ.get("BULKHEAD_MANIFEST", m.DEFAULT_MANIFEST))
    v.add_argument("--pubkey", default=os.environ.get("BULKHEAD_RELEASE_KEY", m.DEFAULT_PUBKEY))
    v.add_argument("--root", help="package directory to check (default: the manifest's package_root)")
    a = p.parse_args(argv)

    if a.cmd == "build":
        externals = None
        if a.extra:
            externals = m._default_externals()
            externals.update({os.path.realpath(x): "extra" for x in a.extra})
        manifest = m.build_manifest(a.root, externals, bytecode=a.bytecode)
        _write(a.out, json.dumps(manifest, indent=1, sort_keys=True))
        print(f"manifest: {len(manifest['files'])} package files, {len(manifest['external'])} external, "
              f"digest {m.manifest_digest(manifest)}", file=sys.stderr)
        return 0
    if a.cmd == "keygen":
        priv, pub = m.generate_key()
        _write(a.prefix + ".key", priv.decode(), 0o600)
        _write(a.prefix + ".pub", pub.decode())
        print(f"wrote {a.prefix}.key (keep secret) and {a.prefix}.pub", file=sys.stderr)
        return 0
    if a.cmd == "sign":
        try:
            manifest = json.loads(_read(a.manifest, "manifest"))
        except ValueError:
            raise IntegrityError(f"the manifest {a.manifest} is not valid JSON") from None
        if not isinstance(manifest, dict) or manifest.get("format") != m.FORMAT:
            raise IntegrityError(f"{a.manifest} is not an unsigned {m.FORMAT} manifest")
        signed = m.sign_manifest(manifest, _read(a.key, "signing key"))
        _write(a.out, json.dumps(signed, indent=1, sort_keys=True))
        return 0
    diffs = m.verify_installation(a.manifest, a.pubkey, a.root)
    if diffs:
        print(f"REFUSED: {len(diffs)} difference(s) from the signed manifest {a.manifest}:")
        for d in diffs:
            print(f"  {d}")
        return 1
    print(f"OK: signature valid and every file matches {a.manifest}")
    return 0


def manifest_main(argv: list[str]) -> int:
    """`bulkhead manifest build|keygen|sign|verify`."""
    return _run(_manifest, argv)


# ---- attest -------------------------------------------------------------------------------------


def _attest_parser() -> _Parser:
    """`bulkhead attest` (docs/INTEGRITY.md "Attestation"): enroll, quote, verify, policy-init."""
    p = _Parser(prog="bulkhead attest", description="TPM attestation: enroll, quote, verify")
    sub = p.add_subparsers(dest="cmd", required=True)
    tcti_default = os.environ.get("BULKHEAD_TCTI", "device:/dev/tpmrm0")
    e = sub.add_parser("enroll", help="bind the TPM's AK to its EK by credential activation")
    e.add_argument("--tcti", default=tcti_default)
    e.add_argument("--ek", help="expected EK public (hex TPMT_PUBLIC file); default: read from the TPM")
    e.add_argument("-o", "--out")
    q = sub.add_parser("quote", help="quote the integrity PCRs with a verifier nonce")
    q.add_argument("--tcti", default=tcti_default)
    q.add_argument("--nonce", required=True)
    q.add_argument("--log", required=True, help="the measurement event log (JSON lines)")
    q.add_argument("--pcrs", default="14,15", help="PCR indexes to quote (default 14,15)")
    q.add_argument("-o", "--out")
    v = sub.add_parser("verify", help="verify a quote against a policy; exit 0 only when trusted")
    v.add_argument("evidence")
    v.add_argument("--policy", required=True)
    v.add_argument("--enrollment", required=True)
    v.add_argument("--nonce", required=True, help="the nonce this verifier issued for this quote")
    v.add_argument("--json", action="store_true", help="print the verdict as JSON")
    i = sub.add_parser("policy-init", help="write a policy trusting this enrollment's EK and the log's digests")
    i.add_argument("--enrollment", required=True)
    i.add_argument("--log", help="event log whose digests become golden values")
    i.add_argument("-o", "--out")
    return p


def _attest(argv: list[str]) -> int:
    a = _attest_parser().parse_args(argv)
    if a.cmd == "verify":
        return _attest_verify(a)
    if a.cmd == "policy-init":
        return _attest_policy_init(a)
    from bulkhead.integrity.tpm import Tpm, enroll

    if a.cmd == "enroll":
        ek = bytes.fromhex(_read(a.ek, "EK").decode().strip()) if a.ek else None
        with Tpm(a.tcti) as tpm:
            enr = enroll(tpm, ek)
        _write(a.out, json.dumps(enr.to_dict(), indent=1, sort_keys=True))
        print(f"enrolled: AK {enr.ak_name.hex()} bound to EK sha256 {enr.ek_sha256}", file=sys.stderr)
        return 0
    from bulkhead.integrity.host import make_evidence, read_event_log

    try:
        pcrs = [int(x) for x in a.pcrs.split(",")]
    except ValueError:
        print("bulkhead attest: --pcrs takes comma-separated integers", file=sys.stderr)
        return 2
    events = read_event_log(a.log)
    with Tpm(a.tcti) as tpm:
        quote_doc = make_evidence(tpm, pcrs, a.nonce, events)
    _write(a.out, json.dumps(quote_doc, indent=1, sort_keys=True))
    return 0


def _attest_verify(a: argparse.Namespace) -> int:
    """Exit 0 only when the quote is trusted under the policy (docs/INTEGRITY.md "Verdicts")."""
    from bulkhead.integrity.attest import verify_evidence

    try:
        evidence = _read(a.evidence, "evidence")
        policy = _read(a.policy, "policy")
        enrollment = _read(a.enrollment, "enrollment")
    except IntegrityError as exc:
        print(f"verdict: untrusted\n  - {exc}")
        return 1
    verdict = verify_evidence(evidence, policy, enrollment, a.nonce)
    if a.json:
        print(json.dumps(verdict.to_dict(), indent=1))
    else:
        print(f"verdict: {'trusted' if verdict.trusted else 'untrusted'}")
        for r in verdict.reasons:
            print(f"  FAIL {r}")
        for ok in verdict.passed:
            print(f"  ok   {ok}")
    return 0 if verdict.trusted else 1


def _attest_policy_init(a: argparse.Namespace) -> int:
    """A policy trusting this enrollment's EK and the event log's digests (docs/INTEGRITY.md "Policy")."""
    from bulkhead.integrity.host import read_event_log
    from bulkhead.integrity.policy import POLICY_FORMAT, parse_enrollment

    enr = parse_enrollment(_read(a.enrollment, "enrollment"))
    allowed: dict[str, list[str]] = {"manifest": [], "config": [], "vm-launch": []}
    for ev in read_event_log(a.log) if a.log else []:
        if ev.digest not in allowed[ev.kind]:
            allowed[ev.kind].append(ev.digest)
    policy_doc = {"format": POLICY_FORMAT, "ek_sha256": enr.ek_sha256, "pcrs": {"host": 14, "vm": 15},
              "allowed": allowed, "max_age_s": 300, "interval_s": 30,
              "running_vms_when_untrusted": "keep"}
    _write(a.out, json.dumps(policy_doc, indent=1, sort_keys=True))
    return 0


def attest_main(argv: list[str]) -> int:
    """`bulkhead attest enroll|quote|verify|policy-init`."""
    return _run(_attest, argv)


# ---- dev ----------------------------------------------------------------------------------------


def _dev(argv: list[str]) -> int:
    p = _Parser(prog="bulkhead dev", description="development helpers")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tpm", help="run a software TPM (swtpm) and print its TCTI string")
    t.add_argument("--dir", help="TPM state directory (default: a new temporary directory)")
    t.add_argument("--port", type=int, help="TCP port (control channel on port+1; default: free ports)")
    a = p.parse_args(argv)
    from bulkhead.integrity.tpm import SwTpm

    sw = SwTpm(a.dir, a.port).start()
    print(sw.tcti, flush=True)
    print(f"swtpm pid {sw.proc.pid if sw.proc else '?'}, state in {sw.state_dir}; "
          f"export BULKHEAD_TCTI={sw.tcti}; Ctrl-C stops it", file=sys.stderr, flush=True)
    stop = False

    def handler(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    try:
        while not stop and sw.proc is not None and sw.proc.poll() is None:
            time.sleep(0.2)
    finally:
        sw.cleanup()
    return 0


def dev_main(argv: list[str]) -> int:
    """`bulkhead dev tpm [--dir D] [--port P]`."""
    return _run(_dev, argv)
