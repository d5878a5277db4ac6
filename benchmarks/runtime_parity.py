"""Runtime vs reference: teacher-forced per-step gradient parity and free-running agreement.

    python -m benchmarks.runtime_parity --model resnet20 resnet56 --n 200 [--artifacts DIR] [--no-floor]

Teacher-forced: at every GS and AP step of the torch reference's trajectory, the runtime's
graph is fed the reference's iterate (and, for ap_grad, the reference's float32 constants);
its error against the float64 truth on the same inputs must be <= 2x the float32
spread (the torch float32 reference with and without oneDNN, see ``zeropur_export.graphs.parity``; plus a
float32 floor) and <= 1e-3. Free-running: both purify the same
images independently; report identical predictions, identical pixels, and accuracies.

The float32 floor puts the free-running figures in scale: the same reference, run once with
oneDNN's convolutions and once with ATen's im2col + GEMM (both correct float32, summed in other
orders), drifts apart the same way: sign steps turn 1e-7 relative gradient differences into
whole-step pixel differences that later steps compound. A runtime should agree with the
reference at least as well as the reference agrees with itself across that switch.

``--artifacts DIR`` reuses DIR/<model> (e.g. exported with ``zeropur-export export MODEL --config
export/zeropur_export/recipes/MODEL_calibrated.json --out DIR/MODEL``); otherwise the model is exported with its preset.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from zeropur_export.graphs.parity import ParityRow, conditioning_floor, in_second_float32_order, parity_row
from zeropur_export.reference.losses import blur_torch
from zeropur_export.reference.purifier import ReferencePurifier
from zeropur_export.victims.taps import Victim
from zeropur_rt.pipeline import Purifier


def teacher_forced(pur: Purifier, victim: Victim, x_in: np.ndarray) -> list[ParityRow]:
    """One row per graph call along the reference's trajectory (label: the step). The references (float32 and the
    float64 truth) run on ``victim``'s device: on a GPU, torch's second float32 order is cuDNN off."""
    cfg = pur.cfg
    dev = victim.mean.device
    ref32 = ReferencePurifier(victim, cfg)
    ref64 = ReferencePurifier(victim.to_dtype(torch.float64), cfg)
    xt = torch.from_numpy(x_in).to(dev)
    _, trace = ref32.purify_with_iterates(xt)
    host = lambda t: t.detach().cpu().numpy()  # noqa: E731
    rows = []
    for t, x_np in enumerate(trace.gs_x):
        x = torch.from_numpy(x_np).to(dev)
        xb = blur_torch(x, cfg.blur_sigma)
        truth = ref64.gs_grad(x.double(), xb.double())[0]
        go = pur.run_graph("gs_grad", {"x": x_np, "x_blur": host(xb)})["grad"]
        floor = conditioning_floor(ref64.victim, x, xb)  # the export parity's rule for this gradient
        rows.append(_judged(lambda: ref32.gs_grad(x, xb)[0], lambda g32: parity_row(
            victim.name, "gs_grad", "grad", f"step {t}", go, g32, host(truth), floor), str(dev)))
    if cfg.ap_steps == 0:
        return rows
    coarse = torch.from_numpy(trace.coarse).to(dev)
    c32 = ref32.ap_setup(xt, coarse)
    c64 = ref64.ap_setup(xt.double(), coarse.double())
    co = pur.run_graph("ap_setup", {"x_in": x_in, "coarse": trace.coarse})
    for name, b, c in zip(co, [*c32.ila_dir, c32.lpips_ref], [*c64.ila_dir, c64.lpips_ref]):
        rows.append(parity_row(victim.name, "ap_setup", name, "once", co[name], host(b), host(c)))
    # ap_grad is fed the same constants on every side (the reference's float32 ones)
    c32_as64 = type(c32)([d.double() for d in c32.ila_dir], c32.lpips_ref.double())
    feeds = {f"ila_dir_{i}": host(d) for i, d in enumerate(c32.ila_dir)} | {"lpips_ref": host(c32.lpips_ref)}
    for t, fine_np in enumerate(trace.ap_x):
        fine = torch.from_numpy(fine_np).to(dev)
        truth = ref64.ap_grad(fine.double(), c32_as64)
        go = pur.run_graph("ap_grad", feeds | {"fine": fine_np})["grad"]
        rows.append(_judged(lambda: ref32.ap_grad(fine, c32), lambda g32: parity_row(
            victim.name, "ap_grad", "grad", f"step {t}", go, g32, host(truth)), str(dev)))
    return rows


def _judged(float32_ref: Callable[[], torch.Tensor], row: Callable[[list[np.ndarray]], ParityRow],
            device: str = "cpu") -> ParityRow:
    """The row against the float32 reference with the convolution library's order (oneDNN, cuDNN), or, where the
    whole-batch rule misses, against the spread of it and torch's second float32 order on the same device, whose
    flips bound the outliers (ParityRow.ok)."""
    first = [float32_ref().detach().cpu().numpy()]
    r = row(first)
    if r.strict_ok:
        return r
    alt = in_second_float32_order(float32_ref, device=device)
    return r if alt is None else row(first + [alt.detach().cpu().numpy()])


def summary(rows: list[ParityRow]) -> str:
    strict = sum(r.strict_ok for r in rows)
    flips = [r for r in rows if r.ok and not r.strict_ok]
    return (f"{strict}/{len(rows)} within the bound on the whole batch, {sum(r.ok for r in rows)}/{len(rows)} counting "
            f"isolated ReLU-mask flips ({sum(r.outliers for r in flips)} flipped samples in {len(flips)} calls; torch "
            f"float32 itself flipped {sum(r.torch_flips for r in rows)} samples over all calls); "
            f"max err runtime {max(r.ort_err for r in rows):.2e} vs torch f32 {max(r.torch_err for r in rows):.2e}; "
            f"median runtime {np.median([r.ort_err for r in rows]):.2e} vs torch f32 {np.median([r.torch_err for r in rows]):.2e}")


Purify = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # images -> (purified images, their logits)


def runtime_side(pur: Purifier) -> Purify:
    def run(xb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = pur.purify(xb)
        return out, pur.logits(out)
    return run


def reference_side(victim: Victim, cfg, onednn: bool = True) -> Purify:
    """The torch reference on ``victim``'s device; ``onednn=False`` runs its convolutions in torch's second float32
    order (on the CPU ATen's own im2col + GEMM instead of oneDNN, on CUDA ATen's kernels instead of cuDNN)."""
    ref = ReferencePurifier(victim, cfg)

    def purify(xb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = ref.purify(torch.from_numpy(xb))
        with torch.no_grad():
            return out.cpu().numpy(), victim(out).cpu().numpy()

    def run(xb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return purify(xb) if onednn else in_second_float32_order(purify, xb, device=str(victim.mean.device))
    return run


@dataclass
class Purified:
    """One side's purified images and their logits over a whole image set, and its wall time."""

    images: np.ndarray
    logits: np.ndarray
    seconds: float


