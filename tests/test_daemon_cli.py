"""`bulkhead init` and CLI error handling without a running daemon: files and modes, refusing to
re-initialize, one-line errors with the documented exit statuses, table rendering."""

from __future__ import annotations

import os
import stat

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bulkhead.cli import main
from bulkhead.daemon.cli import init_main, table, vm_main
from bulkhead.daemon.store import Store


def test_init_creates_the_ca_certificates_and_keys(tmp_path, capsys):
    root = tmp_path / "s"
    assert init_main(["--state-dir", str(root), "--admin-name", "ops", "--host", "10.0.0.5"]) == 0
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    for key in ("ca.key", "server.key", "admin.key", "audit.key"):
        assert stat.S_IMODE(os.stat(root / key).st_mode) == 0o600, key
    ca = x509.load_pem_x509_certificate((root / "ca.pem").read_bytes())
    srv = x509.load_pem_x509_certificate((root / "server.pem").read_bytes())
    adm = x509.load_pem_x509_certificate((root / "admin.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert srv.issuer == ca.subject and adm.issuer == ca.subject
    ca.public_key().verify(adm.signature, adm.tbs_certificate_bytes, ec.ECDSA(adm.signature_hash_algorithm))
    sans = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "10.0.0.5" in [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    assert adm.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "ops"
    store = Store(root / "state.db")
    row = store.q1("SELECT p.name, r.name AS role, a.scope FROM assignments a JOIN principals p ON p.id = a.principal_id "
                   "JOIN roles r ON r.id = a.role_id WHERE p.name = 'ops'")
    assert tuple(row) == ("ops", "Owner", "/")
    assert {r.name for r in store.roles()} == {"Owner", "Contributor", "Reader", "VM Operator", "Auditor", "Monitoring Reader"}
    store.close()
    capsys.readouterr()
    assert init_main(["--state-dir", str(root)]) == 2
    assert "already initialized" in capsys.readouterr().err
    assert init_main(["--state-dir", str(root), "--force"]) == 0
    assert x509.load_pem_x509_certificate((root / "ca.pem").read_bytes()).serial_number != ca.serial_number


def test_cli_errors_are_one_line_with_exit_status(tmp_path, capsys):
    assert vm_main(["create", "--name", "x", "--state-dir", str(tmp_path)]) == 2  # --tenant missing
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tenant" in err
    assert vm_main(["list", "--state-dir", str(tmp_path)]) == 3  # unreachable (bulkhead.exitstatus)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "bulkhead.sock") in err
    assert vm_main(["list", "--socket", str(tmp_path / "nowhere.sock")]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "nowhere.sock") in err
    assert main(["serve", "--state-dir", str(tmp_path / "missing"), "--port", "0"]) == 4
    assert "not an initialized" in capsys.readouterr().err


def test_table_rendering():
    out = table([{"id": "a", "n": None, "l": ["x", "y"]}, {"id": "b" * 50, "n": 3, "l": []}], ["id", "n", "l"])
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "N", "L"]
    assert lines[1].split() == ["a", "-", "x,y"]
    assert lines[2].startswith("b" * 37 + "...")
