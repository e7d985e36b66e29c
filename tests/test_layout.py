"""The package's shape: the rooms in their order, arrows pointing down only (imports inside
functions included), the library importing no application, and no import cycle inside a room."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

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


# the rooms of the house, lowest first (docs/design.md says what each holds): a module imports
# only modules of rooms listed before its own, or of its own room (a subpackage's files)
ROOMS = [
    "errors", "config", "quantized", "targets", "sampler", "masks", "index_codes", "registry", "kernels",
    "ops", "atomic", "adapter_files",
    "layer", "attach", "memory", "adapter", "train", "checkpoint", "distributed", "compile", "serve",
    "timing", "datasets", "finetune", "cli", "__main__",
]


def _room(module: str) -> int:
    part = module.split(".")[1]
    assert part in ROOMS, f"{module} belongs to no room of ROOMS: name its room in tests/test_layout.py"
    return ROOMS.index(part)


def test_every_arrow_points_down_the_rooms():
    graph = _graph()
    up = {m: sorted(d for d in deps if d != "shira_fx" and _room(d) > _room(m))
          for m, deps in graph.items() if m != "shira_fx"}
    assert not {m: d for m, d in up.items() if d}, "imports of a later room"


def test_the_subpackages_are_rooms():
    graph = _graph()
    for room in ("kernels", "ops", "compile", "serve", "cli"):
        assert any(m.startswith(f"shira_fx.{room}.") for m in graph), f"shira_fx/{room}/ has no modules"


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


def test_the_room_order_sees_an_arrow_up(tmp_path, monkeypatch):
    """The order can fail: a low room importing a higher one is reported."""
    pkg = tmp_path / "shira_fx"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("from .config import ShiraConfig\n")
    (pkg / "config.py").write_text("")
    monkeypatch.setattr(f"{__name__}.PACKAGE", pkg)
    with pytest.raises(AssertionError, match="imports of a later room"):
        test_every_arrow_points_down_the_rooms()
