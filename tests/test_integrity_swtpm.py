"""The development TPM against real swtpm processes: the AK survives dictionary-attack lockout (noDA), a
swtpm dies with a SIGKILLed parent, a stale one on the same state directory is stopped first, and two
swtpms starting at once never end up answering on the same port (issue 12, soak findings C and D).

Each test starts its own swtpm(s) in a temp dir and stops them afterwards.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("tpm2_pytss", reason="tpm2-pytss (and libtss2) not installed")
if shutil.which("swtpm") is None:
    pytest.skip("swtpm is not installed", allow_module_level=True)

from bulkhead.integrity import tpm as tpm_mod
from bulkhead.integrity.errors import TpmError
from bulkhead.integrity.tpm import SwTpm, Tpm

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[SwTpm]:
    sw = SwTpm(str(tmp_path / "tpm")).start()
    yield sw
    sw.cleanup()


def _alive(pid: int) -> bool:
    try:
        st = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return st.rsplit(")", 1)[1].split()[0] != "Z"


def _lock_out(tcti: str) -> None:
    """The attack: drive the TPM into dictionary-attack lockout (TPM 2.0 Part 1 §19.8) with one failed
    authorization of a DA-protected key, maxTries = 1."""
    import tpm2_pytss as t

    ctx = t.ESAPI(t.TCTILdr(*tcti.split(":", 1)))
    try:
        ctx.dictionary_attack_parameters(1, 3600, 3600)
        attrs = (t.TPMA_OBJECT.FIXEDTPM | t.TPMA_OBJECT.FIXEDPARENT | t.TPMA_OBJECT.SENSITIVEDATAORIGIN
                 | t.TPMA_OBJECT.USERWITHAUTH | t.TPMA_OBJECT.SIGN_ENCRYPT)
        template = t.TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256:null", objectAttributes=attrs)
        sens = t.TPM2B_SENSITIVE_CREATE(t.TPMS_SENSITIVE_CREATE(userAuth=t.TPM2B_AUTH(b"right")))
        key, _, _, _, _ = ctx.create_primary(sens, template, t.ESYS_TR.OWNER)
        ctx.tr_set_auth(key, b"wrong")
        scheme = t.TPMT_SIG_SCHEME(scheme=t.TPM2_ALG.ECDSA)
        scheme.details.any.hashAlg = t.TPM2_ALG.SHA256
        ticket = t.TPMT_TK_HASHCHECK(tag=t.TPM2_ST.HASHCHECK, hierarchy=t.TPM2_RH.NULL)
        with pytest.raises(t.TSS2_Exception):
            ctx.sign(key, b"\0" * 32, scheme, ticket)
        ctx.tr_set_auth(key, b"right")  # the right password is refused now too: the TPM is locked out
        with pytest.raises(t.TSS2_Exception, match="lockout"):
            ctx.sign(key, b"\0" * 32, scheme, ticket)
        ctx.flush_context(key)
    finally:
        ctx.close()


def test_the_ak_still_quotes_when_the_tpm_is_in_dictionary_attack_lockout(swtpm: SwTpm) -> None:
    _lock_out(swtpm.tcti)
    with Tpm(swtpm.tcti) as tpm:
        attest, sig = tpm.quote([14, 15], b"nonce-after-lockout")
        assert attest and sig
        from bulkhead.integrity.tpmwire import parse_public

        assert parse_public(tpm.ak_public()).attributes & 0x400, "the AK must carry TPMA_OBJECT.noDA (bit 10)"


def test_an_ak_without_noda_is_locked_out(swtpm: SwTpm) -> None:
    """The control: the same AK template without noDA cannot quote in lockout (what happened before)."""
    import tpm2_pytss as t

    _lock_out(swtpm.tcti)
    ctx = t.ESAPI(t.TCTILdr(*swtpm.tcti.split(":", 1)))
    try:
        attrs = (t.TPMA_OBJECT.FIXEDTPM | t.TPMA_OBJECT.FIXEDPARENT | t.TPMA_OBJECT.SENSITIVEDATAORIGIN
                 | t.TPMA_OBJECT.USERWITHAUTH | t.TPMA_OBJECT.RESTRICTED | t.TPMA_OBJECT.SIGN_ENCRYPT)
        template = t.TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256:null", objectAttributes=attrs)
        ak, _, _, _, _ = ctx.create_primary(None, template, t.ESYS_TR.ENDORSEMENT)
        with pytest.raises(t.TSS2_Exception, match="lockout"):
            ctx.quote(ak, "sha256:14", t.TPM2B_DATA(b"n"))
    finally:
        ctx.close()


_CHILD = """
import sys, time
sys.path.insert(0, {src!r})
from bulkhead.integrity.tpm import SwTpm
sw = SwTpm({state!r}).start()
print(sw.proc.pid, flush=True)
time.sleep(600)
"""


def test_a_swtpm_dies_with_its_sigkilled_parent_and_the_next_one_starts(tmp_path: Path) -> None:
    state = str(tmp_path / "devtpm")
    child = subprocess.Popen([sys.executable, "-c", _CHILD.format(src=SRC, state=state)], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout is not None
        pid = int(child.stdout.readline())
        assert _alive(pid)
        child.send_signal(signal.SIGKILL)  # the attack: the daemon dies without any cleanup
        child.wait()
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), "swtpm outlived its SIGKILLed parent"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    with SwTpm(state) as sw, Tpm(sw.tcti) as tpm:  # same state dir: not locked by a leftover
        assert tpm.quote([14], b"n")[0]


def test_a_stale_swtpm_left_on_the_state_dir_is_stopped_first(tmp_path: Path) -> None:
    state = tmp_path / "devtpm"
    state.mkdir()
    port = tpm_mod._free_port_pair()
    stale = subprocess.Popen(  # started by "an earlier daemon", without PDEATHSIG: still holds the state lock
        ["swtpm", "socket", "--tpm2", "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
         "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1", "--tpmstate", f"dir={state}",
         "--pid", f"file={state / 'swtpm.pid'}", "--flags", "startup-clear,not-need-init"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 5
        while not (state / "swtpm.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        with SwTpm(str(state)) as sw, Tpm(sw.tcti) as tpm:
            assert stale.wait(timeout=5) is not None
            assert tpm.quote([14], b"n")[0]
    finally:
        if stale.poll() is None:
            stale.kill()
        stale.wait()


def test_a_port_taken_between_choice_and_bind_never_yields_another_processes_tpm(
        swtpm: SwTpm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race of two dev TPMs starting at once, forced: the second is handed the port the first just
    took. Before, its readiness check connected to the *first* swtpm and returned its TCTI."""
    real = tpm_mod._free_port_pair
    calls: list[int] = []

    def racy() -> int:
        calls.append(1)
        return swtpm.port if len(calls) == 1 else real()

    monkeypatch.setattr(tpm_mod, "_free_port_pair", racy)
    second = SwTpm(str(tmp_path / "second")).start()
    try:
        assert second.port != swtpm.port and len(calls) >= 2
        assert tpm_mod._listens(second.proc.pid if second.proc else -1, second.port)
        with Tpm(swtpm.tcti) as a, Tpm(second.tcti) as b:
            assert a.ek_public() != b.ek_public()  # two TPMs, not one reached twice
    finally:
        second.cleanup()


def test_a_fixed_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(TpmError, match="could not listen"):
            SwTpm(str(tmp_path / "t"), port=int(s.getsockname()[1])).start(timeout=5)
