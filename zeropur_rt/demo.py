"""``zeropur-rt demo``: export once, attack the bare classifier with PGD, purify with the runtime, report.

The attack needs gradients of the bare classifier, so this job uses torch (the export extra);
purification runs on the runtime backend (ONNX Runtime CPU by default), not on torch.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path


from zeropur_rt.data import load_cifar10_test, to_nchw_float
from zeropur_rt.purifier import STAGES, Purifier


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="zeropur-rt demo", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20", choices=["resnet20", "resnet32", "resnet56"])
    ap.add_argument("--n", type=int, default=64, help="test images (rows 0..n-1)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--artifacts", default=None, help="artifact directory (default: artifacts/<model>; exported if missing)")
    ap.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch", "tensorrt"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", default=None, help="cifar10_test.npz (default: <shared>/data)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.n <= 0 or args.batch <= 0:
        ap.error("--n and --batch must be positive")
    try:
        import torch
        from zeropur_export.attacks import pgd_linf
        from zeropur_export.build import ensure_artifacts
        from zeropur_export.zoo import load_victim
    except ImportError as e:
        raise ImportError("the demo attacks with torch: pip install 'zeropur-rt[export]'") from e
    torch.set_num_threads(args.threads)
    art = ensure_artifacts(args.model, Path(args.artifacts or f"artifacts/{args.model}"))
    pur = Purifier.load(art, backend=args.backend, threads=args.threads)
    victim = load_victim(args.model)
    xs, ys = load_cifar10_test(args.data, 0, args.n)
    x = to_nchw_float(xs)
    correct: dict[str, int] = defaultdict(int)
    stage_s: dict[str, float] = defaultdict(float)
    secs = dict(attack=0.0, purify=0.0)
    batches = range(0, args.n, args.batch)
    try:
        from tqdm import tqdm
        batches = tqdm(batches, desc=f"{args.model} attack+purify", leave=False)
    except ImportError:
        pass
    for i in batches:
        xb, yb = x[i:i + args.batch], ys[i:i + args.batch]
        t0 = time.perf_counter()
        adv = pgd_linf(victim, torch.from_numpy(xb), torch.from_numpy(yb), seed=args.seed + i).numpy()
        secs["attack"] += time.perf_counter() - t0
        for name, inp in (("clean", xb), ("pgd", adv)):
            correct[name] += int((pur.classify(inp) == yb).sum())
            t0 = time.perf_counter()
            _, pred, st = pur.purify_and_classify(inp, timings=True)
            secs["purify"] += time.perf_counter() - t0
            for k, v in st.seconds.items():
                stage_s[k] += v
            correct[name + "_purified"] += int((pred == yb).sum())
    n = args.n
    acc = {k: 100.0 * v / n for k, v in correct.items()}
    print(f"\nZeroPur on {args.model}, {n} CIFAR-10 test images, PGD-Linf 8/255 (step 2/255, 20 steps, random start) "
          f"on the bare classifier; purification by zeropur-rt ({args.backend}, "
          f"{'numpy-twin' if hasattr(pur.kernels, '__name__') else 'host C library'} kernels)")
    print("| input | bare classifier | purified |\n|---|---|---|")
    print(f"| clean | {acc['clean']:.1f}% | {acc['clean_purified']:.1f}% |")
    print(f"| PGD-20 | {acc['pgd']:.1f}% | {acc['pgd_purified']:.1f}% |")
    per_img = secs["purify"] / (2 * n)
    print(f"\nattack {secs['attack']:.1f} s; purification {secs['purify']:.1f} s = {per_img:.3f} s/image")
    total = sum(stage_s.values()) or 1.0
    print("stages: " + ", ".join(f"{k} {100 * stage_s[k] / total:.1f}%" for k in STAGES if k in stage_s))
    return 0
