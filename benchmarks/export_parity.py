"""Export parity table: ONNX Runtime float32 vs torch float32, both against the float64 torch reference.

    python benchmarks/export_parity.py                       # all zoo architectures (minutes)
    python benchmarks/export_parity.py resnet20 vgg19_bn     # a subset
    python benchmarks/export_parity.py --artifacts DIR ...   # reuse/keep exports in DIR/<model>

Error = ||a - truth|| / ||truth||, truth = the reference in float64. A row passes when the ORT
error is <= 2x the float32 spread (torch float32 with and without oneDNN) + a float32 floor and <= 1e-3, or every
sample is but as many ReLU-mask flips as torch's second float32 order takes, each within 2x its worst
(``ParityRow.ok``); batch 1 is 8 single-image calls judged together. Real weights for resnet20/56 (from
the shared folder), seeded random weights otherwise; CIFAR-10 test images where available.

This is where WRN-28-10 and ResNet-50 are judged at full size (about 10 minutes on 2 cores); CI's
tests/export/test_export.py runs the same architectures reduced (WRN-16-2; ResNet-50 with two blocks per stage
at 64x64): the same blocks, shortcuts and pooling, hence the same lowerings.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from zeropur_export.graphs.onnx_export import BatchRange, export_artifacts  # noqa: E402
from zeropur_export.graphs.parity import OrtGraphs, format_table, parity, well_conditioned  # noqa: E402
from zeropur_export.victims.weights import KNOWN_WEIGHTS  # noqa: E402
from zeropur_export.victims.zoo import ZOO, load_victim  # noqa: E402
from zeropur_rt.config import preset  # noqa: E402
from zeropur_export.data import cifar10_test_path, load_cifar10_test, to_nchw_float  # noqa: E402
from zeropur_rt.manifest import load_manifest  # noqa: E402

DEFAULT = ("resnet20", "resnet56", "preact_resnet18", "vgg19_bn", "wrn28_10", "resnet50")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", default=list(DEFAULT))
    p.add_argument("--artifacts", help="directory for the exports (default: a temp dir)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = Path(args.artifacts) if args.artifacts else Path(tempfile.mkdtemp(prefix="zeropur-parity-"))
    cifar = to_nchw_float(load_cifar10_test(stop=32)[0]) if cifar10_test_path().is_file() else None
    rows = []
    for name in args.models:
        if name not in ZOO:
            print(f"unknown architecture {name}", file=sys.stderr)
            return 2
        try:
            v = load_victim(name) if name in KNOWN_WEIGHTS else load_victim(name, random_init=True)
        except FileNotFoundError:
            v = load_victim(name, random_init=True)
        if name == "vgg19_bn" and name not in KNOWN_WEIGHTS:
            v = well_conditioned(v)  # torch's default init collapses random VGG's embedding (cos ~ 1 - 5e-12)
        cfg = preset(ZOO[name][2])
        out = root / name
        try:
            load_manifest(out)
            print(f"{name}: reusing {out}", file=sys.stderr)
        except Exception:  # noqa: BLE001 - no valid artifact there: export
            t = time.perf_counter()
            export_artifacts(v, cfg, out, batch=BatchRange(1, 2, 64), force=True)
            print(f"{name}: exported in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        og = OrtGraphs(out, threads=args.threads)
        for b in (1, 32):  # the acceptance's sizes, for every architecture (ResNet-50 at 32: ~2 min)
            n = max(8, b)  # batch 1 as 8 single-image calls: one image alone is luck (see ParityRow.ok)
            x = torch.rand((n, *v.spec.input_shape), generator=torch.Generator().manual_seed(100 + b))
            rows += parity(v, cfg, og, x, "random", seed=b, graph_batch=b)
            if cifar is not None and v.spec.input_shape == (3, 32, 32):
                rows += parity(v, cfg, og, torch.from_numpy(cifar[:n]), "cifar10", seed=b, graph_batch=b)
    print(format_table(rows))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
