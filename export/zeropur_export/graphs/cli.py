"""``zeropur-export export``: a zoo victim's (or your own classifier's) ZeroPur graphs into an artifact directory.
The parser and the entry; the export itself is ``zeropur_export.graphs.onnx_export.export_artifacts``."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from zeropur_export.graphs.onnx_export import DEFAULT_OPSET, BatchRange, export_artifacts
from zeropur_export.recipes import build_config
from zeropur_export.victims.flags import add_victim_args, own_flags, preset_name, resolve_victim
from zeropur_export.victims.weights import KNOWN_WEIGHTS, find_weights, verify_sha256
from zeropur_export.victims.zoo import ZOO, load_victim, zoo_names
from zeropur_rt.files import sha256_file

DESCRIPTION = "Export a zoo victim's ZeroPur graphs into an artifact directory."


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
    add_victim_args(p, weights=False)  # --weights above serves both


def run_export(args: argparse.Namespace) -> Path:
    if args.victim or args.model is None:
        return run_export_victim(args)
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


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zeropur-export export", description=DESCRIPTION)
    add_export_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    run_export(make_parser().parse_args(argv))
    return 0
