"""The package's shape: layers import only downwards, no import cycles, small modules.

Layers, lowest first (a module may import its own layer and those below):
core (errors, outputs, graph, corpus, workload) -> structure, frontend, verify, report, plots ->
cost_models -> passes -> backends -> the pipeline (variants, search,
knob_search, measure, optimize, compare, compare_run, explain, calibrate, micro_models, pipeline, workload_cost,
reference_speed)
-> cli.
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "tfcompile"
MAX_LINES = 500

LAYERS = [
    ("tfcompile.errors", "tfcompile.environment", "tfcompile.outputs", "tfcompile.graph", "tfcompile.corpus",
     "tfcompile.workload"),
    ("tfcompile.structure", "tfcompile.frontend", "tfcompile.verify", "tfcompile.report", "tfcompile.report_table",
     "tfcompile.report_generation", "tfcompile.plots"),
    ("tfcompile.cost_models",),
    ("tfcompile.passes",),
    ("tfcompile.backends",),
    ("tfcompile.variants", "tfcompile.search", "tfcompile.knob_search", "tfcompile.measure", "tfcompile.optimize",
     "tfcompile.compare", "tfcompile.calibrate", "tfcompile.calibrate_device",
     "tfcompile.micro_models", "tfcompile.pipeline",
     "tfcompile.workload_cost", "tfcompile.provenance", "tfcompile.generation", "tfcompile.explain",
     "tfcompile.reference_speed", "tfcompile.compare_run"),
    ("tfcompile.cli", "tfcompile.cli_options", "tfcompile.cli_reference", "tfcompile.cli_output"),
]


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _layer(module: str) -> int:
    for index, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in {__file__}")


def _imports(path: pathlib.Path, module: str, *, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: -node.level or None] if not path.name == "__init__.py" else \
                    module.split(".")[: len(module.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}
    modules = _modules()
    return {name for name in found if name in modules and name != module}


def test_every_module_is_in_a_layer_and_imports_only_downwards():
    upward = []
    for module, path in _modules().items():
        if module == "tfcompile":
            continue  # the package's lazy public API (optimize_model) sits above everything
        for imported in _imports(path, module, top_level_only=False):
            if imported != "tfcompile" and _layer(imported) > _layer(module):
                upward.append(f"{module} imports {imported}")
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = {m: _imports(p, m, top_level_only=False) - {"tfcompile"} for m, p in _modules().items()}
    # A package's __init__ importing its own submodules is how it exports them, not a cycle.
    for module in graph:
        graph[module] = {i for i in graph[module] if not i.startswith(module + ".")}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_module_over_500_lines():
    long = {m: len(p.read_text().splitlines()) for m, p in _modules().items()}
    assert not {m: n for m, n in long.items() if n > MAX_LINES}


def test_no_module_imports_another_modules_private_names():
    private = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tfcompile"):
                private += [f"{module}: from {node.module} import {a.name}" for a in node.names
                            if a.name.startswith("_") and a.name != "__version__"]
    assert not private, "private names used as API:\n" + "\n".join(private)
