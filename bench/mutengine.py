"""A small AST mutation engine for bulkhead's pure security core (issue 15).

Why our own and not mutmut/cosmic-ray: see docs/ASSURANCE.md section "Mutation testing". In short, the
engine collects the module's tests once, runs them once to learn which test reaches which function,
then forks one child per mutant that swaps a single function's ``__code__`` for the mutated one and
runs only the tests that reach that function, fastest first, stopping at the first failure. No source
tree is copied, nothing is written into ``src/``, and one process runs at a time.

Mutation operators (one mutant each):
  binop/augassign  + -> -, - -> +, * -> /, / -> *, // -> *, % -> //, ** -> *, << <-> >>, & -> |, | -> &, ^ -> &
  compare          == <-> !=, < -> <=, <= -> <, > -> >=, >= -> >, is <-> is not, in <-> not in
  boolop           and <-> or
  unary            `not x` -> `x`, `-x` -> `x`, `~x` -> `x`
  constant         int n -> n + 1, True <-> False, str s -> "XX" s "XX", bytes b -> b"XX" b
  return           `return e` -> `return None`
  assign           `x = e` -> `x = None`
  loop             break <-> continue
  raise-drop       `if c: raise E` -> `if c: pass`
Not mutated: docstrings, annotations, decorators, default values, module- and class-level code, and
string constants inside a ``raise`` (messages: tests assert typed error kinds, not wording).

A mutant's stable key is (module, function, stripped source line, operator, occurrence on that line),
so a reviewed equivalent-mutant entry survives line shifts.
"""

from __future__ import annotations

import ast
import copy
import difflib
import importlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_BINOP: dict[type, type] = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult,
    ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult, ast.LShift: ast.RShift, ast.RShift: ast.LShift,
    ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd, ast.BitXor: ast.BitAnd,
}
_CMP: dict[type, type] = {
    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE,
    ast.GtE: ast.Gt, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In,
}


# decorators, annotations and defaults are evaluated at definition time, not by the function's code
_SKIP_DEF = ("decorator_list", "returns", "args", "type_params")


@dataclass
class Mutant:
    module: str          # "bulkhead/control/rbac.py"
    function: str        # "Policy.decide"
    lineno: int
    line: str            # stripped source line of the mutated node
    op: str              # "Lt->LtE"
    occurrence: int      # index among mutants with the same (function, line, op)
    walk_index: int      # position of the node in the function's deterministic walk
    choice: int          # which mutation of that node
    status: str = "pending"
    killed_by: str = ""
    diff: str = ""

    @property
    def key(self) -> str:
        return f"{self.module}|{self.function}|{self.line}|{self.op}|{self.occurrence}"

    @property
    def ident(self) -> str:
        return f"{self.module}:{self.lineno}:{self.function}:{self.op}"


Edit = tuple[str, Callable[[], None]]


