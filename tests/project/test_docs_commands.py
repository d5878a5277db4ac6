"""Every shell command of the README and docs/usage.md, run in order as a user would, in a tiny setting.

Each ```sh block runs as one bash script (``set -e``) in one shared working directory, so later blocks see what
earlier ones made (the artifact, the PNG folder). The tiny setting is a short list of textual substitutions
(fewer images, shorter loops, free ports) that keep every command and every flag as documented. Lines that
make virtual environments or install packages are left to CI's own install; a block marked
``<!-- needs: MODULE -->`` is skipped, with the reason, where MODULE does not import.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = ("README.md", "docs/usage.md")
SKIP_LINE = re.compile(r"^\s*(python -m venv|pip install|\. \S+/bin/activate)")
TINY = [  # (pattern, replacement): the documented command, made small
    (r"--n (64|500)\b", "--n 4"),
    (r"--batch 1 32\b", "--batch 1 2 --repeats 1 --set gs_steps=1 ap_steps=1"),
    (r"(zeropur-export eval .*)--out", r"\1--threads 2 --out"),
    (r"(zeropur-rt serve \S+)", r"\1 --http-port $HTTP_PORT --grpc-port $GRPC_PORT --instances 1 --threads 1 "
                                r"--set gs_steps=2 ap_steps=3"),
    (r"127\.0\.0\.1:8000", "127.0.0.1:$HTTP_PORT"),
    (r"(zeropur-rt purify \S+ images) ", r"\1 --set gs_steps=2 ap_steps=3 "),
]


def blocks() -> list[tuple[str, int, str | None, str]]:
    """(page, line, required module or None, script) of every ```sh block, in reading order."""
    out = []
    for page in PAGES:
        lines = (ROOT / page).read_text().split("\n")
        for i, line in enumerate(lines):
            if line.strip() != "```sh":
                continue
            need = re.match(r"<!-- needs: (\S+) -->", lines[i - 1].strip()) if i else None
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            out.append((page, i + 1, need and need.group(1), "\n".join(lines[i + 1:end])))
    return out


def tiny(script: str) -> str:
    kept = []
    for line in script.split("\n"):
        if SKIP_LINE.match(line) or "pytest" in line:
            continue
        line = re.sub(r"&& \. \S+/bin/activate", "", line)
        for pat, rep in TINY:
            line = re.sub(pat, rep, line)
        kept.append(line)
    return "\n".join(kept)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    """One working directory per page: a page's blocks build on each other, never on another page's."""
    return {page: tmp_path_factory.mktemp("user") for page in PAGES}


def test_every_page_has_commands():
    assert {p for p, *_ in blocks()} == set(PAGES)


@pytest.mark.parametrize("page,line,need,script", blocks(), ids=[f"{p}:{n}" for p, n, _, _ in blocks()])
def test_documented_commands_run(page, line, need, script, workdirs):
    pytest.importorskip("torch")
    if need and importlib.util.find_spec(need) is None:
        pytest.skip(f"{page}:{line} needs {need}, which is not installed here")
    if shutil.which("zeropur-rt") is None:
        pytest.skip("the zeropur-rt command is not installed (pip install -e .)")
    env = {**os.environ, "HTTP_PORT": str(free_port()), "GRPC_PORT": str(free_port()), "OMP_WAIT_POLICY": "PASSIVE"}
    r = subprocess.run(["bash", "-c", "set -euo pipefail\n" + tiny(script)], cwd=workdirs[page], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{page}:{line}\n{tiny(script)}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"
