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
import os
import sys

# before torch loads the OpenMP runtime, which reads it once: idle worker threads sleep instead of spinning
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from zeropur_export.victims.flags import add_resize_arg, add_victim_args  # noqa: E402

from .common import ATTACK, DEFAULT_CALIB_ROWS, EXIT_BAD_INPUT, CalibError  # noqa: E402
from .run import PROG, run_calibrate, run_eval  # noqa: E402
from .search import BUDGETS  # noqa: E402


def _common_flags(ap: argparse.ArgumentParser, device_help: str) -> None:
    add_victim_args(ap, weights=False)
    add_resize_arg(ap)
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


def main(argv: list[str] | None = None) -> int:
    """``calibrate [flags]`` or ``calibrate eval [flags]``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    evaluating = bool(argv) and argv[0] == "eval"
    try:
        if evaluating:
            return run_eval(_eval_parser().parse_args(argv[1:]))
        return run_calibrate(_calib_parser().parse_args(argv))
    except CalibError as e:
        print(f"{PROG}{' eval' if evaluating else ''}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    raise SystemExit(main())
