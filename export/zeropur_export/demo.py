"""The reference demo: attack the bare classifier with PGD, purify with the torch reference, report.

``zeropur-demo --model resnet20 --n 64``. The runtime's CLI (`zeropur-rt demo`) does the same
through the exported graphs; this one is the oracle and the issue-2 cross-check.
"""
from __future__ import annotations

import argparse
import time

import torch

from zeropur_export.attacks import pgd_linf
from zeropur_export.reference import ReferencePurifier
from zeropur_export.zoo import load_victim
from zeropur_rt.config import preset
from zeropur_rt.data import load_cifar10_test, to_nchw_float
from zeropur_rt.files import atomic_write_json


def _progress(it, total: int, desc: str):
    try:
        from tqdm import tqdm
        return tqdm(it, total=total, desc=desc, leave=False)
    except ImportError:
        return it


def run_demo(model: str, n: int, batch: int, seed: int, data: str | None, ap_mode: str = "lean",
             start: int = 0) -> dict:
    torch.manual_seed(seed)
    victim = load_victim(model)
    cfg = preset("cifar10")
    pur = ReferencePurifier(victim, cfg, ap_mode=ap_mode)  # type: ignore[arg-type]
    xs, ys = load_cifar10_test(data, start, start + n)
    counts = dict(clean=0, clean_purified=0, pgd=0, pgd_purified=0)
    t = dict(attack=0.0, purify=0.0)
    for b in _progress(range(0, n, batch), (n + batch - 1) // batch, f"{model}"):
        x = torch.from_numpy(to_nchw_float(xs[b:b + batch]))
        y = torch.from_numpy(ys[b:b + batch])
        t0 = time.perf_counter()
        adv = pgd_linf(victim, x, y, seed=seed + b)
        t1 = time.perf_counter()
        xp, advp = pur.purify(x), pur.purify(adv)
        t["attack"] += t1 - t0
        t["purify"] += time.perf_counter() - t1
        for k, v in (("clean", x), ("clean_purified", xp), ("pgd", adv), ("pgd_purified", advp)):
            counts[k] += int((pur.classify(v) == y).sum())
    return dict(model=model, n=n, seed=seed, rows=[start, start + n], config=cfg.to_dict(), ap_mode=ap_mode,
                accuracy={k: 100.0 * v / n for k, v in counts.items()},
                seconds=dict(attack=t["attack"], purify=t["purify"], purify_per_image=t["purify"] / (2 * n)))


def format_table(results: list[dict]) -> str:
    lines = ["| model | n | clean | clean, purified | PGD-20 | PGD-20, purified | purify s/img |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        a = r["accuracy"]
        lines.append(f"| {r['model']} | {r['n']} | {a['clean']:.1f}% | {a['clean_purified']:.1f}% | {a['pgd']:.1f}% | "
                     f"{a['pgd_purified']:.1f}% | {r['seconds']['purify_per_image']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", default=["resnet20"], choices=["resnet20", "resnet32", "resnet56"])
    ap.add_argument("--n", type=int, default=64, help="number of test images (rows 0..n-1)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", default=None, help="path of cifar10_test.npz (default: <shared>/data)")
    ap.add_argument("--ap-mode", default="lean", choices=["lean", "recompute"])
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.n <= 0 or args.batch <= 0:
        ap.error("--n and --batch must be positive")
    torch.set_num_threads(args.threads)
    results = [run_demo(m, args.n, args.batch, args.seed, args.data, args.ap_mode) for m in args.model]
    print(format_table(results))
    if args.json:
        atomic_write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
