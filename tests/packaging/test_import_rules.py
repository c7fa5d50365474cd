"""The import rules of docs/architecture.md, checked on the source (ast), so the structure cannot
rot silently: which part of lowbit may import which, and no import circles between modules.

Every `import` counts, including those inside functions (a lazy import is still a dependency);
imports under `if TYPE_CHECKING:` count for the rules but not for circles (they never run)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Where each part's files are: the four engine folders are `lowbit.<folder>` through symlinks.
PARTS = {"lowbit.runtime": "runtime", "lowbit.kernels": "kernels", "lowbit.loaders": "loaders",
         "lowbit.server": "server"}  # fmt: skip
ENGINE_FOLDERS = set(PARTS.values())

# part -> the parts it may import (a part is a module-name prefix; the longest prefix applies).
# Front doors (lowbit/*.py) may import anything and are not listed.
ALLOWED: dict[str, tuple[str, ...]] = {
    "lowbit.kernels": ("lowbit.kernels",),
    "lowbit.loaders": (
        "lowbit.loaders", "lowbit.kernels", "lowbit.runtime.models.config", "lowbit.runtime.quant",
    ),
    "lowbit.runtime": ("lowbit.runtime", "lowbit.kernels", "lowbit.loaders"),
    # Inside the engine: the model and its layers see tensors, caches and weights, never the
    # scheduler, runner or engine; the KV cache and quantization schemes see only kernels.
    "lowbit.runtime.models": (
        "lowbit.runtime.models", "lowbit.runtime.layers", "lowbit.runtime.backends",
        "lowbit.runtime.kv_cache", "lowbit.runtime.quant", "lowbit.kernels",
    ),
    "lowbit.runtime.models.config": ("lowbit.runtime.models.config",),
    "lowbit.runtime.layers": (
        "lowbit.runtime.layers", "lowbit.runtime.backends", "lowbit.runtime.kv_cache", "lowbit.runtime.quant",
        "lowbit.runtime.models.config", "lowbit.kernels",
    ),
    # Op backends (attention, norm, sampler) wrap kernels for the layers and the sampler.
    "lowbit.runtime.backends": (
        "lowbit.runtime.backends", "lowbit.runtime.layers", "lowbit.runtime.kv_cache", "lowbit.runtime.quant",
        "lowbit.runtime.outputs", "lowbit.runtime.sampling_params", "lowbit.kernels",
    ),
    "lowbit.runtime.kv_cache": ("lowbit.runtime.kv_cache", "lowbit.kernels"),
    "lowbit.runtime.quant": ("lowbit.runtime.quant", "lowbit.kernels"),
    "lowbit.quantize": ("lowbit.quantize", "lowbit.runtime", "lowbit.loaders", "lowbit.kernels"),
    "lowbit.server": ("lowbit.server", "lowbit.runtime", "lowbit.loaders"),
}  # fmt: skip


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (or package), resolved
    line: int
    type_checking: bool


def _modules() -> dict[str, Path]:
    """Module name -> file, for every lowbit module (each file once, through its real folder)."""
    found: dict[str, Path] = {}
    for path in sorted((ROOT / "lowbit").rglob("*.py")):
        relative = path.relative_to(ROOT / "lowbit")
        if relative.parts[0] in ENGINE_FOLDERS:  # the symlinks: read through the real folders
            continue
        found[_name("lowbit", relative)] = path
    for package, folder in PARTS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            found[_name(package, path.relative_to(ROOT / folder))] = path
    return found


def _name(package: str, relative: Path) -> str:
    parts = [package, *relative.with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str, path: Path, known: set[str]) -> Iterator[Import]:
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            guarded.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("lowbit"):
                    yield Import(module, alias.name, node.lineno, id(node) in guarded)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, is_package, node)
            if not base.startswith("lowbit"):
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                target = candidate if candidate in known else base
                yield Import(module, target, node.lineno, id(node) in guarded)


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    parent = parts if is_package else parts[:-1]
    parent = parent[: len(parent) - (node.level - 1)]
    return ".".join([*parent, node.module] if node.module else parent)


def _part(module: str) -> str | None:
    matches = [p for p in ALLOWED if module == p or module.startswith(p + ".")]
    return max(matches, key=len) if matches else None


def _within(target: str, prefixes: tuple[str, ...]) -> bool:
    return any(target == p or target.startswith(p + ".") for p in prefixes)


def _all_imports() -> list[Import]:
    modules = _modules()
    known = set(modules)
    return [imp for name, path in modules.items() for imp in _imports(name, path, known)]


def test_the_source_tree_is_read():
    """The checks below mean something only if they see the whole package."""
    modules = _modules()
    for expected in ("lowbit.runtime.engine", "lowbit.kernels", "lowbit.loaders.gguf", "lowbit.server.app"):
        assert any(m == expected or m.startswith(expected + ".") for m in modules), expected
    assert len(_all_imports()) > 100


def test_each_part_imports_only_what_it_may():
    broken = []
    for imp in _all_imports():
        part = _part(imp.source)
        # `lowbit` itself holds only the version and lazy front-door names: anyone may read it.
        if part is not None and imp.target != "lowbit" and not _within(imp.target, ALLOWED[part]):
            broken.append(f"{imp.source}:{imp.line} imports {imp.target} ({part} may import {ALLOWED[part]})")
    assert not broken, "\n".join(broken)


def test_no_module_imports_our_folders_by_their_bare_names():
    """`import kernels` would be Hugging Face's package (or nothing): ours is `lowbit.kernels`."""
    bare = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            bare += [f"{name}:{node.lineno} {n}" for n in names if n.split(".")[0] in ENGINE_FOLDERS]
    assert not bare, bare


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_circles():
    known = set(_modules())
    edges: dict[str, set[str]] = {}
    for imp in _all_imports():
        # A package's __init__ re-exporting its own submodules is not a circle worth naming.
        if imp.type_checking or imp.target not in known or imp.source == imp.target:
            continue
        edges.setdefault(imp.source, set()).add(imp.target)
    for package, members in list(edges.items()):
        edges[package] = {m for m in members if not m.startswith(package + ".") or package not in known}
    assert not _cycles(edges), _cycles(edges)


@pytest.mark.parametrize("rule", sorted(ALLOWED))
def test_each_rule_names_existing_parts(rule):
    """A rule about a part that no longer exists guards nothing."""
    modules = set(_modules())
    for prefix in (rule, *ALLOWED[rule]):
        assert any(m == prefix or m.startswith(prefix + ".") for m in modules), prefix
