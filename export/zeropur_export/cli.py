"""``zeropur-export MODEL --out DIR``: export a zoo victim's ZeroPur graphs into an artifact directory."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence

from zeropur_rt.config import ZeroPurConfig, preset
from zeropur_rt.files import sha256_file


def _parse_value(raw: str, default: Any) -> Any:
    if isinstance(default, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {raw!r}")
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(Fraction(raw)) if "/" in raw else float(raw)
    return raw


def build_config(preset_name: str, config_file: str | None, sets: Sequence[str]) -> tuple[ZeroPurConfig, dict | None]:
    """Preset, then a calibrated config file (bare config or {"config": ..., "calibration": ...}), then --set."""
    cfg = preset(preset_name)
    calibration = None
    if config_file:
        try:
            raw = json.loads(Path(config_file).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read config file {config_file}: {e}") from e
        if not isinstance(raw, dict):
            raise ValueError(f"{config_file} must hold a JSON object")
        # provenance in the manifest: the calibration record if the file has one, else the file itself
        calibration = raw.get("calibration") or {"config_file": Path(config_file).name,
                                                 "sha256": sha256_file(config_file)}
        cfg = ZeroPurConfig.from_dict({**cfg.to_dict(), **raw.get("config", raw if "calibration" not in raw else {})})
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    overrides: dict[str, Any] = {}
    for kv in sets:
        if "=" not in kv:
            raise ValueError(f"--set expects key=value, got {kv!r}")
        k, v = kv.split("=", 1)
        if k not in fields:
            raise ValueError(f"unknown config field {k!r}; valid fields: {', '.join(sorted(fields))}")
        try:
            overrides[k] = _parse_value(v, fields[k])
        except (ValueError, ZeroDivisionError) as e:
            raise ValueError(f"--set {kv}: {e}") from e
    return (cfg.replace(**overrides) if overrides else cfg), calibration


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zeropur-export", description=__doc__,
                                epilog="TensorRT engines: zeropur-export build-engines ARTIFACT_DIR [--precision fp32|fp16] "
                                       "(see zeropur-export build-engines -h)")
    p.add_argument("model", help="zoo architecture (e.g. resnet20, resnet56, preact_resnet18, wrn28_10, resnet50, vgg19_bn)")
    p.add_argument("--out", required=True, help="artifact directory to create")
    p.add_argument("--weights", help="weights file (state_dict); default: the known pretrained file")
    p.add_argument("--weights-sha256", help="expected sha256 of --weights (refuse the file if it differs)")
    p.add_argument("--weights-dir", help="where to look for known pretrained weight files")
    p.add_argument("--random-init", action="store_true", help="seeded random weights (tests, benchmarks)")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-init")
    p.add_argument("--preset", help="config preset (default: the model's own: cifar10 or imagenet)")
    p.add_argument("--config", help="calibrated config JSON (overrides the preset)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config field")
    p.add_argument("--min-batch", type=int, default=1)
    p.add_argument("--opt-batch", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    p.add_argument("--force", action="store_true", help="replace an existing artifact directory")
    p.add_argument("--verbose", action="store_true")
    return p


def run(args: argparse.Namespace) -> Path:
    from zeropur_export.onnx_export import DEFAULT_OPSET, BatchRange, export_artifacts
    from zeropur_export.weights import KNOWN_WEIGHTS, find_weights, verify_sha256
    from zeropur_export.zoo import ZOO, load_victim, zoo_names

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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["build-engines"]:
        from zeropur_export.engines import main_build_engines
        return main_build_engines(argv[1:])
    args = make_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, OSError, RuntimeError) as e:
        print(f"zeropur-export: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
