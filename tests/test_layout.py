"""The package's import graph has no cycle, counting every import statement (module-level and inside functions).

Each `import fssam_deploy.x` / `from fssam_deploy.x import y` is an edge from the importing module to `x` (or to
`x.y` when `y` is a submodule). The implicit import of parent packages is not an edge (as in import-linter)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import networkx as nx

import fssam_deploy

ROOT = Path(fssam_deploy.__file__).parent


def module_name(path: Path) -> str:
    parts = ["fssam_deploy", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> nx.DiGraph:
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    g = nx.DiGraph()
    g.add_nodes_from(files)
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for t in targets:
                if t in files and t != mod:
                    g.add_edge(mod, t)
    return g


def test_no_import_cycles():
    g = import_graph()
    assert g.number_of_nodes() > 50 and g.number_of_edges() > 100  # the walk saw the package
    cycles = list(nx.simple_cycles(g, length_bound=12))
    assert not cycles, [" -> ".join([*c, c[0]]) for c in cycles[:10]]


def test_a_cycle_is_found(tmp_path, monkeypatch):
    """The check itself: two modules importing each other inside functions are a cycle."""
    pkg = tmp_path / "fssam_deploy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from fssam_deploy import b\n")
    (pkg / "b.py").write_text("def g():\n    from . import a\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", pkg)
    assert list(nx.simple_cycles(import_graph())) in (
        [["fssam_deploy.a", "fssam_deploy.b"]], [["fssam_deploy.b", "fssam_deploy.a"]])
