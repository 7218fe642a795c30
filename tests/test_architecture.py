"""The layers of docs/architecture.md, checked: the import contract (import-linter, in pyproject.toml), no import
circle between files, no private name imported across files, the paper's functions and the data pipeline free of
Ray and torch.distributed, and functions and files that fit on a screen.

Each checker is a plain function over a source tree, tested first on a small tree that breaks it (so a checker
that cannot fail is caught), then run on cmd_dist/ and tune/.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO as _REPO

REPO = Path(_REPO)

PACKAGES = ("cmd_dist", "tune")
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 500
#: Only the exchange crosses process boundaries (STYLE.md, "One place crosses process boundaries").
DISTRIBUTED_OWNER = "cmd_dist.train.exchange"
#: Where Ray may be imported: the launch layer, the Tune driver and the CLI (which stops Ray on the way out).
RAY_FREE = (
    "cmd_dist.method",
    "cmd_dist.data",
    "cmd_dist.train",
    "cmd_dist.infer",
    "cmd_dist.runs",
    "cmd_dist.config",
    "cmd_dist.models",
)


def module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def sources(root: Path, packages=PACKAGES) -> dict[str, Path]:
    return {module_name(root, p): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def imports(module: str, path: Path, known: set[str]) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import in the file, lazy ones included."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names = [a.name for a in node.names]
            # `from pkg import mod` imports the module pkg.mod
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
            found += [(s, [], node.lineno) for s in subs]
            rest = [n for n in names if f"{base}.{n}" not in known]
            if rest or not subs:
                found.append((base, rest, node.lineno))
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    mods = sources(root)
    known = set(mods)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for target, _, _ in imports(m, p, known):
            while target and target not in known:
                target = target.rpartition(".")[0]
            # a package's __init__ is not an edge to follow from its own files
            if target and target != m and not m.startswith(target + "."):
                graph[m].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one file (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def private_imports(root: Path) -> list[str]:
    mods = sources(root)
    known = set(mods)
    bad = []
    for m, p in mods.items():
        for target, names, line in imports(m, p, known):
            if target.split(".")[0] in PACKAGES and target != m:
                bad += [f"{p.relative_to(root)}:{line} imports {target}.{n}" for n in names if n.startswith("_")]
    return bad


def forbidden_imports(root: Path, owners: tuple[str, ...], banned: str, allowed: tuple[str, ...] = ()) -> list[str]:
    mods = sources(root)
    known = set(mods)
    bad = []
    for m, p in mods.items():
        if not any(m == o or m.startswith(o + ".") for o in owners) or m in allowed:
            continue
        for target, names, line in imports(m, p, known):
            full = [target] + [f"{target}.{n}" for n in names]
            if any(t == banned or t.startswith(banned + ".") for t in full):
                bad.append(f"{p.relative_to(root)}:{line} imports {banned}")
    return bad


def oversized(root: Path) -> list[str]:
    bad = []
    for _, p in sources(root).items():
        text = p.read_text()
        n = len(text.splitlines())
        if n > MAX_FILE_LINES:
            bad.append(f"{p.relative_to(root)}: {n} lines (at most {MAX_FILE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    bad.append(f"{p.relative_to(root)}:{node.lineno} {node.name}: {length} lines")
    return bad


# ----------------------------------------------------------------------------- the checkers can fail


@pytest.fixture
def broken_tree(tmp_path: Path) -> Path:
    """A tiny tree with one of every violation the checkers look for."""
    pkg = tmp_path / "cmd_dist"
    (pkg / "method").mkdir(parents=True)
    (tmp_path / "tune").mkdir()
    (tmp_path / "tune" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "method" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from cmd_dist.b import _hidden\n")
    (pkg / "b.py").write_text("from cmd_dist import a\n_hidden = 1\n")
    (pkg / "method" / "loss.py").write_text("import torch.distributed as dist\nimport ray\n")
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (pkg / "long.py").write_text(f"def long():\n{body}\n" + "\n" * MAX_FILE_LINES)
    return tmp_path


def test_the_checkers_find_each_kind_of_violation(broken_tree):
    assert cycles(import_graph(broken_tree)) == [["cmd_dist.a", "cmd_dist.b"]]
    assert private_imports(broken_tree) == ["cmd_dist/a.py:2 imports cmd_dist.b._hidden"]
    assert forbidden_imports(broken_tree, ("cmd_dist.method",), "torch.distributed") == [
        "cmd_dist/method/loss.py:1 imports torch.distributed"
    ]
    assert forbidden_imports(broken_tree, ("cmd_dist.method",), "ray") == ["cmd_dist/method/loss.py:2 imports ray"]
    assert [s.split(":")[0] for s in oversized(broken_tree)] == ["cmd_dist/long.py", "cmd_dist/long.py"]


def test_import_linter_fails_on_a_broken_layer(tmp_path):
    """The contract in pyproject.toml is live: a copy of the package where the method layer imports the launch
    layer breaks it."""
    lint = Path(sys.executable).parent / "lint-imports"
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "cmd_dist" / "method" / "bad.py").write_text("import cmd_dist.launch.job\n")
    done = subprocess.run([str(lint), "--no-cache"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode != 0 and "cmd_dist.method.bad -> cmd_dist.launch.job" in done.stdout


# ----------------------------------------------------------------------------- the project keeps them


def test_the_import_contract_holds():
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_no_import_circle_between_files():
    assert cycles(import_graph(REPO)) == []


def test_no_private_name_is_imported_across_files():
    assert private_imports(REPO) == []


def test_only_the_exchange_touches_torch_distributed():
    assert forbidden_imports(REPO, ("cmd_dist", "tune"), "torch.distributed", allowed=(DISTRIBUTED_OWNER,)) == []


def test_the_method_data_train_and_runs_layers_never_import_ray():
    assert [line for owner in RAY_FREE for line in forbidden_imports(REPO, (owner,), "ray")] == []


def test_functions_and_files_fit_on_a_screen():
    assert oversized(REPO) == []
