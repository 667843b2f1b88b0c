"""The package's layers: each module imports only modules of its own layer or of layers below it, and no module
imports one that imports it back (function-level imports included, so that neither can hide inside a function).

    distributed, losses,       process setup and messages; the preference losses (pure functions); ending the job
    watchdog                   when a rank is lost
    config                     typed run configuration: schema, loading, the keys' reference
    data                       reading, normalising, tokenizing pairs; the sampler
    forward                    batch layouts, attention, sequence parallelism, scoring and log-probs
    models                     what a model family supports; DeepSpeed configs and engines
    estimate                   the memory estimator
    plan                       the run plan decided once at setup (``deepspeed: auto`` asks the estimator)
    training                   the recipe's loop and what it owns: state, reference, metrics, checkpoints
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ds_dpo"
LAYERS = [
    {"distributed", "losses", "watchdog"},
    {"config"},
    {"data"},
    {"forward"},
    {"models"},
    {"estimate"},
    {"plan"},
    {"training"},
]


def module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, package: Path) -> set[str]:
    """The ds_dpo modules ``path`` imports, anywhere in the file (``from ds_dpo.x import y`` names ``x.y`` where
    that is a module, else ``x``)."""
    modules = {module_name(p, package) for p in package.rglob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "ds_dpo" and node.level == 0:
            base = node.module.partition(".")[2]
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                found.add(sub if sub in modules else base)
        elif isinstance(node, ast.Import):
            found |= {a.name.partition(".")[2] for a in node.names if a.name.startswith("ds_dpo.")}
    return found - {module_name(path, package), ""}


def graph_of(package: Path) -> dict[str, set[str]]:
    return {module_name(p, package): imports_of(p, package) for p in package.rglob("*.py")}


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    found = [i for i, layer in enumerate(LAYERS) if top in layer]
    assert found, f"module ds_dpo.{module} belongs to no layer: add it to LAYERS"
    return found[0]


def check_layers(package: Path) -> None:
    graph = graph_of(package)
    assert set().union(*graph.values()) <= set(graph), "imports of modules that do not exist"
    upward = [
        f"ds_dpo.{m} imports ds_dpo.{d}"
        for m, deps in sorted(graph.items())
        for d in sorted(deps)
        if layer_of(d) > layer_of(m)
        or (layer_of(d) == layer_of(m) and d.split(".")[0] != m.split(".")[0] and m.split(".")[0] != "")
    ]
    assert not upward, "imports from a higher layer (or a sibling of the same layer): " + "; ".join(upward)
    done, path = set(), []

    def visit(module):
        assert module not in path, f"import cycle: {' -> '.join(path[path.index(module) :] + [module])}"
        if module in done:
            return
        path.append(module)
        for dependency in sorted(graph[module]):
            visit(dependency)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_layers_and_no_cycles():
    check_layers(PACKAGE)


def plant(root: Path, files: dict[str, str]) -> Path:
    package = root / "ds_dpo"
    for name, text in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    return package


def test_the_checker_sees_an_upward_import(tmp_path):
    """Not vacuous: a data module importing the training layer (inside a function) is caught."""
    package = plant(
        tmp_path,
        {
            "data/__init__.py": "",
            "data/pipeline.py": "def f():\n    from ds_dpo.training import recipe\n",
            "training/__init__.py": "",
            "training/recipe.py": "",
            "__init__.py": "",
        },
    )
    try:
        check_layers(package)
    except AssertionError as e:
        assert "ds_dpo.data.pipeline imports ds_dpo.training.recipe" in str(e)
    else:
        raise AssertionError("upward import not detected")


def test_the_checker_sees_a_cycle(tmp_path):
    """Not vacuous: two modules of one layer importing each other (one inside a function) are caught."""
    package = plant(
        tmp_path,
        {
            "data/__init__.py": "",
            "data/a.py": "from ds_dpo.data import b\n",
            "data/b.py": "def f():\n    from ds_dpo.data.a import x\n",
            "__init__.py": "",
        },
    )
    try:
        check_layers(package)
    except AssertionError as e:
        assert "import cycle: data.a -> data.b -> data.a" in str(e)
    else:
        raise AssertionError("cycle not detected")
