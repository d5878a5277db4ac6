"""``zeropur-export bench``: purification latency per backend and batch size, the cost model, and the steps sweep.

    zeropur-export bench --model resnet20 --batch 1 32 --repeats 3 --out runs/bench_resnet20
    zeropur-export bench --model resnet20 --sweep --sweep-n 200 --out runs/sweep_resnet20

Backends: ``released`` (torch reference, re-computing AP: the released code's cost), ``lean``
(torch reference, lean AP), ``onnxruntime`` (zeropur-rt: exported graphs + host kernels), ``torch-fast``
(the fast torch runner on the CPU: folded, compiled by inductor, fused elementwise; + host kernels), and
where present ``torch-cuda`` (reference on the GPU). Every figure of one table comes from one run
on one machine; ratios are against ``released`` measured in that same run. Every row runs the
artifact's config with the same ``--set`` overrides; a loss weight baked into the graphs is refused
rather than changed on the torch rows alone.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from zeropur_export.artifacts import ensure_artifacts, recipe_artifacts, victim_artifacts
from zeropur_export.bench.latency import ALL_BACKENDS, data_name, latency_markdown, latency_plot, run_latency
from zeropur_export.bench.sweep import run_sweep, sweep_markdown, sweep_plot
from zeropur_export.victims.flags import add_resize_arg, add_victim_args, resolve_victim
from zeropur_export.victims.zoo import load_victim
from zeropur_rt.config import apply_overrides, parse_sets
from zeropur_rt.files import atomic_write_json, atomic_write_text
from zeropur_rt.manifest import load_manifest


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="zeropur-export bench", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="zoo architecture (default resnet20); or --victim")
    ap.add_argument("--artifacts", default=None, help="artifact dir, used with the config it was exported with "
                    "(default artifacts/<model>-paper: the paper recipe, exported if missing)")
    ap.add_argument("--backends", nargs="+", default=["released", "lean", "onnxruntime"],
                    help="what to time: released (the authors' loop in torch), lean (the reference), onnxruntime, ...")
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 32], help="batch sizes to time (default 1 32)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per row (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    ap.add_argument("--workers", nargs="+", type=int, default=None, help="the runtime's one-thread sessions a batch "
                    "is split across, a row each (default --threads; 1: one --threads-thread session)")
    ap.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="loop overrides for every row, e.g. gs_steps=2 eps=8/255 (not the baked loss weights)")
    ap.add_argument("--sweep", action="store_true", help="run the GS/AP steps sweep instead of the latency table")
    ap.add_argument("--sweep-n", type=int, default=200, help="images of the steps sweep (default 200)")
    ap.add_argument("--sweep-gs", nargs="+", type=int, default=[0, 5, 10], help="GS step counts swept")
    ap.add_argument("--sweep-ap", nargs="+", type=int, default=[0, 10, 25, 50], help="AP step counts swept")
    ap.add_argument("--data", default=None, help="images: the CIFAR-10 copy for --model; any form for --victim "
                    "(latency without --data times seeded noise of the victim's shape)")
    add_resize_arg(ap)
    ap.add_argument("--out", default=None, help="output folder for JSON, markdown and PNG (default runs/bench_<model>)")
    add_victim_args(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = make_parser()
    args = ap.parse_args(argv)
    if args.model and args.victim:
        ap.error("pass --model (zoo) or --victim, not both")
    unknown = [b for b in args.backends if b not in ALL_BACKENDS]
    if unknown:
        ap.error(f"unknown backend(s) {unknown}; choose from {', '.join(ALL_BACKENDS)}")
    overrides = parse_sets(args.set)
    import torch
    torch.set_num_threads(args.threads)
    args.own = None
    if args.victim:
        args.own = resolve_victim(args)
        args.model = args.own.name
        art = victim_artifacts(args.own, args.artifacts)
    else:
        args.model = args.model or "resnet20"
        data_name(args)  # the CIFAR-10 copy found (or the error naming the fix) before any export
        art = ensure_artifacts(args.model, args.artifacts) if args.artifacts else recipe_artifacts(args.model, "paper")[1]
    manifest = load_manifest(art)
    cfg = apply_overrides(manifest.zeropur_config, overrides, baked=True)
    max_batch = manifest.batch["max"]
    too_big = [b for b in args.batch if b > max_batch or b < 1]
    if too_big and not args.sweep:
        raise ValueError(f"batch sizes {too_big} do not fit this artifact (1..{max_batch}); re-export with --max-batch")
    victim = args.own.victim if args.own is not None else load_victim(args.model)
    out = Path(args.out or f"runs/{'sweep' if args.sweep else 'bench'}_{args.model}")
    if args.sweep:
        res = run_sweep(args, victim, cfg, overrides, art, print)
        md, plot = sweep_markdown(res), sweep_plot
    else:
        res = run_latency(args, victim, cfg, overrides, art, print)
        md, plot = latency_markdown(res), latency_plot
    md += f"\n\nData: {res['data']}."
    print("\n" + md)
    out.mkdir(parents=True, exist_ok=True)
    plot(res, out / f"{res['kind']}.png")
    atomic_write_text(out / f"{res['kind']}.md", md + "\n")
    atomic_write_json(out / f"{res['kind']}.json", res)
    print(f"\nwrote {out}/{res['kind']}.json, .md, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
