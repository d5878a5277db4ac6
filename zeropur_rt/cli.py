"""``zeropur-rt``: the deploy-time commands over an artifact directory (no torch needed).

    zeropur-rt purify artifacts/resnet20 images/ --out purified/     # PNG folder out (or --out x.npz)
    zeropur-rt classify artifacts/resnet20 images/                   # the bare classifier's labels
    zeropur-rt bench artifacts/resnet20 --batch 1 32                 # latency per batch size and worker count
    zeropur-rt info artifacts/resnet20                               # what the artifact holds, hashes verified
    zeropur-rt serve artifacts/resnet20                              # Triton on 127.0.0.1:8000 / :8001
    zeropur-rt query http://127.0.0.1:8000 images/                   # labels from a served purifier
    zeropur-rt triton-repo artifacts/resnet20 --out repo             # the model repository alone

Build-time work (fetch, export, build-engines, calibrate, demo, bench, eval) is ``zeropur-export``'s.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from zeropur_rt.config import parse_sets
from zeropur_rt.files import atomic_write_bytes
from zeropur_rt.errors import InputError, ZeroPurError
from zeropur_rt.manifest import load_manifest
from zeropur_rt.progress import progress

if TYPE_CHECKING:
    from zeropur_rt.pipeline import Purifier
    from zeropur_rt.serving.repository import RepoOptions


def _add_session_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact_dir", help="directory written by zeropur-export")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt"],
                   help="onnxruntime (default; CPU, or onnxruntime-gpu) or tensorrt (engines from build-engines, the "
                   "whole loop on the GPU)")
    p.add_argument("--device", default=None, help="cpu (default for onnxruntime) or cuda[:N] (default for tensorrt)")
    p.add_argument("--ort-provider", choices=["cuda", "tensorrt"], default=None,
                   help="with --backend onnxruntime --device cuda: its CUDA (default) or TensorRT execution provider")
    p.add_argument("--kernels", default="auto", choices=["auto", "host", "numpy", "cuda"],
                   help="update-step and blur kernels: the C host library, the numpy twin, CUDA; auto picks by device")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: every core)")
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
    from zeropur_rt.datasets import read_dataset

    _check_out(args, purify)
    if not Path(args.input).exists():
        raise InputError(f"{args.input}: no such file or directory (images: a file, a folder, an .npz or a CSV)")
    with _load(args, args.workers) as pur:
        images = read_dataset(args.input, pur.chw, resize=args.resize, labels=False, num_classes=pur.manifest.num_classes)
        x, y, names = images.x, images.y, images.names
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
        where = f"{args.backend} on {pur.runner.device} ({pur.workers} worker{'s' if pur.workers != 1 else ''}), {pur.kernels.name} kernels"
    pred = np.concatenate(preds)
    print(f"{len(x)} images, {secs:.2f} s ({secs / len(x):.4f} s/image), {where}")
    if y is not None:
        print(f"accuracy: {100 * float((pred == y).mean()):.2f}%")
    if not args.out or len(x) <= 20:
        for n, p in zip(names, pred):
            print(f"{n}\t{int(p)}")
    if args.out and args.out.lower().endswith(".npz"):
        buf = io.BytesIO()
        payload = dict(pred=pred, names=np.array(names))
        if purify:
            payload["x_purified"] = np.concatenate(outs)
        if y is not None:
            payload["y"] = y
        np.savez_compressed(buf, **payload)
        atomic_write_bytes(args.out, buf.getvalue())
        print(f"wrote {args.out}")
    elif args.out:
        from zeropur_rt.images import write_pngs
        print(f"wrote {write_pngs(args.out, np.concatenate(outs), names)} ({len(x)} 8-bit PNG images; "
              "--out FILE.npz keeps the float32 result)")
    elif purify:
        print("nothing saved: pass --out FILE.npz (float32 result, labels) or --out FOLDER (8-bit PNG images)")
    return 0


def _check_out(args: argparse.Namespace, purify: bool) -> None:
    """--out's form is known from its name: refuse a wrong one before any image is read."""
    if not args.out:
        return
    suffix = Path(args.out).suffix.lower()
    if suffix != ".npz" and (suffix or not purify):
        raise InputError(f"--out {args.out}: write a .npz file" + (" or a folder (no suffix) of PNG images"
                                                                    if purify else " (classify has no images to write)"))
    if suffix != ".npz" and Path(args.out).exists() and (not Path(args.out).is_dir() or any(Path(args.out).iterdir())):
        raise InputError(f"--out {args.out} exists and is not an empty folder; name a new folder for the PNG images")


