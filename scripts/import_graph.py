"""The project's import structure: its layers, the imports between them, and what breaks the layering.

    .venv/bin/python scripts/import_graph.py            # the layers as a Mermaid diagram, then any problem
    .venv/bin/python scripts/import_graph.py --check    # only the problems; exit 1 if there is one

Every import counts, at module level or inside a function (a lazy import is still a dependency), except those
under ``if TYPE_CHECKING:``. A module may import from its own layer and the layers below it, never from one above;
the modules import no circle; and no module imports another layer's private names (``_name``).
``tests/test_layers.py`` runs the check.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("plvm_model", "operators", "pipelines")

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("model code", ("plvm_model",)),
    ("stored state", ("plvm_model.store",)),
    ("stages", ("operators",)),
    ("runner", ("pipelines.runner",)),
    ("config", ("pipelines.config",)),
    ("compositions", ("pipelines",)),
    ("command line", ("pipelines.cli",)),
]
"""Bottom to top; a module belongs to the layer of its longest matching prefix."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> int:
    best, length = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > length:
                best, length = i, len(prefix)
    return best


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports(path: Path, modules: set[str]) -> list[tuple[str, list[str]]]:
    """The project modules ``path`` imports, each with the names it takes from it."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    own = module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], *filter(None, [base])])
            for alias in node.names:  # `from pkg import module` imports the module
                if f"{base}.{alias.name}" in modules:
                    found.append((f"{base}.{alias.name}", []))
                else:
                    found.append((base, [alias.name]))
    out = []
    for target, names in found:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != own:
            out.append((target, names))
    return out


def graph() -> dict[str, list[tuple[str, list[str]]]]:
    files = [p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))]
    modules = {module_name(p) for p in files}
    return {module_name(p): imports(p, modules) for p in files}


def cycles(edges: dict[str, list[tuple[str, list[str]]]]) -> list[list[str]]:
    """The import circles: strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target, _ in edges.get(node, []):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10000)
    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def problems(edges: dict[str, list[tuple[str, list[str]]]]) -> list[str]:
    """Every upward import, private name taken across layers, and circle."""
    out = []
    for module, targets in sorted(edges.items()):
        for target, names in targets:
            here, there = layer_of(module), layer_of(target)
            if there > here:
                out.append(f"upward: {module} ({LAYERS[here][0]}) imports {target} ({LAYERS[there][0]})")
            private = [n for n in names if n.startswith("_")]
            if private and here != there:
                out.append(f"private: {module} imports {', '.join(private)} from {target}")
    out += [f"circle: {' -> '.join(component)}" for component in cycles(edges)]
    return out


def mermaid(edges: dict[str, list[tuple[str, list[str]]]]) -> str:
    """The layers and the imports between them (how many), bottom to top."""
    counts: dict[tuple[int, int], int] = defaultdict(int)
    for module, targets in edges.items():
        for target, _ in targets:
            here, there = layer_of(module), layer_of(target)
            if here != there:
                counts[(here, there)] += 1
    lines = ["flowchart BT"]
    for i, (name, prefixes) in enumerate(LAYERS):
        lines.append(f'    L{i}["{name}<br/>{", ".join(prefixes)}"]')
    for (here, there), n in sorted(counts.items()):
        lines.append(f"    L{here} -->|{n}| L{there}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="print only the problems; exit 1 if there is one")
    args = parser.parse_args()
    edges = graph()
    found = problems(edges)
    if not args.check:
        print(mermaid(edges))
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
