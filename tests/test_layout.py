"""The code layout's rules, checked on the source: one import name, one-way layers, no cycles.

- Everything installs under `ggserve` (pyproject's package list is the tree's, and a built wheel
  has no other top-level name).
- `server -> engine -> kernels`: kernels imports nothing of engine / server / bench, engine
  nothing of server / bench, and server takes engine names only from `ggserve.engine` itself
  (its `__init__` exports), never from engine's modules.
- No import cycles between modules, counting imports inside functions too (a lazy import that
  closes a cycle is still a cycle; only `if TYPE_CHECKING:` blocks are left out).
"""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.testdata import REPO_ROOT

FOLDERS = ("server", "engine", "kernels", "bench")  # each is ggserve.<folder>
LAYER_FORBIDS = {  # layer -> packages it must not import
    "ggserve.kernels": ("ggserve.engine", "ggserve.server", "ggserve.bench"),
    "ggserve.engine": ("ggserve.server", "ggserve.bench"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["ggserve", *parts])


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for folder in FOLDERS for p in sorted((REPO_ROOT / folder).rglob("*.py"))
            if "__pycache__" not in p.parts}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, module: str) -> list[str]:
    """Absolute names of everything `module` imports (submodules where `from X import y` names one)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source != module:  # a package's __init__ importing its own submodules
                found.append(source)
            found.extend(f"{source}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {imp for imp in _imports(path, name) if imp in modules} | set(
        imp for imp in _imports(path, name) if imp.split(".")[0] in FOLDERS)
        for name, path in modules.items()}


def test_nothing_imports_the_folders_by_their_bare_names(graph):
    bare = {name: sorted(i for i in imports if i.split(".")[0] in FOLDERS) for name, imports in graph.items()}
    assert {k: v for k, v in bare.items() if v} == {}, "import them as ggserve.<folder>..."


def test_layers_import_only_downwards(graph):
    upward = []
    for module, imports in graph.items():
        for layer, forbidden in LAYER_FORBIDS.items():
            if module == layer or module.startswith(layer + "."):
                upward += [(module, i) for i in imports if i.startswith(forbidden)]
    assert upward == []


def test_server_takes_engine_names_from_its_exports_only(graph):
    reaching_in = [(m, i) for m, imports in graph.items() if m.startswith("ggserve.server")
                   for i in imports if i.startswith("ggserve.engine.")]
    assert reaching_in == [], "add the name to engine/__init__.py's exports instead"


def test_the_engine_exports_resolve():
    import ggserve.engine as engine

    missing = [name for name in engine.__all__ if not hasattr(engine, name)]
    assert missing == []


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a self-import): Tarjan's."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def strongconnect(v: str) -> None:  # the graph is small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                strongconnect(w)
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
            if len(component) > 1 or v in graph.get(v, ()):
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            strongconnect(v)
    return cycles


def test_no_import_cycles(graph):
    assert find_cycles(graph) == []


def test_the_cycle_check_finds_a_cycle_through_a_function_level_import(tmp_path):
    a, b, c = tmp_path / "a.py", tmp_path / "b.py", tmp_path / "c.py"
    a.write_text("def f():\n    from ggserve.engine.b import g\n")
    b.write_text("import ggserve.engine.a\n")
    c.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import ggserve.engine.a\n")
    names = {"ggserve.engine.a": a, "ggserve.engine.b": b, "ggserve.engine.c": c}
    small = {m: {i for i in _imports(p, m) if i in names} for m, p in names.items()}
    assert find_cycles(small) == [["ggserve.engine.a", "ggserve.engine.b"]]


def test_kernel_modules_set_up_numba_before_defining_kernels():
    """numba's cache directory and threading layer are chosen by jit_cache / threads, which must
    run before a module defines its first kernel (kernels/__init__.py loads nothing)."""
    missing = []
    for path in sorted((REPO_ROOT / "kernels").glob("*.py")):
        if path.stem in ("jit_cache", "threads", "__init__"):
            continue
        imports = _imports(path, _module_name(path))
        if any(i == "numba" or i.startswith("numba.") for i in imports):
            if not {"ggserve.kernels.jit_cache", "ggserve.kernels.threads"} <= set(imports):
                missing.append(path.name)
    assert missing == []


def test_engine_keeps_at_most_twelve_modules_beside_its_subpackages():
    modules = [p.name for p in (REPO_ROOT / "engine").glob("*.py") if p.name != "__init__.py"]
    assert len(modules) <= 12, sorted(modules)


def test_every_package_is_declared_and_every_declared_package_exists():
    setuptools = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(setuptools["packages"])
    in_tree = {_module_name(p) for folder in FOLDERS for p in (REPO_ROOT / folder).rglob("__init__.py")
               if "__pycache__" not in p.parts}
    assert declared == in_tree
    assert setuptools["package-dir"] == {f"ggserve.{f}": f for f in FOLDERS}


def test_a_built_wheel_has_one_top_level_name(tmp_path):
    # built from a copy of what the Dockerfile copies: setuptools writes build/ beside the sources
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in FOLDERS:
        shutil.copytree(REPO_ROOT / folder, source / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("ggserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"ggserve"}
    assert "ggserve/server/static/index.html" in names and "ggserve/kernels/matmul.py" in names
