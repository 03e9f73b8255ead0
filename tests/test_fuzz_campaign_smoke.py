"""CI's bounded fuzzing run: every atheris harness in fuzz/ runs for a few seconds from its seed corpus.

A harness failing here (a crash: any exception other than the ones it declares expected, or a hang past
libFuzzer's -timeout) fails CI. Longer campaigns: `make fuzz SECONDS=N` (docs/FUZZING.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HARNESSES = sorted(p for p in (ROOT / "fuzz").glob("fuzz_*.py") if p.stem != "fuzz_virtio_common")
SECONDS = int(os.environ.get("BULKHEAD_FUZZ_SECONDS", "4"))


def test_every_harness_is_listed() -> None:
    assert len(HARNESSES) >= 10, [h.name for h in HARNESSES]


@pytest.mark.parametrize("harness", HARNESSES, ids=lambda p: p.stem)
def test_harness_runs_clean_for_a_bounded_time(harness: Path, tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    corpus = ROOT / "fuzz" / "corpus" / harness.stem.removeprefix("fuzz_")
    args = [sys.executable, str(harness), f"-max_total_time={SECONDS}", "-timeout=20", "-rss_limit_mb=2048"]
    args.append(str(tmp_path))  # libFuzzer writes new inputs into the first corpus directory
    if corpus.is_dir():
        args.append(str(corpus))
    p = subprocess.run(args, capture_output=True, text=True, timeout=SECONDS + 120, cwd=tmp_path)
    tail = (p.stdout + p.stderr)[-3000:]
    assert p.returncode == 0, f"{harness.name} crashed or hung:\n{tail}"
    assert "Done" in tail or "DONE" in tail, tail
