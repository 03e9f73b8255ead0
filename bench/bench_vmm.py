"""Core VMM benchmarks, side by side with QEMU (same payloads, same run) and a C reference loop.

    .venv/bin/python bench/bench_vmm.py [--runs N] [--json OUT]

1. start-to-exit: process start of `bulkhead run` to VM exit, payload prints one line and exits
   (bench/payloads/hello_exit.c), vs `qemu-system-x86_64 -M microvm ... -kernel payload.elf`. As root the
   first row is the jailed default (`bulkhead run -q`), the second the unjailed `--no-jail`; the three are
   alternated in every round; medians with min/max (--runs >= 5). `--start-only` skips 2.
2. port-I/O exit throughput: bench/payloads/pio.c doing 200,000 `out`s; exits/s = count / (t(count) - t(0)),
   per VMM, for port 0x3ff (the UART scratch register: a full exit to the VMM each time, on both) and
   port 0x80 (POST code: coalesced by bulkhead, ordinary exit on QEMU); plus bench/pio_ref.c (a minimal C
   VMM loop on KVM) as the floor.
3. memory: peak RSS of the VMM process (getrusage of the child) running the hello payload; bulkhead
   also reports the guest pages it touched (--stats), which are subtracted.
Medians of N runs, runs interleaved so machine noise hits both VMMs alike.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from bulkhead.guests.build import build  # noqa: E402

# What users run: the launcher install.sh writes (Python -I -S); the venv's pip script otherwise.
# BULKHEAD_BENCH_LAUNCHER overrides (e.g. a worktree's .venv/bin/bulkhead before install.sh has run).
_LAUNCHER = os.environ.get("BULKHEAD_BENCH_LAUNCHER") or shutil.which("bulkhead") or str(ROOT / ".venv/bin/bulkhead")
BULKHEAD = [_LAUNCHER, "run", "--no-jail", "-q"]
BULKHEAD_JAILED = [_LAUNCHER, "run", "-q"]
QEMU = [
    "qemu-system-x86_64", "-M", "microvm", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-nodefaults",
    "-no-user-config", "-nographic", "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
]  # fmt: skip


def timed(cmd: list[str]) -> tuple[float, int, str]:
    """Wall time, peak RSS (KiB) and stdout of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    dt = time.perf_counter() - t0
    if p.returncode != 1:  # payloads exit with debug-exit 0 -> status 1
        raise RuntimeError(f"{cmd[0]} exited {p.returncode}: {p.stderr[-500:]}")
    # ru_maxrss of RUSAGE_CHILDREN is the max over all children so far; measure RSS per child via wait4.
    return dt, before, p.stdout


