"""Every fuzz harness's seed corpus and every input kept in fuzz/regressions/<harness>/ (inputs that once
crashed a harness or showed a behaviour worth pinning) runs through the harness target without an
exception: the fuzzers' findings stay fixed. Runs without atheris instrumentation, in seconds."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
FUZZ = ROOT / "fuzz"
NOT_HARNESSES = {"fuzz_virtio_common.py"}
CORPUS = {"boot_images": "boot"}

NO_SEEDS = {"integrity_evidence", "integrity_wire"}  # their owner ships no seed corpus (yet)
HARNESSES = sorted(p for p in FUZZ.glob("fuzz_*.py") if p.name not in NOT_HARNESSES)


def _load(path: Path) -> Any:
    atheris = pytest.importorskip("atheris")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(atheris, "instrument_imports", lambda *a, **k: contextlib.nullcontext())
        mp.syspath_prepend(str(FUZZ))
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
    return module


def _inputs(name: str) -> list[Path]:
    dirs = [FUZZ / "corpus" / CORPUS.get(name, name), FUZZ / "regressions" / name]
    return [f for d in dirs if d.is_dir() for f in sorted(d.iterdir()) if f.is_file()]


def test_there_is_a_harness_per_parsing_area() -> None:
    names = {p.stem for p in HARNESSES}
    assert {"fuzz_boot_images", "fuzz_virtio_queue", "fuzz_worker_protocol", "fuzz_api_models"} <= names


@pytest.mark.parametrize("path", HARNESSES, ids=lambda p: p.stem)
def test_corpus_and_regressions_replay_cleanly(path: Path) -> None:
    name = path.stem.removeprefix("fuzz_")
    module = _load(path)
    target = getattr(module, "TestOneInput", None) or module.run
    inputs = _inputs(name)
    assert inputs or name in NO_SEEDS, f"{path.name} has no seed corpus in fuzz/corpus"
    for f in inputs:
        target(f.read_bytes())  # raises on a regression


def test_audit_verifier_findings_are_pinned() -> None:
    """From fuzz_audit_verify: an empty log with no signed head used to verify (issue 12 hole 5). It is
    now a seed whose verdict is a failure (the harness asserts the verdict)."""
    files = {f.name for f in _inputs("audit_verify")}
    assert "empty_log_no_head" in files
