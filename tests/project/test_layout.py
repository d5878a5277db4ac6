"""The layout's rules, read from the source: deploy time never imports build time, no import circles (imports
inside functions included), the deploy-side tests import no torch, cheap imports, one loop, modules that read in
one sitting, and a wheel without ``benchmarks``."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"zeropur_rt": ROOT / "zeropur_rt", "zeropur_export": ROOT / "export" / "zeropur_export", "benchmarks": ROOT / "benchmarks"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, root in PACKAGES.items():
        for p in root.rglob("*.py"):
            out[".".join((pkg, *p.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")] = p
    return out


def _imports(name: str, path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for n in nodes:
        if isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                base = ".".join(pkg.split(".")[:len(pkg.split(".")) - n.level + 1] + ([base] if base else []))
            found |= {f"{base}.{a.name}" for a in n.names} | {base}
        elif isinstance(n, ast.Import):
            found |= {a.name for a in n.names}
    return found


def test_deploy_time_never_imports_build_time():
    bad = {m: sorted(i for i in _imports(m, p, False) if i.split(".")[0] in ("zeropur_export", "benchmarks"))
           for m, p in _modules().items() if m.startswith("zeropur_rt")}
    assert not {m: i for m, i in bad.items() if i}


def test_no_import_circles_even_inside_functions():
    """A lazy import inside a function is for cost, never to close a loop: every import counts."""
    mods = _modules()

    def resolve(target: str) -> str | None:
        while target and target not in mods:
            target = target.rpartition(".")[0]
        return target or None
    graph = {m: {resolve(i) for i in _imports(m, p, False)} - {None, m} for m, p in mods.items()}
    # a package importing its own submodules is how packages work, not a circle
    graph = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    circles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                circles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2
    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not circles


def test_import_zeropur_rt_stays_cheap():
    code = ("import sys, zeropur_rt, zeropur_rt.pipeline, zeropur_rt.cli, zeropur_rt.runners.onnxruntime, "
            "zeropur_rt.runners.tensorrt, zeropur_rt.kernels.sets, zeropur_rt.kernels.cuda, zeropur_export.cli; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'onnxruntime', 'tensorrt', 'cuda', 'pycuda')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_loop_is_written_once():
    """Only the schedule iterates Guided Shift or Adaptive Projection over a config's step counts."""
    loops = re.compile(r"for .* in range\([^)]*\b(gs_steps|ap_steps)\b")
    hits = [f"{m}:{i}" for m, p in _modules().items() for i, line in enumerate(p.read_text().splitlines(), 1)
            if loops.search(line)]
    hits += [str(p) for p in (ROOT / "benchmarks").glob("*.py") if loops.search(p.read_text())]
    assert hits and all(h.startswith("zeropur_rt.schedule:") for h in hits), hits


def test_wheel_holds_no_benchmarks():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = cfg["tool"]["scikit-build"]["wheel"]["packages"]
    assert set(packages) == {"zeropur_rt", "zeropur_export"}, packages
    assert set(cfg["project"]["scripts"]) == {"zeropur-rt", "zeropur-export"}


def test_deploy_side_tests_import_no_torch():
    """``tests/rt`` runs in a deploy-only install (numpy + onnxruntime): not one of its files imports torch or the
    build side, at any depth of the file."""
    heavy = ("torch", "zeropur_export", "torchvision")
    files = sorted((ROOT / "tests" / "rt").rglob("*.py"))
    bad = {str(p.relative_to(ROOT)): sorted(i for i in _imports("tests.rt", p, False) if i.split(".")[0] in heavy)
           for p in files}
    assert files and not {k: v for k, v in bad.items() if v}


MAX_LINES = 420  # "about 400": a module reads in one sitting


def test_every_module_reads_in_one_sitting():
    long = {str(p.relative_to(ROOT)): n for p in _modules().values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def _tree_block(doc: Path, heading: str) -> str:
    """The first fenced block after ``heading`` in ``doc``."""
    text = doc.read_text()
    return text[text.index(heading):].split("```")[1]


PATH_TOKEN = re.compile(r"^[\w.-]+(/[\w.-]+)*/?$")
FILE_SUFFIXES = (".py", ".cu", ".h", ".cpp", ".c", ".json", ".md", ".sh", ".toml")


def tree_paths(block: str) -> set[str]:
    """Paths a layout tree names: a folder line (``name/``) opens a level for the lines indented under it; a line's
    names come before its first run of two spaces (``a.py b.py   what they are``); wrapped descriptions are skipped."""
    stack: list[tuple[int, str]] = []
    out = set()
    for line in block.splitlines():
        if not line.strip():
            continue
        names = re.split(r"\s{2,}", line.strip())[0].split()
        if not names or not all(PATH_TOKEN.match(n) and (n.endswith("/") or n.endswith(FILE_SUFFIXES)) for n in names):
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1] if stack else ""
        out |= {parent + n for n in names}
        if len(names) == 1 and names[0].endswith("/"):
            stack.append((indent, parent + names[0]))
    return out


def _tracked() -> list[str]:
    return subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()


def test_readme_tree_matches_the_files():
    """Every path the README's layout names exists, and every folder of code or tests is named."""
    files = _tracked()
    if not files:
        pytest.skip("not a git checkout")
    dirs = {f.rsplit("/", 1)[0] + "/" for f in files if "/" in f}
    dirs |= {"/".join(d.split("/")[:i]) + "/" for d in dirs for i in range(1, d.count("/"))}
    named = tree_paths(_tree_block(ROOT / "README.md", "## Layout"))
    assert sorted(p for p in named if p not in dirs and p not in files) == []
    code_dirs = {d for d in dirs if d.startswith(("zeropur_rt/", "export/zeropur_export/", "tests/"))
                 and d.count("/") == (3 if d.startswith("export/") else 2) and "__pycache__" not in d}
    assert sorted(code_dirs - named) == []


def test_module_tree_in_the_docs_matches_the_files():
    """docs/usage.md names every module of both packages, and nothing that is not there."""
    files = _tracked()
    if not files:
        pytest.skip("not a git checkout")
    named = tree_paths(_tree_block(ROOT / "docs" / "usage.md", "## Layout"))
    modules = {f for f in files if f.startswith(("zeropur_rt/", "export/zeropur_export/")) and f.endswith(".py")
               and not f.endswith("__init__.py")}
    assert sorted(modules - named) == []
    assert sorted(p for p in named if not p.endswith("/") and p not in files) == []
