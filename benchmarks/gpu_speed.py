"""Issue 18's GPU report: today's torch device loop against the fast torch runner, from one run.

    python -m benchmarks.gpu_speed [--models resnet20 resnet56] [--batches 1 256] [--agree-n 1000]
    python -m benchmarks.gpu_speed --device cpu --models resnet20 --batches 2 --agree-n 4 --reps 1   # CI's smoke

Rows per (model, batch), every one timed in this process on this device:

* ``released``: the released code's cost (torch reference re-computing AP), the ratio's denominator;
* ``autograd``: the torch runner (eager autograd, unfolded) + our CUDA kernels, the loop in one CUDA graph;
* ``fast-fp32`` / ``fast-tf32`` / ``fast-bf16``: ``load_purifier(..., fast=True, precision=...)``: folded
  BatchNorm, channels-last, torch.compile'd gradient graphs, cuDNN benchmark mode, the same CUDA graph;
* with ``--autotune``, ``fast-fp32-autotune``: the same with inductor's max-autotune (convolution epilogues
  fused; minutes of compilation per graph and batch size).

``--variants`` picks rows (the released code's cost always runs): every fast row compiles two gradient
graphs per batch size, so on a short GPU lease run ``--variants autograd fast-fp32`` first.

Per row: ms per call (median), ms per image, achieved GFLOP/s (the exported graphs' MACs per purification,
x2, per second) and, at the smallest batch, kernels per step (CUDA kernels of one eager purification, over
its gs_steps + ap_steps gradient steps; on the CPU: top-level aten ops). Agreement: each fast precision's
predictions after purification against the eager float32 reference's, on ``--agree-n`` CIFAR-10 test
images (the acceptance: >= 99% for float32), with both accuracies, beside the float32 floor: the reference
against itself with its convolutions summed in another order (cuDNN off; on the CPU oneDNN off).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from zeropur_rt.bench import timed

VARIANTS = ("released", "autograd", "fast-fp32", "fast-tf32", "fast-bf16", "fast-fp32-autotune")
FLOOR = "float32-floor"  # the agreement row of the reference against itself in another float32 summation order


def time_calls(fn: Callable[[], Any], sync: Callable[[], None], reps: int) -> dict[str, float]:
    """``reps`` synchronised calls after one warm-up (cuDNN / TensorRT tactics, torch.compile, CUDA graph capture)."""
    def call() -> None:
        fn()
        sync()
    ts = timed(call, 1, reps)
    return {"median_s": float(np.median(ts)), "min_s": float(np.min(ts)), "reps": reps}


def _purifier(variant: str, art: Path, device: str, victim: Any, overrides: dict[str, Any]) -> Any:
    from zeropur_export.reference.torch_runner import load_purifier
    if variant == "autograd":
        return load_purifier(art, device, victim=victim, overrides=overrides)
    return load_purifier(art, device, victim=victim, overrides=overrides, fast=True, precision=variant.split("-")[1],
                         autotune=variant.endswith("autotune"))


def _variants(device: str, autotune: bool, wanted: list[str] | None = None) -> tuple[str, ...]:
    """The rows to run: ``wanted`` (the released code's cost always, as every ratio's base), else every row
    but max-autotune's (``autotune`` adds it); TF32 only on CUDA."""
    if wanted and not device.startswith("cuda") and "fast-tf32" in wanted:
        raise ValueError("fast-tf32 is a mode of NVIDIA GPUs: drop it from --variants on the CPU")
    if wanted:
        return tuple(v for v in VARIANTS if v == "released" or v in wanted)
    return tuple(v for v in VARIANTS if (device.startswith("cuda") or v != "fast-tf32")
                 and (autotune or not v.endswith("autotune")))


