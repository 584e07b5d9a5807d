"""The import rules of the developers' guide, checked on the source with `ast` (nothing is imported, no Ray):

1. no private name (`_x`) is imported across longctx modules: a helper two modules need is public or moves down;
2. every import inside a function says on its line why it is deferred (`# deferred: CLI start-up time`);
3. no longctx module imports another in a cycle, at module level or inside a function (so no deferred import is
   there to break a cycle);
4. the engines (`data/`, `train/`, `eval/`, `model/`) never import the run plumbing above them.

Each check also runs on a small synthetic tree that breaks its rule, to show that it can fail.
"""

from __future__ import annotations

import ast
import functools
import io
import re
import subprocess
import sys
import textwrap
import tokenize
from pathlib import Path

import pytest

import longctx

PACKAGE = Path(longctx.__file__).parent
ENGINES = ("longctx.data", "longctx.train", "longctx.eval", "longctx.model")
# The floors above the engines: run composition, entry points, sweeps, and the checks and estimates made before a run
# (preflight probes the data with the engines' readers, plan traces the train step). The engines may use the floors
# below them (config, storage, progress, quiet, raycluster, tracking, cleanup, report) and each other.
RUN_PLUMBING = ("longctx.runs", "longctx.cli", "longctx.jobargs", "longctx.tune", "longctx.preflight",
                "longctx.probe", "longctx.plan")


