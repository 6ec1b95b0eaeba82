"""The package import graph has no cycles: leaf helpers live in leaf modules (t2i_align.common)."""

import ast
from collections import defaultdict
from pathlib import Path

from tests.helpers import REPO_ROOT

PACKAGE = Path(REPO_ROOT) / "t2i_align"


def package_graph() -> dict[str, set[str]]:
    """``t2i_align.<part>`` -> the other parts it imports (parts: subpackages and top-level modules)."""
    edges: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        source = ".".join(module.split(".")[:2])
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (parts[-1] == "__init__")]
                names = [".".join([*anchor, node.module] if node.module else anchor)]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                target = ".".join(name.split(".")[:2])
                if name.startswith("t2i_align.") and target != source:
                    edges[source].add(target)
    return edges


def test_no_import_cycles_between_packages():
    edges = package_graph()
    assert "t2i_align.common" in edges["t2i_align.lightning_modules"]  # the scan sees imports at all
    cycles = []
    for start in list(edges):  # depth-first search for a path back to start
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in edges.get(node, ()):
                if nxt == start:
                    cycles.append(" -> ".join([*path, start]))
                elif nxt not in path:
                    stack.append((nxt, [*path, nxt]))
    assert not cycles, cycles[:5]
