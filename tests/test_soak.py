"""The stateful soak, short version (issue 12 point 7): a real `bulkhead serve` (jail backend, host
networks, dev TPM, attested) driven for about a minute by three mTLS clients and the root socket at once,
a pure model predicting every answer, invariants after every round (daemon up, lists = model, every
acknowledged request audited, `audit verify`, host objects = model), and each fault kind injected once
(SIGKILL of dnsmasq, a worker, swtpm, the daemon; ENOSPC on the state filesystem; locked state.db and
audit.db; a vanished tap). The long version is bench/soak.py. The seed is printed; rerun a failure with
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
    for tool in ("swtpm", "dnsmasq", "nft", "gcc", "tpm2_dictionarylockout"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    pytest.importorskip("tpm2_pytss", reason="tpm2-pytss (and libtss2) not installed")


def test_soak_with_every_fault_kind(tmp_path: Path) -> None:
    _needs()
    from soak_driver import FAULTS, Soak

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
