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
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from zeropur_rt.bench import detail_lines, label, latency_stats, machine_facts, time_purifier, timed
from zeropur_rt.config import ZeroPurConfig, apply_overrides, parse_sets
from zeropur_rt.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from zeropur_rt.progress import progress

if TYPE_CHECKING:
    from zeropur_export.taps import Victim

TORCH_BACKENDS = ("released", "lean", "torch-cuda")
ALL_BACKENDS = (*TORCH_BACKENDS, "torch-fast", "onnxruntime")


def machine_info() -> dict[str, Any]:
    import torch
    info = machine_facts() | dict(torch=torch.__version__)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def make_purify_fn(backend: str, victim: "Victim", cfg: ZeroPurConfig, overrides: dict[str, Any], art: Path,
                   threads: int, x: np.ndarray) -> Callable[[], None]:
    """A zero-argument callable purifying ``x`` on a torch ``backend`` (the runtime rows are timed by
    ``zeropur_rt.bench.time_purifier``). ``cfg`` is the artifact's config with ``overrides`` applied."""
    if backend in TORCH_BACKENDS:
        import torch

        from zeropur_export.reference import ReferencePurifier
        dev = "cuda" if backend == "torch-cuda" else "cpu"
        if dev == "cuda" and not torch.cuda.is_available():
            raise ValueError("backend torch-cuda needs a CUDA GPU, none is visible")
        pur = ReferencePurifier(victim.to(dev), cfg, "recompute" if backend == "released" else "lean")
        xt = torch.from_numpy(x).to(dev)

        def run():
            pur.purify(xt)
            if dev == "cuda":
                torch.cuda.synchronize()
        return run
    if backend == "torch-fast":  # compiles on its first call: --warmup >= 1 keeps that out of the timings
        from zeropur_export.torch_runner import load_purifier
        fast = load_purifier(art, "cpu", victim=victim, overrides=overrides, threads=threads, fast=True)
        return lambda: fast.purify(x)
    raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(ALL_BACKENDS)}")


