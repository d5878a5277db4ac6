"""``zeropur-rt``: purify / classify / info over an artifact directory, plus the demo, bench, eval and calibrate jobs."""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from zeropur_rt.files import atomic_write_bytes
from zeropur_rt.manifest import ArtifactError, load_manifest


# Jobs with their own argument parsers, imported only when asked for.
JOBS = {"demo": "zeropur_rt.demo", "bench": "benchmarks.bench", "eval": "benchmarks.evaluate",
        "calibrate": "benchmarks.calibrate"}


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact_dir", help="directory written by zeropur-export")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch", "tensorrt"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--ort-provider", choices=["cuda", "tensorrt"], default=None,
                   help="with --backend onnxruntime --device cuda: its CUDA (default) or TensorRT execution provider")
    p.add_argument("--kernels", default="auto", choices=["auto", "host", "numpy"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="images per call (default: the artifact's opt batch)")
    p.add_argument("--host-loop", action="store_true",
                   help="on a GPU, run the loop from the host (gradients copied back every step) instead of on the device")
    p.add_argument("--no-cuda-graph", action="store_true", help="on a GPU, launch the device loop eagerly (no CUDA graph)")


def _device_loop(pur, args: argparse.Namespace):
    """The device-resident loop for GPU backends (CUDA kernels on the engine's stream), else None."""
    if args.host_loop or not str(args.device).startswith("cuda"):
        return None
    if args.backend == "torch":
        from zeropur_rt.backend_torch_cuda import TorchCudaLoop
        return TorchCudaLoop(pur, cuda_graph=not args.no_cuda_graph)
    if args.backend == "tensorrt":
        from zeropur_rt.backend_trt import TensorRTLoop
        return TensorRTLoop(pur, cuda_graph=not args.no_cuda_graph)
    return None


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def _cmd_purify(args: argparse.Namespace, purify: bool) -> int:
    from zeropur_rt.images import read_images
    from zeropur_rt.purifier import Purifier

    extra = {"provider": args.ort_provider} if args.ort_provider else {}
    pur = Purifier.load(args.artifact_dir, args.backend, args.device, args.kernels, args.threads, **extra)
    x, y, names = read_images(args.input, tuple(pur.chw[1:]))
    size = args.batch or int(pur.manifest.batch.get("opt", pur.max_batch))
    size = min(size, pur.max_batch)
    loop = _device_loop(pur, args) if purify else None
    outs, preds = [], []
    t0 = time.perf_counter()
    for sl in _progress(list(_batches(len(x), size)), "purify" if purify else "classify"):
        if purify:
            xo, p = (loop or pur).purify_and_classify(x[sl])
            outs.append(xo)
        else:
            p = pur.classify(x[sl])
        preds.append(p)
    secs = time.perf_counter() - t0
    if loop is not None:
        loop.close()
    pred = np.concatenate(preds)
    where = f"{args.backend} on {args.device}" + (" (device loop)" if loop is not None else "")
    print(f"{len(x)} images, {secs:.2f} s ({secs / len(x):.4f} s/image), {where}")
    if y is not None:
        print(f"accuracy: {100 * float((pred == y).mean()):.2f}%")
    if args.out:
        import io
        buf = io.BytesIO()
        payload = dict(pred=pred, names=np.array(names))
        if purify:
            payload["x_purified"] = np.concatenate(outs)
        if y is not None:
            payload["y"] = y
        np.savez_compressed(buf, **payload)
        atomic_write_bytes(args.out, buf.getvalue())
        print(f"wrote {args.out}")
    elif not purify or len(x) <= 20:
        for n, p in zip(names, pred):
            print(f"{n}\t{int(p)}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    m = load_manifest(args.artifact_dir)
    print(json.dumps({k: v for k, v in m.to_dict().items() if k != "files"}, indent=2))
    print(f"files verified: {len(m.files)} (sha256 ok)")
    return 0


def _progress(items, desc: str):
    try:
        from tqdm import tqdm
        return tqdm(items, desc=desc, leave=False, disable=len(items) < 2)
    except ImportError:
        return items


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="zeropur-rt", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, helptext in (("purify", "purify images, write purified .npz + predictions"),
                           ("classify", "classify images without purification")):
        p = sub.add_parser(name, help=helptext)
        _add_runtime_args(p)
        p.add_argument("input", help=".npz with 'x' (uint8 NHWC or float NCHW) and optional 'y', or a folder of PNG/JPEG")
        p.add_argument("--out", default=None, help="output .npz (x_purified, pred, names[, y])")
    p = sub.add_parser("info", help="print and verify an artifact directory's manifest")
    p.add_argument("artifact_dir")
    for name in JOBS:
        sub.add_parser(name, help=f"see `zeropur-rt {name} -h`", add_help=False)
    args, rest = ap.parse_known_args(argv)
    try:
        if args.cmd in ("purify", "classify"):
            if rest:
                ap.error(f"unrecognised arguments: {' '.join(rest)}")
            return _cmd_purify(args, args.cmd == "purify")
        if args.cmd == "info":
            return _cmd_info(args)
        import importlib
        return int(importlib.import_module(JOBS[args.cmd]).main(rest) or 0)
    except (ArtifactError, ValueError, FileNotFoundError, ImportError) as e:
        print(f"zeropur-rt {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
