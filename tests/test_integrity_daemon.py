"""Integrity wired into the daemon: the fail-closed gate in the API, launch digests, expected digests,
the code check at `bulkhead serve`. TPM tests use a REAL swtpm started here; no test depends on a
manifest or key installed on the machine (they make their own in tmp dirs).

Every refusal is checked in the audit log, and that the backend was never asked to start the VM.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bulkhead.daemon.auditlog import query_records
from bulkhead.daemon.backend import FakeBackend
from bulkhead.daemon.integrity import (
    IntegrityOptions,
    NoTpm,
    daemon_config_digest,
    start_host_integrity,
    vm_config_of,
)
from bulkhead.daemon.testkit import Harness, fake_kernel
from bulkhead.errors import ConfigError
from bulkhead.integrity.launch import launch_digest_for_config
from bulkhead.runtime.config import VmConfig

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def _audit(h: Harness, action: str) -> list[dict[str, Any]]:
    return [r for r in query_records(h.root / "audit.db", limit=None) if r["action"] == action]


def _started(h: Harness) -> list[str]:
    return [vm for op, vm in h.backend.calls if op == "start"]  # type: ignore[attr-defined]


def _wait_for(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


# ---------------------------------------------------------------------------- no TPM, gate off


def test_without_a_tpm_the_host_is_untrusted_and_no_vm_starts(tmp_path: Path) -> None:
    h = Harness(tmp_path / "s", integrity=NoTpm())
    try:
        vm = h.vm(h.tenant("acme"), "web")
        with h.client() as c:
            st = c.get("/v1/integrity").json()
            assert st["state"] == "untrusted" and st["mode"] == "none"
            assert any("no TPM configured" in r for r in st["reasons"])
            r = c.post(f"/v1/vms/{vm}/start")
            assert r.status_code == 503 and "host is untrusted" in r.json()["detail"]
            assert c.get(f"/v1/vms/{vm}").json()["state"] == "stopped"
        assert _started(h) == []
        refused = _audit(h, "security/integrity/host-untrusted")
        assert len(refused) == 1 and refused[0]["vm"] == vm
        assert "no TPM configured" in json.loads(refused[0]["detail"])["reason"]
        start = [r for r in _audit(h, "daemon.start")][-1]
        assert json.loads(start["detail"])["integrity"]["state"] == "untrusted"
    finally:
        h.close()


def test_gate_off_is_announced_and_audited(tmp_path: Path) -> None:
    h = Harness(tmp_path / "s")  # the harness default: IntegrityOff("test harness")
    try:
        with h.client() as c:
            st = c.get("/v1/integrity").json()
        assert st["state"] == "off" and st["mode"] == "off"
        assert _audit(h, "security/integrity/gate-off"), "an off gate must be audited at daemon start"
        assert _audit(h, "security/integrity/code-unverified")
    finally:
        h.close()


def test_gate_off_is_refused_for_a_backend_that_runs_guests_outside_tests(tmp_path: Path) -> None:
    Harness(tmp_path / "s").close()  # an initialized state directory
    code = (
        "import sys; from pathlib import Path\n"
        "assert 'pytest' not in sys.modules\n"
        "from bulkhead.daemon.daemon import Daemon\n"
        "from bulkhead.daemon.backend import ProcessBackend\n"
        "from bulkhead.daemon.integrity import IntegrityOff\n"
        "from bulkhead.errors import HostError\n"
        "try:\n"
        "    Daemon.open(Path(sys.argv[1]), ProcessBackend(), integrity=IntegrityOff('x'))\n"
        "except HostError as exc:\n"
        "    print('REFUSED', exc); sys.exit(0)\n"
        "sys.exit(1)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s")], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": str(SRC)})
    assert out.returncode == 0 and "REFUSED" in out.stdout, out.stdout + out.stderr
    from bulkhead.daemon.cli import serve_main

    assert serve_main(["--state-dir", str(tmp_path / "s"), "--port", "0", "--integrity", "off"]) == 2


def test_expected_digest_refuses_a_swapped_kernel(tmp_path: Path) -> None:
    h = Harness(tmp_path / "s")
    try:
        t = h.tenant("acme")
        probe = h.vm(t, "probe", cmdline="console=ttyS0", mem_mib=64)
        with h.client() as c:
            m = c.get(f"/v1/vms/{probe}/measurement").json()
            assert m["expected_digest"] is None and m["matches_expected"] is None
            vm = c.post("/v1/vms", json={"tenant": t, "name": "pinned", "kernel": "vmlinux", "cmdline": "console=ttyS0",
                                         "mem_mib": 64, "expected_digest": m["digest"]}).json()
            assert vm["expected_digest"] == m["digest"]
            assert c.post(f"/v1/vms/{vm['id']}/start").status_code == 200
            assert c.get(f"/v1/vms/{vm['id']}/measurement").json()["last_launch_digest"] == m["digest"]
            assert c.post(f"/v1/vms/{vm['id']}/stop").status_code == 200
            (h.root / "images" / "vmlinux").write_bytes(b"\x7fELF an attacker's kernel")
            m2 = c.get(f"/v1/vms/{vm['id']}/measurement").json()
            assert m2["digest"] != m["digest"] and m2["matches_expected"] is False
            r = c.post(f"/v1/vms/{vm['id']}/start")
            assert r.status_code == 409 and "differs from the expected digest" in r.json()["detail"]
            assert c.get(f"/v1/vms/{vm['id']}").json()["state"] == "stopped"
            # a malformed expected digest is a 422, never stored
            bad = c.post("/v1/vms", json={"tenant": t, "name": "bad", "kernel": "vmlinux", "expected_digest": "abc"})
            assert bad.status_code == 422
        assert _started(h) == [vm["id"]]  # only the first, matching start reached the backend
        rec = _audit(h, "security/integrity/launch-digest-mismatch")
        assert len(rec) == 1 and rec[0]["vm"] == vm["id"]
        d = json.loads(rec[0]["detail"])
        assert d["expected_digest"] == m["digest"] and d["digest"] == m2["digest"]
    finally:
        h.close()


class SpecRecorder(FakeBackend):
    def __init__(self) -> None:
        super().__init__()
        self.got: dict[str, Any] = {}

    def start(self, vm_id: str, spec: Any) -> int:
        self.got[vm_id] = spec
        return super().start(vm_id, spec)


def test_measurement_is_the_launch_digest_of_what_the_backend_gets(tmp_path: Path) -> None:
    backend = SpecRecorder()
    h = Harness(tmp_path / "s", backend=backend)
    try:
        t = h.tenant("acme")
        with h.client() as c:
            disk = c.post(f"/v1/tenants/{t}/disks", json={"name": "root", "size_mib": 4}).json()["id"]
        vm = h.vm(t, "web", cmdline="console=ttyS0 quiet", mem_mib=96, cpus=2, rng=True,
                  drives=[{"disk": disk, "read_only": True}])
        with h.client() as c:
            m = c.get(f"/v1/vms/{vm}/measurement").json()
            assert c.post(f"/v1/vms/{vm}/start").status_code == 200
        spec = backend.got[vm]
        assert launch_digest_for_config(vm_config_of(spec)) == m["digest"]
        assert spec.expected_digest == m["digest"]  # handed on, so the VMM re-checks the bytes it loads
        comp = m["components"]
        assert comp["devices"] == ["virtio-blk:id=,ro=1", "virtio-rng"]
        assert (comp["mem_mib"], comp["cpus"], comp["cmdline"]) == (96, 2, "console=ttyS0 quiet")
        # any measured field changes the digest
        other = launch_digest_for_config(vm_config_of(spec)._replace(mem_mib=128))
        assert other != m["digest"]
    finally:
        h.close()


def test_the_vmm_refuses_bytes_that_differ_from_the_expected_digest(tmp_path: Path) -> None:
    """The runtime's own check (Machine.build): the bytes it loads are the bytes it measures, so a kernel
    swapped between the daemon's measurement and the VMM's read is refused before KVM is touched."""
    from bulkhead.runtime.vm import Machine

    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF good")
    cfg = VmConfig(kernel=str(kernel), mem_mib=64, serial="none")
    good = launch_digest_for_config(cfg)
    kernel.write_bytes(b"\x7fELF evil")
    m = Machine(cfg._replace(expected_digest=good))
    try:
        with pytest.raises(ConfigError, match="differs from the expected digest"):
            m.build()
        assert m.kvm is None  # refused before any KVM resource exists
    finally:
        m.close()


class SwapThenBuild(FakeBackend):
    """A backend racing the daemon: the kernel file is swapped after the daemon measured it and before
    the VMM reads it. The VMM (Machine.build) gets the daemon's digest as expected_digest."""

    def __init__(self) -> None:
        super().__init__()
        self.refusal = ""

    def start(self, vm_id: str, spec: Any) -> int:
        from bulkhead.errors import HostError
        from bulkhead.runtime.vm import Machine

        Path(spec.kernel).write_bytes(b"\x7fELF swapped in the window")
        m = Machine(vm_config_of(spec, spec.expected_digest)._replace(serial="none"))
        try:
            m.build()
        except ConfigError as exc:
            self.refusal = str(exc)
            raise HostError(f"the VMM refused: {exc}") from None
        finally:
            m.close()
        return super().start(vm_id, spec)


