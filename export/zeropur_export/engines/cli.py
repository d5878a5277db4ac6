"""``zeropur-export build-engines DIR`` and ``zeropur-export check DIR``: their parsers and entries. The work is in
``builder`` (TensorRT engines) and ``check`` (Polygraphy)."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from zeropur_export.engines.builder import build_engines, dry_run
from zeropur_export.engines.check import check_artifact
from zeropur_rt.cuda_driver import CudaError
from zeropur_rt.engine_record import PRECISIONS


def make_build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zeropur-export build-engines",
                                description="Build TensorRT engines for an artifact directory on this GPU.")
    p.add_argument("artifact_dir", help="artifact directory written by `zeropur-export export MODEL --out DIR`")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32 (parity with the reference; TF32 off) or fp16 (an FP16 copy of the ONNX graphs, "
                        "convolutions and matmuls in float16, on a strongly typed network; TensorRT 10 and 11)")
    p.add_argument("--timing-cache", help="timing cache file (default: timing_cache.smXX.trtX.Y.bin in the artifact dir)")
    p.add_argument("--workspace-mb", type=int, help="builder workspace limit in MiB (default: TensorRT's, the device memory)")
    p.add_argument("--opt-level", type=int, choices=range(0, 6), metavar="0-5", help="builder optimisation level (default 3)")
    p.add_argument("--device", type=int, default=0, help="CUDA device ordinal")
    p.add_argument("--force", action="store_true", help="rebuild even if up-to-date engines are recorded")
    p.add_argument("--verbose", action="store_true", help="print TensorRT's info/warning messages")
    p.add_argument("--dry-run", action="store_true",
                   help="print the build plan (engine files, precision recipe, optimisation profiles) and build nothing")
    p.add_argument("--trt-version", help="with --dry-run: plan for this TensorRT version (default: the installed one)")
    p.add_argument("--compute-capability", help="with --dry-run: plan for this GPU, e.g. 8.7 (default: device 0's)")
    return p


def main_build_engines(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``zeropur-export build-engines DIR [--precision fp32|fp16] ...``; returns the exit code."""
    args = make_build_parser().parse_args(argv)
    try:
        if args.dry_run:
            dry_run(args.artifact_dir, precision=args.precision, trt_version=args.trt_version,
                    compute_capability=args.compute_capability)
            return 0
        build_engines(args.artifact_dir, precision=args.precision, timing_cache=args.timing_cache,
                      workspace_mb=args.workspace_mb, opt_level=args.opt_level, device=args.device, force=args.force,
                      verbose=args.verbose, log=lambda s: print(s, file=sys.stderr))
    except ImportError as e:
        print(f"zeropur-export build-engines: error: {e}", file=sys.stderr)
        return 3
    except (ValueError, OSError, RuntimeError, CudaError) as e:
        print(f"zeropur-export build-engines: error: {e}", file=sys.stderr)
        return 2
    return 0


def make_check_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zeropur-export check",
                                description="Polygraphy over an artifact directory: inspect every graph, compare "
                                            "ONNX Runtime (and TensorRT, where installed) with the runtime's outputs.")
    p.add_argument("artifact_dir", help="artifact directory written by `zeropur-export export MODEL --out DIR`")
    p.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance, runtime vs Polygraphy's ONNX Runtime")
    p.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance, runtime vs Polygraphy's ONNX Runtime")
    p.add_argument("--error-stat", default="elemwise", choices=("elemwise", "max", "mean", "median"),
                   help="which error Polygraphy holds to the tolerances (ONNX Runtime step)")
    p.add_argument("--trt", default="auto", choices=("auto", "on", "off"),
                   help="build engines and compare TensorRT with ONNX Runtime: auto = where tensorrt imports")
    p.add_argument("--trt-rtol", type=float, default=1e-3, help="relative tolerance, TensorRT vs ONNX Runtime")
    p.add_argument("--trt-atol", type=float, default=1e-5, help="absolute tolerance, TensorRT vs ONNX Runtime")
    p.add_argument("--trt-error-stat", default="median", choices=("elemwise", "max", "mean", "median"),
                   help="which error is held to the TensorRT tolerances (default median: another summation order "
                        "flips isolated ReLU masks in the gradient graphs)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads of the runtime's session")
    return p


def main_check(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``zeropur-export check DIR``; returns the exit code."""
    args = make_check_parser().parse_args(argv)
    try:
        rows = check_artifact(args.artifact_dir, rtol=args.rtol, atol=args.atol, stat=args.error_stat, trt=args.trt,
                              trt_rtol=args.trt_rtol, trt_atol=args.trt_atol, trt_stat=args.trt_error_stat,
                              threads=args.threads)
    except (ImportError, ValueError, OSError, RuntimeError) as e:
        print(f"zeropur-export check: error: {e}", file=sys.stderr)
        return 2
    failed = [r for r in rows if r.ok is False]
    print(f"{len(rows) - len(failed)}/{len(rows)} checks passed or skipped" + (f", {len(failed)} FAILED" if failed else ""))
    return 1 if failed else 0