def _walk(node: ast.AST) -> Iterator[tuple[ast.AST, ast.AST | None, str, int | None]]:
    """Every node below a function, deterministic order, with (parent, field, index) to replace it."""
    stack: list[tuple[ast.AST, ast.AST | None, str, int | None]] = [(node, None, "", None)]
    while stack:
        cur, parent, fld, idx = stack.pop()
        yield cur, parent, fld, idx
        children: list[tuple[ast.AST, ast.AST | None, str, int | None]] = []
        for name, value in ast.iter_fields(cur):
            if isinstance(cur, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and name in _SKIP_DEF:
                continue
            if isinstance(cur, (ast.arg, ast.AnnAssign)) and name == "annotation":
                continue
            if isinstance(value, list):
                children.extend((v, cur, name, i) for i, v in enumerate(value) if isinstance(v, ast.AST))
            elif isinstance(value, ast.AST):
                children.append((value, cur, name, None))
        stack.extend(reversed(children))


def _replace(parent: ast.AST, fld: str, idx: int | None, new: ast.AST) -> None:
    if idx is None:
        setattr(parent, fld, new)
    else:
        getattr(parent, fld)[idx] = new


def _is_docstring(parent: ast.AST | None, fld: str, idx: int | None) -> bool:
    return isinstance(parent, ast.Expr)


def _edits(node: ast.AST, parent: ast.AST | None, fld: str, idx: int | None, in_raise: bool,
           in_fstring: bool) -> list[Edit]:
    """The mutations of one node, each a (name, apply) pair. apply mutates the (copied) tree in place."""
    out: list[Edit] = []
    if isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in _BINOP:
        new = _BINOP[type(node.op)]
        out.append((f"{type(node.op).__name__}->{new.__name__}", lambda: setattr(node, "op", new())))
    elif isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in _CMP:
                new = _CMP[type(op)]
                out.append((f"{type(op).__name__}->{new.__name__}",
                            lambda i=i, new=new: node.ops.__setitem__(i, new())))
    elif isinstance(node, ast.BoolOp):
        new = ast.Or if isinstance(node.op, ast.And) else ast.And
        out.append((f"{type(node.op).__name__}->{new.__name__}", lambda: setattr(node, "op", new())))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub, ast.Invert)):
        if parent is not None:
            out.append((f"drop-{type(node.op).__name__}", lambda: _replace(parent, fld, idx, node.operand)))
    elif isinstance(node, ast.Constant) and not in_fstring:
        v = node.value
        if isinstance(v, bool):
            out.append((f"{v}->{not v}", lambda: setattr(node, "value", not v)))
        elif isinstance(v, int):
            out.append(("int+1", lambda: setattr(node, "value", v + 1)))
        elif isinstance(v, str) and not in_raise and not _is_docstring(parent, fld, idx):
            out.append(("str-XX", lambda: setattr(node, "value", "XX" + v + "XX")))
        elif isinstance(v, bytes) and not in_raise:
            out.append(("bytes-XX", lambda: setattr(node, "value", b"XX" + v)))
    elif isinstance(node, ast.Return) and node.value is not None and not (
            isinstance(node.value, ast.Constant) and node.value.value is None):
        out.append(("return-None", lambda: setattr(node, "value", ast.Constant(None))))
    elif isinstance(node, ast.Assign) and not (isinstance(node.value, ast.Constant) and node.value.value is None):
        out.append(("assign-None", lambda: setattr(node, "value", ast.Constant(None))))
    elif isinstance(node, ast.Break) and parent is not None:
        out.append(("break->continue", lambda: _replace(parent, fld, idx, ast.Continue())))
    elif isinstance(node, ast.Continue) and parent is not None:
        out.append(("continue->break", lambda: _replace(parent, fld, idx, ast.Break())))
    elif isinstance(node, ast.Raise) and isinstance(parent, ast.If) and fld == "body" and len(parent.body) == 1:
        out.append(("raise-drop", lambda: _replace(parent, fld, idx, ast.Pass())))
    return out


def _function_edits(fn: ast.AST) -> Iterator[tuple[int, int, ast.AST, str, Callable[[], None]]]:
    """(walk index, choice, node, op, apply) for every mutation inside one top-level function."""
    raise_ranges: list[tuple[int, int]] = []
    fstring_ids: set[int] = set()
    for n in ast.walk(fn):
        if isinstance(n, ast.Raise):
            raise_ranges.append((n.lineno, n.end_lineno or n.lineno))
        if isinstance(n, ast.JoinedStr):
            fstring_ids.update(id(c) for c in ast.walk(n))
    first = True
    for walk_index, (node, parent, fld, idx) in enumerate(_walk(fn)):
        if first:   # the def itself
            first = False
            continue
        # a function's own docstring
        if (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)):
            continue
        lineno = getattr(node, "lineno", 0)
        in_raise = any(a <= lineno <= b for a, b in raise_ranges)
        for choice, (op, apply) in enumerate(_edits(node, parent, fld, idx, in_raise, id(node) in fstring_ids)):
            yield walk_index, choice, node, op, apply


