"""The layout by stage holds: imports run one way, no circles, lazy imports say why.

(rclpy only under nodes/ is checked in test_launch_and_params.py.)

docs/ARCHITECTURE.md draws the same rule; this test is what keeps it true. It reads the
source with ``ast`` (nothing is imported), so it is fast and sees function-local imports
too: a dependency hidden inside a function still counts.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "vizloc_ros"

#: stage -> the stages it may import (besides itself). The runtime (ros_io, localize,
#: fusion, pipeline, nodes) never imports the offline tools (replay, training, sim).
BASE = {"geometry", "settings", "files", "cli_args"}
ALLOWED = {
    "geometry": set(),
    "settings": set(),
    "files": set(),
    "cli_args": set(),
    "metrics": {"geometry"},
    "ros_io": BASE,
    "localize": BASE,
    "fusion": BASE,
    "pipeline": BASE | {"ros_io", "localize", "fusion"},
    "nodes": BASE | {"ros_io", "localize", "fusion", "pipeline"},
    "replay": BASE | {"metrics", "ros_io", "localize", "fusion", "pipeline"},
    "training": BASE | {"metrics", "ros_io", "localize", "pipeline"},
    "sim": BASE | {"metrics", "ros_io"},
    "mapping": BASE | {"metrics", "ros_io", "localize", "pipeline", "training", "sim"},
}
#: single modules that one offline tool may use beyond its stage's row, and why
EXCEPTIONS = {
    ("replay", "vizloc_ros.sim.synthetic"): "vizloc-replay --demo renders the demo bag once",
    ("replay", "vizloc_ros.nodes.params"): "the replay reads the nodes' parameter file "
                                           "(vizloc-replay --params-file; params imports no rclpy)",
}
RUNTIME = ("ros_io", "localize", "fusion", "pipeline", "nodes")
OFFLINE = ("replay", "training", "sim", "mapping")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def package_imports(path: Path):
    """(imported module, line, inside a function?) for every import of the package.

    ``from vizloc_ros.x import y`` names module ``vizloc_ros.x.y`` when that is a module
    of the package, else ``vizloc_ros.x`` (y is a name defined there).
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    local = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            local.update(id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "vizloc_ros":
                    yield alias.name, node.lineno, id(node) in local
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "vizloc_ros":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                yield (sub if sub in MODULES else node.module), node.lineno, id(node) in local


GRAPH = {m: sorted({imp for imp, _, _ in package_imports(p)} - {m}) for m, p in MODULES.items()}


def test_every_module_belongs_to_a_stage():
    stray = [m for m in MODULES if m != "vizloc_ros" and stage_of(m) not in ALLOWED]
    assert not stray, f"modules outside the stages of docs/ARCHITECTURE.md: {stray}"


def test_imports_run_one_way():
    wrong = []
    for module, imported in GRAPH.items():
        src = stage_of(module)
        for target in imported:
            dst = stage_of(target)
            if src is None or dst is None or dst == src or dst in ALLOWED[src]:
                continue
            if (src, target) in EXCEPTIONS:
                continue
            wrong.append(f"{module} -> {target}")
    wrong = sorted(set(wrong))
    assert not wrong, "imports against the stage order (docs/ARCHITECTURE.md):\n" + "\n".join(wrong)


@pytest.mark.parametrize("stage", RUNTIME)
def test_the_runtime_never_imports_the_offline_tools(stage):
    offenders = [f"{m} -> {t}" for m, ts in GRAPH.items() if stage_of(m) == stage
                 for t in ts if stage_of(t) in OFFLINE]
    assert not offenders, offenders


def find_cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_find_cycles_sees_a_circle_and_only_a_circle():
    assert find_cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
    assert find_cycles({"a": ["b"], "b": [], "c": ["a", "b"]}) == []


def test_no_import_circles():
    """Package __init__ files that re-export their own modules are not circles: the edge
    from a package to its child is how Python loads it, so it is left out."""
    graph = {m: [t for t in ts if not t.startswith(m + ".")] for m, ts in GRAPH.items()}
    assert find_cycles(graph) == []


def test_function_local_package_imports_say_why():
    """A package import inside a function hides a dependency; it is kept only where start-up
    time needs it (e.g. no torch in the fusion node), and a comment on it says so."""
    silent = set()
    for module, path in MODULES.items():
        lines = path.read_text().splitlines()
        for target, lineno, inside in package_imports(path):
            if inside and "#" not in lines[lineno - 1] and not lines[lineno - 2].strip().startswith("#"):
                silent.add(f"{path.relative_to(ROOT)}:{lineno} imports {target}")
    assert not silent, "function-local imports without a comment saying why:\n" + "\n".join(sorted(silent))


def test_stage_table_matches_the_architecture_doc():
    """docs/ARCHITECTURE.md lists each stage; a stage added here must be documented there."""
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    missing = [s for s in ALLOWED if f"`{s}" not in doc]
    assert not missing, f"stages not described in docs/ARCHITECTURE.md: {missing}"
