"""Snapshot and restore against bulkhead's own cold start (issue 20 targets), on the default path.

    .venv/bin/python bench/bench_snapshot.py [--runs N] [--touch MiB,...] [--no-jail] [--json OUT]

For each amount of guest memory the guest writes before it waits (bench/payloads/wait_input.c, 128 MiB VM):
1. cold start: `bulkhead run --kernel ...` of the idle guest (touch=0) from exec to the guest's exit, the
   input byte already on stdin;
2. snapshot: the same VM with --snapshot-on-exit, SIGTERM once it printed READY, to the process's exit
   (pause, state, memory scan, encryption, fsync, rename);
3. restore: `bulkhead run --restore FILE --clone` from exec to the guest's exit, the same input waiting.
Cold and restore runs alternate, so noise hits both alike; medians are reported with the ratio
restore/cold (target <= 0.25). The launcher is the installed `bulkhead` (what users run), or
$BULKHEAD_BENCH_LAUNCHER. Jailed when run as root, unless --no-jail.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from bulkhead.guests.build import build  # noqa: E402


def _launcher() -> list[str]:
    env = os.environ.get("BULKHEAD_BENCH_LAUNCHER")
    if env:
        return env.split()
    found = shutil.which("bulkhead")
    return [found] if found else [sys.executable, "-m", "bulkhead"]


def _timed(cmd: list[str], stdin: str = "x") -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=300)
    dt = time.perf_counter() - t0
    if p.returncode != 1 or "GOT x" not in p.stdout:
        raise SystemExit(f"{cmd}: status {p.returncode}\n{p.stdout}\n{p.stderr}")
    return dt


def _snapshot(cmd: list[str], path: Path) -> float:
    """Start, wait for READY, SIGTERM; the time from the signal to the exit (the snapshot's cost)."""
    p = subprocess.Popen([*cmd, "--snapshot-on-exit", str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line.startswith("READY"):
        raise SystemExit(f"guest did not get ready: {line!r} {p.stderr.read() if p.stderr else ''}")
    t0 = time.perf_counter()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    dt = time.perf_counter() - t0
    if p.returncode != 24:
        raise SystemExit(f"snapshot failed: status {p.returncode}: {err}")
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--touch", default="0,112", help="MiB the guest writes before the snapshot (comma list)")
    ap.add_argument("--mem", type=int, default=128)
    ap.add_argument("--no-jail", action="store_true")
    ap.add_argument("--json", metavar="OUT")
    ns = ap.parse_args()
    kernel = build(str(ROOT / "bench" / "payloads" / "wait_input.c"))
    jail = os.geteuid() == 0 and not ns.no_jail
    base = [*_launcher(), "run", "-q", *([] if jail else ["--no-jail"])]
    results: dict[str, object] = {"jailed": jail, "mem_mib": ns.mem, "runs": ns.runs, "launcher": base[0],
                                  "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        key = Path(tmp) / "host.key"
        for touch in (int(t) for t in ns.touch.split(",")):
            boot = [*base, "--kernel", str(kernel), "--mem", str(ns.mem), "--cmdline", f"touch={touch}",
                    "--snapshot-key", str(key)]
            snap = Path(tmp) / f"t{touch}.bhs"
            snaps = [_snapshot(boot, snap) for _ in range(max(3, ns.runs // 2))]
            restore = [*base, "--restore", str(snap), "--clone", "--snapshot-key", str(key)]
            cold, warm = [], []
            idle = [*base, "--kernel", str(kernel), "--mem", str(ns.mem), "--cmdline", "touch=0"]
            for _ in range(ns.runs):  # the cold start is always the idle guest's boot: the guest's own
                cold.append(_timed(idle))  # page-touching loop (emulated ring 0 here) is not start-up cost
                warm.append(_timed(restore))
            case = {
                "touch_mib": touch,
                "file_bytes": snap.stat().st_size,
                "cold_s": statistics.median(cold),
                "restore_s": statistics.median(warm),
                "snapshot_s": statistics.median(snaps),
                "ratio_restore_cold": statistics.median(warm) / statistics.median(cold),
                "cold_all": cold,
                "restore_all": warm,
            }
            results["cases"].append(case)  # type: ignore[attr-defined]
            print(f"touch={touch:4d} MiB  file {case['file_bytes'] / 2**20:7.1f} MiB  cold {case['cold_s']:.3f} s  "
                  f"restore {case['restore_s']:.3f} s  ratio {case['ratio_restore_cold']:.2f}  "
                  f"snapshot {case['snapshot_s']:.3f} s", flush=True)
    if ns.json:
        Path(ns.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
