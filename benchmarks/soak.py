"""Memory soak: many purify calls in a loop; resident memory must not grow after warm-up.

    python -m benchmarks.soak ARTIFACT_DIR --calls 1000 [--batch 4] [--set gs_steps=2 ap_steps=2]

Prints RSS after warm-up and at the end, and exits 1 when growth exceeds --max-growth (5%).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from zeropur_rt.config import parse_sets
from zeropur_rt.pipeline import Purifier


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact_dir")
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=["gs_steps=2", "ap_steps=2"], metavar="KEY=VALUE")
    ap.add_argument("--max-growth", type=float, default=0.05)
    args = ap.parse_args(argv)
    overrides = parse_sets(args.set)
    pur = Purifier.load(args.artifact_dir, threads=args.threads, overrides=overrides)
    rng = np.random.default_rng(0)
    x = rng.random((args.batch, *pur.chw), dtype=np.float32)
    for _ in range(args.warmup):
        pur.purify_and_classify(x)
    base = rss_mib()
    t = time.perf_counter()
    samples = []
    for i in range(args.calls):
        pur.purify_and_classify(x)
        if (i + 1) % max(1, args.calls // 10) == 0:
            samples.append(round(rss_mib(), 1))
    end = rss_mib()
    growth = (end - base) / base
    print(f"{args.calls} purify_and_classify calls (batch {args.batch}, {overrides}) in {time.perf_counter() - t:.1f} s; "
          f"RSS after {args.warmup} warm-up calls {base:.1f} MiB, at the end {end:.1f} MiB: growth {100 * growth:+.2f}% "
          f"(samples every 10%: {samples})")
    return 0 if growth <= args.max_growth else 1


if __name__ == "__main__":
    raise SystemExit(main())
