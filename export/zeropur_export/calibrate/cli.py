"""Per-victim calibration of ZeroPur: fit the recipe to a classifier, training-free.

``calibrate --model resnet20`` searches blur sigma, eps, GS/AP steps and the ILA weight (raw or
normalised) on a held-out calibration slice of the CIFAR-10 test copy (rows 5000:6000 by default),
maximising purified PGD-20 accuracy subject to purified clean accuracy >= unpurified clean accuracy
- ``--max-clean-drop`` (points, same images). The search is ``zeropur_export.calibrate.calibrate``;
this command loads the model and the data, and writes report.json, report.md, report.png and
calibrated_config.json into ``--out``.

``calibrate eval --model resnet20 --config paper --config runs/calib_resnet20/calibrated_config.json
--rows 0:1000`` evaluates configs on the evaluation slice (never the calibration slice).

Your own classifier: ``calibrate --victim net.py:factory --weights w.pt --mean .. --std .. --input-shape C,H,W
--num-classes K --data DATA`` (DATA: an .npz, a folder with one subfolder per class, or a path,label CSV;
images of another size are scaled and centre-cropped, ``--resize refuse`` refuses them). Its rows are dealt
out class by class (``zeropur_rt.datasets.stratified_order``); the first half is the evaluation slice, the
calibration slice is the second half (its first ``--stage-n`` final count of rows). ``--budget quick`` (the
default for --victim) is the small search for a first deployment, ``--budget full`` the README's.

Exit codes: 0 ok, 2 bad input, 3 no config met the clean-accuracy budget (the report is still written).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

# before torch loads the OpenMP runtime, which reads it once: idle worker threads sleep instead of spinning
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from zeropur_export.data import to_nchw_float  # noqa: E402

from .api import calibrate, check_settings, evaluate_configs  # noqa: E402
from .common import (ATTACK, DEFAULT_CALIB_ROWS, EVAL_ROWS, EXIT_BAD_INPUT, EXIT_NO_FEASIBLE, CalibError,  # noqa: E402
                     resolve_device)
from .inputs import (floats, ints, load_config, load_labelled, load_model, load_victim_data, overlap,  # noqa: E402
                     parse_ila, parse_rows, resolve)
from .report import evaluation_table  # noqa: E402
from .search import AXES, BUDGETS, NEXT_KNOB, Grid  # noqa: E402

PROG = "zeropur-export calibrate"


def _flag(field: str) -> str:
    """The flag that sets an API field, for error messages: eps_255 -> --grid-eps, max_clean_drop -> --max-clean-drop."""
    if field in AXES:
        return "--grid-" + field.removesuffix("_255").replace("_", "-")
    return "--" + field.replace("_", "-")


def _common_flags(ap: argparse.ArgumentParser, device_help: str) -> None:
    from zeropur_export.victims.cli import add_victim_args
    add_victim_args(ap, weights=False)
    ap.add_argument("--resize", choices=["crop", "refuse"], default="crop",
                    help="--data images of another size: scale to cover + centre crop (default), or refuse")
    ap.add_argument("--batch", type=int, default=100, help="images per purification call (default 100)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--device", default="cpu", help=device_help)
    ap.add_argument("--seed", type=int, default=0, help="PGD random-start seed")
    ap.add_argument("--attack-steps", type=int, default=ATTACK["steps"], help=argparse.SUPPRESS)
    ap.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _calib_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                 epilog=f"Evaluation mode: `{PROG} eval -h`.")
    ap.add_argument("--model", default=None, help="zoo architecture (resnet20, resnet56, ...); or --victim")
    ap.add_argument("--weights", default=None, help="weights file (default: the zoo's known pretrained file)")
    ap.add_argument("--data", default=None, help="labelled images: .npz, class-folder tree or path,label CSV "
                    "(default, for a zoo --model: <shared>/data/cifar10_test.npz)")
    ap.add_argument("--calib-rows", default=None, help=f"calibration slice START:STOP (default {DEFAULT_CALIB_ROWS} "
                    "of the CIFAR-10 copy; with --victim and --data: the second half)")
    ap.add_argument("--budget", choices=sorted(BUDGETS), default=None,
                    help="search size: quick (default with --victim) or full (default with --model); grid flags override it")
    ap.add_argument("--force-overlap", action="store_true", help="allow a calibration slice overlapping the evaluation rows 0:5000")
    ap.add_argument("--max-clean-drop", type=float, default=3.0, help="clean-accuracy budget in points (default %(default)s)")
    ap.add_argument("--objective", choices=["pgd", "worst"], default="pgd",
                    help="score robustness by PGD-20 (default), or by the per-image worst case over APGD-CE, APGD-DLR "
                    "(--apgd-iter, on the bare classifier) and a short BPDA-PGD through each config (--bpda-steps)")
    ap.add_argument("--apgd-iter", type=int, default=100, help="APGD iterations of --objective worst (default 100)")
    ap.add_argument("--bpda-steps", type=int, default=5, help="BPDA-PGD steps of --objective worst (default 5)")
    ap.add_argument("--min-robust-gain", type=float, default=1.0,
                    help="the chosen config must beat unpurified PGD accuracy by this many points (default %(default)s)")
    ap.add_argument("--out", default=None, help="output directory (default runs/calib_<model>)")
    _common_flags(ap, "torch device of the search: cpu (default) or cuda[:i]")
    # defaults None: the --budget's grid fills what is not given (full: the values in brackets)
    ap.add_argument("--stage-n", default=None, help="images per stage: GS/AP screens, refinement, final [64,192,1000]")
    ap.add_argument("--grid-sigma", default=None, help="blur sigmas at the preset's image side [0.5,0.7,1.0,1.5] "
                    "(paper: 1.8, always tried via the paper recipe)")
    ap.add_argument("--grid-eps", default=None, help="eps values in /255 units [4,6,8] (paper: 10)")
    ap.add_argument("--grid-gs-steps", default=None, help="[5,10]")
    ap.add_argument("--grid-gs-step", default=None, help="GS step sizes in /255 units [0.5,1] (paper: 1)")
    ap.add_argument("--grid-ap-steps", default=None, help="AP steps in stage 2 (ap_step = eps / ap_steps) [10]")
    ap.add_argument("--grid-ila", default=None, help="ILA variants: u<w> raw dot product (paper: u1e-4), n<w> "
                    "normalised dot product [u1e-4,u1e-5,n0.001,n0.003,n0.01]")
    ap.add_argument("--ap-parents", type=int, default=None, help="GS configs that get the AP grid in stage 2 [3] "
                    "(the best inside budget + parent slack, then spread along the GS clean/robust Pareto front)")
    ap.add_argument("--parent-slack", type=float, default=None,
                    help="extra clean-drop points allowed when picking AP parents (AP recovers clean accuracy) [10]")
    ap.add_argument("--refine-ap-steps", default=None, help="AP step counts tried in stage 3 for the best AP configs [25,50]")
    ap.add_argument("--refine-top", type=int, default=None, help="AP configs that get the stage-3 AP-step variants [1]")
    ap.add_argument("--keep", type=int, default=None, help="configs promoted to stage 3 [6]")
    ap.add_argument("--final", type=int, default=None, help="configs promoted to the final stage [2]")
    ap.add_argument("--slack", type=float, default=None, help="relaxation of the budget at small n, in binomial stds [1]")
    ap.add_argument("--no-paper", dest="include_paper", action="store_false", default=None,
                    help="do not evaluate the paper recipe in stage 2")
    return ap


def _budget(args: argparse.Namespace) -> str:
    return args.budget or ("quick" if args.victim else "full")


def _grid(args: argparse.Namespace) -> Grid:
    """The --budget's grid with every grid flag given on the command line in its place."""
    base = BUDGETS[_budget(args)][0]
    parsed = dict(sigma=(args.grid_sigma, floats, "--grid-sigma"), eps_255=(args.grid_eps, floats, "--grid-eps"),
                  gs_steps=(args.grid_gs_steps, ints, "--grid-gs-steps"),
                  gs_step_255=(args.grid_gs_step, floats, "--grid-gs-step"),
                  ap_steps=(args.grid_ap_steps, ints, "--grid-ap-steps"))
    given: dict[str, Any] = {k: fn(v, flag) for k, (v, fn, flag) in parsed.items() if v is not None}
    if args.grid_ila is not None:
        given["ila"] = parse_ila(args.grid_ila)
    if args.refine_ap_steps is not None:
        given["refine_ap_steps"] = ints(args.refine_ap_steps, "--refine-ap-steps") if args.refine_ap_steps.strip() else []
    for f in ("ap_parents", "parent_slack", "refine_top", "keep", "final", "slack", "include_paper"):
        if getattr(args, f) is not None:
            given[f] = getattr(args, f)
    return dataclasses.replace(base, **given)


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


