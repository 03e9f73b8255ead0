"""Live-migration downtime and total time (issue 20 target: downtime <= 100 ms, idle 128 MiB guest, loopback).

    .venv/bin/python bench/bench_migrate.py [--runs N] [--touch MiB] [--json OUT]

Each run starts a destination and a source process (tests/migrate/peer.py: runtime/migrate.py's send_vm and
receive_vm over mutual TLS 1.3 on 127.0.0.1, keyed attestation double both ways) with the 128 MiB guest
bench/payloads/wait_input.c, which writes `touch` MiB, prints READY and then polls COM1. The source migrates
once READY is out. Reported (medians): downtime (the source's vCPUs paused until the destination's `running`:
last dirty pages, machine state, the destination's restore), total time (connect to `running`, with the
attestation handshake and every pre-copy round), rounds, pages and bytes sent. No peer ratio yet: QEMU's
own migration (`migrate tcp:` between two instances, `info migrate` downtime) is the peer to add.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from bulkhead.daemon import pki  # noqa: E402
from bulkhead.guests.build import build  # noqa: E402


def _certs(d: Path) -> None:
    ca = pki.make_ca()
    (d / "ca.crt").write_bytes(pki.cert_pem(ca.cert))
    key, issued = pki.issue_server(ca, ["localhost"])
    (d / "server.key").write_bytes(pki.key_pem(key))
    (d / "server.crt").write_bytes(pki.cert_pem(issued.cert))
    ckey = pki.new_key()
    (d / "client.key").write_bytes(pki.key_pem(ckey))
    (d / "client.crt").write_bytes(pki.cert_pem(pki.issue_client(ca, "bench-src", ckey.public_key()).cert))


def _peer(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "tests.migrate.peer", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


def _once(d: Path, kernel: str, touch: int) -> dict[str, float]:
    for f in ("port", "src.json", "dest.json"):
        (d / f).unlink(missing_ok=True)
    dst = _peer("dest", str(d), "good")
    try:
        deadline = time.monotonic() + 30
        while not (d / "port").exists():
            if dst.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"destination did not start: {dst.communicate()[1].decode()}")
            time.sleep(0.02)
        src = _peer("src", str(d), "good", kernel, f"touch={touch}", "1")
        _, err = src.communicate(timeout=300)
        res = json.loads((d / "src.json").read_text())
        if res.get("reason") != "migrated":
            raise SystemExit(f"migration failed: {res} {err.decode()}")
        return res
    finally:
        dst.kill()
        dst.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--touch", type=int, default=0, help="MiB the guest writes before READY (0: idle)")
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args()
    kernel = str(build(str(ROOT / "bench" / "payloads" / "wait_input.c"), "elf"))
    d = Path(tempfile.mkdtemp(prefix="bh-bench-migrate-"))
    try:
        _certs(d)
        runs = [_once(d, kernel, args.touch) for _ in range(args.runs)]
    finally:
        shutil.rmtree(d, ignore_errors=True)
    med = {k: statistics.median(r[k] for r in runs) for k in ("downtime_ms", "total_ms", "rounds", "pages", "bytes")}
    out = {"runs": args.runs, "touch_mib": args.touch, "mem_mib": 128, **med,
           "target_downtime_ms": 100, "all": runs}
    print(json.dumps({k: v for k, v in out.items() if k != "all"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
