"""The import structure of src/bulkhead (issue 14): no import circle, no arrow against the layering.

The layering is data (bulkhead/layers.py) and docs/ARCHITECTURE.md prints it, with the exit-status
table (bulkhead/exitstatus.py); both are checked against the doc here. Every import counts: module level,
inside functions (lazy imports) and under TYPE_CHECKING, because each is a dependency someone must keep.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from bulkhead import exitstatus, layers

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(src: Path = SRC) -> dict[str, dict[str, int]]:
    """module -> {imported bulkhead module: line of the first import}."""
    files = {module_name(p, src): p for p in sorted((src / "bulkhead").rglob("*.py"))}
    graph: dict[str, dict[str, int]] = {}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        out: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    target = node.module or ""
                # `from pkg import submodule` imports the submodule; `from mod import name` imports mod
                targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in files else target for a in node.names]
            for t in targets:
                while t and t not in files and "." in t:  # `import bulkhead.x.y` of a name inside a module
                    t = t.rsplit(".", 1)[0]
                if t in files and t != mod and t.split(".")[0] == "bulkhead":
                    out.setdefault(t, node.lineno)
        graph[mod] = out
    return graph


def circles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(graph[w])))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def violations(graph: dict[str, dict[str, int]]) -> list[str]:
    """Every arrow against bulkhead.layers.LAYERS (minus its explicit EXCEPTIONS), as readable lines."""
    allowed = {(a, b) for a, b, _ in layers.EXCEPTIONS}
    bad = []
    for mod, targets in sorted(graph.items()):
        src_layer = layers.layer_of(mod)
        for target, line in sorted(targets.items()):
            if (mod, target) in allowed:
                continue
            dst_layer = layers.layer_of(target)
            src, dst = layers.LAYERS[src_layer], layers.LAYERS[dst_layer]
            if dst_layer > src_layer:
                bad.append(f"{mod}:{line} imports {target}: upward ({src.name} -> {dst.name})")
            elif src.pure and not dst.pure:
                bad.append(f"{mod}:{line} imports {target}: a pure module imports an edge module")
    return bad


def test_every_module_has_a_layer() -> None:
    for mod in import_graph():
        layers.layer_of(mod)  # raises KeyError naming an unplaced module


def test_no_import_circle() -> None:
    assert circles(import_graph()) == []


def test_no_import_against_the_layering() -> None:
    assert violations(import_graph()) == []


def test_the_checks_catch_what_they_claim(tmp_path: Path) -> None:
    """A pure module importing the runtime, and two modules importing each other, are both reported."""
    pkg = tmp_path / "bulkhead"
    (pkg / "runtime").mkdir(parents=True)
    (pkg / "boot").mkdir()
    for f in ("__init__.py", "runtime/__init__.py", "boot/__init__.py"):
        (pkg / f).write_text("")
    (pkg / "boot" / "bad.py").write_text("def f():\n    from bulkhead.runtime import vm\n")
    (pkg / "runtime" / "vm.py").write_text("from bulkhead.runtime import virtio\n")
    (pkg / "runtime" / "virtio.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from bulkhead.runtime.vm import Machine\n")
    graph = import_graph(tmp_path)
    assert circles(graph) == [["bulkhead.runtime.virtio", "bulkhead.runtime.vm"]]
    assert [v.split(" ")[0] for v in violations(graph)] == ["bulkhead.boot.bad:2"]


def test_exceptions_are_explained() -> None:
    for importer, imported, reason in layers.EXCEPTIONS:
        assert reason.strip(), f"{importer} -> {imported} needs a reason"


@pytest.mark.parametrize(("what", "text"), [("layers", layers.render), ("exit statuses", exitstatus.markdown_table)])
def test_architecture_doc_prints_the_code(what: str, text: object) -> None:
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    assert text() in doc, f"docs/ARCHITECTURE.md is out of date ({what}): paste the output of {text}"  # type: ignore[operator]


# ---------------------------------------------------------------------------------------------- sizes
# Issue 14 "Done when": no class over 300 lines and no function over 80 in src/. A definition still over
# its limit is named here with the reason it is not split yet; the test also fails when one of these
# has come under its limit, so the list can only shrink.
MAX_CLASS, MAX_FUNCTION = 300, 80
OVER_LIMIT: dict[str, str] = {}


def oversized(src: Path = SRC) -> dict[str, int]:
    """'module:Qualified.name' -> lines, for every class over MAX_CLASS and function over MAX_FUNCTION."""
    found: dict[str, int] = {}

    def visit(node: ast.AST, mod: str, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                lines = (child.end_lineno or child.lineno) - child.lineno + 1
                limit = MAX_CLASS if isinstance(child, ast.ClassDef) else MAX_FUNCTION
                if lines > limit:
                    found[f"{mod}:{name}"] = lines
                visit(child, mod, name + ".")
            else:
                visit(child, mod, prefix)

    for path in sorted((src / "bulkhead").rglob("*.py")):
        visit(ast.parse(path.read_text(), str(path)), module_name(path, src), "")
    return found


def test_no_class_or_function_over_its_size_limit() -> None:
    found = oversized()
    new = {k: v for k, v in found.items() if k not in OVER_LIMIT}
    assert not new, f"split by meaning (classes <= {MAX_CLASS} lines, functions <= {MAX_FUNCTION}): {new}"
    shrunk = sorted(set(OVER_LIMIT) - set(found))
    assert not shrunk, f"now within the limit, remove from OVER_LIMIT: {shrunk}"


def test_the_size_check_sees_nested_definitions(tmp_path: Path) -> None:
    pkg = tmp_path / "bulkhead"
    pkg.mkdir()
    body = "\n".join(f"        x{i} = {i}" for i in range(MAX_FUNCTION))
    (pkg / "big.py").write_text(f"class C:\n    def f(self):\n{body}\n")
    assert oversized(tmp_path) == {"bulkhead.big:C.f": MAX_FUNCTION + 1}
