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
import time
from pathlib import Path
from typing import Sequence

from zeropur_rt import sources
from zeropur_rt.files import sha256_file

# Commands whose module keeps its own parser: "module:function", imported only when asked for (calibrate's
# module may be absent from a partial install; its ImportError then reaches the user as a one-line error).
DELEGATED = {
    "build-engines": ("zeropur_export.engines:main_build_engines", "build TensorRT engines for an artifact directory"),
    "check": ("zeropur_export.check:main", "Polygraphy: inspect every graph, compare ONNX Runtime / TensorRT outputs"),
    "calibrate": ("zeropur_export.calibrate.cli:main", "search a per-victim recipe on calibration rows"),
    "suggest-taps": ("zeropur_export.victim_cli:main_suggest_taps", "trace your classifier once and propose its taps"),
    "demo": ("zeropur_export.demo:main", "PGD on the bare classifier, then purification: accuracy and time"),
    "bench": ("zeropur_export.bench:main", "latency per backend and batch, cost model, steps sweep"),
    "eval": ("zeropur_export.evaluate:main", "robust accuracy with and without ZeroPur, attacks from ART"),
}


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="zoo architecture (e.g. resnet20, resnet56, preact_resnet18, wrn28_10, "
                   "resnet50, vgg19_bn); or --victim for your own classifier")
    p.add_argument("--out", required=True, help="artifact directory to create")
    p.add_argument("--weights", help="weights file (state_dict); default: the known pretrained file")
    p.add_argument("--weights-sha256", help="expected sha256 of --weights (refuse the file if it differs)")
    p.add_argument("--weights-dir", help="where to look for known pretrained weight files")
    p.add_argument("--random-init", action="store_true", help="seeded random weights (tests, benchmarks)")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-init")
    p.add_argument("--preset", help="config preset (default: the model's own: cifar10 or imagenet)")
    p.add_argument("--config", help="calibrated config JSON (overrides the preset), e.g. a shipped recipe")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config fields, e.g. eps=8/255 ila_normalized=true")
    p.add_argument("--min-batch", type=int, default=1, help="smallest batch the graphs accept (default 1)")
    p.add_argument("--opt-batch", type=int, default=32, help="the batch TensorRT engines are tuned for (default 32)")
    p.add_argument("--max-batch", type=int, default=256, help="largest batch the graphs accept (default 256)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    p.add_argument("--force", action="store_true", help="replace an existing artifact directory")
    p.add_argument("--verbose", action="store_true", help="log each graph as it is traced and checked")
    from zeropur_export.victim_cli import add_victim_args
    add_victim_args(p, weights=False)  # --weights above serves both


def run_export(args: argparse.Namespace) -> Path:
    from zeropur_export.build import build_config
    from zeropur_export.onnx_export import DEFAULT_OPSET, BatchRange, export_artifacts
    from zeropur_export.weights import KNOWN_WEIGHTS, find_weights, verify_sha256
    from zeropur_export.zoo import ZOO, load_victim, zoo_names

    if args.victim or args.model is None:
        return run_export_victim(args)
    from zeropur_export.victim_cli import own_flags
    if own_flags(args):
        raise ValueError(f"{', '.join(own_flags(args))} describe your own classifier (--victim FILE.py:FACTORY); "
                         f"the zoo's {args.model} declares its own contract and taps")
    if args.model not in ZOO:
        raise ValueError(f"unknown architecture {args.model!r}; valid: {', '.join(zoo_names())}")
    out = Path(args.out)
    if out.exists() and not args.force:  # fail before the (slow) model load and trace
        raise FileExistsError(f"artifact directory {out} already exists; pass --force to replace it")
    batch = BatchRange(args.min_batch, args.opt_batch, args.max_batch)
    cfg, calibration = build_config(args.preset or ZOO[args.model][2], args.config, args.set)
    if args.weights and args.random_init:
        raise ValueError("--weights and --random-init are exclusive")
    weights_sha = None
    if args.weights:
        w = Path(args.weights)
        if not w.is_file():
            raise FileNotFoundError(f"weights file {w} not found")
        if args.weights_sha256:
            verify_sha256(w, args.weights_sha256.lower())
        weights_sha = sha256_file(w)
        victim = load_victim(args.model, weights=str(w))
    elif args.random_init:
        victim = load_victim(args.model, random_init=True, seed=args.seed)
    else:
        if args.model not in KNOWN_WEIGHTS:
            raise ValueError(f"{args.model} has no known pretrained weights: pass --weights FILE "
                             "(or --random-init for tests)")
        w = find_weights(args.model, args.weights_dir)  # verifies the known sha256
        weights_sha = sha256_file(w)
        victim = load_victim(args.model, weights=str(w))
    t = time.perf_counter()
    path = export_artifacts(victim, cfg, out, batch=batch, force=args.force, weights_sha256=weights_sha,
                            model=args.model, opset=args.opset or DEFAULT_OPSET, calibration=calibration,
                            verbose=args.verbose, log=lambda s: print(f"  {s}", file=sys.stderr))
    print(f"wrote {path} in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    return path


def run_export_victim(args: argparse.Namespace) -> Path:
    """``export --victim SPEC``: a zoo name or your own classifier (its taps and weights recorded in the manifest)."""
    from zeropur_export.build import build_config
    from zeropur_export.onnx_export import DEFAULT_OPSET, BatchRange, export_artifacts
    from zeropur_export.victim_cli import preset_name, resolve_victim
    from zeropur_export.weights import verify_sha256

    if args.model and args.victim:
        raise ValueError(f"pass the victim once: the positional {args.model!r} or --victim {args.victim!r}")
    out = Path(args.out)
    if out.exists() and not args.force:
        raise FileExistsError(f"artifact directory {out} already exists; pass --force to replace it")
    if args.weights and args.random_init:
        raise ValueError("--weights and --random-init are exclusive")
    if args.weights and args.weights_sha256:
        verify_sha256(Path(args.weights), args.weights_sha256.lower())
    batch = BatchRange(args.min_batch, args.opt_batch, args.max_batch)
    rv = resolve_victim(args, random_init=args.random_init, seed=args.seed)
    if rv.weights_sha256 is None and not args.random_init:
        print(f"warning: no --weights: exporting {rv.name}'s own parameters as its factory left them (random unless it "
              "loads trained ones); the manifest records no weights file. Pass --weights FILE, or --random-init to "
              "say random weights are meant", file=sys.stderr)
    shape = rv.victim.spec.input_shape
    cfg, calibration = build_config(args.preset or preset_name(rv), args.config, args.set, input_shape=shape)
    t = time.perf_counter()
    path = export_artifacts(rv.victim, cfg, out, batch=batch, force=args.force, weights_sha256=rv.weights_sha256,
                            model=rv.name, opset=args.opset or DEFAULT_OPSET, calibration=calibration,
                            taps_source=rv.taps_source, verbose=args.verbose,
                            log=lambda s: print(f"  {s}", file=sys.stderr))
    print(f"wrote {path} in {time.perf_counter() - t:.1f}s (taps: {rv.taps_source})", file=sys.stderr)
    return path


def add_fetch_args(p: argparse.ArgumentParser) -> None:
    names = sorted(sources.table())
    p.add_argument("--models", dest="models", nargs="+", help=argparse.SUPPRESS)  # the plural spelling, also taken
    p.add_argument("--model", dest="models", nargs="+", default=None, metavar="MODEL",
                   help=f"weights to fetch (default: all of {', '.join(n for n in names if n != 'cifar10')})")
    p.add_argument("--data-only", action="store_true", help="fetch only the CIFAR-10 test set")
    p.add_argument("--weights-only", action="store_true", help="fetch only the weights")
    p.add_argument("--pngs", default=None, metavar="DIR", help="also write the first --n test images as PNG files "
                   "in one folder per class (a folder zeropur-rt purify / classify reads; needs Pillow)")
    p.add_argument("--n", type=int, default=16, help="images written by --pngs (default 16)")


def run_fetch(args: argparse.Namespace) -> None:
    """Every named source into the user cache (or found where it already is), then the PNG sample."""
    table = sources.table()
    weights = args.models or [n for n, s in table.items() if s.kind == "weights"]
    names = ([] if args.weights_only else ["cifar10"]) + ([] if args.data_only else weights)
    for name, path in zip(names, sources.fetch(names)):
        print(f"{name}: {sources.describe_data(path) if name == 'cifar10' else path.name}\n  at {path}")
    if args.pngs:
        from zeropur_rt.data import load_cifar10_test
        from zeropur_rt.images import write_class_folders
        x, y = load_cifar10_test(None, 0, args.n)
        print(f"wrote {write_class_folders(args.pngs, x, y)} ({args.n} PNG images, one folder per class)")
    print(f"cache: {sources.cache_dir()} (${sources.CACHE_ENV} moves it)")


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="zeropur-export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    add_export_args(sub.add_parser("export", help="export a zoo victim's ZeroPur graphs into an artifact directory",
                                   description="Export a zoo victim's ZeroPur graphs into an artifact directory."))
    add_fetch_args(sub.add_parser("fetch", help="download the weights and the CIFAR-10 test set (hash-checked)",
                                  description="Download the zoo weights and the CIFAR-10 test set from their official "
                                  "sources (or $ZEROPUR_MIRROR) into the user cache, hash-checked. Needs no torch."))
    for name, (_, helptext) in DELEGATED.items():
        # no options here: the command's own parser reads the rest of the line (its -h included)
        sub.add_parser(name, help=helptext, add_help=False)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = make_parser()
    args, rest = ap.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    if args.cmd in ("export", "fetch") and rest:
        ap.error(f"unrecognised arguments: {' '.join(rest)}")
    if args.cmd != "fetch" and importlib.util.find_spec("torch") is None:
        print(f"zeropur-export {args.cmd}: error: build-time commands need torch; install them with "
              "pip install 'zeropur-rt[export]' (deploy-only installs run zeropur-rt, and zeropur-export fetch)",
              file=sys.stderr)
        return 2
    if getattr(args, "download", False) or "--download" in rest:
        sources.allow_download()  # every lookup of this run may fill the cache
    try:
        if args.cmd == "fetch":
            run_fetch(args)
            return 0
        if args.cmd == "export":
            run_export(args)
            return 0
        module, func = DELEGATED[args.cmd][0].split(":")
        return int(getattr(importlib.import_module(module), func)(rest) or 0)
    except (ValueError, ImportError, OSError, RuntimeError) as e:  # ArtifactError is a ValueError
        print(f"zeropur-export {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