def test_a_kernel_swapped_between_measurement_and_load_is_refused_by_the_vmm(tmp_path: Path) -> None:
    backend = SwapThenBuild()
    h = Harness(tmp_path / "s", backend=backend)
    try:
        vm = h.vm(h.tenant("acme"), "web", mem_mib=64)
        with h.client() as c:
            r = c.post(f"/v1/vms/{vm}/start")
            assert r.status_code == 503 and "differs from the expected digest" in r.json()["detail"]
            assert c.get(f"/v1/vms/{vm}").json()["state"] == "stopped"
        assert "differs from the expected digest" in backend.refusal
    finally:
        h.close()


# ---------------------------------------------------------------------------- code check at serve


def _signed_copy(tmp: Path) -> tuple[Path, dict[str, str]]:
    """A private copy of the package with its own release key and signed manifest; env to use them."""
    from bulkhead.integrity import manifest as mf

    pkg = tmp / "pkg"
    shutil.copytree(SRC / "bulkhead", pkg / "bulkhead", ignore=shutil.ignore_patterns("__pycache__"))
    priv, pub = mf.generate_key()
    (tmp / "release.pub").write_bytes(pub)
    signed = mf.sign_manifest(mf.build_manifest(pkg / "bulkhead"), priv)
    (tmp / "manifest.json").write_text(json.dumps(signed))
    env = {k: v for k, v in os.environ.items() if k not in ("BULKHEAD_DEV_SKIP_INTEGRITY", "BULKHEAD_TCTI")}
    env.update(PYTHONPATH=str(pkg), BULKHEAD_MANIFEST=str(tmp / "manifest.json"),
               BULKHEAD_RELEASE_KEY=str(tmp / "release.pub"), PYTHONDONTWRITEBYTECODE="1")
    return pkg, env


