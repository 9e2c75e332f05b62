"""The package's shape, checked by walking its source with ``ast``.

What holds (DESIGN.md, "The concepts"): data flows down through the layers below, so a module
imports only from its own layer or lower ones; no module imports another package's private module
or private name (``mixprec._x`` top-level helpers are shared by the whole package and may be
imported anywhere); module-level imports form no cycle; no source file exceeds 600 lines.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "mixprec"
MAX_LINES = 600

# Lowest first. A unit is a top-level module or subpackage of mixprec.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("formats", "checkpoint", "_dist", "_cpp"),
    (
        "quantize",
        "stochastic",
        "blockscaled",
        "blockscaled_build",
        "recipes",
        "scaled",
        "fp4_recipes",
    ),
    ("policy", "_policy_checks"),
    ("hardware",),
    ("scaling",),
    ("compute",),
    ("optim",),
    ("diagnostics",),
    ("distributed",),
    ("session",),
    ("integrations", "app", "__init__"),
    ("__main__",),
)
LEVEL = {unit: level for level, units in enumerate(LAYERS) for unit in units}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _package(module: str, is_package: bool) -> str:
    return module if is_package else module.rpartition(".")[0]


def _imports(tree: ast.Module, module: str, is_package: bool) -> list[tuple[str, str, bool]]:
    """``(imported module, imported name or "", at module level)`` for every mixprec import."""
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, "", id(node) in top_level) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module is not None or node.level):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing package
                package = _package(module, is_package).split(".")
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, base] if base else package)
            found += [(base, a.name, id(node) in top_level) for a in node.names]
    return [f for f in found if f[0] == "mixprec" or f[0].startswith("mixprec.")]


def _sources() -> list[tuple[Path, str, bool, ast.Module]]:
    return [
        (path, _module_name(path), path.name == "__init__.py", ast.parse(path.read_text()))
        for path in sorted(SRC.rglob("*.py"))
    ]


def test_every_unit_has_a_layer():
    units = {_unit(module) for _, module, _, _ in _sources()}
    assert units <= set(LEVEL), f"give these a layer in LAYERS: {sorted(units - set(LEVEL))}"


def test_no_source_file_over_600_lines():
    long = {
        str(path.relative_to(SRC)): n
        for path in [*SRC.rglob("*.py"), *SRC.rglob("*.cpp")]
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"split these files (over {MAX_LINES} lines): {long}"


def _resolved(target: str, name: str, modules: set[str]) -> str:
    """The module an import names: ``from mixprec import _dist`` imports ``mixprec._dist``."""
    return f"{target}.{name}" if f"{target}.{name}" in modules else target


def test_no_upward_import():
    modules = {module for _, module, _, _ in _sources()}
    upward = []
    for _, module, is_package, tree in _sources():
        for target, name, _ in _imports(tree, module, is_package):
            target = _resolved(target, name, modules)
            if LEVEL[_unit(target)] > LEVEL[_unit(module)]:
                upward.append(f"{module} imports {target}")
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def _private_parts(target: str, name: str) -> list[str]:
    parts = target.split(".")[1:] + ([name] if name else [])
    # mixprec._x (a top-level helper) is shared by the whole package.
    return [p for p in parts[1:] if p.startswith("_") and not p.startswith("__")]


def test_no_import_of_another_package_private_module_or_name():
    private = []
    for _, module, is_package, tree in _sources():
        own = _package(module, is_package)
        for target, name, _ in _imports(tree, module, is_package):
            if _unit(target) == _unit(module) and _unit(module) not in ("__init__",):
                continue  # inside one package, private helpers are the package's own
            if target.startswith(own + ".") or target == own:
                continue
            if _private_parts(target, name):
                private.append(f"{module} imports {target}{':' + name if name else ''}")
    assert not private, "make these public or move them:\n" + "\n".join(private)


def test_no_import_cycle_at_module_level():
    modules = {module for _, module, _, _ in _sources()}
    graph: dict[str, set[str]] = defaultdict(set)
    for _, module, is_package, tree in _sources():
        for target, name, top in _imports(tree, module, is_package):
            if not top:
                continue
            graph[module].add(_resolved(target, name, modules))
            # importing a submodule runs its package's __init__ first
            parent = target
            while "." in parent:
                parent = parent.rpartition(".")[0]
                if parent != module and not module.startswith(parent + "."):
                    graph[module].add(parent)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in modules:
                continue
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(modules):
        if node not in state and (cycle := visit(node)):
            pytest.fail("module-level import cycle: " + " -> ".join(cycle))


def test_layout_checks_can_fail(tmp_path):
    """The walkers see what they look for (a checker that finds nothing proves nothing)."""
    tree = ast.parse("from mixprec.optim._wrapper import X\nimport mixprec.app.cli\n")
    found = _imports(tree, "mixprec.formats", is_package=False)
    assert ("mixprec.optim._wrapper", "X", True) in found
    assert LEVEL[_unit("mixprec.app.cli")] > LEVEL[_unit("mixprec.formats")]
    assert _private_parts("mixprec.optim._wrapper", "X") == ["_wrapper"]
    assert _private_parts("mixprec.session", "_UPDATE_MODES") == ["_UPDATE_MODES"]
    assert _private_parts("mixprec._dist", "initialized") == []
