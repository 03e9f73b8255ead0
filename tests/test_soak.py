"""The stateful soak, short version (issue 12 point 7): a real `bulkhead serve` (jail backend, host
networks, dev TPM, attested) driven for about a minute by three mTLS clients and the root socket at once,
a pure model predicting every answer, invariants after every round (daemon up, lists = model, every
acknowledged request audited, `audit verify`, host objects = model), and each fault kind injected once
(SIGKILL of dnsmasq, a worker, swtpm, the daemon; ENOSPC on the state filesystem; locked state.db and
audit.db, also while the clients run; ENOSPC while the clients run; a vanished tap). The long version is bench/soak.py. The seed is printed; rerun a failure with
BULKHEAD_SOAK_SEED=<seed>.

Model, driver and world: tests/soak_model.py, tests/soak_driver.py, tests/soak_world.py.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.kvm, pytest.mark.timeout(240)]


def _needs() -> None:
    for tool in ("swtpm", "dnsmasq", "nft", "gcc"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    pytest.importorskip("tpm2_pytss", reason="tpm2-pytss (and libtss2) not installed")


def test_soak_with_every_fault_kind(tmp_path: Path) -> None:
    _needs()
    from soak_driver import CI_FAULTS as FAULTS
    from soak_driver import Soak

    seed = int(os.environ.get("BULKHEAD_SOAK_SEED") or random.SystemRandom().randrange(1 << 31))
    print(f"soak seed {seed} (rerun: BULKHEAD_SOAK_SEED={seed})")
    soak = Soak(tmp_path / "soak", seed, actors=3, ops_per_round=10, log=lambda *a: print(*a, flush=True))
    try:
        soak.setup()
        soak.run(75, faults=FAULTS)
        # every fault kind at least once, even where the time ran out first
        for kind in FAULTS:
            if not soak.stats.violations and not soak.stats.faults[kind]:
                soak.rounds += 1
                from soak_model import run_threads

                run_threads(soak.all_actors(), soak.ops_per_round)
                soak.fault(kind)
    finally:
        report = soak.report()
        print(json.dumps(report, indent=1))
        soak.close()
    assert not report["violations"], f"seed {seed}: " + "\n".join(report["violations"])
    assert report["operations"] >= 200, report["operations"]
    injectable = {"dnsmasq", "lock-state", "lock-audit", "enospc", "swtpm", "daemon"}
    assert injectable <= {k for k, n in report["faults"].items() if n}, report["faults"]
    assert report["invariants"]["host-objects"] >= 5 and report["invariants"]["audit-verify"] >= 5


def test_a_change_refused_on_a_full_disk_changes_nothing(tmp_path: Path) -> None:
    """Fail closed means a 503 changed nothing, on the host too: the state filesystem is left with k free
    pages (k = 1..24, so the disk fills between the VM's vm.start record and the request's own record),
    then a VM start; and a network create on a full disk. Every refusal is a 503 with a kind (never a
    500: soak finding B), and a refused start leaves no worker (finding A)."""
    _needs()
    from soak_world import World

    w = World(tmp_path / "w", "x" + os.urandom(1).hex())
    try:
        w.setup()
        a = w.root_api()
        t = a.call("POST", "/tenants", {"name": "acme"}).body["id"]
        vm = a.call("POST", "/vms", {"tenant": t, "name": "v", "kernel": "idle", "mem_mib": 8}).body["id"]
        w.allow_launch(a.call("GET", f"/vms/{vm}/measurement").body["digest"])
        bad = []
        for k in range(1, 25):
            ballast = w.fill_disk()
            os.truncate(ballast, max(0, ballast.stat().st_size - k * 4096))
            r = a.call("POST", f"/vms/{vm}/start")
            ballast.unlink()
            running = bool(w.observe({vm})["workers"])
            if r.status not in (200, 503) or (r.status == 503 and not r.body.get("kind")):
                bad.append(f"{k} free pages: start answered {r.status} {r.body} (want 200, or 503 with a kind)")
            if r.status != 200 and running:
                bad.append(f"{k} free pages: start answered {r.status} {r.body} and the worker runs")
            if running or r.status == 200:
                a.call("POST", f"/vms/{vm}/stop")
        ballast = w.fill_disk()
        r = a.call("POST", f"/tenants/{t}/networks", {"name": "lan", "ipv4_subnet": "10.77.0.0/24"})
        ballast.unlink()
        if r.status != 201 and w.observe(set())["netns"]:
            bad.append(f"network create answered {r.status} and its namespace exists: {w.observe(set())['netns']}")
        a.close()
        assert not bad, bad
    finally:
        w.teardown()