def _serve(state: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "bulkhead", "serve", "--state-dir", str(state), "--port", "0",
                             "--backend", "fake"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            cwd=str(state))


def test_daemon_refuses_to_start_with_a_modified_package_file(tmp_path: Path) -> None:
    from bulkhead.daemon.testkit import wait_serve_info

    pkg, env = _signed_copy(tmp_path)
    state = tmp_path / "state"
    Harness(state).close()
    # the clean copy verifies: the daemon starts and says so (host untrusted: no TPM configured)
    proc = _serve(state, env)
    try:
        info = wait_serve_info(state, proc)
        assert info["pid"] == proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    started = [json.loads(r["detail"]) for r in query_records(state / "audit.db", limit=None)
               if r["action"] == "daemon.start"][-1]
    assert started["integrity"]["code"]["verified"] is True
    assert started["integrity"]["state"] == "untrusted"
    # one byte appended to one module: refused, the file named on stderr and in the audit log
    victim = pkg / "bulkhead" / "bus.py"
    with open(victim, "a") as f:
        f.write("\n# tampered\n")
    proc = _serve(state, env)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 4, out.decode()  # a HostError (bulkhead.exitstatus)
    assert str(victim) in out.decode() and "differs from the signed manifest" in out.decode()
    assert not (state / "bulkhead.sock").exists()
    rec = [r for r in query_records(state / "audit.db", limit=None) if r["action"] == "security/integrity/code-mismatch"]
    assert len(rec) == 1 and json.loads(rec[0]["detail"])["path"] == str(victim)
    # a manifest signed by another key is refused too (and named)
    from bulkhead.integrity import manifest as mf

    _, other_pub = mf.generate_key()
    (tmp_path / "release.pub").write_bytes(other_pub)
    victim.write_bytes((SRC / "bulkhead" / "bus.py").read_bytes())
    proc = _serve(state, env)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 4, out.decode()  # a HostError (bulkhead.exitstatus)
    assert len([r for r in query_records(state / "audit.db", limit=None)
                if r["action"] == "security/integrity/code-mismatch"]) == 2


