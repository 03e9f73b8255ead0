"""Every generated nftables table is accepted by the real `nft` parser (`nft -c -f`, check mode, in a
throwaway network namespace so no host state is touched), and the host and tenant tables hold exactly
the rules network/rules.py's docstring promises (issue 15 mutation survivors)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from tests.test_network_model import CFG, scenario

from bulkhead.network.rules import guard_table, host_table, render, tenant_table
from bulkhead.network.state import desired_state

pytestmark = pytest.mark.skipif(shutil.which("nft") is None or shutil.which("unshare") is None,
                                reason="needs nft and unshare (util-linux)")


def nft_check(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["unshare", "-n", "nft", "-c", "-f", "-"], input=script, text=True,
                          capture_output=True, timeout=60)


@pytest.mark.parametrize("egress", [True, False])
def test_every_desired_table_parses_in_nft(egress):
    nets, nics = scenario(egress=egress)
    tables = desired_state(nets, nics, CFG).tables
    assert tables
    for t in tables:
        r = nft_check(render(t, {c: (3, 300) for c in t.counters[:1]}))
        assert r.returncode == 0, f"{t.family} {t.name}:\n{r.stderr}\n{render(t)}"
    empty = [guard_table("x", "bt", []), tenant_table("x", "bt", [], None)]
    for t in empty:
        r = nft_check(render(t))
        assert r.returncode == 0, f"{t.family} {t.name}:\n{r.stderr}"
    assert nft_check(render(empty[0]).replace("  }", "  ", 1)).returncode != 0  # the check can fail


def test_counters_start_at_zero_or_at_the_carried_values():
    t = host_table("bt", ["btu1"], "100.64.0.0/16")
    text = render(t)
    assert [ln.strip() for ln in text.splitlines() if ln.strip().startswith("counter ")] == [
        "counter to_host { packets 0 bytes 0 }", "counter cross_tenant { packets 0 bytes 0 }",
        "counter inbound { packets 0 bytes 0 }"]
    assert "counter inbound { packets 5 bytes 9 }" in render(t, {"inbound": (5, 9)})
    assert text.endswith("  }\n}\n")


def test_host_table_rules_known_answer():
    body = host_table("bt", ["btu2", "btu1"], "100.64.0.0/16").body
    names = '{ "btu1", "btu2" }'
    for line in (f'iifname {names} counter name "to_host" drop',
                 f'iifname {names} oifname {names} counter name "cross_tenant" drop',
                 f"oifname {names} ct state established,related accept",
                 f'oifname {names} counter name "inbound" drop',
                 f"ip saddr 100.64.0.0/16 oifname != {names} masquerade"):
        assert f"    {line}\n" in body + "\n", line


def test_tenant_table_rules_known_answer():
    nets, _ = scenario(egress=True)
    t = tenant_table("ns", "bt", [("btb1", nets[0])], "btu1")
    lines = [ln.strip() for ln in t.body.splitlines()]
    assert lines[:3] == ["chain input {", "type filter hook input priority 0; policy drop;", 'iif "lo" accept']
    assert 'iifname { "btb1" } udp dport 67 accept' in lines
    assert 'counter name "to_host" drop' in lines and 'counter name "forward" drop' in lines
    assert 'iifname "btu1" ct state established,related accept' in lines
    assert 'iifname { "btb1" } oifname "btu1" accept' in lines
    assert 'oifname "btu1" masquerade' in lines
    assert t.counters == ("to_host", "forward")
    closed = [ln.strip() for ln in tenant_table("ns", "bt", [("btb1", nets[0])], None).body.splitlines()]
    assert not any("masquerade" in ln or "btu1" in ln for ln in closed)
