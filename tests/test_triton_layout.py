"""The Triton subpackage's layout: kernels apart from their launch glue, and no import circle.

Read statically (every import statement of every module, those under ``if TYPE_CHECKING`` and in
function bodies included), and checked by importing each module alone in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

PACKAGE = "gist_fast.backends.triton"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / "gist_fast" / "backends" / "triton"
MODULES = sorted(p.stem for p in PACKAGE_DIR.glob("*.py") if p.stem != "__init__")
# What a kernels module may import: Triton itself and the JIT helpers shared by both families.
KERNEL_IMPORTS = {"__future__", "triton", "triton.language", f"{PACKAGE}.shared_kernels"}


def imported_modules(path: Path, package: str) -> set[str]:
    """Every module `path` (a module of `package`) imports, as absolute dotted names; ``from . import x``
    counts as importing ``package.x`` (x may be a module of the package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            found.add(base)
            if node.module is None:  # from . import x, y: submodules
                found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def package_graph(directory: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (the package's __init__ left out)."""
    names = {p.stem for p in directory.glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name in names:
        imports = imported_modules(directory / f"{name}.py", package)
        graph[name] = {m.removeprefix(f"{package}.") for m in imports if m.removeprefix(f"{package}.") in names}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` (a list of modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_sees_a_circle_through_a_type_checking_import(tmp_path):
    """The checker itself: two modules that import each other, one only under TYPE_CHECKING (as the
    flat layout's triton_backend and triton_chunked did), are a circle."""
    (tmp_path / "glue.py").write_text("from .plan import run\n")
    (tmp_path / "plan.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .glue import Problem\n"
    )
    (tmp_path / "kernels.py").write_text("import triton\n")
    assert find_cycle(package_graph(tmp_path, "pkg")) in (["glue", "plan", "glue"], ["plan", "glue", "plan"])
    (tmp_path / "plan.py").write_text("from .kernels import k\n")
    assert find_cycle(package_graph(tmp_path, "pkg")) is None


def test_no_module_imports_one_that_imports_it_back():
    assert MODULES, PACKAGE_DIR
    assert find_cycle(package_graph(PACKAGE_DIR, PACKAGE)) is None


def test_kernel_modules_import_only_triton_and_the_shared_jit_helpers():
    kernels = [m for m in MODULES if m.endswith("kernels")]
    assert {"shared_kernels", "fused_kernels", "chunked_kernels"} <= set(kernels)
    for name in kernels:
        extra = imported_modules(PACKAGE_DIR / f"{name}.py", PACKAGE) - KERNEL_IMPORTS - {PACKAGE}
        assert not extra, f"{name} imports {sorted(extra)}"
    # The shared helpers import no other module of the package.
    assert package_graph(PACKAGE_DIR, PACKAGE)["shared_kernels"] == set()


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_alone_in_a_fresh_interpreter(module):
    run = subprocess.run(
        [sys.executable, "-c", f"import {PACKAGE}.{module}"], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
