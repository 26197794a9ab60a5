"""Who imports whom: the layering of docs/architecture.md, and no import cycles.

Every import statement counts: at module level, inside a function (a lazy import is still
a dependency) or under `if TYPE_CHECKING:` (a type is coupling too).
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("angle_rt", "angle_torch", "training", "exporters")
# package → the project packages it may import (besides itself)
ALLOWED = {
    "angle_rt": set(),
    "angle_torch": {"angle_rt"},
    "training": {"angle_rt", "angle_torch"},
    "exporters": {"angle_rt", "angle_torch"},
}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            mods[name] = path
    return mods


def _imports(path: Path, mods: dict[str, Path]) -> set[str]:
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in mods}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(path, mods) - {name} for name, path in mods.items()}


def test_packages_import_only_the_layers_below_them():
    bad = []
    for mod, deps in _graph().items():
        pkg = mod.split(".")[0]
        for dep in deps:
            other = dep.split(".")[0]
            if other != pkg and other not in ALLOWED[pkg]:
                bad.append(f"{mod} imports {dep}")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
    graph = _graph()
    # a package's __init__ importing its own submodules is not a cycle of ideas
    graph = {m: {d for d in deps if not m.startswith(d + ".") and not d.startswith(m + ".")}
             for m, deps in graph.items()}
    cycles, state = [], {}

    def walk(node: str, stack: list[str]) -> None:
        state[node] = "active"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "active":
                cycles.append(" → ".join([*stack[stack.index(dep):], dep]))
            elif dep not in state:
                walk(dep, [*stack, dep])
        state[node] = "done"

    for mod in sorted(graph):
        if mod not in state:
            walk(mod, [mod])
    assert not cycles, "\n".join(cycles)
