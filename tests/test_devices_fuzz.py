"""The device fuzz harnesses: every seed runs clean, and each harness runs under atheris."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _harness(name: str) -> ModuleType:
    pytest.importorskip("atheris")
    spec = importlib.util.spec_from_file_location(f"fuzz_{name}", ROOT / "fuzz" / f"fuzz_{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["serial", "i8042"])
def test_seed_corpus_runs_clean(name: str) -> None:
    harness = _harness(name)
    seeds = sorted((ROOT / "fuzz" / "corpus" / name).iterdir())
    assert len(seeds) >= 4
    for seed in seeds:
        harness.run(seed.read_bytes())


def test_serial_harness_detects_a_broken_invariant(monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness is not vacuous: a device that leaks out-of-range values is caught."""
    harness = _harness("serial")
    monkeypatch.setattr(harness.s.Serial, "_read_reg", lambda self, off: 0x1FF)
    with pytest.raises(AssertionError):
        harness.run(bytes([0, 8, 0]))  # one 1-byte read of LSR


@pytest.mark.parametrize("name", ["serial", "i8042"])
def test_harness_runs_under_atheris(name: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "fuzz" / f"fuzz_{name}.py"),
            "-runs=3000",
            str(tmp_path),
            str(ROOT / "fuzz" / "corpus" / name),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Done 3000 runs" in proc.stderr
