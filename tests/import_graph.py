"""The import graph of ``src/eventrelay``, from the source text: ``python -m tests.import_graph``.

Prints each module with the package modules it imports (at any depth of the file, so an import inside a
function counts: it is still an arrow a reader must follow), then every cycle, then each module over the line
limit. ``tests/unit/test_architecture.py`` holds the package to no cycle and no long module.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "eventrelay"
ROOT = Path(__file__).resolve().parent.parent / "src" / PACKAGE
LINE_LIMIT = 500


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``)."""
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imported(node: ast.AST, here: str, is_package: bool, known: dict[str, Path]) -> Iterator[str]:
    """The modules an import statement names: `from x import y` names `x.y` when that is a module, else x."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
        stem = node.module or ""
        if node.level:
            base = here.split(".")[: len(here.split(".")) - node.level + (1 if is_package else 0)]
            stem = ".".join([*base, node.module] if node.module else base)
        for alias in node.names:
            yield f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in known else stem


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the package modules it imports (at any depth of the file, TYPE_CHECKING blocks too)."""
    known = modules(root)
    arrows: dict[str, set[str]] = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        arrows[name] = {
            target
            for node in ast.walk(tree)
            for target in _imported(node, name, path.name == "__init__.py", known)
            if target in known and target != name
        }
    return arrows


def cycles(arrows: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in arrows[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(arrows):
        if node not in index:
            visit(node)
    return sorted(found)


def long_modules(root: Path = ROOT, limit: int = LINE_LIMIT) -> dict[str, int]:
    """Modules over ``limit`` lines, with their length."""
    lengths = {name: len(path.read_text().splitlines()) for name, path in modules(root).items()}
    return {name: n for name, n in lengths.items() if n > limit}


def main() -> int:
    arrows = graph()
    short = len(PACKAGE) + 1
    for name in sorted(arrows):
        targets = ", ".join(sorted(t[short:] for t in arrows[name]))
        print(f"{name[short:] or PACKAGE} -> {targets}")
    found = cycles(arrows)
    for group in found:
        print("cycle:", " <-> ".join(g[short:] for g in group))
    for name, n in long_modules().items():
        print(f"over {LINE_LIMIT} lines: {name[short:]} ({n})")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
