"""Mutation testing of bulkhead's pure security core (issue 15). Engine: bench/mutengine.py.

    .venv/bin/python bench/mutation.py                       # every active module, every mutant
    .venv/bin/python bench/mutation.py --module rbac         # one module
    .venv/bin/python bench/mutation.py --sample 25 --seed 15 # fixed-seed sample per module (CI)
    .venv/bin/python bench/mutation.py --write-report        # + bench/results/mutation.json, docs/ASSURANCE.md

The process renices itself to 19 and runs one test process at a time (the machine is shared).
Score = killed / (mutants - reviewed equivalents); timeouts count as killed, "no-tests" as survived.
Equivalent mutants are reviewed in security/equivalent-mutants.json, keyed by
module|function|stripped source line|operator|occurrence, so an entry survives line shifts.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import random
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(REPO, "src")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mutengine import Mutant, RunResult, _top_functions, enumerate_mutants, run_module  # noqa: E402

EQUIVALENTS = os.path.join(REPO, "security", "equivalent-mutants.json")
RESULTS = os.path.join(REPO, "bench", "results", "mutation.json")
ASSURANCE = os.path.join(REPO, "docs", "ASSURANCE.md")
BEGIN, END = "<!-- mutation-report:begin -->", "<!-- mutation-report:end -->"

_SURF = "tests/test_surface_inventory.py::test_committed_inventory_matches_the_code"
_BELOW = ("pending: below its floor in its fixed-seed sample ({}); the surviving mutants are listed in "
          "docs/ASSURANCE.md; tests to kill them are still to be written")
_AUDIT_PURE = ["tests/test_control_audit.py", "tests/test_control_audit_vectors.py", "tests/test_control_note_edges.py"]
_INTEGRITY_TESTS = ["tests/test_integrity_pure.py", "tests/test_integrity_tpmwire.py",
                    "tests/test_integrity_verify_pure.py", "tests/test_integrity_attest.py"]
# The table: module (under src/), the tests that exercise it, the floor (% of non-equivalent mutants
# killed), the CI sample size, and a status. "active" rows are measured and enforced; "pending" rows
# are listed in the report and the CI check as PENDING with their reason until their branch is merged.
MODULES: list[dict[str, Any]] = [
    {"name": "rbac", "path": "bulkhead/control/rbac.py", "floor": 95,
     "tests": ["tests/test_control_rbac.py", "tests/test_api_authz.py"], "sample": 30, "status": "active"},
    {"name": "bus", "path": "bulkhead/bus.py", "floor": 90,
     "tests": ["tests/test_bus.py"], "sample": 20, "status": "active"},
    {"name": "serial", "path": "bulkhead/devices/serial.py", "floor": 90,
     "tests": ["tests/test_devices_serial.py", "tests/test_snapshot_devices.py", _SURF], "sample": 25, "status": "active"},
    {"name": "i8042", "path": "bulkhead/devices/i8042.py", "floor": 90,
     "tests": ["tests/test_devices_i8042.py", "tests/test_snapshot_devices.py", _SURF], "sample": 20, "status": "active"},
    {"name": "sandbox-policy", "path": "bulkhead/sandbox/policy.py", "floor": 90,
     "tests": ["tests/test_sandbox_policy.py"], "sample": 20, "status": "active"},
    {"name": "integrity-policy", "path": "bulkhead/integrity/policy.py", "floor": 90,
     "tests": _INTEGRITY_TESTS, "sample": 20,
     "status": "active"},
    {"name": "eventlog", "path": "bulkhead/integrity/eventlog.py", "floor": 90,
     "tests": _INTEGRITY_TESTS, "sample": 20,
     "status": "active"},
    {"name": "tpmwire", "path": "bulkhead/integrity/tpmwire.py", "floor": 90,
     "tests": _INTEGRITY_TESTS, "sample": 20,
     "status": "active"},
    {"name": "attest", "path": "bulkhead/integrity/attest.py", "floor": 90,
     "tests": _INTEGRITY_TESTS, "sample": 20,
     "status": "active"},
    {"name": "queue", "path": "bulkhead/devices/virtio/queue.py", "floor": 95,
     "tests": ["tests/test_virtio_queue.py", "tests/test_virtio_queue_edges.py", "tests/test_virtio_mmio.py", _SURF], "sample": 30, "status": "active"},
    {"name": "virtio-mmio", "path": "bulkhead/devices/virtio/mmio.py", "floor": 90,
     "tests": ["tests/test_virtio_mmio.py", "tests/test_virtio_mmio_edges.py", "tests/test_virtio_blk.py",
               "tests/test_virtio_net.py", "tests/test_virtio_rng.py", _SURF], "sample": 80, "status": "active"},
    {"name": "virtio-block", "path": "bulkhead/devices/virtio/block.py", "floor": 90,
     "tests": ["tests/test_virtio_blk.py", "tests/test_virtio_blk_edges.py", _SURF], "sample": 20, "status": "active"},
    {"name": "virtio-net", "path": "bulkhead/devices/virtio/net.py", "floor": 90,
     "tests": ["tests/test_virtio_net.py", "tests/test_virtio_mmio.py", _SURF], "sample": 20, "status": "active"},
    {"name": "virtio-rng", "path": "bulkhead/devices/virtio/rng.py", "floor": 90,
     "tests": ["tests/test_virtio_rng.py", "tests/test_virtio_mmio.py", _SURF], "sample": 20, "status": "active"},
    {"name": "virtio-vsock", "path": "bulkhead/devices/virtio/vsock.py", "floor": 90,
     "tests": ["tests/test_virtio_vsock.py", "tests/test_virtio_vsock_edges.py", _SURF], "sample": 20,
     "status": "active"},
    {"name": "virtio-vsock-device", "path": "bulkhead/devices/virtio/vsock_device.py", "floor": 90,
     "tests": ["tests/test_virtio_vsock.py", "tests/test_virtio_vsock_edges.py", _SURF], "sample": 20,
     "status": "active"},
    {"name": "elf", "path": "bulkhead/boot/elf.py", "floor": 95,
     "tests": ["tests/test_boot_elf.py", "tests/test_boot_elf_edges.py", "tests/test_boot_fuzz.py", _SURF], "sample": 20, "status": "active"},
    {"name": "bzimage", "path": "bulkhead/boot/bzimage.py", "floor": 95,
     "tests": ["tests/test_boot_bzimage.py", "tests/test_boot_bzimage_edges.py", "tests/test_boot_params.py", "tests/test_boot_params_edges.py", "tests/test_boot_fuzz.py", _SURF],
     "sample": 20, "status": "active"},
    {"name": "pvh", "path": "bulkhead/boot/pvh.py", "floor": 95,
     "tests": ["tests/test_boot_elf.py", "tests/test_boot_elf_edges.py", "tests/test_boot_fuzz.py", _SURF], "sample": 20, "status": "active"},
    {"name": "loader", "path": "bulkhead/boot/loader.py", "floor": 95,
     "tests": ["tests/test_boot_loader.py", "tests/test_boot_loader_edges.py", _SURF], "sample": 20, "status": "active"},
    {"name": "params", "path": "bulkhead/boot/params.py", "floor": 95,
     "tests": ["tests/test_boot_params.py", "tests/test_boot_params_edges.py", "tests/test_boot_loader.py", "tests/test_boot_loader_edges.py"], "sample": 20, "status": "active"},
    {"name": "audit", "path": "bulkhead/control/audit.py", "floor": 95,
     "tests": [*_AUDIT_PURE, "tests/test_daemon_audit.py"], "sample": 30, "status": "active"},
    {"name": "merkle", "path": "bulkhead/control/merkle.py", "floor": 95,
     "tests": ["tests/test_control_merkle.py", *_AUDIT_PURE], "sample": 30, "status": "active"},
    {"name": "note", "path": "bulkhead/control/note.py", "floor": 95,
     "tests": _AUDIT_PURE, "sample": 30, "status": "active"},
    {"name": "auditlog", "path": "bulkhead/daemon/auditlog.py", "floor": 95,
     "tests": ["tests/test_daemon_audit.py", "tests/test_audit_witness.py", "tests/test_daemon_audit_edges.py"],
     "sample": 30, "status": "active"},
    {"name": "network-model", "path": "bulkhead/network/model.py", "floor": 90,
     "tests": ["tests/test_network_model.py"], "sample": 20, "status": "active"},
    {"name": "network-rules", "path": "bulkhead/network/rules.py", "floor": 90,
     "tests": ["tests/test_network_model.py", "tests/test_network_rules_nft.py"], "sample": 20, "status": "active"},
    {"name": "manifest", "path": "bulkhead/integrity/manifest.py", "floor": 90,
     "tests": ["tests/test_integrity_manifest.py"], "sample": 20, "status": "active"},
    {"name": "sandbox-protocol", "path": "bulkhead/sandbox/protocol.py", "floor": 90,
     "tests": ["tests/test_sandbox_protocol.py", "tests/test_sandbox_protocol_edges.py", _SURF], "sample": 20,
     "status": "active"},
]


def load_equivalents() -> dict[str, str]:
    if not os.path.exists(EQUIVALENTS):
        return {}
    with open(EQUIVALENTS, encoding="utf-8") as f:
        data = json.load(f)
    return {"|".join([e["module"], e["function"], e["line"], e["op"], str(e.get("occurrence", 0))]): e["reason"]
            for e in data["mutants"]}


def pick(mutants: list[Mutant], sample: int | None, seed: int) -> list[Mutant]:
    if sample is None or sample >= len(mutants):
        return mutants
    rng = random.Random(f"{seed}:{mutants[0].module}" if mutants else seed)
    chosen = sorted(rng.sample(range(len(mutants)), sample))
    return [mutants[i] for i in chosen]


def file_hashes(row: dict[str, Any]) -> dict[str, str]:
    """SHA-256 (first 16 hex digits) of the module and of each test file of its row."""
    files = [os.path.join("src", row["path"]), *sorted({t.split("::")[0] for t in row["tests"]})]
    out = {}
    for f in files:
        with open(os.path.join(REPO, f), "rb") as fh:
            out[f] = hashlib.sha256(fh.read()).hexdigest()[:16]
    return out


def _no_docstring(body: list[ast.stmt]) -> list[ast.stmt]:
    first = body[0] if body else None
    doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)
    return body[1:] if doc else body


class _Shape(ast.NodeTransformer):
    """A module's code without its functions and without docstrings (what function_hashes keys "<module>")."""
    def visit_FunctionDef(self, node: ast.AST) -> None:
        return None
    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.AST:
        node.body = _no_docstring(node.body)
        self.generic_visit(node)
        return node


