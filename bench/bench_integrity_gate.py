"""Start-time cost of the pre-import integrity gate (docs/INTEGRITY.md §5).

Builds a signed, compiled copy of the package in a temporary directory with launchers written by
bulkhead._boot.write_launcher (what install.sh does), plus a launcher of the old kind (sys.path prepend,
no check), then times `<launcher> run --help` N times, alternating, and prints min and median of each:

    .venv/bin/python bench/bench_integrity_gate.py [N]
"""

from __future__ import annotations

import compileall
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bulkhead import _boot
from bulkhead.integrity import manifest as mf

SRC = Path(__file__).resolve().parents[1] / "src" / "bulkhead"


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        pkg = tmp / "pkg" / "bulkhead"
        shutil.copytree(SRC, pkg, ignore=shutil.ignore_patterns("__pycache__"))
        compileall.compile_dir(str(pkg), quiet=1)
        gate = tmp / "bulkhead"
        _boot.write_launcher(str(gate), "bulkhead", boot=str(pkg / "_boot.py"))
        old = tmp / "old"
        old.write_text(f"#!{sys.executable} -IS\nimport sys\nsys.path[0:0] = {[str(pkg.parent), *_boot.default_sites()]!r}\n"
                       "from bulkhead.cli import main\nsys.exit(main())\n")
        old.chmod(0o755)
        priv, pub = mf.generate_key()
        (tmp / "release.pub").write_bytes(pub)
        ext = mf._default_externals()
        ext[str(gate)] = "extra"
        (tmp / "manifest.json").write_text(json.dumps(mf.sign_manifest(mf.build_manifest(pkg, ext, bytecode=True), priv)))
        env = {k: v for k, v in os.environ.items() if k != "BULKHEAD_DEV_SKIP_INTEGRITY"}
        env.update(BULKHEAD_MANIFEST=str(tmp / "manifest.json"), BULKHEAD_RELEASE_KEY=str(tmp / "release.pub"))
        cases = {"old launcher (no check)": (old, env), "gate, verified": (gate, env),
                 "gate, dev skip": (gate, {**env, "BULKHEAD_DEV_SKIP_INTEGRITY": "1"})}
        times: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(n):
            for name, (exe, e) in cases.items():
                t = time.perf_counter()
                subprocess.run([str(exe), "run", "--help"], env=e, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, check=True)
                times[name].append(time.perf_counter() - t)
        for name, v in times.items():
            print(f"{name:26s} min {min(v) * 1e3:6.1f} ms  median {statistics.median(v) * 1e3:6.1f} ms  (n={n})")


if __name__ == "__main__":
    main()