def load_sources(root: Path) -> dict[str, tuple[str, bool, str]]:
    """{module name: (source, is a package, path)} of every .py under `root` (a package folder)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path.read_text(), is_pkg, str(path))
    return out


def _absolute(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


_BODIES = ("body", "orelse", "finalbody", "handlers", "cases")


def _walk_imports(tree: ast.AST):
    """(node, deferred, type_checking_only) for every import statement (imports are statements: only statement
    bodies are walked, not expressions)."""
    def visit(node, deferred, typing_only):
        for field in _BODIES:
            for child in getattr(node, field, ()):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    yield child, deferred, typing_only
                    continue
                d = deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
                t = typing_only or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
                yield from visit(child, d, t)
    yield from visit(tree, False, False)


def _has_comment(lines: list[str]) -> bool:
    """Whether the lines of one statement hold a comment (a `#` in a string is not one)."""
    text = textwrap.dedent("\n".join(lines)) + "\n"
    return any(tok.type == tokenize.COMMENT for tok in tokenize.generate_tokens(io.StringIO(text).readline))


def scan(sources: dict[str, tuple[str, bool, str]], package: str = "longctx"):
    """Private names imported across modules, deferred imports without a comment on their line, the import edges
    between longctx modules (deferred ones too; not those under TYPE_CHECKING), and every internal import as
    (importer, imported, deferred, where)."""
    private, unexplained, edges, imports = [], [], {}, []
    for module, (src, is_pkg, path) in sources.items():
        tree = ast.parse(src)
        lines = src.split("\n")
        module_names = {}
        for node, deferred, typing_only in _walk_imports(tree):
            where = f"{path}:{node.lineno}"
            if deferred and not _has_comment(lines[node.lineno - 1:node.end_lineno]):
                unexplained.append(f"{where}: {ast.unparse(node)}")
            targets = []
            if isinstance(node, ast.Import):
                for alias in node.names:
                    targets.append(alias.name)
                    if alias.asname:
                        module_names[alias.asname] = alias.name
            else:
                base = _absolute(module, is_pkg, node)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in sources:
                        targets.append(sub)
                        module_names[alias.asname or alias.name] = sub
                    else:
                        targets.append(base)
                        if alias.name.startswith("_") and not alias.name.startswith("__") \
                                and base.startswith(package) and base != module:
                            private.append(f"{where}: {base}.{alias.name}")
            for target in targets:
                if target.split(".")[0] == package:
                    imports.append((module, target, deferred, where))
                    if not typing_only and target != module:
                        edges.setdefault(module, set()).add(target)
        attrs = re.compile(r"\b(%s)\._" % "|".join(map(re.escape, module_names))) if module_names else None
        for node in ast.walk(tree) if attrs and attrs.search(src) else ():  # plots._png after `import ... plots`
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in module_names and module_names[node.value.id] != module \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                private.append(f"{path}:{node.lineno}: {module_names[node.value.id]}.{node.attr}")
    return private, unexplained, edges, imports


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def up_arrows(imports, engines=ENGINES, plumbing=RUN_PLUMBING) -> list[str]:
    """Imports (deferred ones too) from an engine module to the run plumbing."""
    def under(name, prefixes):
        return any(name == p or name.startswith(p + ".") for p in prefixes)
    return [f"{where}: {importer} -> {imported}" for importer, imported, _, where in imports
            if under(importer, engines) and under(imported, plumbing)]


@functools.cache
def _package():
    return scan(load_sources(PACKAGE))


def _tree(tmp_path: Path, files: dict[str, str]) -> dict[str, tuple[str, bool, str]]:
    for rel, text in files.items():
        path = tmp_path / "longctx" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return load_sources(tmp_path / "longctx")


def test_no_private_names_across_modules(tmp_path):
    private, *_ = _package()
    assert private == [], "private names imported across modules (make them public or move them down):\n" + \
        "\n".join(private)
    # negative control: both spellings are caught; a module's own private names are not
    bad = _tree(tmp_path, {
        "__init__.py": "",
        "a.py": "_HIDDEN = 1\ndef _f(): return _HIDDEN\n",
        "b.py": "from longctx.a import _HIDDEN\n",
        "c.py": "from longctx import a\nx = a._f()\n",
        "d/__init__.py": "",
        "d/e.py": "from . import f\nfrom .f import _g\n",
        "d/f.py": "def _g(): pass\n",
    })
    found, *_ = scan(bad)
    assert len(found) == 3 and all(any(s in f for f in found) for s in ("longctx.a._HIDDEN", "longctx.a._f",
                                                                         "longctx.d.f._g")), found


def test_every_deferred_import_says_why(tmp_path):
    _, unexplained, *_ = _package()
    assert unexplained == [], "imports inside functions without a reason on their line " \
        "(`# deferred: ...`; or move them to the top):\n" + "\n".join(unexplained)
    bad = _tree(tmp_path, {
        "__init__.py": "",
        "a.py": "import os\n\ndef f():\n    import json\n    import ray  # deferred: heavy import\n"
                "    from longctx import (  # deferred: CLI start-up time\n        b,\n    )\n"
                "    from longctx.b import (\n        c,\n    )\n",
        "b.py": "c = 1\n",
    })
    _, found, *_ = scan(bad)
    assert [f.split(": ", 1)[1] for f in found] == ["import json", "from longctx.b import c"], found


def test_no_import_cycles_in_the_package(tmp_path):
    _, _, edges, _ = _package()
    assert len(edges) > 50  # the walk saw the package
    assert cycles(edges) == []
    # negative control: a three-module cycle is found, and so is one closed by a deferred import; an import under
    # TYPE_CHECKING (never run) does not close one
    bad = _tree(tmp_path, {
        "__init__.py": "",
        "a.py": "from longctx import b\n",
        "b.py": "from longctx.c import x\n",
        "c.py": "import longctx.a\nx = 1\n",
        "d.py": "import longctx.e\n",
        "e.py": "def f():\n    from longctx import d  # deferred: still a cycle\n",
        "f.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from longctx import g\n",
        "g.py": "import longctx.f\n",
    })
    assert sorted(cycles(scan(bad)[2])) == [["longctx.a", "longctx.b", "longctx.c"], ["longctx.d", "longctx.e"]]


def test_engines_do_not_import_run_plumbing(tmp_path):
    *_, imports = _package()
    assert any(i[0].startswith("longctx.train") for i in imports)
    assert up_arrows(imports) == [], "the engines import the run plumbing above them"
    # negative control: a deferred import counts too; the plumbing may import the engines
    bad = _tree(tmp_path, {
        "__init__.py": "",
        "runs/__init__.py": "",
        "runs/steps.py": "from longctx.train import loop\n",
        "train/__init__.py": "",
        "train/loop.py": "def f():\n    from longctx.runs.steps import x  # deferred: import cycle\n",
        "data/__init__.py": "",
        "data/pack.py": "import longctx.cli\nimport longctx.config\n",
    })
    found = up_arrows(scan(bad)[3])
    assert [f.split(": ", 1)[1] for f in found] == ["longctx.data.pack -> longctx.cli",
                                                    "longctx.train.loop -> longctx.runs.steps"], found


@pytest.mark.slow
def test_every_module_imports_in_a_fresh_interpreter():
    """Each module imports on its own: no import order hides a cycle through a package's __init__."""
    mods = [m for m in load_sources(PACKAGE) if not m.endswith("__main__")]
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    proc = subprocess.run([sys.executable, "-c", code, *mods], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


ENGINES = ("torch", "ray", "transformers", "deepspeed")


def _engines_after(code: str) -> list[str]:
    probe = code + f"\nimport sys\nprint(' '.join(m for m in {ENGINES!r} if m in sys.modules))\n"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split()


def test_cli_parser_imports_no_engine():
    """`longctx --help` (every verb's parser, the study's included) imports no engine: help and usage errors take a
    fraction of a second. The negative control: importing the study's code itself pulls torch in."""
    assert _engines_after("from longctx.cli import build_parser\nbuild_parser()") == []
    assert "torch" in _engines_after("import longctx.runs.study")
