"""``zeropur-export eval``: robust accuracy of a victim with and without ZeroPur, under the field's attack set.

    zeropur-export eval --models resnet20 --n 500 --out runs/eval_{model}          # every attack, AutoAttack's budgets
    zeropur-export eval --models resnet20 --n 64 --attacks apgd-ce bpda-apgd-ce --adaptive-n 32
    zeropur-export eval --models resnet20 --n 500 --cascade --out runs/eval_{model}_cascade     # worst case, AutoAttack's way

All L-inf at ``--eps`` (8/255). The attacks (``zeropur_export.attacks.suite``; ART's PGD/APGD, our
gradients through the defence in ``zeropur_export.attacks.adaptive``):

* non-adaptive, crafted on the bare classifier and then purified: ``autoattack`` (AutoAttack's standard
  version, the paper's protocol: APGD-CE, APGD-T, Square in sequence on the survivors, each APGD keeping
  its last misclassified iterate; FAB-T left out), ``pgd`` (``--pgd-steps``), ``pgd-first`` (the same PGD
  stopped at each image's first misclassification: minimal perturbation, first success), ``apgd-ce``,
  ``apgd-dlr``, ``apgd-t`` (targeted DLR against ``--apgd-targets`` classes, the clean logits' runners-up),
  ``--apgd-iter`` (100) iterations;
* ``transfer``: APGD-CE on ``--transfer-from`` (another zoo classifier), then purified;
* black box, only when named: ``square`` (logits) and ``hopskipjump`` (labels) querying the deployed
  purifier, and the bare classifier for contrast, up to ``--queries`` per image on the first ``--query-n``
  images, scored at 100 / 500 / 1000 / 5000 queries (``zeropur_export.attacks.query``);
* adaptive, through the purifier, ``--adaptive-iter`` (100) iterations on the first
  ``--adaptive-n`` images: ``bpda`` (BPDA-PGD, ``--bpda-steps``), ``bpda-apgd-ce|dlr`` (identity
  backward), ``traj-apgd-ce|dlr`` (identity backward averaged over ``--trajectory-points``
  iterates of the loop), ``unrolled-apgd-ce|dlr`` (the exact gradient of the reference loop with
  a straight-through sign); ``--eot`` draws per gradient for a randomised purifier.

An image is robust against an attack if every candidate the attack made is classified right
after purification; the worst-case rows ask that of every attack (AutoAttack's per-image rule).
``--cascade`` runs AutoAttack's protocol instead: the attacks in order of cost, each on the images
every earlier one (and the clean image) left robust, so the worst case over the whole set reaches
hundreds of images on a CPU; its per-attack figures are cumulative, not standalone.
Chunks of ``--batch`` images are kept as they finish (``<out>/state``): rerun the same command to
resume, ``--fresh`` to start over (a query attack's chunks also answer another ``--queries``: see
``zeropur_export.attacks.query.at_budget``). JSON + markdown are written atomically at the end of each model.
"""
from __future__ import annotations

import argparse
import sys
import time

from zeropur_export.attacks.suite import ATTACKS, DEFAULT, QUERY
from zeropur_export.evaluate.evaluator import Evaluator, dir_for, require_art
from zeropur_export.evaluate.report import markdown
from zeropur_export.victims.flags import add_resize_arg, add_victim_args, resolve_victim
from zeropur_rt.config import parse_sets
from zeropur_rt.files import atomic_write_json, atomic_write_text

BACKENDS = ("onnxruntime", "torch", "tensorrt")


