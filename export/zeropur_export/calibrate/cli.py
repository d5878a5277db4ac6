"""Per-victim calibration of ZeroPur: fit the recipe to a classifier, training-free.

``calibrate --model resnet20`` searches blur sigma, eps, GS/AP steps and the ILA weight (raw or
normalised) on a held-out calibration slice of the CIFAR-10 test copy (rows 5000:6000 by default),
maximising purified PGD-20 accuracy subject to purified clean accuracy >= unpurified clean accuracy
- ``--max-clean-drop`` (points, same images). The search is ``zeropur_export.calibrate.calibrate``;
this command loads the model and the data, and writes report.json, report.md, report.png and
calibrated_config.json into ``--out``.

``calibrate eval --model resnet20 --config paper --config runs/calib_resnet20/calibrated_config.json
--rows 0:1000`` evaluates configs on the evaluation slice (never the calibration slice).

Exit codes: 0 ok, 2 bad input, 3 no config met the clean-accuracy budget (the report is still written).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

# before torch loads the OpenMP runtime, which reads it once: idle worker threads sleep instead of spinning
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from zeropur_rt.data import to_nchw_float  # noqa: E402

from .api import calibrate, check_settings, evaluate_configs  # noqa: E402
from .common import (ATTACK, DEFAULT_CALIB_ROWS, EVAL_ROWS, EXIT_BAD_INPUT, EXIT_NO_FEASIBLE, CalibError,  # noqa: E402
                     resolve_device)
from .inputs import floats, ints, load_config, load_labelled, load_model, overlap, parse_ila, parse_rows  # noqa: E402
from .report import evaluation_table  # noqa: E402
from .search import AXES, Grid  # noqa: E402

PROG = "zeropur-export calibrate"


def _flag(field: str) -> str:
    """The flag that sets an API field, for error messages: eps_255 -> --grid-eps, max_clean_drop -> --max-clean-drop."""
    if field in AXES:
        return "--grid-" + field.removesuffix("_255").replace("_", "-")
    return "--" + field.replace("_", "-")


def _common_flags(ap: argparse.ArgumentParser, device_help: str) -> None:
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help=device_help)
    ap.add_argument("--seed", type=int, default=0, help="PGD random-start seed")
    ap.add_argument("--attack-steps", type=int, default=ATTACK["steps"], help=argparse.SUPPRESS)
    ap.add_argument("--no-progress", dest="progress", action="store_false")


def _calib_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                 epilog=f"Evaluation mode: `{PROG} eval -h`.")
    ap.add_argument("--model", required=True, help="zoo architecture (resnet20, resnet56, ...)")
    ap.add_argument("--weights", default=None, help="weights file (default: the zoo's known pretrained file)")
    ap.add_argument("--data", default=None, help="CIFAR-10 test .npz with 'x' and 'y' (default: <shared>/data/cifar10_test.npz)")
    ap.add_argument("--calib-rows", default=DEFAULT_CALIB_ROWS, help="calibration slice START:STOP (default %(default)s)")
    ap.add_argument("--force-overlap", action="store_true", help="allow a calibration slice overlapping the evaluation rows 0:5000")
    ap.add_argument("--max-clean-drop", type=float, default=3.0, help="clean-accuracy budget in points (default %(default)s)")
    ap.add_argument("--min-robust-gain", type=float, default=1.0,
                    help="the chosen config must beat unpurified PGD accuracy by this many points (default %(default)s)")
    ap.add_argument("--out", default=None, help="output directory (default runs/calib_<model>)")
    _common_flags(ap, "torch device of the search: cpu (default) or cuda[:i]")
    ap.add_argument("--stage-n", default="64,192,1000", help="images per stage: GS/AP screens, refinement, final")
    ap.add_argument("--grid-sigma", default="0.5,0.7,1.0,1.5", help="blur sigmas (paper: 1.8, always tried via the paper recipe)")
    ap.add_argument("--grid-eps", default="4,6,8", help="eps values in /255 units (paper: 10)")
    ap.add_argument("--grid-gs-steps", default="5,10")
    ap.add_argument("--grid-gs-step", default="0.5,1", help="GS step sizes in /255 units (paper: 1)")
    ap.add_argument("--grid-ap-steps", default="10", help="AP steps in stage 2 (ap_step = eps / ap_steps)")
    ap.add_argument("--grid-ila", default="u1e-4,u1e-5,n0.001,n0.003,n0.01",
                    help="ILA variants: u<w> raw dot product (paper: u1e-4), n<w> normalised dot product")
    ap.add_argument("--ap-parents", type=int, default=3, help="GS configs that get the AP grid in stage 2 "
                    "(the best inside budget + parent slack, then spread along the GS clean/robust Pareto front)")
    ap.add_argument("--parent-slack", type=float, default=10.0,
                    help="extra clean-drop points allowed when picking AP parents (AP recovers clean accuracy)")
    ap.add_argument("--refine-ap-steps", default="25,50", help="AP step counts tried in stage 3 for the best AP configs")
    ap.add_argument("--refine-top", type=int, default=1, help="AP configs that get the stage-3 AP-step variants")
    ap.add_argument("--keep", type=int, default=6, help="configs promoted to stage 3")
    ap.add_argument("--final", type=int, default=2, help="configs promoted to the final stage")
    ap.add_argument("--slack", type=float, default=1.0, help="relaxation of the budget at small n, in binomial stds")
    ap.add_argument("--no-paper", dest="include_paper", action="store_false", help="do not evaluate the paper recipe in stage 2")
    return ap


def _grid(args: argparse.Namespace) -> Grid:
    return Grid(sigma=floats(args.grid_sigma, "--grid-sigma"), eps_255=floats(args.grid_eps, "--grid-eps"),
                gs_steps=ints(args.grid_gs_steps, "--grid-gs-steps"), gs_step_255=floats(args.grid_gs_step, "--grid-gs-step"),
                ap_steps=ints(args.grid_ap_steps, "--grid-ap-steps"), ila=parse_ila(args.grid_ila),
                ap_parents=args.ap_parents, parent_slack=args.parent_slack,
                refine_ap_steps=ints(args.refine_ap_steps, "--refine-ap-steps") if args.refine_ap_steps.strip() else [],
                refine_top=args.refine_top, keep=args.keep, final=args.final, slack=args.slack,
                include_paper=args.include_paper)


def _torch_setup(args: argparse.Namespace) -> None:
    if args.threads <= 0:
        raise CalibError(f"--threads must be > 0, got {args.threads}")
    torch.set_num_threads(args.threads)
    resolve_device(args.device)


def _images(args: argparse.Namespace, rows: tuple[int, int]) -> tuple[Any, Any, str, str, str, Any]:
    """(victim, images, labels, weights path, weights sha256, data path) of the model and rows asked for."""
    victim, wpath, wsha = load_model(args.model, args.weights)
    xs, ys, data_path = load_labelled(args.data, rows)
    return victim, torch.from_numpy(to_nchw_float(xs)), ys, wpath, wsha, data_path


def run_calibrate(argv: list[str]) -> int:
    args = _calib_parser().parse_args(argv)
    calib = parse_rows(args.calib_rows, "--calib-rows")
    if overlap(calib, EVAL_ROWS) and not args.force_overlap:
        raise CalibError(f"--calib-rows {args.calib_rows} overlaps the evaluation rows {EVAL_ROWS[0]}:{EVAL_ROWS[1]}; "
                         "calibrating on evaluation images inflates the reported accuracy. Use rows >= 5000 "
                         "(default 5000:6000) or pass --force-overlap")
    stage_n = ints(args.stage_n, "--stage-n")
    check_settings(stage_n=stage_n, max_clean_drop=args.max_clean_drop, min_robust_gain=args.min_robust_gain,
                   batch=args.batch, attack_steps=args.attack_steps, name=_flag)
    grid = _grid(args)
    grid.check(_flag)
    _torch_setup(args)
    out = Path(args.out or f"runs/calib_{args.model}")
    victim, x, y, wpath, wsha, data_path = _images(args, calib)

    def log(msg: str) -> None:
        print(msg, flush=True)

    log(f"calibrating {args.model} on rows {calib[0]}:{calib[1]} ({len(x)} images), budget {args.max_clean_drop:g} points")
    res = calibrate(victim, x, y, max_clean_drop=args.max_clean_drop, min_robust_gain=args.min_robust_gain, grid=grid,
                    stage_n=stage_n, device=args.device, batch=args.batch, progress=args.progress,
                    attack_steps=args.attack_steps, seed=args.seed, first_row=calib[0],
                    pgd_cache=out / "pgd_cache.npz", log=log)
    res.report = dict(model=args.model, weights=wpath, weights_sha256=wsha, data=data_path, calib_rows=list(calib),
                      **{k: v for k, v in res.report.items() if k != "model"})
    res.save(out)
    rep = res.report
    log(f"{rep['configs_tried']} configs tried in {rep['wall_seconds']:.0f} s; wrote {out}/report.md, report.json, report.png"
        + (", calibrated_config.json" if res.config is not None else ""))
    if res.config is None:
        print(f"{PROG}: {rep['message']}", file=sys.stderr)
        return EXIT_NO_FEASIBLE
    c = rep["chosen"]
    log(f"chosen: {c['label']}\n  n={c['n']}: clean {c['clean']:.1f}% -> {c['clean_purified']:.1f}% purified, "
        f"PGD {c['pgd']:.1f}% -> {c['pgd_purified']:.1f}% purified")
    return 0


def _eval_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"{PROG} eval",
                                 description="Evaluate ZeroPur configs (clean / PGD-20, without / with purification) on the evaluation slice.")
    ap.add_argument("--model", required=True)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--data", default=None)
    ap.add_argument("--config", action="append", required=True,
                    help="'paper' (the preset) or a ZeroPurConfig JSON file (e.g. calibrated_config.json); repeatable")
    ap.add_argument("--rows", default="0:1000", help="evaluation rows START:STOP inside 0:5000 (default %(default)s)")
    ap.add_argument("--force-overlap", action="store_true", help="allow rows overlapping a config's calibration slice")
    ap.add_argument("--out", default=None, help="output directory (default runs/eval_<model>)")
    _common_flags(ap, "torch device: cpu (default) or cuda[:i]")
    return ap


def run_eval(argv: list[str]) -> int:
    args = _eval_parser().parse_args(argv)
    rows = parse_rows(args.rows, "--rows")
    check_settings(batch=args.batch, attack_steps=args.attack_steps, name=_flag)
    configs = [load_config(s) for s in args.config]
    calib_default = parse_rows(DEFAULT_CALIB_ROWS)
    for name, _, crow in configs:
        for cr in ([crow] if crow else []) + [calib_default]:
            if overlap(rows, cr) and not args.force_overlap:
                raise CalibError(f"--rows {args.rows} overlaps the calibration rows {cr[0]}:{cr[1]}"
                                 f"{' of ' + name if cr == crow else ' (the default calibration slice)'}; evaluate on rows "
                                 f"inside {EVAL_ROWS[0]}:{EVAL_ROWS[1]} or pass --force-overlap")
    _torch_setup(args)
    out = Path(args.out or f"runs/eval_{args.model}")
    victim, x, y, wpath, wsha, data_path = _images(args, rows)
    res = evaluate_configs(victim, x, y, [(name, cfg) for name, cfg, _ in configs], device=args.device,
                           batch=args.batch, progress=args.progress, attack_steps=args.attack_steps, seed=args.seed,
                           first_row=rows[0], pgd_cache=out / "pgd_cache.npz", log=lambda m: print(m, flush=True))
    for r, (_, _, crow) in zip(res.report["results"], configs):
        r["calib_rows"] = list(crow) if crow else None
    res.report = dict(model=args.model, weights=wpath, weights_sha256=wsha, data=data_path, rows=list(rows),
                      **{k: v for k, v in res.report.items() if k != "model"})
    res.save(out)
    print(evaluation_table(res.report))
    print(f"wrote {out}/eval.md, eval.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``calibrate [flags]`` or ``calibrate eval [flags]``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    evaluating = bool(argv) and argv[0] == "eval"
    try:
        return run_eval(argv[1:]) if evaluating else run_calibrate(argv)
    except CalibError as e:
        print(f"{PROG}{' eval' if evaluating else ''}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    raise SystemExit(main())
