"""The package's shape, checked with ``ast``: imports point downstream only, functions fit on a screen.

The rules are those of ``docs/architecture.md``: ``io`` <- ``preprocess`` <- ``train`` /
``evaluate`` / ``inference``; ``models`` is used by those three; ``tracking`` by the stages;
the pipeline and the CLI on top; nothing imports the CLI. Leaf modules (``errors``,
``config``, ``files``, ``figures``, ``spatial``, ``console``) may be imported by anyone.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "chemmap"
MAX_LINES = 80

LEAVES = {"errors", "config", "files", "figures", "spatial", "console"}
# concept -> the other concepts it may import (leaves aside).
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "config": set(),
    "files": set(),
    "figures": set(),
    "spatial": set(),
    "console": set(),
    "stages": set(),
    "tracking": set(),
    "io": set(),
    "synth": {"io"},
    "preprocess": {"io"},
    "models": set(),
    "inference": {"io", "preprocess", "models"},
    "train": {"preprocess", "models", "stages", "tracking"},
    "evaluate": {"preprocess", "models", "inference", "stages", "tracking"},
    "registry": {"preprocess", "models", "inference", "evaluate", "stages", "tracking"},
}
STAGE_PACKAGES = {
    "io",
    "synth",
    "preprocess",
    "models",
    "train",
    "evaluate",
    "inference",
    "registry",
    "stages",
    "tracking",
}
ALLOWED["pipeline"] = STAGE_PACKAGES
# Ray jobs: a config checked and `chemmap run` submitted to a cluster; only the CLI uses it.
ALLOWED["cluster"] = set()
ALLOWED["cli"] = {*ALLOWED["pipeline"], "pipeline", "cluster"}
# Modules that may import chemmap modules inside functions: the assemblers, to keep
# `chemmap --help` instant and to load a stage's heavy libraries only when it runs.
LAZY_IMPORTERS = {"cli", "pipeline"}


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _concept(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return rel.parts[0] if rel.parts[0] != "__init__" else "chemmap"


def _chemmap_imports(tree: ast.AST, module: str) -> list[tuple[ast.AST, str]]:
    """``(node, imported module)`` of every chemmap import, relative ones resolved."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node, a.name) for a in node.names if a.name.split(".")[0] == "chemmap"]
        elif isinstance(node, ast.ImportFrom):
            name = node.module or ""
            if node.level:
                base = module.split(".")[: -node.level]
                name = ".".join([*base, name] if name else base)
            if name == "chemmap":  # from chemmap import tracking
                out += [(node, f"chemmap.{a.name}") for a in node.names]
            elif name.split(".")[0] == "chemmap":
                out.append((node, name))
    return out


def _target_concept(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "chemmap"


def _top_level_nodes(tree: ast.Module) -> set[int]:
    """ids of import nodes at module level (also inside a top-level ``if``/``try``)."""
    ids: set[int] = set()
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            ids.add(id(node))
        elif isinstance(node, ast.If | ast.Try):
            stack += [
                *node.body,
                *node.orelse,
                *getattr(node, "handlers", []),
                *getattr(node, "finalbody", []),
            ]
        elif isinstance(node, ast.ExceptHandler):
            stack += node.body
    return ids


def _broken_rules(path: Path) -> list[str]:
    concept = _concept(path)
    module = ".".join(("chemmap", *path.relative_to(PACKAGE).with_suffix("").parts))
    tree = ast.parse(path.read_text())
    top = _top_level_nodes(tree)
    problems = []
    for node, name in _chemmap_imports(tree, module):
        target = _target_concept(name)
        where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
        if target == "cli":
            problems.append(f"{where} imports the CLI ({name})")
        elif target not in (concept, *LEAVES) and target not in ALLOWED.get(concept, set()):
            problems.append(f"{where}: {concept} must not import {target} ({name})")
        elif id(node) not in top and concept not in LAZY_IMPORTERS and target != concept:
            problems.append(
                f"{where}: import {name} inside a function (put chemmap's own imports at the top)"
            )
    return problems


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_downstream(path):
    assert _concept(path) in {*ALLOWED, "chemmap"}, f"{path}: a new package needs its row in ALLOWED"
    assert _broken_rules(path) == []


def test_the_rules_catch_a_broken_one(tmp_path):
    fake = PACKAGE / "train" / "_probe_for_test.py"
    try:
        fake.write_text(
            "from chemmap.evaluate import report\n\n\ndef f():\n    from chemmap.models import unet\n"
        )
        problems = _broken_rules(fake)
    finally:
        fake.unlink()
    assert len(problems) == 2
    assert "train must not import evaluate" in problems[0] and "inside a function" in problems[1]


def _long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    return [
        f"{path.relative_to(PACKAGE.parent)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.end_lineno - n.lineno + 1 > MAX_LINES
    ]


def test_no_function_is_longer_than_a_screen():
    assert [f for p in _modules() for f in _long_functions(p)] == []