def count_kernels(purify: Callable[[], Any], device: str) -> int:
    """CUDA kernels launched by ``purify`` (memcpy / memset excluded); on the CPU, top-level aten ops."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        purify()
        if cuda:
            torch.cuda.synchronize()
    if cuda:
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and not e.name.startswith(("Memcpy", "Memset")))
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)


def measure(model: str, art: Path, device: str, batches: list[int], reps: int, x_all: np.ndarray, y_all: np.ndarray,
            agree_n: int, overrides: dict[str, Any], autotune: bool = False, variants: list[str] | None = None,
            floor: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The latency rows of every batch, then the agreement on ``agree_n`` images; one purifier per variant."""
    import torch

    from zeropur_rt.macs import purification_macs
    from zeropur_export.reference.purifier import ReferencePurifier
    from zeropur_export.victims.zoo import load_victim

    victim = load_victim(model).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    purifiers = {v: _purifier(v, art, device, victim, overrides) for v in _variants(device, autotune, variants)
                 if v != "released"}
    cfg = next(iter(purifiers.values())).cfg  # every row runs the artifact's config with the same overrides
    released = ReferencePurifier(victim, cfg, ap_mode="recompute")  # on the victim's device
    flop = 2 * purification_macs(art, cfg)["purification"]
    rows = []
    for b in batches:
        x = x_all[np.arange(b) % len(x_all)]
        xt = torch.from_numpy(x).to(device)
        calls: dict[str, Callable[[], Any]] = {"released": lambda: released.purify(xt)}
        calls |= {v: (lambda p=p: p.purify(x)) for v, p in purifiers.items()}
        row: dict[str, Any] = {"model": model, "batch": b, "device": device}
        for v, fn in calls.items():
            s = time_calls(fn, sync, reps)["median_s"]
            row[v] = {"ms_per_call": 1e3 * s, "ms_per_image": 1e3 * s / b, "gflops": flop * b / s / 1e9,
                      "x_vs_released": row["released"]["ms_per_call"] / (1e3 * s) if v != "released" else 1.0}
        if b == min(batches):  # eager (no CUDA graph) so that the profiler sees each launch; already compiled
            for v, p in purifiers.items():
                graphed, p.loops.cuda_graph = p.loops.cuda_graph, False
                row[v]["kernels_per_step"] = count_kernels(lambda: p.purify(x), device) / (cfg.gs_steps + cfg.ap_steps)
                p.loops.cuda_graph = graphed
        rows.append(row)
        print(f"  {model} batch {b}: " + ", ".join(f"{v} {row[v]['ms_per_call']:.1f} ms" for v in calls), flush=True)
    agree: dict[str, Any] = {}
    if agree_n and any(v.startswith("fast") for v in purifiers):
        agree = agreement(ReferencePurifier(victim, cfg, ap_mode="lean"), purifiers, x_all[:agree_n], y_all[:agree_n],
                          max(batches), floor)
    for p in purifiers.values():
        p.close()
    return rows, agree