def _top_functions(tree: ast.Module) -> Iterator[tuple[str, list[str], ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(qualname, enclosing class path, def) for module-level functions and (nested) class methods."""
    def visit(body: list[ast.stmt], classes: list[str]) -> Iterator[
            tuple[str, list[str], ast.FunctionDef | ast.AsyncFunctionDef]]:
        for st in body:
            if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield ".".join([*classes, st.name]), classes, st
            elif isinstance(st, ast.ClassDef):
                yield from visit(st.body, [*classes, st.name])
    yield from visit(tree.body, [])


def enumerate_mutants(src_root: str, relpath: str) -> list[Mutant]:
    path = os.path.join(src_root, relpath)
    with open(path, encoding="utf-8") as f:
        source = f.read()
    lines = source.splitlines()
    tree = ast.parse(source)
    out: list[Mutant] = []
    seen: dict[tuple[str, str, str], int] = {}
    for qualname, _classes, fn in _top_functions(tree):
        for walk_index, choice, node, op, _apply in _function_edits(fn):
            lineno = getattr(node, "lineno", fn.lineno)
            text = lines[lineno - 1].strip() if 0 < lineno <= len(lines) else ""
            k = (qualname, text, op)
            occ = seen.get(k, 0)
            seen[k] = occ + 1
            out.append(Mutant(relpath, qualname, lineno, text, op, occ, walk_index, choice))
    return out


def _find_def(tree: ast.Module, qualname: str, nth: int = 0) -> tuple[list[str], ast.FunctionDef | ast.AsyncFunctionDef]:
    hits = [(c, fn) for q, c, fn in _top_functions(tree) if q == qualname]
    return hits[nth]


def mutated_code(source: str, filename: str, m: Mutant, nth: int = 0) -> tuple[Any, str, int]:
    """Compile the mutated function; return (code object, unified diff, def's first line)."""
    tree = ast.parse(source)
    classes, fn = _find_def(tree, m.function, nth)
    first_line = fn.decorator_list[0].lineno if fn.decorator_list else fn.lineno
    before = ast.unparse(fn)
    fn = copy.deepcopy(fn)
    edits = [(w, c, op, apply) for w, c, _n, op, apply in _function_edits(fn) if (w, c) == (m.walk_index, m.choice)]
    if not edits:
        raise LookupError(f"mutation site vanished: {m.ident}")
    edits[0][3]()
    fn.decorator_list = []
    after = ast.unparse(fn)
    diff = "".join(difflib.unified_diff(before.splitlines(True), after.splitlines(True), "original", "mutant", n=1))
    wrapped: ast.stmt = fn
    for cls in reversed(classes):
        wrapped = ast.ClassDef(name=cls, bases=[], keywords=[], body=[wrapped], decorator_list=[])
    mod = ast.Module(body=[wrapped], type_ignores=[])
    ast.fix_missing_locations(mod)
    code = compile(mod, filename, "exec", dont_inherit=True)
    for _ in classes:
        code = next(c for c in code.co_consts if hasattr(c, "co_code") and c.co_name in classes)
    fcode = next(c for c in code.co_consts if hasattr(c, "co_code") and c.co_name == fn.name)
    return fcode, diff, first_line


def _unwrap(obj: Any) -> list[Any]:
    out: list[Any] = []
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    if isinstance(obj, property):
        return [f for f in (obj.fget, obj.fset, obj.fdel) if f is not None]
    while obj is not None:
        if hasattr(obj, "__code__"):
            out.append(obj)
        obj = getattr(obj, "__wrapped__", None)
    return out


def target_function(module: Any, qualname: str, first_line: int) -> Any:
    parts = qualname.split(".")
    obj: Any = module
    for p in parts[:-1]:
        obj = obj.__dict__[p]
    cands = _unwrap(obj.__dict__.get(parts[-1]))
    for f in cands:
        if f.__code__.co_firstlineno == first_line:
            return f
    if len(cands) == 1:
        return cands[0]
    raise LookupError(f"cannot find function object for {qualname} (line {first_line})")


def _all_codes(code: Any) -> Iterator[Any]:
    yield code
    for c in code.co_consts:
        if hasattr(c, "co_code"):
            yield from _all_codes(c)


# --------------------------------------------------------------------------- the pytest side

@dataclass
class RunResult:
    baseline_failed: list[str] = field(default_factory=list)
    tests: int = 0
    baseline_seconds: float = 0.0
    mutants: list[Mutant] = field(default_factory=list)


class MutationPlugin:
    """Collect once, then fork: one baseline child (coverage map) and one child per mutant."""

    def __init__(self, modname: str, src_root: str, relpath: str, mutants: list[Mutant],
                 progress: Callable[[str], None]) -> None:
        self.modname = modname
        self.src_root = src_root
        self.relpath = relpath
        self.mutants = mutants
        self.progress = progress
        self.result = RunResult(mutants=mutants)
        self._failed: list[str] = []

    # pytest hooks
    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.failed:
            self._failed.append(report.nodeid)

    def pytest_runtestloop(self, session: Any) -> bool:
        items = list(session.items)
        self._config = session.config
        self.result.tests = len(items)
        cover, durations, failed = self._baseline(items)
        self.result.baseline_failed = failed
        self.result.baseline_seconds = sum(durations.values())
        good = [it for it in items if it.nodeid not in failed]
        module = importlib.import_module(self.modname)
        path = module.__file__ or ""
        with open(path, encoding="utf-8") as f:
            source = f.read()
        for i, m in enumerate(self.mutants, 1):
            sel = sorted((it for it in good if m.function in cover.get(it.nodeid, ())),
                         key=lambda it: durations.get(it.nodeid, 0.0))
            try:
                code, m.diff, first = mutated_code(source, path, m)
                fobj = target_function(module, m.function, first)
            except (LookupError, SyntaxError, ValueError, StopIteration) as e:
                m.status, m.killed_by = "skipped", f"{type(e).__name__}: {e}"
                continue
            if not sel:
                m.status = "no-tests"
            else:
                budget = 10.0 + 3.0 * sum(durations.get(it.nodeid, 0.0) for it in sel)
                m.status, m.killed_by = self._run_mutant(fobj, code, sel, budget)
            self.progress(f"[{i}/{len(self.mutants)}] {m.status:9} {m.ident}")
        return True

    def _run_items(self, items: list[Any]) -> str:
        self._failed = []
        for i, item in enumerate(items):
            nxt = items[i + 1] if i + 1 < len(items) else None
            item.config.hook.pytest_runtest_protocol(item=item, nextitem=nxt)
            if self._failed:
                return self._failed[0]
        return ""

    def _fork(self, child: Callable[[], Any], budget: float) -> tuple[str, Any]:
        """Run child() in a forked process group with its own stdout/stderr silenced."""
        fd, out = tempfile.mkstemp(prefix="bulkhead-mut-", suffix=".json")
        os.close(fd)
        pid = os.fork()
        if pid == 0:  # child
            code = 0
            try:
                os.setpgid(0, 0)
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 1)
                os.dup2(null, 2)
                tr = self._config.pluginmanager.get_plugin("terminalreporter")
                if tr is not None:  # pytest keeps the terminal on a saved dup of fd 1
                    tr._tw._file = open(os.devnull, "w")  # noqa: SIM115 (lives until the child exits)
                value = child()
                with open(out, "w", encoding="utf-8") as f:
                    json.dump(value, f)
            except BaseException:
                code = 3
            finally:
                os._exit(code)
        deadline = time.monotonic() + budget
        try:
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.monotonic() > deadline:
                    os.killpg(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    return "timeout", None
                time.sleep(0.02)
            if os.waitstatus_to_exitcode(status) != 0:
                return "crashed", None
            with open(out, encoding="utf-8") as f:
                return "ok", json.load(f)
        finally:
            os.unlink(out)

    def _baseline(self, items: list[Any]) -> tuple[dict[str, set[str]], dict[str, float], list[str]]:
        module = importlib.import_module(self.modname)
        code_to_fn: dict[Any, str] = {}
        tree_names = {q for q, _c, _f in _top_functions(ast.parse(Path(module.__file__ or "").read_text(encoding="utf-8")))}
        for q in tree_names:
            parts = q.split(".")
            obj: Any = module
            try:
                for p in parts[:-1]:
                    obj = obj.__dict__[p]
                for f in _unwrap(obj.__dict__.get(parts[-1])):
                    for c in _all_codes(f.__code__):
                        code_to_fn[c] = q
            except KeyError:
                continue

        def child() -> dict[str, Any]:
            import threading
            cover: dict[str, list[str]] = {}
            durations: dict[str, float] = {}
            failed: list[str] = []
            current: set[str] = set()

            def prof(frame: Any, event: str, arg: Any) -> None:
                if event == "call":
                    q = code_to_fn.get(frame.f_code)
                    if q is not None:
                        current.add(q)
            sys.setprofile(prof)
            threading.setprofile(prof)
            for i, item in enumerate(items):
                nxt = items[i + 1] if i + 1 < len(items) else None
                current.clear()
                self._failed = []
                t0 = time.monotonic()
                item.config.hook.pytest_runtest_protocol(item=item, nextitem=nxt)
                durations[item.nodeid] = time.monotonic() - t0
                cover[item.nodeid] = sorted(current)
                if self._failed:
                    failed.append(item.nodeid)
            sys.setprofile(None)
            threading.setprofile(None)  # type: ignore[arg-type]
            return {"cover": cover, "durations": durations, "failed": failed}

        state, value = self._fork(child, budget=1800.0)
        if state != "ok":
            raise RuntimeError(f"baseline run {state}")
        return ({k: set(v) for k, v in value["cover"].items()}, value["durations"], value["failed"])

    def _run_mutant(self, fobj: Any, code: Any, sel: list[Any], budget: float) -> tuple[str, str]:
        def child() -> str:
            fobj.__code__ = code
            return self._run_items(sel)
        state, value = self._fork(child, budget)
        if state == "timeout":
            return "timeout", ""
        if state == "crashed":
            return "killed", "(crashed the test process)"
        return ("killed", value) if value else ("survived", "")


def run_module(modname: str, src_root: str, relpath: str, tests: list[str], mutants: list[Mutant],
               progress: Callable[[str], None], repo: str) -> RunResult:
    import pytest
    plugin = MutationPlugin(modname, src_root, relpath, mutants, progress)
    args = ["-q", "-p", "no:cacheprovider", "-o", "addopts=", "--no-header", "-W", "ignore",
            "--rootdir", repo, *[os.path.join(repo, t) for t in tests]]
    saved = os.getcwd()
    os.chdir(repo)
    try:
        rc = pytest.main(args, plugins=[plugin])
    finally:
        os.chdir(saved)
    if rc not in (0, 5) and not plugin.result.mutants:
        raise RuntimeError(f"pytest exited {rc}")
    return plugin.result
