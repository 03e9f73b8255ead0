"""CI fast check of the mutation-score floors (issue 15).

`bench/mutation.py --ci` against the committed full report (bench/results/mutation.json, written by
`make mutation`): a row whose module and tests are unchanged is rescored from its recorded statuses
with the current reviewed equivalents (no run); a row whose tests changed reruns every mutant those
test files killed in the report (so a deleted or weakened test shows) plus its fixed-seed sample
(seed 15); a row whose module changed runs its fixed-seed sample. A row the report holds as a sample
reruns that sample when anything changed, and a sampled mutant the report has as killed that now survives
fails as a regression. One child process per mutant, renice 19. A module below its floor fails,
listing the surviving mutants with their diffs.
A row that is not "active" is reported PENDING (a visible skip with its reason).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from mutation import MODULES  # noqa: E402

SEED = 15


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    out = tmp_path_factory.mktemp("mutation") / "sample.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "mutation.py"), "--ci",
                        "--seed", str(SEED), "--json", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    if not out.exists():
        pytest.fail(f"bench/mutation.py failed (exit {r.returncode}):\n{r.stdout}\n{r.stderr[-3000:]}")
    return {m["name"]: m for m in json.loads(out.read_text())["modules"]}


@pytest.mark.slow
@pytest.mark.timeout(900)  # a stale report reruns mutants; unchanged, the check takes seconds
@pytest.mark.parametrize("row", MODULES, ids=[r["name"] for r in MODULES])
def test_mutation_score_is_at_or_above_the_floor(row: dict[str, Any], sample: dict[str, dict[str, Any]]) -> None:
    if row["status"] != "active":
        pytest.skip(f"PENDING {row['name']} (floor {row['floor']}%): {row['status'].removeprefix('pending: ')}")
    r = sample[row["name"]]
    assert not r["baseline_failed"], f"tests fail without any mutant: {r['baseline_failed']}"
    lost = "\n".join(f"{g['at']} (killed by {g['was_killed_by']} in the report)\n{g['diff']}" for g in r.get("regressions", []))
    assert not lost, (
        f"{row['path']}: mutants the committed report has as killed now survive ({r.get('ci')}): a test that "
        f"killed them was removed or weakened. Restore it, or rerun `make mutation` and commit the report "
        f"if the change is intended:\n{lost}")
    survivors = "\n".join(f"{s['at']}\n{s['diff']}" for s in r["survivors"])
    assert r["score"] >= row["floor"], (
        f"{row['path']}: mutation score {r['score']}% < floor {row['floor']}% "
        f"({r['killed']} of {r['mutants_run'] - r['equivalent'] - r['skipped']} mutants killed; {r.get('ci')}, "
        f"seed {SEED}). Kill these with a test of real behaviour, or review them as equivalent in "
        f"security/equivalent-mutants.json:\n{survivors}")