def test_a_manifest_of_another_directory_does_not_vouch_for_the_running_code(tmp_path: Path) -> None:
    """A valid signed manifest of a pristine copy, while the daemon imports a modified copy (PYTHONPATH):
    refused, naming the running package."""
    pkg, env = _signed_copy(tmp_path)
    evil = tmp_path / "evil"
    shutil.copytree(pkg, evil)
    with open(evil / "bulkhead" / "bus.py", "a") as f:
        f.write("\n# tampered\n")
    env["PYTHONPATH"] = str(evil)
    state = tmp_path / "state"
    Harness(state).close()
    proc = _serve(state, env)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 4, out.decode()  # a HostError (bulkhead.exitstatus)
    assert f"the running package {evil / 'bulkhead'}" in out.decode()
    rec = [r for r in query_records(state / "audit.db", limit=None) if r["action"] == "security/integrity/code-mismatch"]
    assert len(rec) == 1 and json.loads(rec[0]["detail"])["path"] == str(evil / "bulkhead")


# ---------------------------------------------------------------------------- real swtpm


tpm_needed = pytest.mark.skipif(shutil.which("swtpm") is None, reason="swtpm is not installed")
MANIFEST = "5a" * 32
CONFIG = {"listen": "127.0.0.1:0", "test": True}


