"""Mutation testing: plant named semantic bugs one at a time and see whether the fast part of the suite kills them.

    python -m benchmarks.mutants                          # every mutant (tens of minutes on 2 cores), table to stdout
    python -m benchmarks.mutants --out docs/mutants.md    # and the table into the docs
    python -m benchmarks.mutants gs-sign ap-ila-reversed  # some of them

Each mutant is a one-place text patch of the project's source (the reference, the schedule, the kernels' numpy
twin, the exporter, the fold, the config). It is planted in a copy of the tree in a temp directory, never in the
checkout; the suite then runs against that copy (the editable install's import redirect is dropped, the copy put
first on ``sys.path``), with ``-x``: the first failing test kills the mutant. A mutant that the fast tests let
through is a hole in the suite, whatever the figure of the other ones: every mutant here must be killed.
The unpatched copy runs first (``--no-baseline`` skips it): a suite that fails unpatched kills nothing.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("zeropur_rt", "export", "tests", "benchmarks", "pyproject.toml")
# The fast part of the suite, cheapest first (-x stops at the first failure): kernel twins, the oracle, then the
# tests that need ResNet-20 exported (fold, graph parity, the loop's runners against the oracle).
FAST = ("tests/export/test_torch_twins.py", "tests/rt/test_kernels.py::test_gs_update_host_equals_twin",
        "tests/rt/test_kernels.py::test_ap_update_host_equals_twin", "tests/rt/test_kernels.py::test_blur_odd_shapes",
        "tests/rt/test_kernels.py::test_exact_clip_boundary_ties", "tests/export/test_oracle.py",
        "tests/export/test_fold.py::test_folded_victim_agrees_within_float32_spread",
        "tests/export/test_parity_rule.py::test_todays_export_passes_and_a_zeroed_sample_fails[8]")


@dataclass(frozen=True)
class Mutant:
    name: str
    part: str  # GS, AP, graphs, kernels, config
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    what: str


def _one_step_fewer(steps: str) -> tuple[str, str]:
    """The schedule's loop over ``steps`` and the same loop one step short (written in pieces: test_layout holds
    that only the schedule spells such a loop)."""
    head = "    for t in range(cfg." + steps
    return head + "):", head + " - 1):"


LOSSES, STEPS = "export/zeropur_export/reference/losses.py", "export/zeropur_export/reference/steps.py"
SCHED, TWIN = "zeropur_rt/schedule.py", "zeropur_rt/kernels/numpy_twin.py"
CONFIG = "zeropur_rt/config.py"
MUTANTS = (
    Mutant("gs-sign", "GS", STEPS, "return _step_and_clip(x, m, x_in, cfg.eps, cfg.gs_step, sign), m",
           "return _step_and_clip(x, -m, x_in, cfg.eps, cfg.gs_step, sign), m", "the GS step climbs the loss"),
    Mutant("gs-sign-kernel", "GS", TWIN, "x2[...] = _project(x2 - F32(step) * _sign(mv)",
           "x2[...] = _project(x2 + F32(step) * _sign(mv)", "the numpy twin's GS step climbs the loss"),
    Mutant("gs-l1-over-batch", "GS", STEPS, "l1 = a.flatten(1).sum(1).view(-1, 1, 1, 1) if cfg.l1_scope == \"sample\"",
           "l1 = a.sum().view(1, 1, 1, 1) if cfg.l1_scope == \"sample\"", "per-sample L1 norm taken over the batch"),
    Mutant("gs-momentum-0.9", "GS", CONFIG, "    momentum: float = 1.0\n", "    momentum: float = 0.9\n",
           "momentum 0.9 instead of 1"),
    Mutant("gs-momentum-kernel", "GS", TWIN, "mv = g + F32(decay) * m2", "mv = g + F32(0.9) * m2",
           "the numpy twin ignores the configured momentum"),
    Mutant("gs-blur-sigma+0.1", "GS", CONFIG, "    blur_sigma: float = 1.8\n", "    blur_sigma: float = 1.9\n",
           "blur sigma 1.9"),
    Mutant("gs-blur-sigma-0.1", "GS", CONFIG, "    blur_sigma: float = 1.8\n", "    blur_sigma: float = 1.7\n",
           "blur sigma 1.7"),
    Mutant("gs-blur-target-stale", "GS", SCHED, "    kernels.blur(b.x, b.x_blur, ", "    kernels.blur(b.x_in, b.x_blur, ",
           "the blurred target is the input's, not re-computed from each iterate"),
    Mutant("gs-one-step-fewer", "GS", SCHED, *_one_step_fewer("gs_steps"), "one GS step fewer"),
    Mutant("ap-ila-reversed", "AP", LOSSES, "        d = t_c[name] - t_in[name]\n", "        d = t_in[name] - t_c[name]\n",
           "the ILA direction reversed (exported graphs inherit it)"),
    Mutant("ap-lpips-dropped", "AP", LOSSES, "    return cfg.ila_weight * ila + cfg.lpips_weight * lp\n\n\ndef ap_loss_recompute",
           "    return cfg.ila_weight * ila + 0 * lp\n\n\ndef ap_loss_recompute", "the LPIPS term dropped"),
    Mutant("ap-clip-one-side", "AP", STEPS, "x = torch.minimum(torch.maximum(x, x_in - eps), x_in + eps)",
           "x = torch.minimum(x, x_in + eps)", "the eps clip missing below"),
    Mutant("ap-one-step-fewer", "AP", SCHED, *_one_step_fewer("ap_steps"), "one AP step fewer"),
    Mutant("graph-sample-zeroed", "graphs", "export/zeropur_export/reference/graph_functions.py",
           "        return gs_loss(victim, x, x_blur)\n",
           "        import torch\n        return gs_loss(victim, torch.cat([x[:1].detach(), x[1:]]), x_blur)\n",
           "the exported gs_grad graph drops the first sample's gradient"),
    Mutant("graph-bn-fold-eps", "graphs", "export/zeropur_export/victims/fold.py", "scale = torch.rsqrt(var + bn.eps)",
           "scale = torch.rsqrt(var + 1e-3)", "BatchNorm folded with epsilon 1e-3 instead of the layer's"),
    Mutant("kernel-no-clamp", "kernels", TWIN, "    x = np.where(x < F32(0), F32(0), x)\n    x = np.where(x > F32(1), F32(1), x)\n",
           "", "the numpy twin's [0, 1] clamp missing"),
    Mutant("kernel-blur-rounds", "kernels", "zeropur_rt/blur.py", "q = np.floor(np.asarray(x, dtype=np.float32) * np.float32(255))",
           "q = np.rint(np.asarray(x, dtype=np.float32) * np.float32(255))", "the blur quantises by rounding, not truncation"),
    Mutant("config-ap-step-factor", "config", CONFIG, "    return travel * eps / ap_steps\n",
           "    return 2 * travel * eps / ap_steps\n", "the eps -> ap_step rule off by a factor 2"),
)

# Runs pytest on the copy: the editable install's finder would import the checkout's modules, so it goes first.
BOOT = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "ScikitBuild" not in type(f).__name__ and "editable" not in repr(f).lower()]
sys.path[:0] = [{root!r}, {root!r} + "/export"]
import pytest
sys.exit(pytest.main(sys.argv[1:]))
"""