def run_latency(args: argparse.Namespace, victim: "Victim", cfg: ZeroPurConfig, overrides: dict[str, Any], art: Path,
                log: Callable[[str], None]) -> dict[str, Any]:
    from zeropur_export.costs import forward_equivalents, sgemm_gflops
    from zeropur_rt.macs import purification_macs

    x_all, _ = bench_images(args, victim, max(args.batch), labels=False)
    cost = dict(fe_released=forward_equivalents(victim, cfg, "recompute"), fe_lean=forward_equivalents(victim, cfg, "lean"),
                macs=purification_macs(art, cfg), sgemm_one_thread_gflops=[sgemm_gflops()])
    rows = []
    runtime_workers = args.workers or [args.threads]
    combos = [(be, b, w) for b in args.batch for be in args.backends
              for w in (runtime_workers if be == "onnxruntime" else [None])]
    for be, b, w in progress(combos, "bench"):
        reps = args.repeats if be != "released" or b <= 32 else max(1, args.repeats // 2)
        if be == "onnxruntime":
            from zeropur_rt.pipeline import Purifier
            with Purifier.load(art, "onnxruntime", threads=args.threads, overrides=overrides, workers=w) as pur:
                row = dict(backend=be, workers=w, batch=b, **time_purifier(pur, x_all[:b], args.warmup, reps))
        else:
            fn = make_purify_fn(be, victim, cfg, overrides, art, args.threads, x_all[:b])
            row = dict(backend=be, workers=None, batch=b, **latency_stats(timed(fn, args.warmup, reps), b))
        row["achieved_gflops"] = 2 * cost["macs"]["purification"] * b / row["p50_s"] / 1e9
        rows.append(row)
        log(f"{label(row):24s} batch {b:4d}: p50 {row['p50_s']:.3f} s, {row['s_per_image']:.4f} s/image")
    # the ceiling is read again after the timings and the larger reading counts: one dragged down by other load
    # would inflate every percentage, and the larger one can only make them smaller
    cost["sgemm_one_thread_gflops"].append(sgemm_gflops())
    cost["peak_gflops_readings"] = [args.threads * max(r.values()) for r in cost["sgemm_one_thread_gflops"]]
    cost["peak_gflops"] = max(cost["peak_gflops_readings"])
    for r in rows:
        base = next((q for q in rows if q["backend"] == "released" and q["batch"] == r["batch"]), None)
        r["speedup_vs_released"] = base["p50_s"] / r["p50_s"] if base else None
    return dict(kind="latency", model=args.model, config=cfg.to_dict(), threads=args.threads,
                workers=runtime_workers, machine=machine_info(), data=data_name(args),
                cost_model=cost, rows=rows)


def data_name(args: argparse.Namespace) -> str:
    """Which images a run read, for its report: the CIFAR-10 copy (named, hashed), the user's data, or noise."""
    if getattr(args, "own", None) is not None:
        return f"{args.data} (your data)" if args.data else "seeded uniform noise of the victim's input shape"
    from zeropur_rt import sources
    return sources.describe_data(sources.cifar10_test_file(args.data))


def bench_images(args: argparse.Namespace, victim: "Victim", n: int, labels: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """The first ``n`` images (and labels) to time: the CIFAR-10 copy for the zoo; for --victim its --data
    (any form, at its input shape), or, for latency without --data, seeded uniform noise of its shape."""
    if getattr(args, "own", None) is None:
        from zeropur_rt.data import load_cifar10_test, to_nchw_float
        xs, ys = load_cifar10_test(args.data, 0, n)
        return to_nchw_float(xs), ys
    if not args.data:
        if labels:
            raise ValueError("--sweep with --victim needs labelled --data (an .npz, a class-folder tree or a CSV)")
        return np.random.default_rng(0).random((n, *victim.spec.input_shape), dtype=np.float32), None
    from zeropur_export.build import victim_data
    ds, _ = victim_data(args.data, victim, args.resize, labels=labels)
    if len(ds) < n:
        raise ValueError(f"{args.data} holds {len(ds)} images, the run needs {n}")
    return ds.x[:n], None if ds.y is None else ds.y[:n]


def latency_markdown(res: dict[str, Any]) -> str:
    c = res["cost_model"]
    lines = [f"Latency, {res['model']}, {res['threads']} threads ({res['machine'].get('cpu_model', '?')}); "
             f"each row p50 of its repeats, one run.",
             "", "| backend | batch | p50 s | p90 s | p99 s | s/image | images/s | x vs released | GFLOP/s (% of sgemm peak) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        sp = f"{r['speedup_vs_released']:.2f}" if r["speedup_vs_released"] else "-"
        lines.append(f"| {label(r)} | {r['batch']} | {r['p50_s']:.3f} | {r['p90_s']:.3f} | {r['p99_s']:.3f} | "
                     f"{r['s_per_image']:.4f} | {r['images_per_s']:.1f} | {sp} | {r['achieved_gflops']:.1f} "
                     f"({100 * r['achieved_gflops'] / c['peak_gflops']:.0f}%) |")
    lines += detail_lines(res["rows"], res["threads"])
    fr, fl = c["fe_released"], c["fe_lean"]
    lines += ["", f"Cost model per image: released-code AP {fr['forward']:.0f} forwards + {fr['backward']:.0f} backwards "
              f"= {fr['F_bwd1']:.0f} F (backward = 1 F) / {fr['F_bwd2']:.0f} F (backward = 2 F); lean {fl['forward']:.0f} + "
              f"{fl['backward']:.0f} = {fl['F_bwd1']:.0f} F / {fl['F_bwd2']:.0f} F. Graph MACs per purification: "
              f"{c['macs']['purification'] / 1e9:.2f} G (floor {2 * c['macs']['purification'] / c['peak_gflops'] / 1e9:.4f} s/image "
              f"at this CPU's sgemm peak of {c['peak_gflops']:.0f} GFLOP/s: {ceiling_sources(c, res['threads'])})."]
    return "\n".join(lines)


def ceiling_sources(cost: dict[str, Any], threads: int) -> str:
    """Where the sgemm ceiling came from, for the latency table's footnote (older results lack the readings)."""
    text = f"{threads} x the best one-thread sgemm of torch's and numpy's BLAS"
    if "peak_gflops_readings" in cost:
        text += ", the larger of its readings before and after the timings, " + " and ".join(
            f"{g:.0f}" for g in cost["peak_gflops_readings"])
    if "sgemm_one_thread_gflops" in cost:
        before, after = cost["sgemm_one_thread_gflops"]
        text += "; one thread, before / after: " + ", ".join(
            f"{blas}'s {before[blas]:.0f} / {after[blas]:.0f}" for blas in before)
    return text


def latency_plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for be in dict.fromkeys(label(r) for r in res["rows"]):
        rs = sorted((r for r in res["rows"] if label(r) == be), key=lambda r: r["batch"])
        a1.plot([r["batch"] for r in rs], [r["p50_s"] for r in rs], "o-", label=be)
        a2.plot([r["batch"] for r in rs], [r["images_per_s"] for r in rs], "o-", label=be)
    for a, yl in ((a1, "latency per call, p50 (s)"), (a2, "images / s")):
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.set_xlabel("batch")
        a.set_ylabel(yl)
        a.grid(True, which="both", alpha=0.3)
    a1.legend()
    fig.suptitle(f"ZeroPur purification, {res['model']}, {res['threads']} CPU threads")
    _save_fig(fig, path)


def _save_fig(fig, path: Path) -> None:
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def run_sweep(args: argparse.Namespace, victim: "Victim", cfg: ZeroPurConfig, overrides: dict[str, Any], art: Path,
              log: Callable[[str], None]) -> dict[str, Any]:
    """GS/AP step counts vs latency (ONNX Runtime) and purified PGD-20 accuracy."""
    import torch

    from zeropur_export.attacks import pgd_linf
    from zeropur_rt.pipeline import Purifier
    x, ys = bench_images(args, victim, args.sweep_n, labels=True)
    adv = pgd_linf(victim, torch.from_numpy(x), torch.from_numpy(ys)).numpy()
    rows = []
    grid = [(g, a) for g in args.sweep_gs for a in args.sweep_ap]
    for gs, apn in progress(grid, "sweep"):
        # ap_step pinned: the eps -> ap_step rule would lengthen the steps as their count drops,
        # and the sweep asks what fewer steps of the recipe's size buy
        steps = dict(gs_steps=gs, ap_steps=apn, ap_step=cfg.ap_step)
        pur = Purifier.load(art, threads=args.threads, overrides={**overrides, **steps})
        t, correct_adv, correct_clean = 0.0, 0, 0
        for i in range(0, len(x), 50):
            t0 = time.perf_counter()
            _, p = pur.purify_and_classify(adv[i:i + 50])
            t += time.perf_counter() - t0
            correct_adv += int((p == ys[i:i + 50]).sum())
            correct_clean += int((pur.purify_and_classify(x[i:i + 50])[1] == ys[i:i + 50]).sum())
        rows.append(dict(gs_steps=gs, ap_steps=apn, s_per_image=t / len(x), purified_pgd_acc=100 * correct_adv / len(x),
                         purified_clean_acc=100 * correct_clean / len(x)))
        log(f"GS {gs:2d} AP {apn:2d}: {t / len(x):.4f} s/image, purified PGD {rows[-1]['purified_pgd_acc']:.1f}%, "
            f"purified clean {rows[-1]['purified_clean_acc']:.1f}%")
    return dict(kind="sweep", model=args.model, n=len(x), threads=args.threads, base_config=cfg.to_dict(),
                machine=machine_info(), data=data_name(args), rows=rows)


def sweep_markdown(res: dict[str, Any]) -> str:
    cfg = res["base_config"]
    lines = [f"Steps sweep, {res['model']}, {res['n']} images, ONNX Runtime CPU, {res['threads']} threads; PGD-20 "
             f"8/255 on the bare classifier; step sizes fixed at GS {cfg['gs_step'] * 255:.2g}/255 and AP "
             f"{cfg['ap_step'] * 255:.2g}/255 (fewer steps = a smaller move).", "", "| GS steps | AP steps | s/image | purified clean | purified PGD-20 |",
             "|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['gs_steps']} | {r['ap_steps']} | {r['s_per_image']:.4f} | {r['purified_clean_acc']:.1f}% | "
                     f"{r['purified_pgd_acc']:.1f}% |")
    return "\n".join(lines)


def sweep_plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in res["rows"]:
        ax.scatter(r["s_per_image"], r["purified_pgd_acc"], c="C0")
        ax.annotate(f"GS{r['gs_steps']}/AP{r['ap_steps']}", (r["s_per_image"], r["purified_pgd_acc"]), fontsize=7)
    ax.set_xlabel("seconds per image (ONNX Runtime CPU)")
    ax.set_ylabel("purified PGD-20 accuracy (%)")
    ax.set_title(f"Latency vs robustness, {res['model']}")
    ax.grid(alpha=0.3)
    _save_fig(fig, path)


def main(argv: list[str] | None = None) -> int:
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
    ap.add_argument("--resize", choices=["crop", "refuse"], default="crop",
                    help="--data images of another size: scale to cover + centre crop (default), or refuse")
    ap.add_argument("--out", default=None, help="output folder for JSON, markdown and PNG (default runs/bench_<model>)")
    from zeropur_export.victim_cli import add_victim_args
    add_victim_args(ap)
    args = ap.parse_args(argv)
    if args.model and args.victim:
        ap.error("pass --model (zoo) or --victim, not both")
    unknown = [b for b in args.backends if b not in ALL_BACKENDS]
    if unknown:
        ap.error(f"unknown backend(s) {unknown}; choose from {', '.join(ALL_BACKENDS)}")
    overrides = parse_sets(args.set)
    import torch

    from zeropur_export.build import ensure_artifacts, recipe_artifacts
    from zeropur_export.zoo import load_victim
    from zeropur_rt.manifest import load_manifest
    torch.set_num_threads(args.threads)
    args.own = None
    if args.victim:
        from zeropur_export.build import victim_artifacts
        from zeropur_export.victim_cli import resolve_victim
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
