"""Imports point down: no cycles among transferkit's modules, and each layer imports only the layers below it.

Every import counts, also those inside functions (which hide a cycle from Python but not from a reader) and
those under ``TYPE_CHECKING``: the graph is read from the source with :mod:`ast`, nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "transferkit"
# A layer -> the layers it must never import.
FORBIDDEN = {
    "models": ("features", "train", "use", "cli"),
    "train": ("use", "cli"),
}
# MLflow is tracking's business; outside tracking/ only these modules may import it, each for one reason.
MLFLOW_ALLOWED = {
    "transferkit.models.saved_model",  # find_checkpoint downloads a runs:/ or models:/ URI to a local file
}


def _module_files() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = _module_files()


def _imported_names(module: str, path: Path) -> set[str]:
    """Every dotted name ``module`` imports: ``from a.b import c`` gives ``a.b.c`` when that is a module, else ``a.b``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                names.add(full if full in MODULES else base)
    return names


IMPORTS = {module: _imported_names(module, path) for module, path in MODULES.items()}
GRAPH = {module: sorted(name for name in names if name in MODULES and name != module)
         for module, names in IMPORTS.items()}


def import_cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, targets = work[-1]
            target = next(targets, None)
            if target is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        cycles.append(sorted(component))
            elif target not in index:
                index[target] = low[target] = len(index)
                stack.append(target)
                on_stack.add(target)
                work.append((target, iter(graph[target])))
            elif target in on_stack:
                low[node] = min(low[node], index[target])
    return cycles


def test_the_cycle_finder_finds_a_cycle_hidden_in_a_longer_chain():
    graph = {"a": ["b"], "b": ["c"], "c": ["a", "d"], "d": []}
    assert import_cycles(graph) == [["a", "b", "c"]]
    assert import_cycles({"a": ["b"], "b": []}) == []


def test_no_import_cycles():
    assert import_cycles(GRAPH) == []


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_only_downwards(layer):
    forbidden = tuple(f"transferkit.{name}" for name in FORBIDDEN[layer])
    offending = {module: [name for name in names if name.startswith(forbidden)]
                 for module, names in GRAPH.items() if module.startswith(f"transferkit.{layer}.")}
    assert {module: names for module, names in offending.items() if names} == {}


def test_only_tracking_imports_mlflow():
    importers = {module for module, names in IMPORTS.items()
                 if any(name == "mlflow" or name.startswith("mlflow.") for name in names)}
    outside = {module for module in importers if not module.startswith("transferkit.tracking.")}
    assert outside == MLFLOW_ALLOWED
