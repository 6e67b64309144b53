"""The package's import structure: no cycles among aepo's modules (imports inside functions
included), and the layers in order: ``aepo.evaluate``, ``aepo.demo`` and ``aepo.cli`` sit
above ``aepo.train``, which sits above the kernels, objectives, rollout and tasks."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "aepo"
TOP = ("aepo.evaluate", "aepo.demo", "aepo.cli")
# The drop-ins share the fused head's plumbing with the trainer through aepo.lm_head.
BELOW_TRAIN = ("aepo.kernels", "aepo.objectives", "aepo.loss", "aepo.rollout", "aepo.tasks")
BELOW_TRAIN += ("aepo.integrations", "aepo.lm_head")


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imported(node, package: str, known) -> list[str]:
    """The aepo modules one import statement names; ``from pkg import sub`` names ``sub``."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in known]
    base = node.module or ""
    if node.level:
        parts = package.split(".")
        base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
    subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
    names = subs if len(subs) == len(node.names) else [base, *subs]
    return [n for n in names if n in known]


def import_graph() -> dict[str, set[str]]:
    """module -> the aepo modules it imports (anywhere in its source)."""
    known = modules()
    graph = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                deps.update(_imported(node, package, known))
        graph[name] = deps - {name}
    return graph


def _within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (``[a, b, ..., a]``), ignoring a package's imports of its own
    submodules (re-exports); None when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph[node]):
            if dep.startswith(node + "."):
                continue  # a package re-exporting its submodule
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep, [*path, dep])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_graph_sees_both_import_forms():
    graph = import_graph()
    assert "aepo.train.rollout" in graph["aepo.evaluate"]  # a function-level import
    assert "aepo.kernels.tree_rows" in graph["aepo.kernels.fused_loss"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"p": {"p.x"}, "p.x": {"p"}}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_layers():
    graph = import_graph()
    for name, deps in graph.items():
        if _within(name, ("aepo.train",)):
            up = sorted(d for d in deps if _within(d, TOP))
            assert not up, f"{name} imports {up}, which sit above aepo.train"
        if _within(name, BELOW_TRAIN):
            up = sorted(d for d in deps if _within(d, ("aepo.train", *TOP)))
            assert not up, f"{name} imports {up} (a lower layer must not import the trainer)"