def agreement(ref: Any, purifiers: dict[str, Any], x: np.ndarray, y: np.ndarray, batch: int,
              floor: bool = True) -> dict[str, Any]:
    """Predictions after purification: each fast precision against the eager float32 reference's. Every call
    has ``batch`` images (the last one topped up from the start and cut back): a compiled step is specialised
    to its batch size, and a new size would compile again.

    ``floor``: also the reference against itself with its convolutions summed in another float32 order (cuDNN
    off on CUDA, oneDNN off on the CPU). Sign steps turn rounding-level gradient differences into whole-step
    pixel differences, so two correct float32 loops part on images near a decision boundary; this row says how
    far, on the same images and the same device, so that a fast row's agreement can be read against it."""
    import torch

    from zeropur_export.graphs.parity import convolution_library, in_second_float32_order

    victim, device = ref.victim, ref.runner.dev
    fast = {v: p for v, p in purifiers.items() if v.startswith("fast")}

    def reference(xb: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return victim(ref.purify(xb)).argmax(1).cpu().numpy()

    preds: dict[str, list[np.ndarray]] = {v: [] for v in ("reference", *fast)}
    floor_preds: list[np.ndarray] | None = [] if floor else None
    for i in range(0, len(x), batch):
        xb, n = x[np.arange(i, i + batch) % len(x)], min(batch, len(x) - i)
        xt = torch.from_numpy(xb).to(device)
        preds["reference"].append(reference(xt)[:n])
        if floor_preds is not None:
            p2 = in_second_float32_order(reference, xt, device=str(device))
            if p2 is None:  # this torch has no second order to measure
                floor_preds = None
            else:
                floor_preds.append(p2[:n])
        for v, p in fast.items():
            preds[v].append(p.purify_and_classify(xb)[1][:n])
    p_ref = np.concatenate(preds.pop("reference"))
    if floor_preds is not None:
        preds[FLOOR] = floor_preds
    out: dict[str, Any] = {"n": len(x), "accuracy_reference": 100 * float(np.mean(p_ref == y))}
    for v, ps in preds.items():
        p = np.concatenate(ps)
        out[v] = {"same_prediction": 100 * float(np.mean(p == p_ref)), "accuracy": 100 * float(np.mean(p == y))}
    if FLOOR in out:
        out[FLOOR]["tested"] = f"reference with {convolution_library(str(device))[1]} off"
    out["ok"] = "fast-fp32" not in out or out["fast-fp32"]["same_prediction"] >= 99.0  # the acceptance's float32 row
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Issue 18 speed report ({report['device_name']})", ""]
    for row in report["rows"]:
        lines += [f"## {row['model']}, batch {row['batch']}", "",
                  "| variant | ms/call | ms/image | GFLOP/s | x vs released | kernels/step |", "|---|---|---|---|---|---|"]
        for v in VARIANTS:
            r = row.get(v)
            if r:
                k = r.get("kernels_per_step")
                lines.append(f"| {v} | {r['ms_per_call']:.2f} | {r['ms_per_image']:.3f} | {r['gflops']:.1f} | "
                             f"{r['x_vs_released']:.2f} | {'-' if k is None else f'{k:.0f}'} |")
        lines.append("")
    for model, a in report["agreement"].items():
        lines.append(f"Agreement, {model}, {a['n']} images (reference accuracy {a['accuracy_reference']:.1f}%): " +
                     "; ".join(f"{r.get('tested', v)} {r['same_prediction']:.1f}% same prediction, "
                               f"{r['accuracy']:.1f}% accuracy" for v, r in a.items() if isinstance(r, dict)))
        if FLOOR in a:
            lines.append(f"(The {a[FLOOR]['tested']} is the float32 floor: two correct float32 loops on the same "
                         "images, parting only by summation order.)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/gpu_speed")
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 256])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--agree-n", type=int, default=1000, help="CIFAR-10 test images for the prediction agreement")
    ap.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="config overrides for every row, e.g. --set gs_steps=2 (CI's smoke)")
    ap.add_argument("--autotune", action="store_true", help="add the fast-fp32-autotune row (long compiles)")
    ap.add_argument("--variants", nargs="+", choices=[v for v in VARIANTS if v != "released"], default=None,
                    help="only these rows beside the released code's cost (each fast row compiles its two gradient "
                    "graphs per batch size: on a short GPU lease, autograd fast-fp32 first)")
    ap.add_argument("--no-floor", dest="floor", action="store_false",
                    help="skip the agreement's float32 floor (one more reference purification of the --agree-n images)")
    args = ap.parse_args(argv)
    if args.variants is not None and not set(args.variants) - {"released"}:
        ap.error("--variants needs a row besides released")
    import torch

    from zeropur_export.artifacts import ensure_artifacts
    from zeropur_rt.config import parse_sets
    from zeropur_export.data import load_cifar10_test, to_nchw_float
    from zeropur_rt.files import atomic_write_json, atomic_write_text

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_speed: this torch ({torch.__version__}) sees no CUDA device; nothing to measure "
              "(--device cpu runs the same rows on the CPU)")
        return 0
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # float32 unless a row opts in
    xs, ys = load_cifar10_test(stop=max(args.agree_n, max(args.batches)))
    x_all = to_nchw_float(xs)
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    report: dict[str, Any] = {"device": args.device, "device_name": name, "torch": torch.__version__,
                              "rows": [], "agreement": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for model in args.models:
        art = ensure_artifacts(model, Path(args.artifacts) / model)
        rows, agree = measure(model, art, args.device, args.batches, args.reps, x_all, ys, args.agree_n,
                              parse_sets(args.set), args.autotune, args.variants, args.floor)
        report["rows"] += rows
        if agree:
            report["agreement"][model] = agree
        atomic_write_json(out / "gpu_speed.json", report)
    atomic_write_text(out / "gpu_speed.md", markdown(report))
    print(markdown(report))
    return 0 if all(a["ok"] for a in report["agreement"].values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
