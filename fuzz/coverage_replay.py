"""Replay every harness's corpus (seeds + what the last `make fuzz` found) through its target once,
without atheris instrumentation, so coverage.py can measure which lines the fuzzers reach.

Usage (the numbers in docs/ASSURANCE.md come from this):
    .venv/bin/python -m coverage run --branch --source=bulkhead fuzz/coverage_replay.py --work /tmp/bulkhead-fuzz
    .venv/bin/python -m coverage report --include='*/bulkhead/devices/*,*/bulkhead/boot/*'

An input that raises is counted and printed (a crash the fuzzer also reports); the exit status is 1
then. Harness entry points: TestOneInput, else run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

FUZZ_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(FUZZ_DIR))
sys.path.insert(0, str(FUZZ_DIR.parent / "src"))

from run_all import harnesses, seed_dir  # noqa: E402


def _load(path: Path) -> Any:
    import atheris

    atheris.instrument_imports = lambda *a, **k: contextlib.nullcontext()  # plain bytecode for coverage
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/bulkhead-fuzz", help="corpus directories of the last run")
    args = ap.parse_args(argv)
    failures = 0
    for path in harnesses():
        name = path.stem.removeprefix("fuzz_")
        module = _load(path)
        target = getattr(module, "TestOneInput", None) or module.run
        dirs = [
            d
            for d in (seed_dir(name), FUZZ_DIR / "regressions" / name, Path(args.work) / name)
            if d is not None and d.is_dir()
        ]
        files = [f for d in dirs for f in sorted(d.iterdir()) if f.is_file()]
        bad = 0
        for f in files:
            try:
                target(f.read_bytes())
            except Exception as exc:
                bad += 1
                print(f"  {path.name}: {f}: {type(exc).__name__}: {exc}")
        failures += bad
        print(f"{path.name:<30} inputs={len(files):<6} crashes={bad}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
