"""virtio-blk throughput, side by side with QEMU's virtio-mmio block device, same payload, same run.

    .venv/bin/python bench/bench_blk.py [--runs N] [--size-mib 256] [--rand 2000] [--json OUT]

The guest (bench/payloads/blk_bench.c, one request in flight) writes then reads the whole image with 1 MiB
requests and does random 4 KiB reads and writes; each phase is timed on the host between the PHASE lines
the guest prints on COM1. QEMU: -M microvm,acpi=off -global virtio-mmio.force-legacy=false
-drive id=d0,file=IMG,format=raw,if=none -device virtio-blk-device,drive=d0.
The "bulkhead" column is the default path, jailed (run as root); "bulkhead_unjailed" is --no-jail.
Notification cost: the same 4 KiB random reads on unjailed bulkhead with queue notifications on ioeventfds (default)
and with the naive path (--no-ioeventfd: every notify is an MMIO exit handled on the vCPU thread).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0:0] = [str(ROOT), str(ROOT / "src")]
from tests.virtio_payloads import Bulkhead, Devices, Qemu, bench_phases, build_virtio, stream_lines  # noqa: E402

MIB = 1 << 20


def one(vmm, image: Path, disk: Path, append: str) -> dict[str, dict[str, float]]:  # type: ignore[no-untyped-def]
    argv = vmm.argv(image, append, Devices(drives=[(disk, False)]), mem_mib=256)
    proc, lines = stream_lines(argv, timeout=600)
    status = proc.wait(timeout=60)
    if status != vmm.exit_status(0):
        raise RuntimeError(f"{vmm.name} exited {status}: {lines[-5:]}")
    return bench_phases(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--rand", type=int, default=2000)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    image = build_virtio("blk_bench")
    # "bulkhead" is the default path a user runs: jailed (as root). The unjailed and naive-notify columns show
    # what the jail and the ioeventfd path each cost.
    vmms = {"bulkhead": Bulkhead(jail=os.geteuid() == 0), "qemu": Qemu(), "bulkhead_unjailed": Bulkhead(),
            "bulkhead_naive_notify": Bulkhead(("--no-ioeventfd",))}
    results: dict[str, dict[str, list[float]]] = {k: {} for k in vmms}
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        disk = Path(d) / "bench.img"
        with open(disk, "wb") as f:
            f.truncate(a.size_mib * MIB)
        for _ in range(a.runs):
            for name, vmm in vmms.items():
                append = f"rand_count={a.rand}"
                if name == "bulkhead_naive_notify":
                    append += " phases=rand_read"
                phases = one(vmm, image, disk, append)
                for ph, kv in phases.items():
                    if ph in ("seq_write", "seq_read"):
                        results[name].setdefault(f"{ph}_MBps", []).append(kv["bytes"] / kv["seconds"] / 1e6)
                    elif ph in ("rand_read", "rand_write"):
                        results[name].setdefault(f"{ph}_iops", []).append(kv["requests"] / kv["seconds"])
                        results[name].setdefault(f"{ph}_us_per_req", []).append(kv["seconds"] / kv["requests"] * 1e6)
    med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in results.items()}
    b, q, u, n = med["bulkhead"], med["qemu"], med["bulkhead_unjailed"], med["bulkhead_naive_notify"]
    keys = ("seq_write_MBps", "seq_read_MBps", "rand_read_iops", "rand_write_iops")
    ratios = {f"{k}_bulkhead_over_qemu": b[k] / q[k] for k in keys}
    ratios |= {f"{k}_unjailed_over_qemu": u[k] / q[k] for k in keys}
    ratios["notify_cost_us_naive_minus_ioeventfd"] = n["rand_read_us_per_req"] - u["rand_read_us_per_req"]
    out = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": a.runs, "jailed": os.geteuid() == 0, "size_mib": a.size_mib, "rand_count": a.rand,
           "medians": med, "ratios": ratios}  # fmt: skip
    text = json.dumps(out, indent=1)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
