"""The import graph of ``ahn``: no cycles, layers that point one way, and function-local imports that say why.

Every module under ``ahn/`` is parsed with :mod:`ast` (never imported): imports at any depth count, function-local
ones included, except those under ``if TYPE_CHECKING:``. Relative imports are resolved; ``from ahn.x import y``
is an edge to the module ``ahn.x.y`` when that is a module, else to ``ahn.x`` (or, for a name that ``ahn.x``
exports lazily through its ``_LAZY`` table, to the module that defines it). Only explicit imports are edges:
the implicit import of a parent package (``ahn.x`` when ``ahn.x.y`` is imported) is not, so a package that
re-exports its submodules does not make a loop with each of them.

A function-local import is allowed for two reasons only, and says which in a comment on its own line or the line
above it (a run of consecutive imports shares one comment):

* ``# optional dependency``: a package ahn runs without (lm_eval, matplotlib, triton, fla, ...), or one that is
  slow to import and used by a single command (datasets, jieba);
* ``# start-up time``: keeps ``import ahn``, ``ahn --help`` and ``ahn --version`` free of torch / transformers (and
  the modules of ahn that import them), or keeps a heavy import that a command rarely needs (matplotlib, torch's
  FLOP counter) out of its start.

Run as a script (``python tests/test_import_graph.py``) it prints the cycles and the function-local imports.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ahn"
REASONS = ("optional dependency", "start-up time")
REASON_RE = re.compile(r"#.*\b(" + "|".join(re.escape(r) for r in REASONS) + r")\b")

class Import(NamedTuple):
    module: str  # the importing module
    target: str  # the imported module (only modules of ahn are resolved; others keep their dotted name)
    line: int
    local: bool  # inside a function body


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module under ahn/ (a package is its __init__.py)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, local: bool):
    """(import node, inside a function) for every import under ``node``, skipping ``if TYPE_CHECKING:`` bodies."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, local
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield from _walk_one(other, local)
        else:
            yield from _walk(child, local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))


def _walk_one(node: ast.AST, local: bool):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node, local
    else:
        yield from _walk(node, local or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))


def _resolve_base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    if node.level > 1:
        parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def lazy_exports() -> dict[str, dict[str, str]]:
    """Package -> {name: module} of the packages that export names lazily (a ``_LAZY`` table in ``__init__``):
    ``from ahn import add_memory`` imports ``ahn.model`` when it runs."""
    out = {}
    for name, path in module_files().items():
        if path.name != "__init__.py":
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets):
                out[name] = ast.literal_eval(node.value)
    return out


def imports_of(module: str, source: str, is_package: bool, modules, lazy: Optional[dict] = None) -> list[Import]:
    """The imports in ``source`` (the text of ``module``); ``modules`` is the set of ahn's module names, ``lazy``
    what :func:`lazy_exports` returns."""
    tree = ast.parse(source)
    lazy = lazy or {}
    out = []
    for node, local in _walk(tree, False):
        if isinstance(node, ast.Import):
            out += [Import(module, alias.name, node.lineno, local) for alias in node.names]
            continue
        base = _resolve_base(module, is_package, node)
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            target = sub if sub in modules else lazy.get(base, {}).get(alias.name, base)
            out.append(Import(module, target, node.lineno, local))
    return out


def all_imports() -> list[Import]:
    modules, lazy = module_files(), lazy_exports()
    return [imp for name, path in modules.items()
            for imp in imports_of(name, path.read_text(), path.name == "__init__.py", modules, lazy)]


def import_graph(imports: Optional[list[Import]] = None) -> dict[str, set[str]]:
    """Module -> the modules of ahn it imports (self-imports, e.g. ``import ahn`` inside ahn, are not edges)."""
    modules = module_files()
    graph = {name: set() for name in modules}
    for imp in all_imports() if imports is None else imports:
        if imp.target in modules and imp.target != imp.module:
            graph[imp.module].add(imp.target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted, largest first."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):  # recursive: ahn has ~100 modules, far below the recursion limit
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out, key=lambda c: (-len(c), c))


def describe(comp: list[str], graph: dict[str, set[str]]) -> str:
    members = set(comp)
    edges = [f"{a} -> {b}" for a in comp for b in sorted(graph[a] & members)]
    return f"{len(comp)} modules: " + "; ".join(edges)


