"""The package's import graph flows one way: no module imports one that imports it back (function-level imports
included, so that a cycle cannot hide inside a function)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ds_dpo"


def imports_of(path: Path) -> set[str]:
    """The ds_dpo modules ``path`` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "ds_dpo":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ds_dpo."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("ds_dpo.")}
    return found - {path.stem}


def test_no_import_cycles():
    graph = {p.stem: imports_of(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert set().union(*graph.values()) <= set(graph), "imports of modules that do not exist"
    done, path = set(), []

    def visit(module):
        assert module not in path, f"import cycle: {' -> '.join(path[path.index(module):] + [module])}"
        if module in done:
            return
        path.append(module)
        for dependency in sorted(graph[module]):
            visit(dependency)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_the_checker_sees_a_cycle(tmp_path, monkeypatch):
    """The check is not vacuous: two modules importing each other (one inside a function) are caught."""
    (tmp_path / "a.py").write_text("from ds_dpo import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from ds_dpo.a import x\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path)
    try:
        test_no_import_cycles()
    except AssertionError as e:
        assert "import cycle: a -> b -> a" in str(e)
    else:
        raise AssertionError("cycle not detected")
