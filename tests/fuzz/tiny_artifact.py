"""A tiny real victim (conv -> conv -> pool -> fc, 3x8x8 inputs), exported in seconds.

The fuzz, fault, concurrency and soak runs need a real artifact directory many times over; ResNet-20's
export takes most of a minute on a 2-core CPU, this one a few seconds. It runs every graph of the format
(classifier, gs_grad, ap_setup, ap_grad) through the same exporter and runtime as the zoo models.

    python tests/fuzz/tiny_artifact.py OUT_DIR [--force] [--max-batch 16]     # what the fault tests run (and kill)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

TINY_CONFIG = dict(gs_steps=2, ap_steps=2, blur_sigma=0.7)  # a short loop: these runs count calls, not accuracy


def tiny_victim(seed: int = 0):
    import torch
    from torch import nn

    from zeropur_export.victims.taps import TapSpec, make_victim

    torch.manual_seed(seed)
    net = nn.Sequential()
    net.add_module("conv1", nn.Conv2d(3, 4, 3, padding=1))
    net.add_module("relu1", nn.ReLU())
    net.add_module("conv2", nn.Conv2d(4, 4, 3, padding=1))
    net.add_module("relu2", nn.ReLU())
    net.add_module("pool", nn.AdaptiveAvgPool2d(1))
    net.add_module("flat", nn.Flatten())
    net.add_module("fc", nn.Linear(4, 10))
    spec = TapSpec(embedding="fc:in", ila=("relu2",), lpips=("relu1", "relu2"), mean=(0.5, 0.5, 0.5),
                   std=(0.25, 0.25, 0.25), input_shape=(3, 8, 8), num_classes=10)
    return make_victim(net, spec, name="tiny")


def export_tiny(out_dir: str | Path, force: bool = False, max_batch: int = 16) -> Path:
    from zeropur_export.graphs.onnx_export import export_artifacts
    from zeropur_rt.config import preset

    return export_artifacts(tiny_victim(), preset("cifar10", **TINY_CONFIG), out_dir, model="tiny",
                            batch=(1, 4, max_batch), force=force)


_SHARED: dict[str, Path] = {}


def shared_tiny(root: Path) -> Path:
    """One tiny export per process (every test module of a pytest run shares it); ``root``: where to put it."""
    if "dir" not in _SHARED or not (_SHARED["dir"] / "manifest.json").is_file():
        _SHARED["dir"] = export_tiny(Path(root) / "tiny", force=True)
    return _SHARED["dir"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--max-batch", type=int, default=16)
    args = ap.parse_args(argv)
    try:
        print(export_tiny(args.out, args.force, args.max_batch))
    except (ValueError, OSError, RuntimeError) as e:  # the exporter's own errors: one line, exit 2
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
