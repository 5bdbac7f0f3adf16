"""The package's shape: no import cycles, small modules, nothing pointing outside the repo."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pace_llm"
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, known: dict[str, Path]) -> set[str]:
    """pace_llm modules a file imports at module level (not inside functions)."""
    deps = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module in known:
            subs = {f"{node.module}.{a.name}" for a in node.names} & set(known)
            deps |= subs or {node.module}
        elif isinstance(node, ast.Import):
            deps |= {a.name for a in node.names if a.name in known}
    return deps


def test_no_import_cycles():
    known = _modules()
    graph = {name: _imports(path, known) for name, path in known.items()}
    done: set[str] = set()

    def visit(name: str, stack: list[str]) -> None:
        for dep in graph[name]:
            assert dep not in stack, f"import cycle: {' -> '.join(stack + [dep])}"
            if dep not in done:
                visit(dep, stack + [dep])
        done.add(name)

    for name in graph:
        visit(name, [name])


def test_modules_stay_small():
    sizes = {p.relative_to(ROOT): len(p.read_text().splitlines()) for p in _modules().values()}
    assert not {p: n for p, n in sizes.items() if n > MAX_LINES}


def test_nothing_points_outside_the_repository():
    pattern = re.compile(r"\.\./shared|shared/(data|docs|reference)|reference/\w+\.md|"
                         r"(?<!docs/)PACE\.md §")
    files = [ROOT / "README.md", *PACKAGE.rglob("*.py"), *(ROOT / "tests").rglob("*.py"),
             *(ROOT / "tests").rglob("*.md"), *(ROOT / "bench").glob("*.py"),
             *(ROOT / "bench").glob("*.md"), *(ROOT / "scripts").glob("*.py"),
             *(ROOT / "recipes").glob("*.yaml"), *(ROOT / "docs").glob("*.md")]
    hits = [f"{f.relative_to(ROOT)}:{n}: {line.strip()}"
            for f in files if f != Path(__file__)
            for n, line in enumerate(f.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, "\n".join(hits)


def test_the_schema_is_the_bottom():
    """schema.py imports nothing of the package, not even inside a function."""
    tree = ast.parse((PACKAGE / "schema.py").read_text())
    names = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [n for n in names if n and n.split(".")[0] == "pace_llm"]
