"""The package's layering, read from the sources: each layer imports only the ones below it.

Every import counts, at module level or inside a function (a lazy import is still a dependency):
``kernels/`` (installed as ``fastmask.kernels``) holds only Triton code and imports nothing from
fastmask; the reference (the oracle) imports nothing above it; no module imports, directly or
through others, a module that imports it back.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    parts = list(relative.parts)
    if parts[0] == "kernels":
        parts.insert(0, "fastmask")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    files = list((ROOT / "fastmask").rglob("*.py")) + list((ROOT / "kernels").glob("*.py"))
    return {_module_name(path): path for path in files}


def _imports(name: str, path: Path, modules: set[str]) -> set[str]:
    """The fastmask modules ``name`` imports (``from x import y`` counts y when y is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
            targets = submodules or [base]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    return {name: _imports(name, path, set(sources)) for name, path in sources.items()}


def test_kernels_import_nothing_from_fastmask():
    graph = _graph()
    for name, imported in graph.items():
        if name.startswith("fastmask.kernels"):
            outside = {m for m in imported if not m.startswith("fastmask.kernels")}
            assert not outside, f"{name} imports {sorted(outside)}"
    for path in (ROOT / "kernels").glob("*.py"):
        assert "import torch" not in path.read_text(), f"{path.name}: kernels/ holds Triton code only"


def test_reference_imports_nothing_above_it():
    for name, imported in _graph().items():
        if name.startswith("fastmask.reference"):
            above = {m for m in imported if not m.startswith("fastmask.reference")}
            assert not above, f"{name} imports {sorted(above)}"


def test_no_import_cycles():
    graph = _graph()
    # a package's __init__ importing its own submodules is how it exposes them, not a dependency
    edges = {name: {m for m in imported if not m.startswith(name + ".")} for name, imported in graph.items()}

    def path_back(start: str, goal: str) -> list[str] | None:
        stack, seen = [[start]], {start}
        while stack:
            path = stack.pop()
            for nxt in sorted(edges[path[-1]]):
                if nxt == goal:
                    return path + [nxt]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(path + [nxt])
        return None

    cycles = [[name, *back] for name in sorted(edges) for target in sorted(edges[name])
              if (back := path_back(target, name))]
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