def _own(args: argparse.Namespace) -> bool:
    """--victim with --data: any classifier on any labelled data (else the zoo on the CIFAR-10 copy)."""
    if args.model and args.victim:
        raise CalibError(f"pass the victim once: --model {args.model} or --victim {args.victim}")
    if not (args.model or args.victim):
        raise CalibError("no victim: pass --model NAME (the zoo) or --victim file.py:factory (your own classifier)")
    if args.victim and not args.data and ":" in args.victim:
        raise CalibError("--victim needs --data (an .npz, a folder with one subfolder per class, or a path,label CSV)")
    if args.victim and not args.data:
        args.model, args.victim = args.victim, None  # a zoo name on the CIFAR-10 copy: the --model path
    return bool(args.victim)


def run_calibrate(argv: list[str]) -> int:
    args = _calib_parser().parse_args(argv)
    if _own(args):
        return run_calibrate_own(args)
    args.calib_rows = args.calib_rows or DEFAULT_CALIB_ROWS
    calib = parse_rows(args.calib_rows, "--calib-rows")
    if overlap(calib, EVAL_ROWS) and not args.force_overlap:
        raise CalibError(f"--calib-rows {args.calib_rows} overlaps the evaluation rows {EVAL_ROWS[0]}:{EVAL_ROWS[1]}; "
                         "calibrating on evaluation images inflates the reported accuracy. Use rows >= 5000 "
                         "(default 5000:6000) or pass --force-overlap")
    stage_n, grid = _search_settings(args)
    _torch_setup(args)
    out = Path(args.out or f"runs/calib_{args.model}")
    victim, x, y, wpath, wsha, data_path = _images(args, calib)
    return _search_and_save(args, victim, x, y, calib, stage_n, grid, out,
                            dict(model=args.model, weights=wpath, weights_sha256=wsha, data=data_path))


