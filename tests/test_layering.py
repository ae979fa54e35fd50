"""The package's architecture, checked: layers import only downwards, no cycles, FUSE only in the shell.

The layers (README.md, "Code"), lowest first; a module may import its own layer and those below.
Every import counts, also those made inside a function (lazy imports keep start-up cheap, they do
not make an upward import right) and those under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ocifuse"

LAYERS: dict[str, tuple[str, ...]] = {
    # values every layer shares: errors, digests, the JSON model, sizes, the cache seam's interface
    "base": (
        "errors",
        "units",
        "digest",
        "model",
        "findings",
        "store",
        "journal",
        "progress",
        "urls",
        "credentials",
    ),
    # where bytes come from: files, ranges, decompressing sources, the index cache on disk
    "bytes": (
        "source",
        "streams",
        "readers",
        "spill",
        "gzipsource",
        "zstdsource",
        "compressed",
        "cache",
        "remote",
        "portable",
    ),
    # what tar bytes hold: entry tables, the header walk, the stored table, open archives, layers, TOCs
    "tar": ("entries", "tarscan", "tablecodec", "archive", "layer", "chunked"),
    # what the tools see: layouts, docker-archives, resolution, the rootfs merge, the front door
    "views": ("layout", "dockerarchive", "resolve", "rootfs", "image", "tree", "views"),
    # the commands' own logic, FUSE-free
    "commands": ("validate", "fsck", "inspect", "options", "umount", "makeindex"),
    # the FUSE shell: the only modules that import pyfuse3 or trio
    "fuse": ("fs", "daemon"),
    # the command line and the package's lazy public API
    "cli": ("cli", "__init__"),
}
RANK = {module: rank for rank, modules in enumerate(LAYERS.values()) for module in modules}
FUSE_ONLY = {"pyfuse3", "trio"}


def imports(module: str) -> tuple[set[str], set[str]]:
    """(the package's modules ``module`` imports, the outside top-level packages it imports)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    inside: set[str] = set()
    outside: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                inside.add(node.module.split(".")[0])
            else:
                inside.update(a.name for a in node.names if (PACKAGE / f"{a.name}.py").exists())
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] != PACKAGE.name:
                outside.add(parts[0])
            elif len(parts) > 1:  # from ocifuse.x import y: an import of x all the same
                inside.add(parts[1])
            else:  # from ocifuse import x
                inside.update(a.name for a in node.names if (PACKAGE / f"{a.name}.py").exists())
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] != PACKAGE.name:
                    outside.add(parts[0])
                elif len(parts) > 1:  # import ocifuse.x
                    inside.add(parts[1])
    return inside, outside


MODULES = sorted(p.stem for p in PACKAGE.glob("*.py"))


def test_every_module_has_a_layer() -> None:
    assert sorted(RANK) == MODULES


@pytest.mark.parametrize("module", MODULES)
def test_imports_go_down_only(module: str) -> None:
    inside, _ = imports(module)
    upward = sorted(m for m in inside if RANK[m] > RANK[module])
    assert upward == [], f"{module} ({_layer(module)}) imports from higher layers: {upward}"


@pytest.mark.parametrize("module", MODULES)
def test_only_the_fuse_shell_imports_pyfuse3_or_trio(module: str) -> None:
    _, outside = imports(module)
    if _layer(module) != "fuse":
        assert outside & FUSE_ONLY == set()


def test_the_readme_and_the_architecture_page_map_every_module() -> None:
    """README's Code section lists the layers as LAYERS does; docs/architecture.md has a line a module."""
    readme = (PACKAGE.parent / "README.md").read_text().split("\n## Code\n", 1)[1]
    listed = {}
    for line in readme.splitlines():
        if line.startswith("- ") and ":" in line:
            name, _, modules = line[2:].partition(":")
            listed[name.split(" (")[0]] = tuple(m.strip("`") for m in modules.split())
    assert listed == LAYERS
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    assert [m for m in MODULES if f"- `{m}.py`:" not in page] == []


def test_no_import_cycle() -> None:
    graph = {m: imports(m)[0] - {m} for m in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep) :] + [dep]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep, [*path, dep])
        state[module] = 2

    for module in MODULES:
        if module not in state:
            visit(module, [module])


def _layer(module: str) -> str:
    return next(name for name, modules in LAYERS.items() if module in modules)
