"""Data flows one way: model -> graph -> costed graph -> partition -> plan -> runtime. Every
import in the package, lazy ones inside functions included, is read from the source and
checked against what its layer may use, so a shortcut from a lower layer to a higher one
fails here instead of slowly turning the layers into one."""

from __future__ import annotations

import ast
from pathlib import Path

import hybridiff

PACKAGE = Path(hybridiff.__file__).parent

#: What each lower layer may import (prefixes of module names). The compiler, simulator,
#: calibration, bench and command line stand above them and may import them all.
ALLOWED = {
    "hybridiff.errors": ("hybridiff.errors",),
    "hybridiff.files": ("hybridiff.errors",),
    "hybridiff.plan": ("hybridiff.errors", "hybridiff.files", "hybridiff.plan"),
    "hybridiff.program": ("hybridiff.errors", "hybridiff.plan", "hybridiff.program"),
    "hybridiff.device": ("hybridiff.errors",),
    "hybridiff.graph": ("hybridiff.errors", "hybridiff.graph"),
    "hybridiff.models": ("hybridiff.errors", "hybridiff.models"),
    "hybridiff.simulate": ("hybridiff.errors", "hybridiff.files", "hybridiff.plan", "hybridiff.program"),
    "hybridiff.runtime": (
        "hybridiff.errors", "hybridiff.files", "hybridiff.plan", "hybridiff.program", "hybridiff.device",
        "hybridiff.graph", "hybridiff.models", "hybridiff.runtime", "hybridiff.quiet_libraries",
    ),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every hybridiff module ``path`` imports; ``from hybridiff import x`` names hybridiff.x."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("hybridiff"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hybridiff") and node.level == 0:
            if node.module == "hybridiff":
                found.update(f"hybridiff.{a.name}" for a in node.names)
            else:
                found.add(node.module)
    return found


def _violations() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        layer = next((name for name in ALLOWED if module == name or module.startswith(name + ".")), None)
        if layer is None:
            continue
        for target in sorted(_imports(path)):
            if not any(target == a or target.startswith(a + ".") for a in ALLOWED[layer]):
                bad.append(f"{module} imports {target}")
    return bad


def test_no_layer_imports_a_layer_above_it():
    assert _violations() == []


#: The runtime's rooms, lowest first: each may import the rooms before it (and the modules at
#: the runtime's root, spans and watchdog), never one after it.
ROOMS = ("comm", "execution", "api", "run", "launch")


def test_no_runtime_room_imports_a_room_above_it():
    bad = []
    for path in sorted((PACKAGE / "runtime").rglob("*.py")):
        parts = _module_name(path).split(".")
        if len(parts) < 3 or parts[2] not in ROOMS:
            continue
        mine = ROOMS.index(parts[2])
        for target in sorted(_imports(path)):
            room = target.split(".")[2] if target.startswith("hybridiff.runtime.") else None
            if room in ROOMS and ROOMS.index(room) > mine:
                bad.append(f"{_module_name(path)} imports {target}")
    assert bad == []


def test_the_check_sees_lazy_imports_and_from_package_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from hybridiff import device\ndef f():\n    from hybridiff.compiler.compile import plan_for\n")
    assert _imports(source) == {"hybridiff.device", "hybridiff.compiler.compile"}


def _top_level_imports(path: Path) -> set[str]:
    """The hybridiff modules ``path`` imports when it is imported (not lazily, not for types)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hybridiff") and node.level == 0:
            found.update(f"{node.module}.{a.name}" if node.module == "hybridiff" else node.module for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("hybridiff"))
    return found


def test_no_module_imports_itself_through_others():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: {t for t in _top_level_imports(p) if t in modules and t != m} for m, p in modules.items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(module):] + [module]))
        if module not in done:
            for target in sorted(graph[module]):
                visit(target, path + [module])
            done.add(module)

    for module in sorted(graph):
        visit(module, [])


#: The sizes past which a module, class or function is doing more than one job.
LIMITS = {"module": 400, "class": 200, "function": 60}
KINDS = {ast.ClassDef: "class", ast.FunctionDef: "function", ast.AsyncFunctionDef: "function"}


def test_no_module_class_or_function_is_oversized():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        if len(source.splitlines()) > LIMITS["module"]:
            found.append(f"{path.relative_to(PACKAGE)}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            kind = KINDS.get(type(node))
            if kind and node.end_lineno - node.lineno + 1 > LIMITS[kind]:
                found.append(f"{path.relative_to(PACKAGE)}: {kind} {node.name} {node.end_lineno - node.lineno + 1} lines")
    assert found == []
