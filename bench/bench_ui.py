"""Web console benchmarks (issue 21, docs/UI.md "Performance").

1. The VM list page with 1,000 VMs (seeded straight into the state store, as the brief says): server
   time of GET /ui/vms as an admin, in-process (the Gate, RBAC filtering, the template), median and worst
   of N runs, against the JSON API's GET /v1/vms of the same VMs in the same run (the peer). Target
   <= 300 ms.
2. The console keeping up with a guest printing 100 KiB/s: a FakeBackend "guest" appends 100 KiB/s to
   its console for DURATION seconds; a WebSocket client on the real mTLS server (the same endpoint the
   page's xterm.js uses) counts what arrives and how far behind it is at the end.

    .venv/bin/python bench/bench_ui.py            # prints markdown, writes bench/results/ui.json
    .venv/bin/python bench/bench_ui.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import json
import ssl
import statistics
import sys
import tempfile
import threading
import time
import uuid
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from bulkhead.daemon.testkit import Harness, ServerThread  # noqa: E402


def seed_vms(h: Harness, n: int) -> str:
    """n VMs in one tenant, copied from one created through the API (state store rows, no audit)."""
    t = h.tenant("bench")
    first = h.vm(t, "vm-0000")
    store = h.daemon.store
    row = dict(store.q1("SELECT * FROM vms WHERE id = ?", (first,)))
    cols = list(row)
    with store.txn() as c:
        for i in range(1, n):
            row.update(id=str(uuid.uuid4()), name=f"vm-{i:04d}")
            c.execute(f"INSERT INTO vms ({','.join(cols)}) VALUES ({','.join('?' * len(cols))})",
                      [row[k] for k in cols])
    return t


def page_times(h: Harness, path: str, runs: int) -> list[float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with h.client(h.admin) as c:
            c.get(path)  # warm (template compiled, evaluator loaded)
            out = []
            for _ in range(runs):
                t0 = time.perf_counter()
                r = c.get(path)
                out.append((time.perf_counter() - t0) * 1000)
                assert r.status_code == 200, r.text[:200]
    return out


def console_rate(h: Harness, rate: int, duration: float) -> dict[str, float]:
    from websockets.sync.client import connect

    t = h.tenant("console")
    vm = h.vm(t, "printer", mem_mib=16)
    with h.client() as c:
        assert c.post(f"/v1/vms/{vm}/start").status_code == 200
    backend = h.backend
    with ServerThread(h) as s:
        ctx = ssl.create_default_context(cafile=str(h.sd.ca_cert))
        ctx.load_cert_chain(str(h.sd.admin_cert), str(h.sd.admin_key))
        ws = connect(f"wss://127.0.0.1:{s.port}/v1/vms/{vm}/console/ws?mode=ro&tail=0", ssl=ctx, proxy=None,
                     compression=None, open_timeout=10)
        json.loads(ws.recv(timeout=10))
        written = [0]
        stop = threading.Event()

        def guest() -> None:  # 100 KiB/s in 10 ms slices, as a guest's UART output would arrive
            chunk = (b"0123456789abcdef" * 64)[: rate // 100]
            t0 = time.monotonic()
            while not stop.is_set() and time.monotonic() - t0 < duration:
                with backend._lock:
                    backend._console[vm].extend(chunk)
                written[0] += len(chunk)
                time.sleep(max(0.0, t0 + written[0] / rate - time.monotonic()))

        g = threading.Thread(target=guest)
        got = 0
        t0 = time.monotonic()
        g.start()
        while time.monotonic() - t0 < duration + 5 and (g.is_alive() or got < written[0]):
            try:
                msg = ws.recv(timeout=0.5)
            except TimeoutError:
                continue
            if isinstance(msg, bytes):
                got += len(msg)
        end = time.monotonic() - t0
        stop.set()
        g.join()
        ws.close()
    return {"written_bytes": written[0], "received_bytes": got, "seconds": round(end, 2),
            "received_kib_s": round(got / 1024 / duration, 1), "behind_at_end_bytes": written[0] - got}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--vms", type=int, default=1000)
    a = ap.parse_args()
    runs, duration = (3, 2.0) if a.quick else (15, 10.0)
    with tempfile.TemporaryDirectory() as d:
        h = Harness(Path(d) / "s")
        try:
            seed_vms(h, a.vms)
            ui = page_times(h, "/ui/vms", runs)
            api = page_times(h, "/v1/vms", runs)
            con = console_rate(h, 100 * 1024, duration)
        finally:
            h.close()
    res = {"vms": a.vms, "ui_ms_median": round(statistics.median(ui), 1), "ui_ms_max": round(max(ui), 1),
           "api_ms_median": round(statistics.median(api), 1), "ratio_ui_to_api": round(statistics.median(ui) / statistics.median(api), 2),
           "console": con}
    print(f"| GET /ui/vms, {a.vms} VMs | median {res['ui_ms_median']} ms, max {res['ui_ms_max']} ms (target <= 300) |")
    print(f"| GET /v1/vms, same VMs (peer) | median {res['api_ms_median']} ms (ui/api {res['ratio_ui_to_api']}) |")
    print(f"| console at 100 KiB/s for {duration} s | received {con['received_kib_s']} KiB/s, "
          f"{con['behind_at_end_bytes']} bytes behind at the end |")
    if not a.quick:
        out = ROOT / "bench" / "results" / "ui.json"
        out.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