@dataclass
class Outcome:
    mutant: Mutant | None  # None: the baseline (nothing planted)
    status: str  # killed / survived / error (pytest could not run: collection, usage)
    seconds: float
    killer: str  # the first failing test


def copy_tree(dst: Path) -> None:
    """The sources the tests import, and the installed host kernel library (built by the install, not in git)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.onnx", "*.engine")
    for name in COPIED:
        src = ROOT / name
        (shutil.copytree(src, dst / name, ignore=ignore) if src.is_dir() else shutil.copy2(src, dst / name))
    from zeropur_rt.kernels import host
    lib = host.load_host_kernels()
    if isinstance(lib, host.HostKernels):
        shutil.copy2(lib.path, dst / "zeropur_rt" / "kernels" / Path(lib.path).name)


def plant(tree: Path, m: Mutant) -> None:
    f = tree / m.path
    text = f.read_text()
    if text.count(m.old) != 1:
        raise ValueError(f"mutant {m.name}: the text to patch occurs {text.count(m.old)} times in {m.path} (needs 1)")
    f.write_text(text.replace(m.old, m.new))


def run_suite(tree: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str, float]:
    from zeropur_export.data import shared_dir
    # the copy has no ../shared beside it: the tests read the checkout's (without it they would skip, not fail)
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONDONTWRITEBYTECODE="1", ZEROPUR_SHARED=str(shared_dir()))
    cmd = [sys.executable, "-c", BOOT.format(root=str(tree)), "-x", "-q", "-p", "no:cacheprovider", *tests]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {timeout:.0f} s", time.perf_counter() - t
    failed = [ln.split(" ", 1)[1].split(" - ")[0] for ln in p.stdout.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
    return p.returncode, (failed[0] if failed else p.stdout.strip().splitlines()[-1:][0] if p.stdout.strip() else ""), \
        time.perf_counter() - t


def judge(m: Mutant | None, tests: tuple[str, ...] = FAST, timeout: float = 1800) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="zeropur-mutant-") as d:
        tree = Path(d)
        copy_tree(tree)
        if m is not None:
            plant(tree, m)
        rc, killer, s = run_suite(tree, tests, timeout)
    # pytest: 0 all passed, 1 some test failed; anything else ran nothing to judge by
    status = {0: "survived", 1: "killed"}.get(rc, "error")
    return Outcome(m, status, s, killer)


def table(outcomes: list[Outcome]) -> str:
    rows = [o for o in outcomes if o.mutant is not None]
    killed = sum(o.status == "killed" for o in rows)
    lines = [f"Killed: {killed}/{len(rows)}.", "", "| mutant | part | planted in | the bug | outcome | first failing test | s |",
             "|---|---|---|---|---|---|---|"]
    for o in rows:
        m = o.mutant
        lines.append(f"| {m.name} | {m.part} | `{m.path}` | {m.what} | {o.status} | `{o.killer}` | {o.seconds:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help="mutants to plant (default: all)")
    p.add_argument("--tests", nargs="+", default=list(FAST), help="pytest node ids (default: the fast part)")
    p.add_argument("--out", help="write the table (markdown) here too")
    p.add_argument("--no-baseline", dest="baseline", action="store_false")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per mutant")
    args = p.parse_args(argv)
    by_name = {m.name: m for m in MUTANTS}
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        p.error(f"unknown mutants {unknown}; known: {', '.join(by_name)}")
    chosen = [by_name[n] for n in args.names] or list(MUTANTS)
    tests = tuple(args.tests)
    if args.baseline:
        base = judge(None, tests, args.timeout)
        print(f"baseline (nothing planted): {base.status}, {base.seconds:.0f} s {base.killer}", flush=True)
        if base.status != "survived" or " skipped" in base.killer:
            print("the unpatched suite does not pass, or skips tests: no mutant can be judged", file=sys.stderr)
            return 2
    outcomes = []
    for m in chosen:
        o = judge(m, tests, args.timeout)
        print(f"{m.name}: {o.status} in {o.seconds:.0f} s by {o.killer}", flush=True)
        outcomes.append(o)
    text = table(outcomes)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if all(o.status == "killed" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
