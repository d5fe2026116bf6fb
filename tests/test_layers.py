"""The import graph: no cycles, and the pipeline and models never reach up into the daemon."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("daemon", "pipeline", "models")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return "scandrop." + ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the scandrop modules it imports (at any level: a lazy import still ties the two)."""
    modules = {_module_name(p): p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        # `from scandrop.pipeline.dense import fuse_depth` names both the package and the module
        graph[name] = {d for d in deps if not (path.name != "__init__.py" and name.startswith(d + "."))}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path of module names, or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 60  # the walk found the modules
    assert find_cycle(graph) is None


def test_pipeline_and_models_do_not_import_the_daemon() -> None:
    """The benchmark harness drives the daemon's worker on purpose; nothing else below may."""
    upward = {
        (name, dep)
        for name, deps in import_graph().items()
        if name.startswith(("scandrop.pipeline", "scandrop.models"))
        and not name.startswith("scandrop.pipeline.bench")
        for dep in deps
        if dep.startswith("scandrop.daemon")
    }
    assert upward == set()