def parse_rows(s: str) -> tuple[int, int]:
    a, sep, b = s.partition(":")
    try:
        start, stop = int(a or 0), int(b)
    except ValueError:
        raise ValueError(f"--rows must be START:STOP (e.g. 0:200), got {s!r}") from None
    if not sep or start < 0 or stop <= start:
        raise ValueError(f"--rows must be START:STOP with 0 <= START < STOP, got {s!r}")
    return start, stop


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="zeropur-export eval", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", dest="models", nargs="+", default=None,
                    help="zoo architectures (default resnet20); or --victim")
    ap.add_argument("--models", dest="models", nargs="+", help=argparse.SUPPRESS)  # the old spelling, still taken
    ap.add_argument("--n", type=int, default=100, help="images: test rows 0..N-1 (default 100)")
    ap.add_argument("--rows", default=None, help="START:STOP test rows (default 0:N); overrides --n")
    ap.add_argument("--attacks", nargs="+", default=list(DEFAULT), help=f"any of {', '.join(ATTACKS)} (default: all "
                    f"but the query attacks {', '.join(QUERY)})")
    ap.add_argument("--eps", type=float, default=8.0, help="L-inf budget in 1/255 units (default 8)")
    ap.add_argument("--pgd-steps", type=int, default=20, help="steps of pgd and pgd-first (default 20)")
    ap.add_argument("--apgd-iter", type=int, default=100, help="APGD iterations (AutoAttack: 100)")
    ap.add_argument("--apgd-targets", type=int, default=9, help="APGD-T target classes (AutoAttack: 9)")
    ap.add_argument("--transfer-from", default=None, help="zoo model the transfer attack is crafted on "
                    "(default resnet56; resnet20 for resnet56)")
    ap.add_argument("--adaptive-iter", type=int, default=100, help="APGD iterations of the adaptive attacks")
    ap.add_argument("--adaptive-n", type=int, default=None, help="adaptive attacks on the first K images only")
    ap.add_argument("--unrolled-iter", type=int, default=None, help="iterations of the unrolled attacks, ~5 purifications "
                    "each (default: --adaptive-iter)")
    ap.add_argument("--unrolled-n", type=int, default=None, help="unrolled attacks on the first K images only "
                    "(default: --adaptive-n)")
    ap.add_argument("--bpda-steps", type=int, default=20, help="BPDA-PGD steps")
    ap.add_argument("--queries", type=int, default=5000, help="most queries per image of square / hopskipjump, and "
                    "autoattack's Square budget (AutoAttack: 5000)")
    ap.add_argument("--query-n", type=int, default=None, help="query attacks on the first K images only")
    ap.add_argument("--p-init", type=float, default=0.8, help="Square's initial share of pixels (AutoAttack: 0.8)")
    ap.add_argument("--ce", choices=["ce", "stable-ce"], default="ce", help="loss of pgd, pgd-first, autoattack's "
                    "APGD-CE and the APGD-CE attacks: cross-entropy (published figures) or softplus of the "
                    "log-sum-exp margin, which does not round to 0 at large margins")
    ap.add_argument("--trajectory-points", type=int, default=8, help="iterates the trajectory BPDA averages over")
    ap.add_argument("--cascade", action="store_true", help="AutoAttack's protocol: each attack (cheapest first) on "
                    "the images still robust; reports the worst case over every attack on all N images")
    ap.add_argument("--eot", type=int, default=1, help="EOT draws per adaptive gradient, for a randomised config "
                    "(--set random_start=true ...); 1 is exact for a deterministic one")
    ap.add_argument("--fresh", action="store_true", help="discard this --out's finished chunks instead of resuming")
    ap.add_argument("--batch", type=int, default=32, help="images per attack / purifier call (<= artifact max batch)")
    ap.add_argument("--seed", type=int, default=0, help="attack seed (default 0)")
    ap.add_argument("--backend", default="onnxruntime", help=f"purifier backend: {', '.join(BACKENDS)}")
    ap.add_argument("--device", default=None, help="purifier device (default: the backend's own)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    ap.add_argument("--recipe", default=None, help="zoo models: paper, calibrated or a config JSON (default: the shipped "
                    "calibrated recipe where there is one), exported once into artifacts/<model>-<recipe>")
    ap.add_argument("--artifacts", default=None, help="artifact dir, used with the config it was exported with; may "
                    "contain {model}; with --recipe, where that recipe is exported")
    ap.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="purifier loop overrides, e.g. gs_steps=2 eps=8/255 (not the baked loss weights)")
    ap.add_argument("--data", default=None, help="CIFAR-10 test .npz (default <shared>/data/cifar10_test.npz)")
    ap.add_argument("--out", default=None, help="output folder (default runs/eval_<model>); may contain {model}")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    add_resize_arg(ap)
    add_victim_args(ap)
    return ap