class TpmEnv:
    def __init__(self, tmp: Path, backend: Any = None, **policy: Any) -> None:
        pytest.importorskip("tpm2_pytss", reason="tpm2-pytss (and libtss2) not installed")
        from bulkhead.integrity.tpm import SwTpm, Tpm, enroll

        self.sw = SwTpm(str(tmp / "tpm")).start()
        with Tpm(self.sw.tcti) as tpm:
            enr = enroll(tpm)
        self.dir = tmp / "integrity"
        self.dir.mkdir()
        self.enrollment = self.dir / "enrollment.json"
        self.enrollment.write_text(json.dumps(enr.to_dict()))
        self.policy = self.dir / "policy.json"
        self.doc: dict[str, Any] = {
            "format": "bulkhead-policy/1", "ek_sha256": enr.ek_sha256,
            "allowed": {"manifest": [MANIFEST], "config": [daemon_config_digest(CONFIG)], "vm-launch": []},
            "max_age_s": 30, "interval_s": 0.2, **policy,
        }
        self.write_policy()
        self.h = Harness(tmp / "s", backend=backend, integrity=NoTpm())
        self.h.daemon.code_integrity = {"verified": True, "manifest_digest": MANIFEST, "manifest": "test"}
        opts = IntegrityOptions(tcti=self.sw.tcti, policy=self.policy, enrollment=self.enrollment,
                                event_log=self.dir / "events.jsonl")
        start_host_integrity(self.h.daemon, self.h.root, opts, CONFIG, timeout_s=3.0)

    def write_policy(self) -> None:
        tmp = self.policy.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc))
        os.replace(tmp, self.policy)

    def allow(self, digest: str) -> None:
        self.doc["allowed"]["vm-launch"].append(digest)
        self.write_policy()

    def integrity(self) -> dict[str, Any]:
        with self.h.client() as c:
            r: dict[str, Any] = c.get("/v1/integrity").json()
            return r

    def close(self) -> None:
        self.h.close()
        if self.sw.proc is not None:
            self.sw.proc.send_signal(signal.SIGCONT)
        self.sw.cleanup()


@pytest.fixture
def tpm_env(tmp_path: Path) -> Iterator[TpmEnv]:
    e = TpmEnv(tmp_path)
    yield e
    e.close()


@tpm_needed
def test_clean_host_attests_and_a_pinned_vm_starts_then_a_swapped_kernel_is_refused(tpm_env: TpmEnv) -> None:
    e, h = tpm_env, tpm_env.h
    st = e.integrity()
    assert st["state"] == "trusted" and st["mode"] == "tpm", st["reasons"]
    assert st["last_success_age_s"] is not None and st["last_success_age_s"] < 30
    t = h.tenant("acme")
    probe = h.vm(t, "probe", cmdline="console=ttyS0", mem_mib=64)
    with h.client() as c:
        digest = c.get(f"/v1/vms/{probe}/measurement").json()["digest"]
        vm = c.post("/v1/vms", json={"tenant": t, "name": "pinned", "kernel": "vmlinux", "cmdline": "console=ttyS0",
                                     "mem_mib": 64, "expected_digest": digest}).json()["id"]
        # not yet a golden value in the policy: refused, nothing measured
        r = c.post(f"/v1/vms/{vm}/start")
        assert r.status_code == 409 and "not allowed by the policy" in r.json()["detail"]
        e.allow(digest)  # the daemon reads the changed policy before the next start
        assert c.post(f"/v1/vms/{vm}/start").status_code == 200
        log = [json.loads(x) for x in (e.dir / "events.jsonl").read_text().splitlines()]
        assert [x["kind"] for x in log] == ["manifest", "config", "vm-launch"] and log[2]["digest"] == digest
        assert h.daemon.integrity.gate.attest_now().trusted  # the launch replays: still trusted
        assert c.post(f"/v1/vms/{vm}/stop").status_code == 200
        (h.root / "images" / "vmlinux").write_bytes(b"\x7fELF swapped after create")
        r = c.post(f"/v1/vms/{vm}/start")
        assert r.status_code == 409 and "differs from the expected digest" in r.json()["detail"]
    assert _started(h) == [vm]
    assert len(_audit(h, "security/integrity/launch-digest-mismatch")) == 1
    assert len(_audit(h, "security/integrity/launch-refused")) == 1  # the not-in-policy refusal
    assert _audit(h, "security/integrity/trusted")
    assert len((e.dir / "events.jsonl").read_text().splitlines()) == 3  # refused launches are not measured