def _search_settings(args: argparse.Namespace) -> tuple[list[int], Grid]:
    stage_n = ints(args.stage_n, "--stage-n") if args.stage_n else list(BUDGETS[_budget(args)][1])
    check_settings(stage_n=stage_n, max_clean_drop=args.max_clean_drop, min_robust_gain=args.min_robust_gain,
                   batch=args.batch, attack_steps=args.attack_steps, name=_flag)
    grid = _grid(args)
    grid.check(_flag)
    return stage_n, grid


def run_calibrate_own(args: argparse.Namespace) -> int:
    """calibrate --victim SPEC --data DATA: the same search on the calibration half of the user's data."""
    stage_n, grid = _search_settings(args)
    _torch_setup(args)
    rv = resolve(args)
    x, y, data_path, split = load_victim_data(args.data, rv.victim, args.resize)
    n_eval = split["eval_rows"][1]
    calib = (parse_rows(args.calib_rows, "--calib-rows") if args.calib_rows
             else (n_eval, min(len(x), n_eval + stage_n[-1])))
    if calib[1] > len(x):
        raise CalibError(f"--calib-rows {calib[0]}:{calib[1]} out of range: {data_path} holds {len(x)} images")
    if overlap(calib, tuple(split["eval_rows"])) and not args.force_overlap:
        raise CalibError(f"--calib-rows {calib[0]}:{calib[1]} overlaps the evaluation rows 0:{n_eval} (the first half "
                         "of the class-interleaved data); calibrating on evaluation images inflates the reported "
                         "accuracy. Pass rows in the second half or --force-overlap")
    out = Path(args.out or f"runs/calib_{rv.name}")
    xt = torch.from_numpy(x[calib[0]:calib[1]])
    return _search_and_save(args, rv.victim, xt, y[calib[0]:calib[1]], calib, stage_n, grid, out,
                            dict(model=rv.name, **rv.provenance(), data=data_path, **split))


