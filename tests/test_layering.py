"""The package's layering: imports point one way (no circle between packages), tailor.lora imports
nothing of tailor, and evaluation does not depend on training."""

from __future__ import annotations

import ast
from pathlib import Path

import tailor

ROOT = Path(tailor.__file__).parent


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def package_imports() -> dict[str, set[str]]:
    """tailor.X -> the tailor.Y it imports (also inside functions; not TYPE_CHECKING-only imports)."""
    edges: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        source = _package(".".join(("tailor", *path.relative_to(ROOT).with_suffix("").parts)))
        tree = ast.parse(path.read_text())
        skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                   for n in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if name.startswith("tailor.") and _package(name) != source and source != "tailor":
                    edges.setdefault(source, set()).add(_package(name))
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle_between_packages():
    assert _cycle(package_imports()) is None, " -> ".join(_cycle(package_imports()))


def test_lora_imports_nothing_of_tailor_and_eval_not_train():
    edges = package_imports()
    assert edges.get("tailor.lora", set()) == set()
    for lower in ("tailor.eval", "tailor.loss", "tailor.methods", "tailor.config", "tailor.data"):
        assert "tailor.train" not in edges.get(lower, set()), lower


def test_the_check_sees_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
