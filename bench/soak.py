"""The stateful soak, long version (issue 12 point 7): drive a real jailed daemon for N minutes from
several concurrent clients against a pure model, check every invariant after every round, inject a fault
between rounds (cycling through every kind in a seeded order), and report operations/s, operations by
kind, faults injected by kind, invariants checked, findings (bugs worked around) and any violation with
the seed that reproduces it.

    sudo .venv/bin/python bench/soak.py --minutes 30 [--seed S] [--actors 3] [--ops 12] [--json out.json]

Exit status 0 when no invariant broke, 1 otherwise. Model, driver and world: tests/soak_*.py.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0:0] = [str(ROOT / "tests"), str(ROOT / "src")]

from soak_driver import FAULTS, Soak  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--actors", type=int, default=3, help="concurrent mTLS clients (plus the root socket)")
    p.add_argument("--ops", type=int, default=12, help="operations per client per round")
    p.add_argument("--fault-every", type=int, default=1, help="rounds between faults")
    p.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated subset of {','.join(FAULTS)}")
    p.add_argument("--no-sigterm-idle", action="store_true",
                   help="close every client before a SIGTERM restart (skip the idle keep-alive client check)")
    p.add_argument("--json", type=Path, help="write the report here too")
    p.add_argument("--keep", action="store_true", help="keep the work directory (daemon logs)")
    args = p.parse_args(argv)
    faults = tuple(f for f in args.faults.split(",") if f)
    unknown = set(faults) - set(FAULTS)
    if unknown:
        p.error(f"unknown faults: {', '.join(sorted(unknown))}")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    print(f"soak seed {seed} ({args.minutes} min, {args.actors} clients)", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bulkhead-soak-"))
    soak = Soak(work, seed, actors=args.actors, ops_per_round=args.ops, log=lambda *a: print(*a, flush=True),
                sigterm_idle_client=not args.no_sigterm_idle)
    try:
        soak.setup()
        soak.run(args.minutes * 60, fault_every=args.fault_every, faults=faults)
    finally:
        report = soak.report()
        soak.close()
    report["work_dir"] = str(work)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    if report["violations"]:
        print(f"VIOLATIONS (reproduce with --seed {seed}):", *report["violations"], sep="\n", file=sys.stderr)
        return 1
    print(f"{report['operations']} operations ({report['ops_per_s']}/s), faults {report['faults']}, no violation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
