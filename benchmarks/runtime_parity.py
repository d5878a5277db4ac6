"""Runtime vs reference: teacher-forced per-step gradient parity and free-running agreement.

    python -m benchmarks.runtime_parity --model resnet20 resnet56 --n 200 [--pgd]

Teacher-forced: at every GS and AP step of the torch reference's trajectory, the runtime's
graph is fed the reference's iterate (and, for ap_grad, the reference's float32 constants);
its error against the float64 truth on the same inputs must be <= 2x the torch float32
reference's own error (plus a 1e-7 floor) and <= 1e-3. Free-running: both purify the same
images independently; report identical predictions, identical pixels, and accuracies.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from zeropur_export.parity import ParityRow, conditioning_floor, parity_row
from zeropur_export.reference import ReferencePurifier, Trace, blur_torch
from zeropur_export.taps import Victim
from zeropur_rt.purifier import Purifier


def teacher_forced(pur: Purifier, victim: Victim, x_in: np.ndarray) -> list[ParityRow]:
    """One row per graph call along the reference's trajectory (label: the step)."""
    cfg = pur.cfg
    ref32 = ReferencePurifier(victim, cfg)
    ref64 = ReferencePurifier(victim.to_dtype(torch.float64), cfg)
    xt = torch.from_numpy(x_in)
    trace = Trace()
    ref32.purify(xt, trace)
    run = pur.runner.run
    rows = []
    for t, x in enumerate(trace.gs_x):
        xb = blur_torch(x, cfg.blur_sigma)
        truth = ref64.gs_grad(x.double(), xb.double())[0]
        g32 = ref32.gs_grad(x, xb)[0]
        go = run("gs_grad", {"x": x.numpy(), "x_blur": xb.numpy()})[0]
        floor = conditioning_floor(ref64.victim, x, xb)  # the export parity's rule for this gradient
        rows.append(parity_row(victim.name, "gs_grad", "grad", f"step {t}", go, g32.numpy(), truth.numpy(), floor))
    if cfg.ap_steps == 0:
        return rows
    coarse = trace.coarse
    c32 = ref32.ap_setup(xt, coarse)
    c64 = ref64.ap_setup(xt.double(), coarse.double())
    co = run("ap_setup", {"x_in": x_in, "coarse": coarse.numpy()})
    names = pur.manifest.graphs["ap_setup"]["outputs"]
    for name, a, b, c in zip(names, co, [*c32.ila_dir, c32.lpips_ref], [*c64.ila_dir, c64.lpips_ref]):
        rows.append(parity_row(victim.name, "ap_setup", name, "once", a, b.numpy(), c.numpy()))
    # ap_grad is fed the same constants on every side (the reference's float32 ones)
    c32_as64 = type(c32)([d.double() for d in c32.ila_dir], c32.lpips_ref.double())
    feeds = {f"ila_dir_{i}": d.numpy() for i, d in enumerate(c32.ila_dir)} | {"lpips_ref": c32.lpips_ref.numpy()}
    for t, fine in enumerate(trace.ap_x):
        truth = ref64.ap_grad(fine.double(), c32_as64, None, None)
        g32 = ref32.ap_grad(fine, c32, None, None)
        go = run("ap_grad", feeds | {"fine": fine.numpy()})[0]
        rows.append(parity_row(victim.name, "ap_grad", "grad", f"step {t}", go, g32.numpy(), truth.numpy()))
    return rows


def summary(rows: list[ParityRow]) -> str:
    strict = sum(r.strict_ok for r in rows)
    flips = [r for r in rows if r.ok and not r.strict_ok]
    return (f"{strict}/{len(rows)} within the bound on the whole batch, {sum(r.ok for r in rows)}/{len(rows)} counting "
            f"isolated ReLU-mask flips ({sum(r.outliers for r in flips)} flipped samples in {len(flips)} calls); "
            f"max err runtime {max(r.ort_err for r in rows):.2e} vs torch f32 {max(r.torch_err for r in rows):.2e}; "
            f"median runtime {np.median([r.ort_err for r in rows]):.2e} vs torch f32 {np.median([r.torch_err for r in rows]):.2e}")


def free_running(pur: Purifier, victim: Victim, x: np.ndarray, y: np.ndarray, batch: int = 50) -> dict:
    ref = ReferencePurifier(victim, pur.cfg)
    same_pred = same_px = acc_rt = acc_ref = 0.0
    secs = dict(runtime=0.0, reference=0.0)
    margins: list[float] = []  # the reference's top-1 minus top-2 logit where the two disagree
    all_margins: list[float] = []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        t0 = time.perf_counter()
        xo, po = pur.purify_and_classify(xb)
        t1 = time.perf_counter()
        xr = ref.purify(torch.from_numpy(xb))
        with torch.no_grad():
            logits = victim(xr).numpy()
        pr = logits.argmax(1)
        top2 = np.sort(logits, axis=1)[:, -2:]
        margins += [float(m) for m in (top2[:, 1] - top2[:, 0])[po != pr]]
        all_margins += [float(m) for m in top2[:, 1] - top2[:, 0]]
        secs["runtime"] += t1 - t0
        secs["reference"] += time.perf_counter() - t1
        same_pred += float((po == pr).sum())
        same_px += float((xo == xr.numpy()).sum())
        acc_rt += float((po == y[i:i + batch]).sum())
        acc_ref += float((pr == y[i:i + batch]).sum())
    n = len(x)
    return dict(n=n, same_prediction=same_pred / n, same_pixels=same_px / x.size,
                acc_runtime=100 * acc_rt / n, acc_reference=100 * acc_ref / n, seconds=secs,
                disagreeing_margins=sorted(margins), median_margin=float(np.median(all_margins)))


def main(argv: list[str] | None = None) -> int:
    from zeropur_export.attacks import pgd_linf
    from zeropur_export.build import ensure_artifacts
    from zeropur_export.zoo import load_victim
    from zeropur_rt.data import load_cifar10_test, to_nchw_float

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", default=["resnet20"])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--teacher-n", type=int, default=16, help="images in the teacher-forced check")
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    xs, ys = load_cifar10_test(stop=args.n)
    x, y = to_nchw_float(xs), ys
    for model in args.model:
        victim = load_victim(model)
        pur = Purifier.load(ensure_artifacts(model, Path(args.artifacts) / model), threads=args.threads)
        rows = teacher_forced(pur, victim, x[:args.teacher_n])
        print(f"{model}: teacher-forced, {len(rows)} graph calls on {args.teacher_n} images: {summary(rows)}")
        adv = pgd_linf(victim, torch.from_numpy(x), torch.from_numpy(y)).numpy()
        for label, inp in (("clean", x), ("pgd20", adv)):
            r = free_running(pur, victim, inp, y)
            print(f"{model} {label}: n={r['n']} same prediction {100 * r['same_prediction']:.1f}%, same pixels "
                  f"{100 * r['same_pixels']:.2f}%, purified acc runtime {r['acc_runtime']:.1f}% vs reference "
                  f"{r['acc_reference']:.1f}% ({r['seconds']['runtime']:.1f} s vs {r['seconds']['reference']:.1f} s)")
            if r["disagreeing_margins"]:
                print("  reference's top-1 minus top-2 logit on the disagreeing images: "
                      + ", ".join(f"{m:.3f}" for m in r["disagreeing_margins"]) + f" (median over all: {r['median_margin']:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