def _cmd_info(args: argparse.Namespace) -> int:
    m = load_manifest(args.artifact_dir)
    if args.json:
        print(json.dumps(m.to_dict(), indent=2))
        return 0
    from zeropur_rt.describe import describe_manifest
    print(describe_manifest(m))
    return 0


def _repo_options(args: argparse.Namespace) -> "RepoOptions":
    from zeropur_rt.serving.repository import RepoOptions
    return RepoOptions(name=args.name, backend=args.backend, device=args.device, instances=args.instances,
                       threads=args.threads, max_queue_delay_us=args.max_queue_delay_us, preferred=args.preferred,
                       dynamic_batching=not args.no_dynamic_batching, classify_model=args.classify_model,
                       continuous_model=args.continuous_model, overrides=parse_sets(args.set))


def _cmd_triton_repo(args: argparse.Namespace) -> int:
    from zeropur_rt.serving.repository import write_repository
    out = write_repository(args.artifact_dir, args.out, _repo_options(args), force=args.force)
    print(f"wrote {out}: " + ", ".join(sorted(d.name for d in out.iterdir() if (d / "config.pbtxt").is_file())))
    return 0


def _add_repo_args(p: argparse.ArgumentParser, out: bool) -> None:
    p.add_argument("artifact_dir", help="directory written by zeropur-export")
    if out:
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


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="zeropur-rt", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for name, helptext in (("purify", "purify images and classify the result; write a .npz or a PNG folder"),
                           ("classify", "classify images with the bare classifier (no purification)")):
        p = sub.add_parser(name, help=helptext, description=helptext[0].upper() + helptext[1:] + ".")
        _add_runtime_args(p)
        p.add_argument("input", help="one image file, a folder of images (flat, or one subfolder per class), an .npz "
                       "with 'x' (uint8 NHWC or float NCHW) and optional 'y', or a path,label CSV")
        p.add_argument("--resize", choices=["crop", "refuse"], default="refuse",
                       help="images of another size: refuse them (default), or scale to cover + centre crop")
        p.add_argument("--out", default=None, help="FILE.npz (x_purified float32, pred, names[, y]) or, for purify, "
                       "a new FOLDER of 8-bit PNG images named as the input's")
    from zeropur_rt import bench
    p = sub.add_parser("bench", help="purification latency per batch size and worker count",
                       description=(bench.__doc__ or "").splitlines()[0])
    _add_session_args(p)
    bench.add_args(p)
    p = sub.add_parser("info", help="what an artifact holds (model, recipe, batch range, weights), hashes verified",
                       description="Verify an artifact directory's files against its manifest and describe it.")
    p.add_argument("artifact_dir", help="directory written by zeropur-export")
    p.add_argument("--json", action="store_true", help="print the raw manifest JSON instead")
    p = sub.add_parser("triton-repo", help="write a Triton Inference Server model repository",
                       description="Write a Triton model repository (Python-backend models over the artifact).")
    _add_repo_args(p, out=True)
    from zeropur_rt.serving import commands
    p = sub.add_parser("serve", help=commands.SERVE_HELP, description=commands.SERVE_HELP[0].upper() + commands.SERVE_HELP[1:] + ".")
    _add_repo_args(p, out=False)
    commands.add_serve_args(p)
    p = sub.add_parser("query", help=commands.QUERY_HELP, description=commands.QUERY_HELP[0].upper() + commands.QUERY_HELP[1:] + ".")
    commands.add_query_args(p)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from zeropur_rt import bench
    from zeropur_rt.serving import commands
    try:
        if args.cmd == "query":
            return commands.run_query(args)
        if args.cmd == "serve":
            return commands.run_serve(args, _repo_options(args))
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