def _fn_hash(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    body = _no_docstring(fn.body)
    shape = (ast.dump(fn.args), ast.dump(ast.Module(body=body, type_ignores=[])),
             [ast.dump(d) for d in fn.decorator_list], ast.dump(fn.returns) if fn.returns else "")
    return hashlib.sha256(repr(shape).encode()).hexdigest()[:16]


def _bound_names(st: ast.stmt) -> list[str]:
    if isinstance(st, (ast.Import, ast.ImportFrom)):
        return [(a.asname or a.name).split(".")[0] for a in st.names]
    if isinstance(st, ast.ClassDef):
        return [st.name]
    targets = st.targets if isinstance(st, ast.Assign) else [st.target] if isinstance(st, (ast.AnnAssign, ast.AugAssign)) else []
    return sorted({n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)})


def function_hashes(row: dict[str, Any], source: str | None = None) -> dict[str, str]:
    """SHA-256 (16 hex digits) of each function's AST (qualname -> hash; duplicate qualnames get #n), and
    of each module-level binding ("<NAME>": the import, assignment, or class statement without its
    methods that binds NAME); "<module>" hashes the module-level statements that bind nothing.
    Docstrings, comments, blank lines and line shifts do not count."""
    if source is None:
        with open(os.path.join(SRC, row["path"]), encoding="utf-8") as f:
            source = f.read()
    tree = ast.parse(source)
    out: dict[str, str] = {}
    for qualname, _classes, fn in _top_functions(tree):
        k = qualname if qualname not in out else f"{qualname}#{sum(x.split('#')[0] == qualname for x in out)}"
        out[k] = _fn_hash(fn)
    rest: list[str] = []
    for st in _no_docstring(tree.body):
        if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        text = ast.dump(_Shape().visit(st))
        names = _bound_names(st)
        for n in names:
            out[f"<{n}>"] = hashlib.sha256((out.get(f"<{n}>", "") + text).encode()).hexdigest()[:16]
        if not names:
            rest.append(text)
    out["<module>"] = hashlib.sha256(repr(rest).encode()).hexdigest()[:16]
    return out


