"""The direction of imports: every module of `pipeline/` belongs to a layer, and no module imports
one of a higher layer, at module level or inside a function, unless ALLOWED below says why. No
import cycle between modules either. The layers, lowest first:

    errors, precision, images, safe_files, registry, regions, runs   leaves
    blocks      the block kinds (each a strict options model and its nn.Module) and their registry
    methods     the methods (each an options model, its phases and objectives, its losses)
    spec        the spec schema: the union of every registered block and method, YAML, overrides
    graph       a spec's networks checked on the meta device and assembled into modules
    data, distributed, weights   shards, the DALI pipeline, parts; the DeepSpeed engines; published
                weights converted into a spec's networks
    train       the loop, the tasks between steps, checkpoints
    profile, eval   throughput runs; sampling and metrics of trained networks
    cli, commands   the command line and its commands

The spec comes above blocks and methods because its schema is made of their options models; what
a method computes needs only torch, blocks and its own losses, never a spec module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "pipeline"

LAYERS: list[tuple[str, ...]] = [
    (
        "pipeline.errors",
        "pipeline.precision",
        "pipeline.images",
        "pipeline.safe_files",
        "pipeline.registry",
        "pipeline.regions",
        "pipeline.runs",
    ),
    ("pipeline.blocks",),
    ("pipeline.methods",),
    ("pipeline.spec",),
    ("pipeline.graph",),
    ("pipeline.data", "pipeline.distributed", "pipeline.weights"),
    ("pipeline.train",),
    ("pipeline.profile", "pipeline.eval"),
    ("pipeline.cli", "pipeline.commands", "pipeline.__main__"),
]

# (importer, imported): why this import may run up the layers. Each is function-local.
ALLOWED = {
    ("pipeline.spec.load", "pipeline.graph"): "load_spec(check_graphs=True) checks the networks of the spec it "
    "loaded, so that every command gets one call; the graph layer needs the spec's models to exist first",
    ("pipeline.methods.cycle", "pipeline.data.dali"): "the cycle method's sample grid shows the first images of "
    "each domain's stream",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def layer(module: str) -> int:
    matches = [
        (len(prefix), i)
        for i, prefixes in enumerate(LAYERS)
        for prefix in prefixes
        if module == prefix or module.startswith(prefix + ".")
    ]
    assert matches or module == "pipeline", f"{module} is in no layer: add it to LAYERS"
    return max(matches)[1] if matches else len(LAYERS)


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(module: str) -> list[tuple[str, bool, int]]:
    """(imported module, at module level, line) for each import of a pipeline module; imports
    that run only for type checkers are left out."""
    found: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, top: bool) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child, top)
            return
        if isinstance(node, ast.Import):
            found.extend((a.name, top, node.lineno) for a in node.names if a.name.startswith("pipeline"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            for alias in node.names:  # `from pipeline.train import checkpoint` imports a module
                sub = f"{node.module}.{alias.name}"
                found.append((sub if sub in MODULES else node.module, top, node.lineno))
        inner = top and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(ast.parse(MODULES[module].read_text()), True)
    return found


def test_every_module_is_in_a_layer():
    for module in MODULES:
        layer(module)


def test_no_import_runs_up_the_layers():
    upward: set[str] = set()
    for module in MODULES:
        for imported, _top, line in imports(module):
            if layer(imported) > layer(module) and (module, imported.removesuffix(".__init__")) not in ALLOWED:
                allowed = [k for k in ALLOWED if k[0] == module and (imported + ".").startswith(k[1] + ".")]
                if not allowed:
                    upward.add(f"{MODULES[module].relative_to(ROOT.parent)}:{line}: {module} imports {imported}")
    assert not upward, "imports that run up the layers (see this file's docstring):\n" + "\n".join(sorted(upward))


def test_every_allowed_exception_is_still_needed():
    used = {
        key
        for module in MODULES
        for imported, top, _line in imports(module)
        for key in ALLOWED
        if key[0] == module and (imported + ".").startswith(key[1] + ".") and not top
    }
    assert used == set(ALLOWED), f"no longer needed (delete them): {sorted(set(ALLOWED) - used)}"


def test_no_import_cycle_between_modules():
    graph = {
        module: {imported for imported, _top, _line in imports(module) if imported in MODULES} for module in MODULES
    }
    cycles = [sorted(c) for c in _strongly_connected(graph) if len(c) > 1]
    assert not cycles, "modules that import each other (directly or around a loop): " + "; ".join(map(str, cycles))


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iteratively."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
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
                components.append(component)
    return components


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from pipeline.train import loop\n", [("pipeline.train.loop", True)]),
        ("def f():\n    from pipeline.graph import analyze_spec\n", [("pipeline.graph", False)]),
        ("if TYPE_CHECKING:\n    from pipeline.graph import NetworkPlan\n", []),
        ("import pipeline.cli\n", [("pipeline.cli", True)]),
    ],
)
def test_imports_are_read_as_python_runs_them(tmp_path, monkeypatch, source, expected):
    module = "pipeline.errors"
    file = tmp_path / "errors.py"
    file.write_text(source)
    monkeypatch.setitem(MODULES, module, file)
    assert [(name, top) for name, top, _line in imports(module)] == expected


def test_the_cycle_finder_finds_a_cycle_and_nothing_else():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert sorted(sorted(c) for c in _strongly_connected(graph) if len(c) > 1) == [["a", "b", "c"]]