def unexplained_local_imports() -> list[str]:
    """'file:line: import' for each function-local import without a reason comment (see the module docstring)."""
    modules = module_files()
    bad = []
    for name, path in modules.items():
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines), filename=str(path))
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for body in _bodies(func):
                run_reason = None  # None: not in a run of consecutive imports
                for stmt in body:
                    if not isinstance(stmt, (ast.Import, ast.ImportFrom)):
                        run_reason = None
                        continue
                    own = " ".join(lines[max(stmt.lineno - 2, 0): stmt.end_lineno])  # the line above through its own
                    if REASON_RE.search(own):
                        run_reason = True
                    elif run_reason is None:
                        run_reason = False
                    if not run_reason:
                        bad.append(f"{path.relative_to(ROOT)}:{stmt.lineno}: {lines[stmt.lineno - 1].strip()}")
    return bad


def _bodies(func: ast.AST):
    """Every statement list inside ``func`` that belongs to it (not to a nested function, which is visited on its
    own), skipping ``if TYPE_CHECKING:`` bodies."""
    todo = [func.body]
    while todo:
        body = todo.pop()
        yield body
        for stmt in body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if isinstance(stmt, ast.If) and _is_type_checking(stmt.test):
                todo.append(stmt.orelse)
                continue
            for field in ("body", "orelse", "finalbody"):
                sub = getattr(stmt, field, None)
                if isinstance(sub, list) and sub and isinstance(sub[0], ast.stmt):
                    todo.append(sub)
            for handler in getattr(stmt, "handlers", ()):
                todo.append(handler.body)
            for case in getattr(stmt, "cases", ()):
                todo.append(case.body)


# ---------------------------------------------------------------------------------------------------- tests


def test_the_parser_sees_local_relative_and_submodule_imports():
    """The graph is only as good as its parser: a function-local relative import of a submodule, a
    ``from package import submodule`` and a TYPE_CHECKING import are each read the way Python runs them."""
    imports = all_imports()
    graph = import_graph(imports)
    assert "ahn.config" in graph and "ahn.benchmarks.evaluate" in graph
    assert ("ahn.cli", "ahn.distill.trainer") in {(i.module, i.target) for i in imports if i.local}
    code = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import ahn.model\n"
            "from ahn.lm_eval import TASKS_DIR\n"
            "def f():\n    from . import teacher\n    from .. import _io\n    from .teacher import load_teacher\n")
    modules = {"ahn.demo.x", "ahn.demo.teacher", "ahn._io", "ahn.lm_eval"}
    found = [(i.target, i.line, i.local) for i in imports_of("ahn.demo.x", code, False, modules)]
    assert found == [("typing", 1, False), ("ahn.lm_eval", 4, False), ("ahn.demo.teacher", 6, True), ("ahn._io", 7, True),
                     ("ahn.demo.teacher", 8, True)]
    assert imports_of("ahn.demo", "from . import x", True, {"ahn.demo", "ahn.demo.x"})[0].target == "ahn.demo.x"
    assert lazy_exports()["ahn"]["add_memory"] == "ahn.model"
    assert imports_of("ahn.x", "from ahn import add_memory, __version__", False, {"ahn", "ahn.model"},
                      lazy_exports()) == [Import("ahn.x", "ahn.model", 1, False), Import("ahn.x", "ahn", 1, False)]
    assert cycles({"a": {"b"}, "b": {"a", "c"}, "c": set(), "d": {"e"}, "e": set()}) == [["a", "b"]]


def test_no_import_cycle_anywhere():
    """No module of ahn imports (at any depth, function-local imports included) a module that imports it back."""
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(describe(c, graph) for c in found)


