"""The layering rules of the project, read from the imports themselves (ast), so they stay true.

- ``models/`` imports nothing from ``pipeline/`` or ``jobs/``; ``pipeline/`` imports nothing from ``jobs/``.
- The inference path (``pipeline`` outside ``training/``, ``evaluation/`` and ``synth/``) imports none of those.
- No import cycle among the project's modules. An import inside ``if TYPE_CHECKING:`` does not run and is left
  out; ``from pkg import sub`` imports the module ``pkg.sub``.
- A function-local import of the project's own modules only where the module says why (a comment naming the
  heavy dependencies it defers): the command line's per-command modules.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "models", "jobs")
BESIDE_INFERENCE = ("pipeline.training", "pipeline.evaluation", "pipeline.synth")
LOCAL_IMPORTS_ALLOWED = {"jobs.cli"}  # its comment: each command's module imports Ray/Dask when it runs


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _target(name: str) -> str | None:
    """The project module an import of ``name`` loads (its longest prefix that is a module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skipped


def _imports(module: str) -> list[tuple[str, bool]]:
    """``(imported project module, inside a function)`` for every runtime import in ``module``."""
    tree = ast.parse(MODULES[module].read_text())
    skipped = _type_checking_nodes(tree)
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                     for a in node.names]
        for name in names:
            target = _target(name) if name.split(".")[0] in PACKAGES else None
            if target and target != module:
                found.append((target, id(node) in local))
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def test_models_and_pipeline_do_not_reach_up():
    wrong = [(m, t) for m, imports in GRAPH.items() for t, _ in imports
             if (m.startswith("models") and not t.startswith("models"))
             or (m.startswith("pipeline") and t.startswith("jobs"))]
    assert not wrong, f"layer violations (importer, imported): {wrong}"


def test_the_inference_path_imports_no_training_evaluation_or_synth_code():
    inference = [m for m in GRAPH if m.startswith("pipeline") and not m.startswith(BESIDE_INFERENCE)]
    wrong = [(m, t) for m in inference for t, _ in GRAPH[m] if t.startswith(BESIDE_INFERENCE)]
    assert not wrong, wrong


def test_no_import_cycles():
    edges = defaultdict(set)
    for m, imports in GRAPH.items():
        edges[m] |= {t for t, _ in imports}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in list(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_function_local_imports_of_the_project_only_where_justified():
    local = sorted({m for m, imports in GRAPH.items() for _, inside in imports if inside} - LOCAL_IMPORTS_ALLOWED)
    assert not local, f"function-local imports of project modules in {local}: import them at the top"


def test_the_checks_see_the_project():
    assert {"pipeline.engine", "models.checkpoint", "jobs.cli", "pipeline.frameworks.magnet"} <= set(MODULES)
    assert ("pipeline.frameworks.base", False) in GRAPH["pipeline.frameworks.magnet"]
