"""docs/THREAT_MODEL.md stays true to the suite: every test it names (`tests/...py::test_name`) exists,
every boundary has a section with assets and at least one test per section, and every boundary the
attack-surface registry knows is covered. Test names are collected by parsing the test files with ast
(no test module is imported)."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

from bulkhead.surface import BOUNDARIES

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "THREAT_MODEL.md"
REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")
SECTIONS = (
    "Guest to VMM",
    "Guest to guest",
    "Worker to daemon",
    "API client to daemon",
    "Tenant to tenant",
    "Host code integrity",
    "Underlay to host",
)


@cache
def defined_tests(path: Path) -> frozenset[str]:
    """Names of test functions defined at module level or in classes of a test file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = set()
    for node in tree.body:
        bodies = node.body if isinstance(node, ast.ClassDef) else [node]
        for item in bodies:
            if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and item.name.startswith("test"):
                names.add(item.name)
    return frozenset(names)


def references(text: str) -> list[tuple[str, str]]:
    return REF.findall(text)


def missing(text: str, root: Path = ROOT) -> list[str]:
    """The `file::test` references in `text` that do not name an existing test."""
    out = []
    for file, name in references(text):
        path = root / file
        if not path.is_file() or name not in defined_tests(path):
            out.append(f"{file}::{name}")
    return out


def _sections(text: str) -> dict[str, str]:
    parts = re.split(r"^## ", text, flags=re.MULTILINE)
    return {p.splitlines()[0].split(" (")[0].strip(): p for p in parts[1:]}


def test_every_named_test_exists() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert len(references(text)) >= 40
    assert missing(text) == [], "docs/THREAT_MODEL.md names tests that do not exist"


def test_the_check_detects_a_vanished_test() -> None:
    text = "`tests/test_threat_model.py::test_every_named_test_exists` `tests/test_threat_model.py::test_gone`"
    assert missing(text) == ["tests/test_threat_model.py::test_gone"]
    assert missing("`tests/no_such_file.py::test_x`") == ["tests/no_such_file.py::test_x"]


def test_every_boundary_has_assets_threats_and_tests() -> None:
    sections = _sections(DOC.read_text(encoding="utf-8"))
    for title in SECTIONS:
        assert title in sections, f"no section for {title}"
        body = sections[title]
        assert "Assets:" in body, f"{title}: no assets"
        assert "| STRIDE |" in body, f"{title}: no STRIDE table"
        assert references(body), f"{title}: no test proves a mitigation"


def test_every_registry_boundary_is_in_the_model() -> None:
    text = DOC.read_text(encoding="utf-8")
    for boundary in BOUNDARIES:
        assert f"`{boundary}`" in text, f"boundary {boundary} of bulkhead.surface is not modelled"