# Which layers may not import which (the CLI is the top: nobody imports it but `python -m ahn`).
FORBIDDEN = {
    # The core: kernels -> memory -> (salience, state) -> cache -> attention -> model.
    "ahn.kernels": ("ahn.memory", "ahn.salience", "ahn.state", "ahn.cache", "ahn.attention", "ahn.model",
                    "ahn.adapters"),
    "ahn.memory": ("ahn.salience", "ahn.state", "ahn.cache", "ahn.attention", "ahn.model", "ahn.adapters"),
    "ahn.salience": ("ahn.state", "ahn.cache", "ahn.attention", "ahn.model", "ahn.adapters"),
    "ahn.state": ("ahn.cache", "ahn.attention", "ahn.model", "ahn.adapters"),
    "ahn.cache": ("ahn.attention", "ahn.model", "ahn.adapters", "ahn.salience"),
    "ahn.attention": ("ahn.model", "ahn.adapters"),
    "ahn.adapters": ("ahn.model",),
    "ahn.distill": ("ahn.demo", "ahn.benchmarks", "ahn.cli", "ahn.lm_eval"),
    "ahn.benchmarks": ("ahn.cli", "ahn.lm_eval", "ahn.demo"),
    "ahn.demo": ("ahn.cli", "ahn.benchmarks", "ahn.lm_eval"),
    "ahn.generate": ("ahn.cli", "ahn.demo", "ahn.distill", "ahn.benchmarks"),
    "ahn.flops": ("ahn.cli", "ahn.demo", "ahn.distill", "ahn.benchmarks"),
    "ahn.lm_eval": ("ahn.cli", "ahn.demo", "ahn.distill"),
    "ahn.config": ("ahn.cli", "ahn.demo", "ahn.distill", "ahn.benchmarks", "ahn.model", "ahn.generate"),
}
# The benchmarks that are about the demo (made of `ahn demo` runs) may import it; the demo imports no benchmark.
DEMO_BENCHMARKS = ("ahn.benchmarks.capacity", "ahn.benchmarks.distill_step")  # the latter: the demo's shape by default
# Low-level helpers import nothing of ahn above them.
HELPERS = ("ahn._io", "ahn._jsonl", "ahn._cli_args", "ahn._lazy", "ahn._loading", "ahn._progress", "ahn._shipped",
           "ahn.plotting")


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_layers_point_one_way():
    """distill imports neither the demo nor the benchmarks; the benchmarks import neither the CLI nor the demo
    (but those made of demo runs); the demo imports no benchmark; the small helpers import no other module of ahn
    (but each other); nobody but ``ahn.__main__`` imports the CLI."""
    graph = import_graph()
    bad = []
    for module, targets in graph.items():
        for target in sorted(targets):
            for layer, forbidden in FORBIDDEN.items():
                if _within(module, layer) and any(_within(target, f) for f in forbidden):
                    if not (module in DEMO_BENCHMARKS and _within(target, "ahn.demo")):
                        bad.append(f"{module} -> {target}")
            if target == "ahn.cli" and module != "ahn.__main__":
                bad.append(f"{module} -> {target} (only ahn.__main__ imports the CLI)")
            if module in HELPERS and target not in HELPERS and target != "ahn":
                bad.append(f"{module} -> {target} (a low-level helper)")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(set(bad)))


def test_function_local_imports_say_why():
    """Every function-local import carries ``# optional dependency`` or
    ``# start-up time`` on its line or the line above (a run of consecutive imports shares one)."""
    bad = unexplained_local_imports()
    assert not bad, "function-local imports without a reason:\n" + "\n".join(bad)


def test_modes_are_defined_once():
    """The attention modes ("full", "window", "ahn") are ``ahn.config.MODES``, which everyone imports."""
    defined = []
    for name, path in module_files().items():
        for node in ast.parse(path.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, ast.AnnAssign) else []
            if any(isinstance(t, ast.Name) and t.id == "MODES" for t in targets):
                defined.append(name)
    assert "ahn.config" in defined
    assert defined == ["ahn.config"], defined


def test_start_up_imports_no_torch():
    """``import ahn`` and building the CLI's parser (``ahn --help`` / ``--version``) import no heavy library."""
    code = ("import sys\nimport ahn\nheavy = ('torch', 'transformers', 'datasets', 'matplotlib', 'tqdm', 'lm_eval')\n"
            "first = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
            "import ahn.cli\nahn.cli.build_parser()\n"
            "print(first, sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in heavy}))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[] []", f"heavy modules at start-up (import ahn, then the CLI): {out.stdout}"


def _module_of(line: str) -> str:
    parts = list(Path(line.split(":", 1)[0]).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


if __name__ == "__main__":
    g = import_graph()
    for c in cycles(g):
        print("cycle:", describe(c, g))
    local = [i for i in all_imports() if i.local]
    statements = {(i.module, i.line) for i in local}
    of_ahn = {(i.module, i.line) for i in local if i.target == "ahn" or i.target.startswith("ahn.")}
    print(f"{len(statements)} function-local import statements ({len(of_ahn)} of ahn's own modules)")
    for line in unexplained_local_imports():
        print("no reason:", line)