@tpm_needed
def test_tpm_gone_makes_the_host_untrusted_and_refuses_vm_starts(tpm_env: TpmEnv) -> None:
    e, h = tpm_env, tpm_env.h
    assert e.integrity()["state"] == "trusted"
    vm = h.vm(h.tenant("acme"), "web")
    assert e.sw.proc is not None
    e.sw.proc.kill()
    e.sw.proc.wait(10)
    assert _wait_for(lambda: e.integrity()["state"] == "untrusted"), e.integrity()
    st = e.integrity()
    assert any("TPM" in r for r in st["reasons"]), st["reasons"]
    with h.client() as c:
        r = c.post(f"/v1/vms/{vm}/start")
    assert r.status_code == 503 and "host is untrusted" in r.json()["detail"]
    assert _started(h) == []
    went = _audit(h, "security/integrity/untrusted")
    assert went and any("TPM" in x for x in json.loads(went[-1]["detail"])["reasons"])
    assert _audit(h, "security/integrity/host-untrusted")[0]["vm"] == vm


@tpm_needed
def test_policy_stop_stops_running_vms_when_the_host_becomes_untrusted(tmp_path: Path) -> None:
    e = TpmEnv(tmp_path, running_vms_when_untrusted="stop")
    try:
        h = e.h
        t = h.tenant("acme")
        vm = h.vm(t, "web")
        with h.client() as c:
            e.allow(c.get(f"/v1/vms/{vm}/measurement").json()["digest"])
            assert c.post(f"/v1/vms/{vm}/start").status_code == 200
        assert e.sw.proc is not None
        e.sw.proc.kill()

        def stopped() -> bool:
            with h.client() as c:
                return bool(c.get(f"/v1/vms/{vm}").json()["state"] == "stopped")

        assert _wait_for(stopped), "running VMs must be stopped under policy `stop`"
        assert ("stop", vm) in h.backend.calls  # type: ignore[attr-defined]
        recs = [json.loads(r["detail"]) for r in _audit(h, "vm.stop")]
        assert any(d.get("reason") == "host untrusted" for d in recs)
    finally:
        e.close()


@tpm_needed
def test_an_attestation_that_stops_arriving_is_audited_as_untrusted_without_any_query(tmp_path: Path) -> None:
    e = TpmEnv(tmp_path, max_age_s=1, interval_s=0.5)
    try:
        h = e.h
        assert _audit(h, "security/integrity/trusted")
        h.daemon.integrity.gate.driver.stop()  # the attestation loop dies silently
        h.daemon.start_monitor(0.1)

        def went_untrusted() -> bool:
            return any("stale" in r for rec in _audit(h, "security/integrity/untrusted")
                       for r in json.loads(rec["detail"])["reasons"])

        assert _wait_for(went_untrusted, 10), "staleness must be noticed and audited by the daemon itself"
        vm = h.vm(h.tenant("acme"), "web")
        with h.client() as c:
            assert c.post(f"/v1/vms/{vm}/start").status_code == 503
        assert _started(h) == []
    finally:
        e.close()


@tpm_needed
def test_unusable_policy_leaves_the_host_untrusted(tmp_path: Path) -> None:
    e = TpmEnv(tmp_path)
    try:
        assert e.integrity()["state"] == "trusted"
        e.policy.write_text("{not json")
        st = e.integrity()
        assert st["state"] == "untrusted" and any("unusable" in r for r in st["reasons"])
        vm = e.h.vm(e.h.tenant("acme"), "web")
        with e.h.client() as c:
            assert c.post(f"/v1/vms/{vm}/start").status_code in (409, 503)
        assert _started(e.h) == []
    finally:
        e.close()