def run_rss(cmd: list[str]) -> tuple[float, int, str]:
    """Wall time, this child's own peak RSS in KiB (os.wait4), stdout."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        _, status, ru = os.wait4(p.pid, 0)
        dt = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode(errors="replace")
    if p.returncode != 1:
        raise RuntimeError(f"{' '.join(cmd[:3])} exited {p.returncode}")
    return dt, ru.ru_maxrss, text


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def _spread(xs: list[float]) -> dict[str, float]:
    return {"median": med(xs), "min": min(xs), "max": max(xs)}


def bench_start(hello: Path, runs: int) -> dict[str, object]:
    """Row 1 (the target, issue 16): the jailed default path as root (`bulkhead run -q`, what a root user
    gets without flags) against QEMU microvm. Row 2: the unjailed path (--no-jail). The three are run in
    rotating order in every round so machine noise hits them alike; medians with min and max."""
    jailed_ok = os.geteuid() == 0
    times: dict[str, list[float]] = {"jailed": [], "qemu": [], "unjailed": []}
    bh_rss, qe_rss, touched = [], [], []
    with tempfile.TemporaryDirectory() as d:
        stats = Path(d) / "stats.json"

        def one(kind: str) -> None:
            if kind == "jailed":
                times["jailed"].append(run_rss([*BULKHEAD_JAILED, "--kernel", str(hello)])[0])
            elif kind == "qemu":
                t, rss, _ = run_rss([*QEMU, "-kernel", str(hello)])
                times["qemu"].append(t)
                qe_rss.append(rss)
            else:
                t, rss, _ = run_rss([*BULKHEAD, "--kernel", str(hello), "--stats", str(stats)])
                times["unjailed"].append(t)
                bh_rss.append(rss)
                touched.append(json.loads(stats.read_text())["guest_resident_bytes"] // 1024)

        order = ["jailed", "qemu", "unjailed"] if jailed_ok else ["qemu", "unjailed"]
        for kind in order:  # untimed warm-up: page cache, and the root-only caches of the gate's digests
            one(kind)        # (/run/bulkhead/digests.json) and of the seccomp programs (/run/bulkhead/seccomp)
        for xs in (*times.values(), bh_rss, qe_rss, touched):
            xs.clear()
        for i in range(runs):
            for kind in order[i % len(order):] + order[:i % len(order)]:
                one(kind)
    qe = med(times["qemu"])
    out: dict[str, object] = {"launcher": _LAUNCHER, "qemu_s": _spread(times["qemu"])}
    if jailed_ok:
        out["bulkhead_jailed_s"] = _spread(times["jailed"])
        out["ratio_jailed_over_qemu"] = med(times["jailed"]) / qe  # target <= 1.0
    else:
        out["bulkhead_jailed_s"] = "not measured: the jail needs root"
    out.update({
        "bulkhead_unjailed_s": _spread(times["unjailed"]), "ratio_unjailed_over_qemu": med(times["unjailed"]) / qe,
        "bulkhead_peak_rss_kib": med(bh_rss), "qemu_peak_rss_kib": med(qe_rss),
        "bulkhead_guest_touched_kib": med(touched),
        "bulkhead_overhead_kib": med(bh_rss) - med(touched),
        "overhead_ratio_bulkhead_over_qemu": (med(bh_rss) - med(touched)) / med(qe_rss),
    })  # fmt: skip
    return out


def bench_pio(pio: Path, runs: int, count: int) -> dict[str, object]:
    res: dict[str, object] = {}
    for port in (0x3FF, 0x80):
        for name, base in (("bulkhead", BULKHEAD), ("qemu", [*QEMU])):
            full, empty = [], []
            for _ in range(runs):
                kern = ["--kernel", str(pio)] if name == "bulkhead" else ["-kernel", str(pio)]
                app = "--cmdline" if name == "bulkhead" else "-append"
                full.append(run_rss([*base, *kern, app, f"port={port:#x} count={count}"])[0])
                empty.append(run_rss([*base, *kern, app, f"port={port:#x} count=0"])[0])
            res[f"{name}_port_{port:#x}_exits_per_s"] = count / max(med(full) - med(empty), 1e-9)
        res[f"ratio_port_{port:#x}"] = res[f"bulkhead_port_{port:#x}_exits_per_s"] / res[f"qemu_port_{port:#x}_exits_per_s"]  # type: ignore[operator]
    ref_src = ROOT / "bench" / "pio_ref.c"
    with tempfile.TemporaryDirectory() as d:
        exe = Path(d) / "pio_ref"
        subprocess.run(["gcc", "-O2", "-o", str(exe), str(ref_src)], check=True)
        rates = []
        for _ in range(runs):
            out = subprocess.run([str(exe), str(count), "0x3ff"], capture_output=True, text=True, check=True).stdout
            rates.append(float(out.split("exits_per_s=")[1].split()[0]))
        res["c_reference_exits_per_s"] = med(rates)
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=11)
    ap.add_argument("--start-only", action="store_true", help="only the start-to-exit rows")
    ap.add_argument("--count", type=int, default=200_000)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if shutil.which("qemu-system-x86_64") is None:
        print("bench_vmm: qemu-system-x86_64 is required (./install.sh installs it)", file=sys.stderr)
        return 2
    hello = build(str(ROOT / "bench/payloads/hello_exit.c"))
    pio = build(str(ROOT / "bench/payloads/pio.c"))
    result = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "host": os.uname().release,
        "runs": a.runs,
        "start_to_exit": bench_start(hello, a.runs),
    }
    if not a.start_only:
        result["pio"] = bench_pio(pio, max(3, a.runs // 2), a.count)
    text = json.dumps(result, indent=1)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
