"""What ``zeropur-export calibrate`` and ``calibrate eval`` do once their flags are parsed: load the victim and the
rows, run the search (``calibrate``) or the evaluation (``evaluate_configs``), write the reports."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch

from zeropur_export.data import to_nchw_float

from .api import calibrate, check_settings, evaluate_configs
from .common import DEFAULT_CALIB_ROWS, EVAL_ROWS, EXIT_NO_FEASIBLE, CalibError, resolve_device
from .inputs import (floats, ints, load_config, load_labelled, load_model, load_victim_data, overlap, parse_ila,
                     parse_rows, resolve)
from .report import evaluation_table
from .search import AXES, BUDGETS, NEXT_KNOB, Grid

PROG = "zeropur-export calibrate"


def flag_for(field: str) -> str:
    """The flag that sets an API field, for error messages: eps_255 -> --grid-eps, max_clean_drop -> --max-clean-drop."""
    if field in AXES:
        return "--grid-" + field.removesuffix("_255").replace("_", "-")
    return "--" + field.replace("_", "-")


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


def run_calibrate(args: argparse.Namespace) -> int:
    """``calibrate``: the search on the calibration rows, the report and the recipe into ``--out``."""
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
                   batch=args.batch, attack_steps=args.attack_steps, name=flag_for)
    grid = _grid(args)
    grid.check(flag_for)
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


def run_eval(args: argparse.Namespace) -> int:
    """``calibrate eval``: configs on the evaluation rows."""
    if _own(args):
        return run_eval_own(args)
    rows = parse_rows(args.rows or "0:1000", "--rows")
    check_settings(batch=args.batch, attack_steps=args.attack_steps, name=flag_for)
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
    check_settings(batch=args.batch, attack_steps=args.attack_steps, name=flag_for)
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
