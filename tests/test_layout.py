"""The package's shape: imports go down the layers (function-local imports included), no cycles,
short functions, every module on the map, nothing pointing outside the repo.

The layers, bottom to top (docs/ARCHITECTURE.md says what each holds). A module imports modules
of its own layer or below; within a layer the import graph has no cycle. ``TYPE_CHECKING``
imports name types only: the layers do not apply to them, but they may not close a cycle. A new module goes into :data:`LAYERS` and onto
the map in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import ast
import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pace_llm"
MAX_FUNCTION_LINES = 60  # code lines: no docstring, comment or blank line
MODULE_BUDGET = 600  # lines; above it a module asks for a look at its design, not a move

LAYERS: list[tuple[str, set[str]]] = [
    ("recipe", {"schema", "errors", "dtypes", "families", "atomic", "console"}),
    ("foundations", {"lora", "noise", "plot", "records", "distributed", "dsconfig", "schedule",
                     "flat_optim", "tracking", "tinymodel", "checkpoint", "rundir", "hub"}),
    ("data", {"data", "data.sources", "data.files", "data.tokens", "data.templates",
              "data.length", "data.examples", "data.spec", "data.cache", "data.stream", "data.mix",
              "data.batches", "data.collate", "data.build", "data.checks", "tasks", "tasks.gsm8k",
              "tasks.glue", "tasks.instruct", "tasks.synthetic"}),
    ("model", {"quant", "model", "inject", "objective", "probes", "evaluate", "peft_format",
               "vllm_contract", "merge"}),
    ("recipe checks", {"checks", "config"}),
    ("commands on a recipe", {"export", "datacheck"}),
    ("engine and loop", {"flat_engine", "ds_engine", "stepper", "run", "results", "resume",
                         "trainer"}),
    ("setup", {"setup"}),
    ("entry", {"train", "cli", ""}),  # "": the package's face, pace_llm/__init__.py
]


def _modules() -> dict[str, Path]:
    """Module name relative to the package ("" for the package itself) -> file."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported(node: ast.AST, name: str, is_package: bool, known: set[str]) -> set[str]:
    """Package modules one import statement names (relative to the package)."""
    if isinstance(node, ast.Import):
        return {a.name.removeprefix("pace_llm.") for a in node.names
                if a.name.startswith("pace_llm.") and a.name.removeprefix("pace_llm.") in known}
    if not isinstance(node, ast.ImportFrom):
        return set()
    module = node.module or ""
    if node.level:  # relative: from the module's package
        base = name.split(".") if is_package else name.split(".")[:-1]
        module = ".".join(base[:len(base) - node.level + 1] + ([module] if module else []))
        module = "pace_llm." + module if module else "pace_llm"
    if not (module == "pace_llm" or module.startswith("pace_llm.")):
        return set()
    rel = module.removeprefix("pace_llm").removeprefix(".")
    subs = {f"{rel}.{a.name}".lstrip(".") for a in node.names} & known
    return subs or ({rel} if rel in known else set())


def _imports(name: str, path: Path, known: set[str], types: bool = False) -> set[str]:
    """Every package module the file imports: at module level, inside functions and classes,
    under conditions; inside ``if TYPE_CHECKING:`` only with ``types``."""
    found: set[str] = set()
    todo: list[ast.AST] = [ast.parse(path.read_text())]
    while todo:
        node = todo.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child) and not types:
                todo += child.orelse
                continue
            found |= _imported(child, name, path.name == "__init__.py", known)
            todo.append(child)
    return found - {name}


def _graph(types: bool = False) -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules), types) for name, path in modules.items()}


def _layer_of() -> dict[str, int]:
    return {module: i for i, (_, members) in enumerate(LAYERS) for module in members}


def test_every_module_has_a_layer():
    placed = _layer_of()
    assert set(_modules()) == set(placed), (
        f"not in LAYERS: {sorted(set(_modules()) - set(placed))}; "
        f"in LAYERS but gone: {sorted(set(placed) - set(_modules()))}")


def test_imports_go_down_the_layers():
    layer = _layer_of()
    up = [f"{a} ({LAYERS[layer[a]][0]}) imports {b} ({LAYERS[layer[b]][0]})"
          for a, deps in _graph().items() for b in sorted(deps) if layer[b] > layer[a]]
    assert not up, "\n".join(up)


@pytest.mark.parametrize("types", [False, True], ids=["imports", "with-type-only-imports"])
def test_no_import_cycles(types):
    """No cycle among the imports; none either when the type-only (``TYPE_CHECKING``) ones are
    counted: two modules that name each other's types are one knot to read."""
    graph = _graph(types)
    done: set[str] = set()

    def visit(name: str, stack: list[str]) -> None:
        for dep in sorted(graph[name]):
            assert dep not in stack, f"import cycle: {' -> '.join(stack + [dep])}"
            if dep not in done:
                visit(dep, stack + [dep])
        done.add(name)

    for name in graph:
        visit(name, [name])


def test_the_schema_imports_nothing_of_the_package():
    assert _graph()["schema"] == set()


def test_the_checker_sees_function_local_and_skips_type_checking_imports(tmp_path):
    """The rules above read every import: a function-local one counts, a TYPE_CHECKING one
    does not (so a cycle or an upward arrow cannot hide inside a function)."""
    path = tmp_path / "mod.py"
    path.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                    "    from pace_llm.train import main\n"
                    "def f():\n    from pace_llm import distributed as D\n"
                    "    import pace_llm.schema\n")
    assert _imports("lora", path, {"train", "distributed", "schema"}) == {"distributed",
                                                                        "schema"}


def _code_lines(node: ast.AST, lines: list[str]) -> int:
    body = node.body
    first = body[0]
    doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
        first.value.value, str)
    start = first.end_lineno + 1 if doc else first.lineno
    return sum(1 for line in lines[start - 1:node.end_lineno]
               if line.strip() and not line.strip().startswith("#"))


def test_functions_stay_short():
    long = []
    for path in _modules().values():
        text = path.read_text()
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = _code_lines(node, lines)
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n}")
    assert not long, "split by meaning:\n" + "\n".join(long)


def test_module_budget_asks_for_a_look():
    """Not a cap: a module over the budget is named as a warning, a prompt to look at its
    design (one meaning per module), never a reason to move code somewhere else."""
    big = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
           for p in _modules().values()}
    over = {p: n for p, n in big.items() if n > MODULE_BUDGET}
    if over:
        warnings.warn(f"modules over {MODULE_BUDGET} lines, worth a look: {over}",
                      stacklevel=1)


def test_every_module_is_on_the_map():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    missing = [str(p.relative_to(ROOT)) for p in _modules().values()
               if f"`{p.relative_to(ROOT)}`" not in text]
    assert not missing, f"docs/ARCHITECTURE.md does not map: {missing}"


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
