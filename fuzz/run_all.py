"""Run every atheris harness fuzz/fuzz_*.py for a fixed time and summarise (used by `make fuzz`).

Each harness runs as its own process: libFuzzer with -max_total_time=SECONDS, a working corpus in
WORK/<name> (new inputs go there, never into the repo) seeded from fuzz/corpus/<dir>, crash artifacts
in WORK/artifacts/. The summary (executions, final coverage counters, crashes) is printed as a table
and written to WORK/summary.json. Exit status 1 when any harness crashed or failed to start.

Usage: .venv/bin/python fuzz/run_all.py [--seconds N] [--work DIR] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

FUZZ_DIR = Path(__file__).resolve().parent
NOT_HARNESSES = {"fuzz_virtio_common.py"}
# Harness name (without "fuzz_") -> seed corpus directory under fuzz/corpus, when it differs.
CORPUS = {"boot_images": "boot"}
_DONE = re.compile(r"Done (\d+) runs in (\d+) second")
_STAT = re.compile(r"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)")


def harnesses() -> list[Path]:
    return sorted(p for p in FUZZ_DIR.glob("fuzz_*.py") if p.name not in NOT_HARNESSES)


def seed_dir(name: str) -> Path | None:
    d = FUZZ_DIR / "corpus" / CORPUS.get(name, name)
    return d if d.is_dir() else None


def run_one(path: Path, seconds: int, work: Path) -> dict[str, object]:
    name = path.stem.removeprefix("fuzz_")
    corpus = work / name
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts = work / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        str(path),
        f"-max_total_time={seconds}",
        "-timeout=10",
        "-rss_limit_mb=3072",
        f"-artifact_prefix={artifacts}/{name}-",
        "-print_final_stats=1",
        str(corpus),
    ]
    seeds = seed_dir(name)
    if seeds is not None:
        cmd.append(str(seeds))
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=seconds + 300)
    elapsed = time.monotonic() - start
    log = proc.stdout + proc.stderr
    (work / f"{name}.log").write_text(log)
    done = _DONE.search(log)
    stats = _STAT.findall(log)
    execs = int(done.group(1)) if done else (int(stats[-1][0]) if stats else 0)
    return {
        "harness": path.name,
        "seconds": round(elapsed, 1),
        "executions": execs,
        "cov": int(stats[-1][1]) if stats else None,
        "features": int(stats[-1][2]) if stats else None,
        "corpus": int(stats[-1][3]) if stats else None,
        "seeds": str(seeds.relative_to(FUZZ_DIR.parent)) if seeds else None,
        "status": proc.returncode,
        "crashed": proc.returncode != 0,
        "log": str(work / f"{name}.log"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--work", default="/tmp/bulkhead-fuzz")
    ap.add_argument("--only", nargs="*", default=None, help="harness names (e.g. serial boot_images)")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for path in harnesses():
        if args.only and path.stem.removeprefix("fuzz_") not in args.only:
            continue
        r = run_one(path, args.seconds, work)
        results.append(r)
        flag = "CRASH" if r["crashed"] else "ok"
        print(
            f"{r['harness']:<30} {flag:<5} execs={r['executions']:<9} cov={r['cov']} ft={r['features']} "
            f"corpus={r['corpus']} ({r['seconds']} s)",
            flush=True,
        )
    (work / "summary.json").write_text(json.dumps(results, indent=1) + "\n")
    crashed = [r["harness"] for r in results if r["crashed"]]
    if crashed:
        print(f"crashes (see {work}/artifacts and the logs): {', '.join(map(str, crashed))}")
        return 1
    print(f"{len(results)} harnesses, no crash; summary in {work}/summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
