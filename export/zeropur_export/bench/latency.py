"""The latency table of ``zeropur-export bench``: each backend timed per batch size in one run, the cost model
beside it."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from zeropur_rt.bench import detail_lines, label, latency_stats, machine_facts, time_purifier, timed
from zeropur_rt.config import ZeroPurConfig
from zeropur_rt.files import atomic_write_bytes
from zeropur_rt.progress import progress

if TYPE_CHECKING:
    from zeropur_export.victims.taps import Victim

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

        from zeropur_export.reference.purifier import ReferencePurifier
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
        from zeropur_export.reference.torch_runner import load_purifier
        fast = load_purifier(art, "cpu", victim=victim, overrides=overrides, threads=threads, fast=True)
        return lambda: fast.purify(x)
    raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(ALL_BACKENDS)}")


def run_latency(args: argparse.Namespace, victim: "Victim", cfg: ZeroPurConfig, overrides: dict[str, Any], art: Path,
                log: Callable[[str], None]) -> dict[str, Any]:
    from zeropur_export.bench.costs import forward_equivalents, sgemm_gflops
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
        from zeropur_export.data import load_cifar10_test, to_nchw_float
        xs, ys = load_cifar10_test(args.data, 0, n)
        return to_nchw_float(xs), ys
    if not args.data:
        if labels:
            raise ValueError("--sweep with --victim needs labelled --data (an .npz, a class-folder tree or a CSV)")
        return np.random.default_rng(0).random((n, *victim.spec.input_shape), dtype=np.float32), None
    from zeropur_export.artifacts import victim_data
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
    save_fig(fig, path)


def save_fig(fig, path: Path) -> None:
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
