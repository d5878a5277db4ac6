"""``zeropur-rt``: the deploy-time commands over an artifact directory: purify, classify, bench, info, triton-repo.

Build-time work (export, build-engines, calibrate, demo, bench, eval) is ``zeropur-export``'s.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from typing import TYPE_CHECKING, Iterator

import numpy as np

from zeropur_rt.config import parse_sets
from zeropur_rt.files import atomic_write_bytes
from zeropur_rt.errors import ZeroPurError
from zeropur_rt.manifest import load_manifest
from zeropur_rt.progress import progress

if TYPE_CHECKING:
    from zeropur_rt.pipeline import Purifier


def _add_session_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact_dir", help="directory written by zeropur-export")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt"])
    p.add_argument("--device", default=None, help="cpu (default for onnxruntime) or cuda[:N] (default for tensorrt)")
    p.add_argument("--ort-provider", choices=["cuda", "tensorrt"], default=None,
                   help="with --backend onnxruntime --device cuda: its CUDA (default) or TensorRT execution provider")
    p.add_argument("--kernels", default="auto", choices=["auto", "host", "numpy", "cuda"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--single-image", choices=["auto", "own", "worker"], default="auto",
                   help="with workers, the session a single image runs on: the faster one, measured on the first "
                   "single-image call (auto), the --threads-thread one (own) or a one-thread worker's (worker)")
    p.add_argument("--no-cuda-graph", action="store_true", help="on a GPU, launch the device loop eagerly (no CUDA graph)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="loop overrides (steps, eps, step sizes, sigma), e.g. --set gs_steps=5 eps=8/255")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of a randomised config's draws (--set random_start=true / blur_sigma_jitter=...)")


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    _add_session_args(p)
    p.add_argument("--workers", type=int, default=None, help="CPU: one-thread sessions each batch is split across "
                   "(default --threads; 1: one --threads-thread session for every batch)")
    p.add_argument("--batch", type=int, default=None, help="images per call (default: the artifact's opt batch)")


def _load(args: argparse.Namespace, workers: int | None) -> "Purifier":
    from zeropur_rt.pipeline import Purifier

    extra = {"provider": args.ort_provider} if args.ort_provider else {}
    return Purifier.load(args.artifact_dir, args.backend, args.device, args.kernels, args.threads,
                         overrides=parse_sets(args.set), cuda_graph=not args.no_cuda_graph, seed=args.seed,
                         workers=workers, single_image=args.single_image, **extra)


def _batches(n: int, size: int) -> Iterator[slice]:
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def _cmd_purify(args: argparse.Namespace, purify: bool) -> int:
    from zeropur_rt.images import read_images

    with _load(args, args.workers) as pur:
        x, y, names = read_images(args.input, tuple(pur.chw), args.resize, pur.manifest.num_classes)
        size = min(args.batch or int(pur.manifest.batch.get("opt", pur.max_batch)), pur.max_batch)
        outs, preds = [], []
        t0 = time.perf_counter()
        for sl in progress(list(_batches(len(x), size)), "purify" if purify else "classify"):
            if purify:
                xo, p = pur.purify_and_classify(x[sl])
                outs.append(xo)
            else:
                p = pur.classify(x[sl])
            preds.append(p)
        secs = time.perf_counter() - t0
        where = f"{args.backend} on {pur.runner.device} ({pur.workers} workers), {pur.kernels.name} kernels"
    pred = np.concatenate(preds)
    print(f"{len(x)} images, {secs:.2f} s ({secs / len(x):.4f} s/image), {where}")
    if y is not None:
        print(f"accuracy: {100 * float((pred == y).mean()):.2f}%")
    if args.out:
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


def _cmd_triton_repo(args: argparse.Namespace) -> int:
    from zeropur_rt.serving.repository import RepoOptions, write_repository
    o = RepoOptions(name=args.name, backend=args.backend, device=args.device, instances=args.instances,
                    threads=args.threads, max_queue_delay_us=args.max_queue_delay_us, preferred=args.preferred,
                    dynamic_batching=not args.no_dynamic_batching, classify_model=args.classify_model,
                    continuous_model=args.continuous_model, overrides=parse_sets(args.set))
    out = write_repository(args.artifact_dir, args.out, o, force=args.force)
    print(f"wrote {out}: " + ", ".join(sorted(d.name for d in out.iterdir() if (d / "config.pbtxt").is_file())))
    return 0


def _add_triton_repo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact_dir")
    p.add_argument("--out", required=True, help="model repository directory to create")
    p.add_argument("--name", default="zeropur", help="model name (the optional models get _classify / _continuous)")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt"],
                   help="onnxruntime: CPU instances; tensorrt: one instance per GPU")
    p.add_argument("--device", default=None, help="cpu, or cuda with onnxruntime-gpu (instances per GPU)")
    p.add_argument("--instances", type=int, default=None, help="CPU: instances (default: one per core); GPU: per GPU (1)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per instance (default: cores / instances)")
    p.add_argument("--max-queue-delay-us", type=int, default=2000, help="dynamic batcher's max queue delay")
    p.add_argument("--preferred", type=int, nargs="+", default=None, help="preferred batch sizes (default: opt, max)")
    p.add_argument("--no-dynamic-batching", action="store_true", help="one request per execute")
    p.add_argument("--classify-model", action="store_true", help="add NAME_classify: the victim's logits alone")
    p.add_argument("--continuous-model", action="store_true",
                   help="add NAME_continuous: continuous batching across loop steps (decoupled; gRPC streaming)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="loop overrides")
    p.add_argument("--force", action="store_true", help="replace an existing repository")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="zeropur-rt", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, helptext in (("purify", "purify images, write purified .npz + predictions"),
                           ("classify", "classify images without purification")):
        p = sub.add_parser(name, help=helptext)
        _add_runtime_args(p)
        p.add_argument("input", help=".npz with 'x' (uint8 NHWC or float NCHW) and optional 'y', a folder of images "
                       "(flat, or one subfolder per class), or a path,label CSV")
        p.add_argument("--resize", choices=["crop", "refuse"], default="refuse",
                       help="images of another size: refuse them (default), or scale to cover + centre crop")
        p.add_argument("--out", default=None, help="output .npz (x_purified, pred, names[, y])")
    from zeropur_rt import bench
    p = sub.add_parser("bench", help="purification latency per batch size and worker count",
                       description=(bench.__doc__ or "").splitlines()[0])
    _add_session_args(p)
    bench.add_args(p)
    p = sub.add_parser("info", help="print and verify an artifact directory's manifest")
    p.add_argument("artifact_dir")
    _add_triton_repo_args(sub.add_parser("triton-repo", help="write a Triton Inference Server model repository"))
    args = ap.parse_args(argv)
    try:
        if args.cmd == "info":
            return _cmd_info(args)
        if args.cmd == "triton-repo":
            return _cmd_triton_repo(args)
        if args.cmd == "bench":
            return bench.run(args, lambda workers: _load(args, workers))
        return _cmd_purify(args, args.cmd == "purify")
    except (ZeroPurError, ValueError, OSError, ImportError) as e:  # ArtifactError, OutputError, ...
        print(f"zeropur-rt {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