def purify_all(fn: Purify, x: np.ndarray, batch: int = 50) -> Purified:
    t0 = time.perf_counter()
    parts = [fn(x[i:i + batch]) for i in range(0, len(x), batch)]
    return Purified(np.concatenate([o for o, _ in parts]), np.concatenate([lg for _, lg in parts]),
                    time.perf_counter() - t0)


def reference_outputs(victim: Victim, cfg, x: np.ndarray, batch: int = 50) -> Purified:
    """The torch reference on ``x``, computed once and shared by ``free_running`` and ``float32_floor``."""
    return purify_all(reference_side(victim, cfg), x, batch)


def agreement(tested: Purified, reference: Purified, y: np.ndarray) -> dict:
    """Identical predictions and pixels of two independent purifications, accuracies, and the
    reference's top-1 minus top-2 logit margin where the predictions part."""
    po, pr = tested.logits.argmax(1), reference.logits.argmax(1)
    top2 = np.sort(reference.logits, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    n = len(y)
    return dict(n=n, same_prediction=float((po == pr).mean()),
                same_pixels=float((tested.images == reference.images).mean()),
                acc_tested=100 * float((po == y).mean()), acc_reference=100 * float((pr == y).mean()),
                seconds=dict(tested=tested.seconds, reference=reference.seconds),
                disagreeing_margins=sorted(float(m) for m in margin[po != pr]), median_margin=float(np.median(margin)))


def free_running(pur: Purifier, victim: Victim, x: np.ndarray, y: np.ndarray, batch: int = 50,
                 reference: Purified | None = None) -> dict:
    """The runtime against the torch reference (``reference``: its outputs on ``x``, if already computed)."""
    ref = reference or reference_outputs(victim, pur.cfg, x, batch)
    return agreement(purify_all(runtime_side(pur), x, batch), ref, y)


def float32_floor(victim: Victim, cfg, x: np.ndarray, y: np.ndarray, batch: int = 50,
                  reference: Purified | None = None) -> dict:
    """The torch reference against itself with its convolutions summed in another order (oneDNN off):
    how far two correct float32 implementations of the loop drift apart once free-running."""
    ref = reference or reference_outputs(victim, cfg, x, batch)
    return agreement(purify_all(reference_side(victim, cfg, onednn=False), x, batch), ref, y)


def format_agreement(label: str, r: dict, tested: str = "runtime") -> str:
    line = (f"{label}: n={r['n']} same prediction {100 * r['same_prediction']:.1f}%, same pixels "
            f"{100 * r['same_pixels']:.2f}%, purified acc {tested} {r['acc_tested']:.1f}% vs reference "
            f"{r['acc_reference']:.1f}% ({r['seconds']['tested']:.1f} s vs {r['seconds']['reference']:.1f} s)")
    if r["disagreeing_margins"]:
        line += ("\n  reference's top-1 minus top-2 logit on the disagreeing images: "
                 + ", ".join(f"{m:.3f}" for m in r["disagreeing_margins"]) + f" (median over all: {r['median_margin']:.3f})")
    return line


def main(argv: list[str] | None = None) -> int:
    from zeropur_export.attacks.pgd import pgd_linf
    from zeropur_export.artifacts import ensure_artifacts
    from zeropur_export.victims.zoo import load_victim
    from zeropur_export.data import load_cifar10_test, to_nchw_float

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", default=["resnet20"])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--teacher-n", type=int, default=16, help="images in the teacher-forced check")
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-floor", dest="floor", action="store_false",
                    help="skip the float32 floor (the reference against itself with oneDNN off)")
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
            ref = reference_outputs(victim, pur.cfg, inp)
            print(format_agreement(f"{model} {label}", free_running(pur, victim, inp, y, reference=ref)))
            if args.floor:
                r = float32_floor(victim, pur.cfg, inp, y, reference=ref)
                print(format_agreement(f"{model} {label}, float32 floor", r, tested="reference with oneDNN off"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
