"""The house rules of ARCHITECTURE.md, checked on the source: the one door, and no import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _modules(package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, module: str) -> set[str]:
    """Every module `path` imports, at any depth of the file (lazy imports count too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


def _graph(*packages: str) -> dict[str, set[str]]:
    modules = {name: path for package in packages for name, path in _modules(package).items()}
    return {name: {m for m in _imports(path, name) if m in modules and m != name} for name, path in modules.items()}


def test_harness_enters_the_detector_only_through_detector_api() -> None:
    offenders = sorted(
        f"{name} imports {target}"
        for name, path in _modules("harness").items()
        for target in _imports(path, name)
        if (target == "detector" or target.startswith("detector.")) and not target.startswith("detector.api")
    )
    assert offenders == []


def test_the_detector_never_imports_the_harness() -> None:
    offenders = sorted(
        f"{name} imports {target}" for name, path in _modules("detector").items() for target in _imports(path, name)
        if target == "harness" or target.startswith("harness.")
    )  # fmt: skip
    assert offenders == []


@pytest.mark.parametrize("package", ["harness", "detector"])
def test_no_import_cycle(package: str) -> None:
    graph = _graph(package)
    graph = {m: {t for t in targets if graph.get(t) is not None and not m.startswith(t + ".")} for m, targets in graph.items()}
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [node, nxt]) if nxt in stack else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert cycles == []
