"""``zeropur-export demo``: attack the bare classifier with PGD, purify, report accuracy, time and stage shares.

    zeropur-export demo --model resnet20 --n 64                      # the shipped calibrated recipe, ONNX Runtime
    zeropur-export demo --model resnet20 --recipe paper              # the paper's recipe
    zeropur-export demo --model resnet20 resnet56 --n 500 --backend reference --recipe paper

The runtime backends (onnxruntime, tensorrt, torch) export the model once into artifacts/<model>-<recipe>
and purify through those graphs. ``reference`` runs the torch reference on the victim directly, with no
export: the cross-check against an independent implementation. The attack needs the bare classifier's
gradients, so it always runs in torch.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict
from typing import Any

from zeropur_rt import sources
from zeropur_export.data import load_cifar10_test, to_nchw_float
from zeropur_rt.files import atomic_write_json
from zeropur_rt.progress import progress
from zeropur_rt.schedule import STAGES
from zeropur_export.victims.flags import add_download_arg

BACKENDS = ("onnxruntime", "tensorrt", "torch", "reference")
ATTACK = "PGD-Linf 8/255 (step 2/255, 20 steps, random start) on the bare classifier"


def open_purifier(model: str, args: argparse.Namespace) -> tuple[str, str, Any]:
    """(recipe name, where the graphs come from, a zeropur_rt.Purifier) for ``model``."""
    from zeropur_export.artifacts import load_backend, recipe_artifacts
    from zeropur_export.recipes import default_recipe, recipe_config
    recipe = args.recipe or default_recipe(model)
    if args.backend == "reference":
        from zeropur_export.reference.purifier import ReferencePurifier
        from zeropur_export.victims.zoo import load_victim
        name, cfg, _ = recipe_config(model, recipe)
        return name, f"torch reference ({args.ap_mode} AP), no export", \
            ReferencePurifier(load_victim(model), cfg, args.ap_mode).pipeline
    name, art = recipe_artifacts(model, recipe, args.artifacts)
    return name, str(art), load_backend(art, args.backend, args.device, args.threads)


def run_demo(model: str, args: argparse.Namespace) -> dict[str, Any]:
    """Accuracy (clean / PGD-20, bare / purified), seconds and stage shares of one model on test rows 0..n-1."""
    import torch

    from zeropur_export.attacks.pgd import pgd_linf
    from zeropur_export.recipes import describe
    from zeropur_export.victims.zoo import load_victim

    recipe, source, pur = open_purifier(model, args)
    victim = load_victim(model)
    xs, ys = load_cifar10_test(args.data_file, 0, args.n)
    x = to_nchw_float(xs)
    correct: dict[str, int] = defaultdict(int)
    stage_s: dict[str, float] = defaultdict(float)
    secs = dict(attack=0.0, purify=0.0)
    for i in progress(range(0, args.n, args.batch), f"{model} attack+purify"):
        xb, yb = x[i:i + args.batch], ys[i:i + args.batch]
        t0 = time.perf_counter()
        adv = pgd_linf(victim, torch.from_numpy(xb), torch.from_numpy(yb), seed=args.seed + i).numpy()
        secs["attack"] += time.perf_counter() - t0
        for name, inp in (("clean", xb), ("pgd", adv)):
            correct[name] += int((pur.classify(inp) == yb).sum())
            t0 = time.perf_counter()
            res = pur.run(inp, classify=True, timings=True)
            secs["purify"] += time.perf_counter() - t0
            correct[name + "_purified"] += int((res.labels == yb).sum())
            for k, v in res.times.seconds.items():
                stage_s[k] += v
    total = sum(stage_s.values()) or 1.0
    result = dict(model=model, n=args.n, seed=args.seed, rows=[0, args.n], recipe=recipe, data=args.data_name,
                  recipe_summary=describe(pur.cfg), config=pur.cfg.to_dict(), backend=args.backend, source=source,
                  kernels=pur.kernels.name, accuracy={k: 100.0 * v / args.n for k, v in correct.items()},
                  seconds=dict(secs, purify_per_image=secs["purify"] / (2 * args.n)),
                  stages_pct={k: 100 * stage_s[k] / total for k in STAGES if k in stage_s})
    pur.close()
    return result


def format_report(results: list[dict[str, Any]]) -> str:
    """The accuracy table, then per model the recipe it ran and where the purification time went."""
    lines = [f"ZeroPur, CIFAR-10 test rows 0..{results[0]['n'] - 1}, {ATTACK}.", f"Data: {results[0]['data']}.", "",
             "| model | recipe | clean | clean, purified | PGD-20 | PGD-20, purified | purify s/image |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        a = r["accuracy"]
        lines.append(f"| {r['model']} | {r['recipe']} | {a['clean']:.1f}% | {a['clean_purified']:.1f}% | {a['pgd']:.1f}% | "
                     f"{a['pgd_purified']:.1f}% | {r['seconds']['purify_per_image']:.3f} |")
    lines.append("")
    for r in results:
        lines += [f"{r['model']}: recipe {r['recipe']} ({r['recipe_summary']}); {r['backend']} with {r['kernels']} "
                  f"kernels, from {r['source']}",
                  f"  attack {r['seconds']['attack']:.1f} s, purification {r['seconds']['purify']:.1f} s; stages: "
                  + ", ".join(f"{k} {v:.1f}%" for k, v in r["stages_pct"].items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="zeropur-export demo", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    ap.add_argument("--model", nargs="+", default=["resnet20"], help="zoo models with pretrained weights")
    ap.add_argument("--n", type=int, default=64, help="test images (rows 0..n-1)")
    ap.add_argument("--batch", type=int, default=32, help="images per attack and purification call (default 32)")
    ap.add_argument("--recipe", default=None, help="paper, calibrated or a config JSON (default: calibrated where "
                    "one ships for the model, else paper)")
    ap.add_argument("--backend", default="onnxruntime", choices=BACKENDS, help="what purifies: a runtime backend "
                    "over the exported graphs, or the torch reference on the victim itself (default onnxruntime)")
    ap.add_argument("--device", default=None, help="purifier device (default: the backend's own)")
    ap.add_argument("--ap-mode", default="lean", choices=["lean", "recompute"],
                    help="with --backend reference: recompute runs the released code's AP")
    ap.add_argument("--artifacts", default=None, help="artifact directory of the one --model (default "
                    "artifacts/<model>-<recipe>; exported if missing, refused if exported with another config)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    ap.add_argument("--data", default=None, help="cifar10_test.npz (default: $ZEROPUR_DATA, <shared>/data, the user cache)")
    add_download_arg(ap)
    ap.add_argument("--seed", type=int, default=0, help="PGD random-start seed (default 0)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.n <= 0 or args.batch <= 0:
        ap.error("--n and --batch must be positive")
    if args.artifacts and len(args.model) > 1:
        ap.error("--artifacts names one directory: use it with one --model")
    if args.ap_mode != "lean" and args.backend != "reference":
        ap.error("--ap-mode recompute is the reference's; the exported graphs are lean")
    from zeropur_export.victims.weights import find_weights
    # Every input found before the first export or attack: a missing file fails in a second, not after minutes.
    args.data_file = sources.cifar10_test_file(args.data)
    args.data_name = sources.describe_data(args.data_file)
    for m in args.model:
        find_weights(m)
    import torch
    torch.set_num_threads(args.threads)
    results = [run_demo(m, args) for m in args.model]
    print(format_report(results))
    if args.json:
        atomic_write_json(args.json, results)
    return 0
