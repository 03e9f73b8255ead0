"""Issue 19, polish: `bulkhead -V`, generated shell completion and man page (at no start-time cost),
`bulkhead integrity` without a subcommand, tables without Python reprs and with names instead of UUIDs,
`vm events` not cutting DETAIL, exit 3 for an unreachable daemon."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bulkhead.cli import COMMANDS, main
from bulkhead.daemon.testkit import Harness, ServerThread

ROOT = Path(__file__).resolve().parent.parent


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from bulkhead import __version__

    assert main(["-V"]) == 0 and capsys.readouterr().out == f"bulkhead {__version__}\n"


def test_completion_and_man_page_are_generated_from_the_argparse_tree(tmp_path: Path) -> None:
    from bulkhead.clitree import build_parser
    from bulkhead.clitree import main as tree_main

    tree = build_parser()
    sub = next(a for a in tree._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(sub.choices) == {n for n, (_, _, h) in COMMANDS.items() if not h.startswith("(internal)")}
    out = subprocess.run([sys.executable, "-m", "bulkhead.clitree", "completion", "bash"], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    for word in ("allow-digest", "revoke-digest", "import", "stats", "--expected-digest", "--log-format"):
        assert word in out, word
    assert tree_main(["man", "-o", str(tmp_path / "bulkhead.1")]) == 0
    roff = (tmp_path / "bulkhead.1").read_text()
    assert roff.startswith(".TH BULKHEAD") and "bulkhead image" in roff and "bulkhead serve" in roff


def test_no_start_time_cost() -> None:
    code = ("import sys, bulkhead.cli as c; c.main(['-V']); "
            "bad = [m for m in ('shtab', 'argparse_manpage', 'argparse', 'bulkhead.clitree') if m in sys.modules]; "
            "sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, timeout=60,
                          env={"PYTHONPATH": str(ROOT / "src")}).returncode == 0


def test_integrity_without_subcommand_prints_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["integrity"]) == 2
    out, err = capsys.readouterr()
    assert out.startswith("usage: bulkhead integrity") and "status" in out and "required" not in out + err


def test_tables_show_names_and_no_reprs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    h = Harness(tmp_path / "s")
    try:
        t = h.tenant("acme")
        vm = h.vm(t, "web", cmdline="console=ttyS0 " + "x" * 80)
        with h.client() as c:  # an event whose detail is long
            c.post(f"/v1/vms/{vm}/start")
            c.post(f"/v1/vms/{vm}/stop")
        with ServerThread(h):
            common = ["--socket", str(h.sd.socket)]
            assert main(["vm", "get", "web", *common]) == 0
            out = capsys.readouterr().out
            assert "None" not in out and "[]" not in out and "acme" in out
            assert "x" * 80 in out  # nothing cut in the detail view
            assert main(["vm", "list", *common]) == 0
            out = capsys.readouterr().out
            assert "acme" in out and t not in out  # the tenant's name, not its UUID
            assert main(["vm", "events", "web", *common]) == 0
            out = capsys.readouterr().out
            assert "..." not in out and "root@local" in out  # DETAIL whole, principals by name
            assert main(["vm", "get", "web", "--json", *common]) == 0
            full = json.loads(capsys.readouterr().out)
            assert full["tenant"] == t and full["initrd"] is None  # --json keeps everything
            assert main(["role", "assignments", *common]) == 0
            out = capsys.readouterr().out
            assert "root@local" in out
    finally:
        h.close()


def test_the_api_takes_tenant_names_where_the_cli_does(tmp_path: Path) -> None:
    h = Harness(tmp_path / "s")
    try:
        t = h.tenant("acme")
        other = h.tenant("other")
        eve = h.principal("eve", ("Contributor", f"/tenants/{t}"))
        with h.client(eve) as c:
            r = c.post("/v1/vms", json={"tenant": "acme", "name": "a", "kernel": "vmlinux"})
            assert r.status_code == 201 and r.json()["tenant"] == t
            assert [v["name"] for v in c.get("/v1/vms", params={"tenant": "acme"}).json()] == ["a"]
            # another tenant by name: the same 404 as an unknown one (names do not bypass isolation)
            assert c.post("/v1/vms", json={"tenant": "other", "name": "b", "kernel": "vmlinux"}).status_code == 404
            assert c.post("/v1/vms", json={"tenant": "nope", "name": "b", "kernel": "vmlinux"}).status_code == 404
            assert c.get("/v1/vms", params={"tenant": "other"}).json() == []
        assert other
    finally:
        h.close()


@pytest.mark.skipif(subprocess.run(["bash", "--version"], capture_output=True).returncode != 0, reason="no bash")
def test_bash_completion_completes_subcommands(tmp_path: Path) -> None:
    script = tmp_path / "bulkhead.bash"
    script.write_text(subprocess.run([sys.executable, "-m", "bulkhead.clitree", "completion", "bash"],
                                     capture_output=True, text=True, check=True, timeout=60).stdout)

    def complete(*words: str) -> list[str]:
        line = " ".join(words)
        prog = (f'source {script}; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; '
                f'_shtab_bulkhead bulkhead {words[-1]} {words[-2]}; echo "${{COMPREPLY[@]}}"')
        return subprocess.run(["bash", "-c", prog], capture_output=True, text=True, timeout=30).stdout.split()

    assert complete("bulkhead", "vm", "st") == ["start", "stop", "stats"]
    assert complete("bulkhead", "attest", "policy", "a") == ["allow-digest"]
    assert "import" in complete("bulkhead", "image", "i")


def test_the_api_takes_names_in_tenant_and_principal_paths(tmp_path: Path) -> None:
    h = Harness(tmp_path / "s")
    try:
        t = h.tenant("acme")
        h.tenant("other")
        bob = h.principal("bob", ("Reader", f"/tenants/{t}"))
        with h.client(bob) as c:
            assert c.get("/v1/tenants/acme").json()["id"] == t
            assert c.get("/v1/tenants/acme/disks").status_code == 200
            assert c.get("/v1/tenants/other").status_code == 404  # by name or id: invisible is not found
            assert c.get("/v1/tenants/..%2Fx").status_code in (404, 422)
        with h.client() as c:
            assert c.get("/v1/principals/bob").json()["id"] == bob.principal_id
            assert c.post("/v1/principals/bob/revoke").json()["name"] == "bob"
            assert c.get("/v1/principals/nobody").status_code == 404
    finally:
        h.close()


def test_a_missing_subcommand_names_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["vm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bulkhead vm needs a command: create, list" in err and "cmd" not in err
    assert main(["image"]) == 2
    assert "import, list, delete" in capsys.readouterr().err