def _search_and_save(args: argparse.Namespace, victim: Any, x: Any, y: Any, calib: tuple[int, int], stage_n: list[int],
                     grid: Grid, out: Path, head: dict[str, Any]) -> int:
    def log(msg: str) -> None:
        print(msg, flush=True)

    budget = _budget(args)
    log(f"calibrating {head['model']} on rows {calib[0]}:{calib[1]} ({len(x)} images), budget {args.max_clean_drop:g} "
        f"points, search {budget} (stages {','.join(map(str, stage_n))})")
    res = calibrate(victim, x, y, max_clean_drop=args.max_clean_drop, min_robust_gain=args.min_robust_gain, grid=grid,
                    stage_n=stage_n, device=args.device, batch=args.batch, progress=args.progress,
                    attack_steps=args.attack_steps, seed=args.seed, first_row=calib[0],
                    pgd_cache=out / "pgd_cache.npz", log=log, objective=args.objective, apgd_iter=args.apgd_iter,
                    bpda_steps=args.bpda_steps, eval_cache=out / "eval_cache.json")
    if res.config is None:
        res.report["message"] += f" Next knob: {NEXT_KNOB[budget]}."
    res.report = dict(**head, calib_rows=list(calib), budget=budget,
                      **{k: v for k, v in res.report.items() if k != "model"})
    res.save(out)
    rep = res.report
    log(f"{rep['configs_tried']} configs tried in {rep['wall_seconds']:.0f} s; wrote {out}/report.md, report.json, report.png"
        + (", calibrated_config.json" if res.config is not None else "")
        + (", calibrated_config.json (the closest miss, marked as failing the budget)" if rep.get("fallback") else ""))
    if res.config is None:
        print(f"{PROG}: {rep['message']}", file=sys.stderr)
        return EXIT_NO_FEASIBLE
    c = rep["chosen"]
    log(f"chosen: {c['label']}\n  n={c['n']}: clean {c['clean']:.1f}% -> {c['clean_purified']:.1f}% purified, "
        f"PGD {c['pgd']:.1f}% -> {c['pgd_purified']:.1f}% purified"
        + (f", worst case {c['worst']:.1f}% -> {c['worst_purified']:.1f}% purified" if "worst" in c else ""))
    return 0


def _eval_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"{PROG} eval",
                                 description="Evaluate ZeroPur configs (clean / PGD-20, without / with purification) on the evaluation slice.")
    ap.add_argument("--model", default=None, help="zoo architecture; or --victim")
    ap.add_argument("--weights", default=None, help="weights file of --model (default: its published weights)")
    ap.add_argument("--data", default=None, help="labelled images (.npz, class-folder tree, path,label CSV)")
    ap.add_argument("--config", action="append", required=True,
                    help="'paper' (the preset) or a ZeroPurConfig JSON file (e.g. calibrated_config.json); repeatable")
    ap.add_argument("--rows", default=None, help="evaluation rows START:STOP inside 0:5000 (default 0:1000; with "
                    "--victim and --data: the first half)")
    ap.add_argument("--force-overlap", action="store_true", help="allow rows overlapping a config's calibration slice")
    ap.add_argument("--out", default=None, help="output directory (default runs/calib_eval_<model>; eval writes runs/eval_<model>)")
    _common_flags(ap, "torch device: cpu (default) or cuda[:i]")
    return ap


def run_eval(argv: list[str]) -> int:
    args = _eval_parser().parse_args(argv)
    if _own(args):
        return run_eval_own(args)
    rows = parse_rows(args.rows or "0:1000", "--rows")
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
    out = Path(args.out or f"runs/calib_eval_{args.model}")
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


def run_eval_own(args: argparse.Namespace) -> int:
    """calibrate eval --victim SPEC --data DATA: configs on the evaluation half of the user's data."""
    check_settings(batch=args.batch, attack_steps=args.attack_steps, name=_flag)
    _torch_setup(args)
    rv = resolve(args)
    configs = [load_config(s, tuple(rv.victim.spec.input_shape)) for s in args.config]
    x, y, data_path, split = load_victim_data(args.data, rv.victim, args.resize)
    rows = parse_rows(args.rows, "--rows") if args.rows else tuple(split["eval_rows"])
    if rows[1] > len(x):
        raise CalibError(f"--rows {rows[0]}:{rows[1]} out of range: {data_path} holds {len(x)} images")
    for name, _, crow in configs:
        if crow and overlap(rows, crow) and not args.force_overlap:
            raise CalibError(f"--rows {rows[0]}:{rows[1]} overlaps the calibration rows {crow[0]}:{crow[1]} of {name}; "
                             "evaluate on the first half or pass --force-overlap")
    out = Path(args.out or f"runs/calib_eval_{rv.name}")
    res = evaluate_configs(rv.victim, torch.from_numpy(x[rows[0]:rows[1]]), y[rows[0]:rows[1]],
                           [(name, cfg) for name, cfg, _ in configs], device=args.device, batch=args.batch,
                           progress=args.progress, attack_steps=args.attack_steps, seed=args.seed, first_row=rows[0],
                           pgd_cache=out / "pgd_cache.npz", log=lambda m: print(m, flush=True))
    for r, (_, _, crow) in zip(res.report["results"], configs):
        r["calib_rows"] = list(crow) if crow else None
    res.report = dict(model=rv.name, **rv.provenance(), data=data_path, rows=list(rows), **split,
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
