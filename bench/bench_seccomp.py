"""Cost of the jailed worker's seccomp filter per system call (issue 16: the blk/net jailed-vs-unjailed gap).

    .venv/bin/python bench/bench_seccomp.py [--rounds 7]

bench/seccomp_cost.c times getppid, ioctl(TCGETS) (goes through the ioctl argument chain, as every KVM_RUN
and irqfd/ioeventfd ioctl does) and pread in a C loop, without and with the worker's program (role worker,
NIC on: the longest ioctl list) loaded exactly as the worker loads it (sandbox/bpf.py). Rounds alternate
plain and filtered; medians with min and max of each, and the difference in ns per call.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from bulkhead.sandbox import jail  # noqa: E402
from bulkhead.sandbox.policy import build_rules  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        exe, prog = Path(d) / "seccomp_cost", Path(d) / "worker.bpf"
        subprocess.run(["gcc", "-O2", "-o", str(exe), str(ROOT / "bench" / "seccomp_cost.c")], check=True)
        program = jail.compile_program(build_rules("worker", nic=True, self_pid=1))
        prog.write_bytes(program)
        rows: dict[str, dict[str, list[float]]] = {"plain": {}, "filtered": {}}
        for _ in range(a.rounds):
            for kind, args in (("plain", []), ("filtered", [str(prog)])):
                out = subprocess.run([str(exe), *args], capture_output=True, text=True, check=True).stdout
                for name, ns in re.findall(r"(\S+) (\d+) ns", out):
                    rows[kind].setdefault(name, []).append(float(ns))
    result: dict[str, object] = {"rounds": a.rounds, "program_instructions": len(program) // 8}
    for name in rows["plain"]:
        p, f = rows["plain"][name], rows["filtered"][name]
        result[name] = {"plain_ns": {"median": statistics.median(p), "min": min(p), "max": max(p)},
                        "filtered_ns": {"median": statistics.median(f), "min": min(f), "max": max(f)},
                        "filter_cost_ns": statistics.median(f) - statistics.median(p)}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