def stale_functions(row: dict[str, Any], was: dict[str, str]) -> tuple[set[str] | None, list[str]]:
    """The functions whose mutants must run again since `was` (function_hashes of the report's version):
    each function whose AST changed or is new, and each function that names a module-level binding
    that changed, appeared or went away. None (every function) when `was` is missing or the unbound
    module-level code changed. Also returns the changed keys, for the log."""
    cur = function_hashes(row)
    changed = sorted(k for k in set(was) | set(cur) if was.get(k) != cur.get(k))
    if not was or "<module>" in changed:
        return None, changed
    names = {k[1:-1] for k in changed if k.startswith("<")}
    with open(os.path.join(SRC, row["path"]), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    stale = {k.split("#")[0] for k in changed if not k.startswith("<")}
    for qualname, _classes, fn in _top_functions(tree):
        used = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name)} | \
               {n.attr for n in ast.walk(fn) if isinstance(n, ast.Attribute)}
        if used & names:
            stale.add(qualname)
    return stale, changed


def measure(row: dict[str, Any], sample: int | None, seed: int, equivalents: dict[str, str],
            verbose: bool, rerun: Any = None, recorded: dict[str, list[str]] | None = None,
            was_killed: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Run the row's mutants (all, or a fixed-seed sample) and score them. With `recorded` (key ->
    [status, killer] from a full report) every mutant keeps its recorded status unless `rerun(mutant,
    recorded entry)` is true or it is in the sample: then it is run again (the CI check). A mutant that
    `recorded` (or, for a sample, `was_killed`: the report's sample) has as killed and that now survives
    is listed under "regressions"."""
    t0 = time.monotonic()
    allm = enumerate_mutants(SRC, row["path"])
    picked = {m.key for m in pick(allm, sample, seed)}
    if recorded is None:
        chosen = [m for m in allm if m.key in picked]
        todo = [m for m in chosen if m.key not in equivalents]
    else:
        chosen = allm
        todo = []
        for m in allm:
            old = recorded.get(m.key)
            if m.key in equivalents:
                continue
            if old is None or m.key in picked or rerun(m, old):
                todo.append(m)
            else:
                m.status, m.killed_by = old
    for m in chosen:
        if m.key in equivalents:
            m.status = "equivalent"
    modname = row["path"][:-3].replace("/", ".")
    log = (lambda s: print(f"  {row['name']}: {s}", file=sys.stderr, flush=True)) if verbose else (lambda s: None)
    res = run_module(modname, SRC, row["path"], row["tests"], todo, log, REPO) if todo else RunResult()
    killed = sum(m.status in ("killed", "timeout") for m in chosen)
    survived = [m for m in chosen if m.status in ("survived", "no-tests")]
    was = recorded if recorded is not None else (was_killed or {})
    regressions = [{"key": m.key, "at": m.ident, "was_killed_by": was[m.key][1], "diff": m.diff}
                   for m in survived if was.get(m.key, [""])[0] in ("killed", "timeout")]
    equiv = [m for m in chosen if m.status == "equivalent"]
    skipped = [m for m in chosen if m.status == "skipped"]
    denom = len(chosen) - len(equiv) - len(skipped)
    score = 100.0 * killed / denom if denom else 100.0
    return {
        "name": row["name"], "module": row["path"], "tests": row["tests"], "floor": row["floor"],
        "status": "measured", "mutants_total": len(allm), "mutants_run": len(chosen), "reran": len(todo),
        "sample": sample if recorded is None else None, "seed": seed if sample else None,
        "killed": killed, "survived": len(survived), "equivalent": len(equiv), "skipped": len(skipped),
        "score": round(score, 1), "pass": score >= row["floor"], "baseline_failed": res.baseline_failed,
        "seconds": round(time.monotonic() - t0, 1), "files": file_hashes(row), "functions": function_hashes(row),
        "survivors": [{"key": m.key, "at": m.ident, "status": m.status, "diff": m.diff} for m in survived],
        "equivalents": [{"key": m.key, "at": m.ident, "reason": equivalents[m.key]} for m in equiv],
        "skipped_mutants": [{"key": m.key, "why": m.killed_by} for m in skipped],
        "mutants": {m.key: [m.status, m.killed_by] for m in chosen if m.status in ("killed", "timeout")},
        "regressions": regressions,
    }


def ci_check(row: dict[str, Any], report: dict[str, dict[str, Any]], seed: int, equivalents: dict[str, str],
             verbose: bool) -> dict[str, Any]:
    """The fast check CI runs (tests/test_mutation_floor.py), against the committed full report.
    Each mutant keeps its recorded status unless something it depends on changed since the report:
    - module and its tests unchanged: recorded statuses, rescored with the current equivalents, no run;
    - a test file changed: every mutant that file killed in the report is run again (a deleted or
      weakened test shows as a regression), plus the row's fixed-seed sample;
    - the module changed: the mutants of every function whose AST changed and every mutant new since the
      report, plus the fixed-seed sample (the report records a hash per function); if the module-level
      code changed (constants, imports, class bodies), or the report has no function hashes, every mutant;
    - the row is not in the report in full: its fixed-seed sample (a sampled row with nothing changed
      keeps that sample's result); a mutant the report's sample has as killed that now survives is a
      regression, as for a full row (so deleting a test that killed one sampled mutant shows).
    With --write-report the result replaces the row in the report: the refresh is incremental too."""
    rec = report.get(row["name"])
    now = file_hashes(row)
    src = os.path.join("src", row["path"])
    full = rec is not None and rec.get("status") == "measured" and rec.get("sample") is None and "mutants" in rec
    if rec is not None and rec.get("status") == "measured" and not full and rec.get("files") == now:
        return {**rec, "ci": f"unchanged since the report's fixed-seed sample of {rec.get('sample')}", "reran": 0}
    if not full:  # a sampled row whose files changed: its sample again; the report's kills must hold
        kills = rec.get("mutants") if rec is not None and rec.get("status") == "measured" else None
        r = measure(row, row["sample"], seed, equivalents, verbose, was_killed=kills or {})
        r["ci"] = "no full report: fixed-seed sample" + (" (the report's sample kills must hold)" if kills else "")
        return r
    assert rec is not None
    changed = {f for f in now if rec["files"].get(f) != now[f]}
    recorded = {k: v for k, v in rec["mutants"].items()}
    for s in rec.get("survivors", []):
        recorded[s["key"]] = [s["status"], ""]
    for k in rec.get("skipped_mutants", []):
        recorded[k["key"]] = ["skipped", k["why"]]
    for e in rec.get("equivalents", []):
        recorded.setdefault(e["key"], ["survived", ""])  # no longer reviewed equivalent: counts as survived
    if not changed:
        r = measure(row, 0, seed, equivalents, verbose, rerun=lambda m, old: False, recorded=recorded)
        r["ci"] = "unchanged since the report: recorded statuses"
        return r
    stale: set[str] | None = set()
    why = [f"tests changed ({', '.join(sorted(changed - {src}))})"] if changed - {src} else []
    if src in changed:
        stale, keys = stale_functions(row, rec.get("functions") or {})
        why.append("module changed (no function hashes, or module-level code): every mutant" if stale is None else
                   f"module changed ({', '.join(keys) or 'comments only'}): mutants of {len(stale)} functions")

    def rerun(m: Mutant, old: list[str]) -> bool:
        return stale is None or m.function in stale or (old[0] in ("killed", "timeout") and old[1].split("::")[0] in changed)
    r = measure(row, row["sample"], seed, equivalents, verbose, rerun=rerun, recorded=recorded)
    r["ci"] = "; ".join(why) + ": those mutants rerun + fixed-seed sample"
    return r


def render(results: list[dict[str, Any]], command: str) -> str:
    lines = [BEGIN, "", f"Reproduce: `{command}` (generated by `bench/mutation.py --write-report`; "
             "results in `bench/results/mutation.json`).", "",
             "| module | tests | mutants | killed | survived | equivalent | score | floor | state |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        tests = ", ".join(os.path.basename(t) for t in r["tests"])
        if r["status"] != "measured":
            lines.append(f"| {r['module']} | {tests} | | | | | | {r['floor']}% | **PENDING**: {r['status'][9:]} |")
            continue
        state = "ok" if r["pass"] else "**BELOW FLOOR**"
        run = f"{r['mutants_run']}" + ("" if r["mutants_run"] == r["mutants_total"] else f" of {r['mutants_total']}")
        lines.append(f"| {r['module']} | {tests} | {run} | {r['killed']} | {r['survived']} | {r['equivalent']} "
                     f"| {r['score']}% | {r['floor']}% | {state} |")
    lines += ["", "Surviving mutants:", ""]
    any_surv = False
    for r in results:
        for s in r.get("survivors", []):
            any_surv = True
            lines += [f"- `{s['at']}` ({s['status']})", "", "```diff", s["diff"].rstrip(), "```", ""]
    if not any_surv:
        lines += ["none.", ""]
    lines += ["Measured (per module: when, with which command; a `--ci` refresh reruns only the mutants of "
              "changed functions and of changed tests' kills, plus the fixed-seed sample):", ""]
    for r in results:
        if r.get("measured_at"):
            lines.append(f"- {r['name']}: {r['measured_at']}, `{r.get('command', '')}`"
                         + (f" ({r['ci']}; {r['reran']} run)" if r.get("ci") else ""))
    lines += ["", "Mutants reviewed as equivalent (security/equivalent-mutants.json):", ""]
    for r in results:
        for e in r.get("equivalents", []):
            lines.append(f"- `{e['at']}` `{e['key'].split('|')[2]}`: {e['reason']}")
    lines += ["", END]
    return "\n".join(lines)


def write_report(results: list[dict[str, Any]], command: str) -> None:
    """Update bench/results/mutation.json (a run of some modules replaces only their rows) and the
    generated section of docs/ASSURANCE.md."""
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    if os.path.exists(RESULTS):
        with open(RESULTS, encoding="utf-8") as f:
            old = {m["name"]: m for m in json.load(f)["modules"]}
        new = {m["name"]: m for m in results}
        results = [new.get(r["name"]) or old[r["name"]] for r in MODULES if r["name"] in new or r["name"] in old]
        command = ".venv/bin/python bench/mutation.py --write-report"
    with open(RESULTS, "w", encoding="utf-8") as f:
        json.dump({"command": command, "modules": results}, f, indent=1)
        f.write("\n")
    with open(ASSURANCE, encoding="utf-8") as f:
        doc = f.read()
    block = render(results, command)
    if BEGIN in doc:
        head, rest = doc.split(BEGIN, 1)
        doc = head + block + rest.split(END, 1)[1]
    else:
        doc = doc.rstrip() + "\n\n## Mutation testing\n\n" + block + "\n"
    with open(ASSURANCE, "w", encoding="utf-8") as f:
        f.write(doc)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--module", action="append", help="row name(s) of the table (default: all active)")
    ap.add_argument("--sample", type=int, help="fixed-seed sample of N mutants per module (default: all)")
    ap.add_argument("--sample-table", action="store_true", help="use each row's CI sample size")
    ap.add_argument("--seed", type=int, default=15)
    ap.add_argument("--include-pending", action="store_true", help="also measure pending rows")
    ap.add_argument("--json", help="write this run's results to this file")
    ap.add_argument("--write-report", action="store_true", help="update bench/results and docs/ASSURANCE.md")
    ap.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    ap.add_argument("--ci", action="store_true", help="the fast CI check against bench/results/mutation.json "
                    "(see ci_check): unchanged rows are rescored, changed ones rerun in part")
    ap.add_argument("--from-json", nargs="+", metavar="FILE", help="with --write-report: take the rows from these "
                    "--json outputs instead of running (assemble a report from runs made one module at a time)")
    ap.add_argument("--rerun-survivors", metavar="FILE", help="take a full run's --json output and run again only "
                    "its surviving mutants (and mutants new since); the others keep their status. Sound after "
                    "tests were added, not after tests were removed or the module changed")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    try:
        os.nice(19)
    except OSError:
        pass
    if a.from_json:
        merged: list[dict[str, Any]] = []
        for fn in a.from_json:
            with open(fn, encoding="utf-8") as f:
                merged += json.load(f)["modules"]
        write_report(merged, ".venv/bin/python bench/mutation.py --write-report")
        return 0 if all(r.get("pass", True) for r in merged) else 1
    rows = [r for r in MODULES if not a.module or r["name"] in a.module]
    if a.module and len(rows) != len(set(a.module)):
        ap.error(f"unknown module; the table has: {', '.join(r['name'] for r in MODULES)}")
    equivalents = load_equivalents()
    report: dict[str, dict[str, Any]] = {}
    if a.ci and os.path.exists(RESULTS):
        with open(RESULTS, encoding="utf-8") as f:
            report = {m["name"]: m for m in json.load(f)["modules"]}
    results: list[dict[str, Any]] = []
    for row in rows:
        if a.list:
            for m in enumerate_mutants(SRC, row["path"]):
                print(("EQUIV " if m.key in equivalents else "      ") + m.ident, "|", m.line)
            continue
        if row["status"] != "active" and not a.include_pending:
            results.append({"name": row["name"], "module": row["path"], "tests": row["tests"],
                            "floor": row["floor"], "status": row["status"]})
            print(f"{row['name']:17} PENDING  {row['status']}", flush=True)
            continue
        sample = row["sample"] if a.sample_table else a.sample
        if a.ci:
            r = ci_check(row, report, a.seed, equivalents, a.verbose)
        elif a.rerun_survivors:
            with open(a.rerun_survivors, encoding="utf-8") as f:
                prev = {m["name"]: m for m in json.load(f)["modules"]}[row["name"]]
            if prev.get("sample") is not None:
                ap.error(f"{a.rerun_survivors}: {row['name']} was a sample, not a full run")
            srcf = os.path.join("src", row["path"])
            keys = [m.key for m in enumerate_mutants(SRC, row["path"])]
            if prev.get("files", {}).get(srcf, file_hashes(row)[srcf]) != file_hashes(row)[srcf] or \
                    len(keys) != prev["mutants_total"]:
                ap.error(f"{row['path']} changed since {a.rerun_survivors}: run it in full")
            recorded = dict(prev.get("mutants") or {k: ["killed", ""] for k in keys})
            for sv in prev["survivors"]:
                recorded[sv["key"]] = [sv["status"], ""]
            r = measure(row, 0, a.seed, equivalents, a.verbose, recorded=recorded,
                        rerun=lambda m, old: old[0] in ("survived", "no-tests"))
            r["reran_from"] = f"{a.rerun_survivors}: only its survivors were run again"
        else:
            r = measure(row, sample, a.seed, equivalents, a.verbose)
        prev_row = report.get(row["name"], {})
        if r.get("reran") == 0 and prev_row.get("measured_at"):
            r["measured_at"], r["command"] = prev_row["measured_at"], prev_row.get("command", "")
        else:
            r["measured_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            args = list(argv if argv is not None else sys.argv[1:])
            for opt in ("--json", "--rerun-survivors"):
                if opt in args:
                    i = args.index(opt)
                    args[i:i + 2] = [opt, "FILE"] if opt == "--rerun-survivors" else []
            r["command"] = ".venv/bin/python bench/mutation.py " + " ".join(
                x for x in args if x not in ("--write-report", "-v", "--include-pending"))
        results.append(r)
        print(f"{r['name']:17} {r['score']:5.1f}% (floor {r['floor']}%) killed {r['killed']}/"
              f"{r['mutants_run'] - r['equivalent'] - r['skipped']}, {r['equivalent']} equivalent, "
              f"{r['skipped']} skipped, {r['seconds']} s {'ok' if r['pass'] else 'BELOW FLOOR'}"
              + (f" [{r['ci']}; {r['reran']} run]" if "ci" in r else ""), flush=True)
        for g in r.get("regressions", []):
            print(f"    REGRESSION: {g['at']} was killed by {g['was_killed_by']} in the report, now survives", flush=True)
        for s in r["survivors"]:
            print(f"    survived: {s['at']}\n" + "".join(f"      {ln}\n" for ln in s["diff"].splitlines()[2:]),
                  end="", flush=True)
        if r["baseline_failed"]:
            print(f"    baseline failures (excluded): {r['baseline_failed']}", flush=True)
    if a.list:
        return 0
    command = ".venv/bin/python bench/mutation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({"command": command, "modules": results}, f, indent=1)
    if a.write_report:
        write_report(results, command.replace(" --write-report", ""))
    return 0 if all(r.get("pass", True) and not r.get("regressions") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