def validate_args(args: argparse.Namespace) -> None:
    if args.victim and args.models:
        raise ValueError("pass --models (zoo) or --victim (one classifier), not both")
    if args.victim and args.recipe:
        raise ValueError("--recipe names a zoo recipe; with --victim pass --artifacts (exported with your config)")
    if args.victim and ":" in args.victim and not args.data:
        raise ValueError("--victim needs --data (an .npz, a folder with one subfolder per class, or a path,label CSV)")
    args.own = None
    if args.victim:
        args.own = resolve_victim(args)
        args.models = [args.own.name]
    args.models = args.models or ["resnet20"]
    bad = [a for a in args.attacks if a not in ATTACKS]
    if bad:
        raise ValueError(f"unknown attack(s) {bad}; choose from {', '.join(ATTACKS)}")
    if args.backend not in BACKENDS:
        raise ValueError(f"unknown backend {args.backend!r}; choose one of {', '.join(BACKENDS)}")
    args.rows = parse_rows(args.rows) if args.rows else (0, args.n)
    if args.rows[1] <= args.rows[0]:
        raise ValueError(f"need at least one image, got --n {args.n}")
    for name in ("pgd_steps", "apgd_iter", "apgd_targets", "adaptive_iter", "bpda_steps", "trajectory_points", "eot",
                 "batch", "threads", "queries"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("adaptive_n", "unrolled_n", "unrolled_iter", "query_n"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.cascade and (args.adaptive_n or args.unrolled_n):
        raise ValueError("--cascade attacks every image still robust; --adaptive-n / --unrolled-n do not apply")
    if args.cascade and set(args.attacks) & set(QUERY):
        raise ValueError(f"the query attacks ({', '.join(QUERY)}) are scored per budget; run them without --cascade")
    args.unrolled_iter = args.unrolled_iter if args.unrolled_iter is not None else args.adaptive_iter
    args.unrolled_n = args.unrolled_n if args.unrolled_n is not None else args.adaptive_n
    if not 0 < args.eps <= 255:
        raise ValueError(f"--eps is in 1/255 units and must be in (0, 255], got {args.eps}")
    args.overrides = parse_sets(args.set)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    validate_args(args)
    require_art()
    import torch

    from zeropur_export.bench.latency import machine_info
    from zeropur_export.graphs.onnx_export import UNVERIFIED_WEIGHTS
    from zeropur_rt import sources
    from zeropur_export.data import load_cifar10_test, to_nchw_float
    from zeropur_rt.manifest import load_manifest
    torch.set_num_threads(args.threads)
    log = print
    # The data first (seconds), then every model's artifact, batch and overrides, before any attack runs.
    own_data = args.own is not None and args.data
    data_file = None if own_data else sources.cifar10_test_file(args.data)
    data_name = f"{args.data} (your data)" if own_data else sources.describe_data(data_file)
    evals = [Evaluator(m, args, log) for m in args.models]
    if args.own is not None and args.data:
        from zeropur_export.artifacts import victim_data
        ds, split = victim_data(args.data, args.own.victim, args.resize)
        if args.rows[1] > len(ds):
            raise ValueError(f"rows {args.rows[0]}:{args.rows[1]} out of range: {args.data} holds {len(ds)} images")
        if args.rows[1] > split["eval_rows"][1]:
            log(f"note: rows {args.rows[0]}:{args.rows[1]} reach past the evaluation half 0:{split['eval_rows'][1]} "
                "(calibrate uses the second half)")
        x, ys = ds.x[args.rows[0]:args.rows[1]], ds.y[args.rows[0]:args.rows[1]]
    else:
        xs, ys = load_cifar10_test(data_file, *args.rows)
        x = to_nchw_float(xs)
    machine = machine_info()
    for ev in evals:
        ev.load()
        out = dir_for(args.out or "runs/eval_{model}", ev.model, len(args.models))
        t0 = time.perf_counter()
        res = ev.run(x, ys, out)
        weights = load_manifest(ev.art_dir).weights_sha256
        res.update(wall_s=time.perf_counter() - t0, machine=machine, art_version=__import__("art").__version__,
                   argv=sys.argv[1:] if argv is None else list(argv), data=data_name,
                   weights_sha256=weights)
        md = markdown(res) + (f"\n\nData: {data_name}. Weights: "
                              + (f"sha256 {weights[:12]}." if weights else f"{UNVERIFIED_WEIGHTS}."))
        atomic_write_text(out / "eval.md", md + "\n")
        atomic_write_json(out / "eval.json", res)
        print("\n" + md + f"\n\nwrote {out}/eval.json, eval.md ({res['wall_s']:.0f} s)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
