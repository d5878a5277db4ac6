"""Soak: many purify calls of mixed batch sizes; resident memory and open file descriptors must not grow
after warm-up.

    python -m benchmarks.soak ARTIFACT_DIR --calls 10000 --batches 1 2 3 4 5 8 [--set gs_steps=1 ap_steps=1] \\
        [--out runs/soak.json]

Batch sizes are drawn at random (seeded) from --batches; more sizes than the purifier caches (4) make it
free and re-allocate batch states all along, which is where a leak would show. RSS and the open-fd count
are sampled every --sample-every calls; growth is the last sample against the first sample after warm-up.
Exits 1 when either grows by more than --max-growth (5%).
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from zeropur_rt.config import parse_sets
from zeropur_rt.files import atomic_write_json
from zeropur_rt.pipeline import Purifier


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact_dir")
    ap.add_argument("--calls", type=int, default=10000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 3, 4, 5, 8])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", nargs="*", default=["gs_steps=1", "ap_steps=1"], metavar="KEY=VALUE")
    ap.add_argument("--sample-every", type=int, default=500)
    ap.add_argument("--max-growth", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON report")
    args = ap.parse_args(argv)
    overrides = parse_sets(args.set)
    pur = Purifier.load(args.artifact_dir, threads=args.threads, overrides=overrides)
    rng = np.random.default_rng(args.seed)
    pool = {b: rng.random((b, *pur.chw), dtype=np.float32) for b in args.batches}
    sizes = rng.choice(args.batches, size=args.warmup + args.calls)
    for b in sizes[:args.warmup]:
        pur.purify_and_classify(pool[int(b)])
    samples = [(0, round(rss_mib(), 2), open_fds())]
    t = time.perf_counter()
    for i, b in enumerate(sizes[args.warmup:], 1):
        pur.purify_and_classify(pool[int(b)])
        if i % args.sample_every == 0:
            samples.append((i, round(rss_mib(), 2), open_fds()))
    secs = time.perf_counter() - t
    pur.close()
    (_, rss0, fd0), (_, rss1, fd1) = samples[0], samples[-1]
    growth = {"rss": (rss1 - rss0) / rss0, "fds": (fd1 - fd0) / fd0}
    report = {"artifact": str(args.artifact_dir), "calls": args.calls, "warmup": args.warmup, "batches": args.batches,
              "overrides": overrides, "threads": args.threads, "seconds": round(secs, 1),
              "rss_mib_after_warmup": rss0, "rss_mib_end": rss1, "rss_mib_max": max(s[1] for s in samples),
              "fds_after_warmup": fd0, "fds_end": fd1, "fds_max": max(s[2] for s in samples),
              "growth": {k: round(v, 5) for k, v in growth.items()}, "samples_call_rss_fds": samples}
    print(f"{args.calls} purify_and_classify calls (batches {args.batches}, {overrides}) in {secs:.1f} s; after "
          f"{args.warmup} warm-up calls RSS {rss0:.1f} MiB, {fd0} fds; at the end RSS {rss1:.1f} MiB "
          f"({100 * growth['rss']:+.2f}%, max {report['rss_mib_max']:.1f}), {fd1} fds ({100 * growth['fds']:+.2f}%)")
    if args.out:
        atomic_write_json(args.out, report)
    return 0 if max(growth.values()) <= args.max_growth else 1


if __name__ == "__main__":
    raise SystemExit(main())
