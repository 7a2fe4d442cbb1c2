"""`routing/` imports flow one way, and no module reaches into another's private names.

Read from the source: every import inside `layerswarm/routing/` (at module level, inside
functions, or under `TYPE_CHECKING`) is an edge; a cycle fails. So does an attribute `x._name`
of another module's making: a name that starts with `_` and that the module using it does not
define itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROUTING = Path(__file__).resolve().parents[2] / "layerswarm" / "routing"


def module_trees() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text()) for p in ROUTING.glob("*.py") if p.stem != "__init__"}


def routing_imports(tree: ast.Module) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if parts[:2] == ["layerswarm", "routing"] and len(parts) > 2:
                found.add(parts[2])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[:2] == ["layerswarm", "routing"] and len(parts) > 2:
                    found.add(parts[2])
    return found


def cycle_from(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A path start -> ... -> start, if there is one."""
    stack: list[tuple[str, list[str]]] = [(start, [start])]
    seen: set[str] = set()
    while stack:
        at, path = stack.pop()
        for nxt in graph.get(at, ()):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


def test_routing_modules_import_each_other_in_one_direction() -> None:
    graph = {name: routing_imports(tree) for name, tree in module_trees().items()}
    cycles = [c for name in sorted(graph) if (c := cycle_from(graph, name))]
    assert not cycles, "import cycles in routing/: " + "; ".join(" -> ".join(c) for c in cycles)


def own_private_names(tree: ast.Module) -> set[str]:
    """Every `_name` the module defines: functions, classes, attributes it assigns."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if n.startswith("_")}


def test_no_routing_module_uses_another_modules_private_names() -> None:
    offences: list[str] = []
    for name, tree in module_trees().items():
        own = own_private_names(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                offences += [
                    f"{name}: imports {a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and node.attr not in own
            ):
                offences.append(f"{name}: {ast.unparse(node)}")
    assert not offences, offences


def test_the_check_itself_finds_a_cycle() -> None:
    assert cycle_from({"a": {"b"}, "b": {"c"}, "c": {"a"}}, "a") == ["a", "b", "c", "a"]
    assert cycle_from({"a": {"b"}, "b": set()}, "a") is None