def test_serve_dev_tpm_provisions_a_software_tpm_and_an_unverified_install_stays_untrusted(tmp_path: Path) -> None:
    if shutil.which("swtpm") is None:
        pytest.skip("swtpm is not installed")
    pytest.importorskip("tpm2_pytss", reason="tpm2-pytss (and libtss2) not installed")
    import httpx

    from bulkhead.daemon.testkit import spawn_daemon

    root = tmp_path / "s"
    Harness(root).close()
    proc, info = spawn_daemon(root, extra_env={"BULKHEAD_DEV_SKIP_INTEGRITY": "1"}, extra_args=["--dev-tpm"])
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=info["socket"]), base_url="http://bulkheadd") as c:
            st = c.get("/v1/integrity").json()
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0].decode()
    assert st["mode"] == "tpm" and st["state"] == "untrusted", st
    assert any("(manifest)" in r and "not allowed" in r for r in st["reasons"]), st["reasons"]
    assert st["code"]["skipped"] is True
    assert "INTEGRITY CHECK SKIPPED" in out and "enrolled the development TPM" in out
    policy = json.loads((root / "integrity" / "policy.json").read_text())
    assert policy["allowed"]["manifest"] == []  # an unverified install is never a golden value
    events = [json.loads(x) for x in (root / "integrity" / "events.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in events] == ["manifest", "config"]


@pytest.mark.kvm
@tpm_needed
def test_demo_guest_starts_through_the_daemon_on_an_attested_host(tmp_path: Path) -> None:
    """The positive path end to end: attested host, pinned launch digest in the policy, the shipped demo
    guest boots through the daemon's process backend and its launch is in the TPM event log."""
    from bulkhead.daemon.backend import ProcessBackend

    try:
        from bulkhead.guests.build import build

        image = build("demo.c")
    except Exception as exc:  # no gcc/ld
        pytest.skip(f"cannot build the demo guest: {exc}")
    e = TpmEnv(tmp_path, backend=ProcessBackend())
    try:
        h = e.h
        shutil.copy(image, h.root / "images" / "demo")
        t = h.tenant("e2e")
        body = {"tenant": t, "name": "demo", "kernel": "demo", "cpus": 1, "mem_mib": 128,
                "cmdline": "console=ttyS0 demo=1"}
        with h.client() as c:
            probe = c.post("/v1/vms", json={**body, "name": "probe"}).json()["id"]
            digest = c.get(f"/v1/vms/{probe}/measurement").json()["digest"]
            e.allow(digest)
            vm = c.post("/v1/vms", json={**body, "expected_digest": digest}).json()["id"]
            assert e.integrity()["state"] == "trusted"
            r = c.post(f"/v1/vms/{vm}/start")
            assert r.status_code == 200 and r.json()["state"] == "running", r.text
            assert _wait_for(lambda: c.get(f"/v1/vms/{vm}").json()["state"] == "exited", 90)
            console = c.get(f"/v1/vms/{vm}/console").json()["data"]
            assert "Goodbye." in console
        log = [json.loads(x) for x in (e.dir / "events.jsonl").read_text().splitlines()]
        assert log[-1]["kind"] == "vm-launch" and log[-1]["digest"] == digest
        assert h.daemon.integrity.gate.attest_now().trusted
    finally:
        e.close()


def test_cli_vm_measurement_expected_digest_and_integrity_status(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from bulkhead.daemon.cli import integrity_main, tenant_main, vm_main
    from bulkhead.daemon.testkit import spawn_daemon

    root = tmp_path / "s"
    Harness(root).close()
    (root / "images" / "vmlinux").write_bytes(fake_kernel(b"cli kernel"))
    proc, info = spawn_daemon(root)
    sock = ["--socket", info["socket"]]
    try:
        assert tenant_main(["create", "acme", *sock]) == 0
        assert vm_main(["create", "--tenant", "acme", "--name", "probe", "--kernel", "vmlinux", "--mem", "64",
                        *sock]) == 0
        capsys.readouterr()
        assert vm_main(["measurement", "probe", "--json", *sock]) == 0
        m = json.loads(capsys.readouterr().out)
        assert len(m["digest"]) == 64 and m["components"]["mem_mib"] == 64
        assert vm_main(["create", "--tenant", "acme", "--name", "pinned", "--kernel", "vmlinux", "--mem", "64",
                        "--expected-digest", m["digest"].upper(), "--json", *sock]) == 0
        assert json.loads(capsys.readouterr().out)["expected_digest"] == m["digest"]
        assert vm_main(["create", "--tenant", "acme", "--name", "bad", "--kernel", "vmlinux",
                        "--expected-digest", "not-a-digest", *sock]) == 1
        assert "expected_digest" in capsys.readouterr().err
        (root / "images" / "vmlinux").write_bytes(b"\x7fELF swapped")
        assert vm_main(["start", "pinned", *sock]) == 1
        assert "differs from the expected digest" in capsys.readouterr().err
        assert integrity_main(["status", "--json", *sock]) == 1  # off is not trusted
        assert json.loads(capsys.readouterr().out)["state"] == "off"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


@tpm_needed
def test_clean_install_attests_through_bulkhead_serve(tmp_path: Path) -> None:
    """The operator's flow with the real `bulkhead serve`: signed manifest, a TPM given with --tpm, an
    enrollment, a policy made from the daemon's own event log (`attest policy-init`); after a restart the
    host is trusted, and a VM whose launch digest is added to the policy starts (fake backend)."""
    pytest.importorskip("tpm2_pytss", reason="tpm2-pytss (and libtss2) not installed")
    import httpx

    from bulkhead.daemon.testkit import wait_serve_info
    from bulkhead.integrity.cli import attest_main
    from bulkhead.integrity.tpm import SwTpm

    _, env = _signed_copy(tmp_path)
    state = tmp_path / "state"
    Harness(state).close()
    (state / "images" / "vmlinux").write_bytes(fake_kernel(b"clean install kernel"))
    integ = state / "integrity"
    integ.mkdir()
    sw = SwTpm(str(tmp_path / "tpm")).start()
    try:
        assert attest_main(["enroll", "--tcti", sw.tcti, "-o", str(integ / "enrollment.json")]) == 0
        assert attest_main(["policy-init", "--enrollment", str(integ / "enrollment.json"),
                            "-o", str(integ / "policy.json")]) == 0  # nothing allowed yet

        def serve() -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
            p = subprocess.Popen([sys.executable, "-m", "bulkhead", "serve", "--state-dir", str(state), "--port", "0",
                                  "--backend", "fake", "--tpm", sw.tcti], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, env=env, cwd=str(state))
            return p, wait_serve_info(state, p)

        def stop(p: subprocess.Popen[bytes]) -> None:
            p.send_signal(signal.SIGTERM)
            p.communicate(timeout=30)

        proc, info = serve()
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=info["socket"]), base_url="http://b") as c:
                st = c.get("/v1/integrity").json()
                assert st["state"] == "untrusted" and st["code"]["verified"] is True
        finally:
            stop(proc)
        # golden values from the daemon's own measurements, as an operator would at provisioning
        assert attest_main(["policy-init", "--enrollment", str(integ / "enrollment.json"),
                            "--log", str(integ / "events.jsonl"), "-o", str(integ / "policy.json")]) == 0
        proc, info = serve()
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=info["socket"]), base_url="http://b") as c:
                st = c.get("/v1/integrity").json()
                assert st["state"] == "trusted" and st["mode"] == "tpm", st["reasons"]
                t = c.post("/v1/tenants", json={"name": "acme"}).json()["id"]
                vm = c.post("/v1/vms", json={"tenant": t, "name": "web", "kernel": "vmlinux"}).json()["id"]
                assert c.post(f"/v1/vms/{vm}/start").status_code == 409  # not a golden value yet
                policy = json.loads((integ / "policy.json").read_text())
                policy["allowed"]["vm-launch"].append(c.get(f"/v1/vms/{vm}/measurement").json()["digest"])
                (integ / "policy.json").write_text(json.dumps(policy))
                r = c.post(f"/v1/vms/{vm}/start")
                assert r.status_code == 200 and r.json()["state"] == "running", r.text
                assert c.get("/v1/integrity").json()["state"] == "trusted"
        finally:
            stop(proc)
    finally:
        sw.cleanup()
