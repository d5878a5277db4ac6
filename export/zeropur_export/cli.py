"""``zeropur-export``: every build-time command (needs torch).

    zeropur-export export resnet20 --out artifacts/resnet20      # the victim's ZeroPur graphs + manifest
    zeropur-export suggest-taps --victim net.py:make --input-shape 3,32,32   # taps of your own classifier
    zeropur-export export --victim net.py:make --weights w.pt --mean .. --std .. --input-shape .. --num-classes .. --out DIR
    zeropur-export build-engines artifacts/resnet20              # TensorRT engines next to them
    zeropur-export calibrate --model resnet20                    # a per-victim recipe
    zeropur-export demo --model resnet20 --n 64                  # PGD, then purification, on real images
    zeropur-export bench --model resnet20 --batch 1 32           # latency, cost model, steps sweep
    zeropur-export eval --models resnet20 --n 200                # robust accuracy under ART attacks
    zeropur-export fetch                                         # weights + CIFAR-10 test set into the user cache

Data and weights are looked up in: the command's flag, the environment variable, ../shared, the user cache
(zeropur_rt/sources.py). ``--download`` on any command, or ``fetch`` once, fills the cache from the
official sources, hash-checked.

``zeropur-export COMMAND -h`` lists a command's options. The deploy-time CLI is ``zeropur-rt``.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from typing import Sequence

from zeropur_rt import sources

# The command table: name -> ("module:entry", one-line help). Each command's module holds its parser beside its
# entry and is imported only when asked for (calibrate's may be absent from a partial install; its ImportError then
# reaches the user as a one-line error); only ``fetch`` runs without torch.
COMMANDS = {
    "export": ("zeropur_export.graphs.cli:main", "export a zoo victim's ZeroPur graphs into an artifact directory"),
    "fetch": ("zeropur_export.fetch:main", "download the weights and the CIFAR-10 test set (hash-checked)"),
    "build-engines": ("zeropur_export.engines.cli:main_build_engines", "build TensorRT engines for an artifact directory"),
    "check": ("zeropur_export.engines.cli:main_check",
              "Polygraphy: inspect every graph, compare ONNX Runtime / TensorRT outputs"),
    "calibrate": ("zeropur_export.calibrate.cli:main", "search a per-victim recipe on calibration rows"),
    "suggest-taps": ("zeropur_export.victims.cli:main_suggest_taps", "trace your classifier once and propose its taps"),
    "demo": ("zeropur_export.bench.demo:main", "PGD on the bare classifier, then purification: accuracy and time"),
    "bench": ("zeropur_export.bench.cli:main", "latency per backend and batch, cost model, steps sweep"),
    "eval": ("zeropur_export.evaluate.cli:main", "robust accuracy with and without ZeroPur, attacks from ART"),
}
TORCH_FREE = ("fetch",)


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="zeropur-export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for name, (_, helptext) in COMMANDS.items():
        # no options here: the command's own parser reads the rest of the line (its -h included)
        sub.add_parser(name, help=helptext, add_help=False)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = make_parser().parse_known_args(sys.argv[1:] if argv is None else list(argv))
    if args.cmd not in TORCH_FREE and importlib.util.find_spec("torch") is None:
        print(f"zeropur-export {args.cmd}: error: build-time commands need torch; install them with "
              "pip install 'zeropur-rt[export]' (deploy-only installs run zeropur-rt, and zeropur-export fetch)",
              file=sys.stderr)
        return 2
    if "--download" in rest:
        sources.allow_download()  # every lookup of this run may fill the cache
    try:
        module, func = COMMANDS[args.cmd][0].split(":")
        return int(getattr(importlib.import_module(module), func)(rest) or 0)
    except (ValueError, ImportError, OSError, RuntimeError) as e:  # ArtifactError is a ValueError
        print(f"zeropur-export {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
