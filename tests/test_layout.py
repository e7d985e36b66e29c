"""The package's shape: the library imports no application, and no two library modules import
each other in a cycle (imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "shira_fx"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every shira_fx module `path` imports, resolved to module names."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("shira_fx")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("shira_fx"):
                continue
            for alias in node.names:  # `from . import ops` names a module, `from .x import f` not
                sub = f"{target}.{alias.name}"
                found.add(sub if _exists(sub) else target)
    found.discard(name)
    return found


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _is_application(module: str) -> bool:
    return module in ("shira_fx.cli", "shira_fx.__main__") or module.startswith("shira_fx.cli.")


def test_the_library_imports_no_application():
    graph = _graph()
    offenders = {m: sorted(i for i in deps if _is_application(i))
                 for m, deps in graph.items() if not _is_application(m)}
    assert not {m: d for m, d in offenders.items() if d}


def test_library_modules_import_each_other_without_cycles():
    graph = {m: {d for d in deps if not _is_application(d) and d != "shira_fx"}
             for m, deps in _graph().items() if not _is_application(m) and m != "shira_fx"}
    assert len(graph) >= 15, sorted(graph)  # the walk found the modules
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, "import cycle: " + " -> ".join(path + (module,))
        if module in done:
            return
        for dep in sorted(graph.get(module, ())):
            visit(dep, path + (module,))
        done.add(module)

    for module in sorted(graph):
        visit(module, ())


def test_the_cycle_finder_sees_a_cycle(tmp_path, monkeypatch):
    """The checker can fail: two modules importing each other are reported."""
    pkg = tmp_path / "shira_fx"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import g\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", pkg)
    graph = _graph()
    assert graph["shira_fx.a"] == {"shira_fx.b"} and graph["shira_fx.b"] == {"shira_fx.a"}
