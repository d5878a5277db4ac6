"""Every GPU-side check in one run, plus the latency benchmark; one JSON + one markdown report.

    python -m benchmarks.gpu_check [--out runs/gpu_check] [--models resnet20 resnet56] [--batches 1 256]

1. CUDA kernels == host twin, bit for bit (pytest tests/gpu/test_cuda_kernels.py).
2. The torch runner on CUDA + our CUDA kernels, the full loop on the device (the one pipeline):
   pytest tests/gpu/test_torch_cuda_loop.py; eager vs CUDA graph bit for bit and vs the reference's
   torch kernels on the same runner, 64 images; vs the torch reference on ``--parity-n`` real images,
   clean and PGD-20. tests/export/test_loop.py runs the shared loop tests on every runner the GPU adds.
3. TensorRT, if importable: pytest tests/gpu/test_tensorrt.py (engine builds incl. batch 1, FP32 parity,
   Purifier and its CUDA graph replay vs the torch reference, a failed capture); onnxruntime's CUDA / TensorRT execution
   providers where onnxruntime-gpu is installed: pytest tests/gpu/test_onnxruntime_gpu.py.
4. Latency per (model, batch): the released-code-cost torch reference (``ap_mode="recompute"``) on
   this GPU, the lean torch reference, the torch runner + our kernels (eager and CUDA graph), and
   TensorRT's device loop, eager and with a CUDA graph -- all in this run, on this GPU.
5. Issue 18's report (``benchmarks.gpu_speed``): the fast torch runner (folded, channels-last, compiled,
   CUDA graph) in float32 / TF32 / BF16 against today's loop, kernels per step, GFLOP/s, agreement on
   ``--parity-n`` images; its files under ``<out>/speed``.

Without a GPU it prints why and exits 0 (the report says ``skipped``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks import gpu_speed

ROOT = Path(__file__).resolve().parents[1]


def _pytest(path: str, out: Path, timeout: int) -> dict[str, Any]:
    t = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", path], cwd=ROOT, capture_output=True,
                           text=True, timeout=timeout)
        log, rc = r.stdout + r.stderr, r.returncode
    except subprocess.TimeoutExpired as e:
        log, rc = f"{e.stdout or ''}{e.stderr or ''}\nTIMEOUT after {timeout}s", -1
    (out / (Path(path).stem + ".log")).write_text(log)
    summary = [ln for ln in log.strip().splitlines() if " passed" in ln or " failed" in ln or " skipped" in ln
               or " error" in ln]
    return {"path": path, "returncode": rc, "ok": rc == 0, "summary": summary[-1] if summary else log[-300:],
            "seconds": round(time.perf_counter() - t, 1)}


def _fp32(deterministic: bool) -> None:
    """float32 as on the CPU (no TF32); deterministic cuDNN for bit-level checks, autotuned for latency."""
    import torch
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = deterministic, not deterministic


def check_device_loop(art: Path, x: np.ndarray) -> dict[str, Any]:
    """Torch runner + our CUDA kernels: eager vs CUDA graph (bit for bit), and vs the reference's torch
    kernels on the same GPU gradients."""
    from zeropur_export.reference.steps import TorchKernels
    from zeropur_export.reference.torch_runner import load_purifier
    from zeropur_rt.pipeline import Purifier

    _fp32(deterministic=True)
    with load_purifier(art, "cuda", cuda_graph=False) as eager, load_purifier(art, "cuda", cuda_graph=True) as graphed:
        out_eager = eager.purify(x)
        graphed.purify(x)
        out_graph, p_dev = graphed.purify_and_classify(x)  # the replay
        out_graph2 = graphed.purify(x)
        r = eager.runner
        ref_kernels = Purifier(r, TorchKernels(r.tensor), eager.cfg, input_shape=eager.chw, batch=eager.batch,
                               has_ap=True, cuda_graph=False)
        out_host, p_host = ref_kernels.purify_and_classify(x)
    same_pred = float(np.mean(p_dev == p_host))
    graph_bits = bool(np.array_equal(out_eager.view(np.uint32), out_graph.view(np.uint32))
                      and np.array_equal(out_graph.view(np.uint32), out_graph2.view(np.uint32)))
    return {"n": len(x), "graph_equals_eager_bits": graph_bits, "same_prediction_vs_reference_kernels": same_pred,
            "same_pixels_vs_reference_kernels": float(np.mean(out_graph == out_host)),
            "max_abs_diff_vs_reference_kernels": float(np.max(np.abs(out_graph - out_host))),
            "ok": graph_bits and same_pred >= 1 - 1 / 64}


def check_reference_parity(model: str, art: Path, x: np.ndarray, y: np.ndarray, batch: int = 250) -> dict[str, Any]:
    """The device loop (CUDA graph) vs the torch reference (lean, eager) on real images, clean and PGD-20."""
    import torch

    from zeropur_export.attacks.pgd import pgd_linf
    from zeropur_export.reference.purifier import ReferencePurifier
    from zeropur_export.reference.torch_runner import load_purifier

    _fp32(deterministic=True)
    loop = load_purifier(art, "cuda", cuda_graph=True)
    victim, pur = loop.runner.victim, loop
    ref = ReferencePurifier(victim, pur.cfg, ap_mode="lean")
    res: dict[str, Any] = {"n": len(x),
                           "attack": "PGD-Linf 8/255, step 2/255, 20 steps, random start (seed: the batch offset)"}
    t0 = time.perf_counter()
    with loop:
        for kind in ("clean", "pgd"):
            p_ref, p_rt, p_bare = [], [], []
            for i in range(0, len(x), batch):
                xt = torch.from_numpy(x[i:i + batch]).cuda()
                yt = torch.from_numpy(y[i:i + batch]).cuda()
                if kind == "pgd":
                    xt = pgd_linf(victim, xt, yt, seed=i)
                with torch.no_grad():
                    p_bare.append(victim(xt).argmax(1).cpu().numpy())
                    p_ref.append(victim(ref.purify(xt)).argmax(1).cpu().numpy())
                p_rt.append(loop.purify_and_classify(xt.cpu().numpy())[1])
            a_ref, a_rt, a_bare = np.concatenate(p_ref), np.concatenate(p_rt), np.concatenate(p_bare)
            res[kind] = {"accuracy_bare": 100 * float(np.mean(a_bare == y)),
                         "accuracy_reference": 100 * float(np.mean(a_ref == y)),
                         "accuracy_device_loop": 100 * float(np.mean(a_rt == y)),
                         "same_prediction": 100 * float(np.mean(a_ref == a_rt))}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    res["ok"] = min(res["clean"]["same_prediction"], res["pgd"]["same_prediction"]) >= 98.0
    return res


def bench_model(model: str, art: Path, batches: list[int], have_trt: bool, reps: dict[int, int],
                x_all: np.ndarray) -> list[dict[str, Any]]:
    import torch

    from zeropur_export.reference.purifier import ReferencePurifier
    from zeropur_export.reference.torch_runner import load_purifier
    from zeropur_rt.pipeline import Purifier

    _fp32(deterministic=False)
    eager, graphed = load_purifier(art, "cuda", cuda_graph=False), load_purifier(art, "cuda", cuda_graph=True)
    victim, cfg = eager.runner.victim, eager.cfg
    sync = torch.cuda.synchronize
    rows = []
    trt_eager = trt_graph = None
    if have_trt:
        trt_eager = Purifier.load(art, backend="tensorrt", cuda_graph=False)
        trt_graph = Purifier.load(art, backend="tensorrt", cuda_graph=True)
    released = ReferencePurifier(victim, cfg, ap_mode="recompute")
    lean = ReferencePurifier(victim, cfg, ap_mode="lean")
    for b in batches:
        x = x_all[np.arange(b) % len(x_all)]
        xt = torch.from_numpy(x).cuda()
        r = reps.get(b, 3)
        row: dict[str, Any] = {"model": model, "batch": b}
        variants: list[tuple[str, Callable[[], Any]]] = [
            ("torch_released_code_cost", lambda: released.purify(xt)), ("torch_lean", lambda: lean.purify(xt)),
            ("torch_cuda_plus_our_kernels", lambda: eager.purify(x)),
            ("torch_cuda_plus_our_kernels_cuda_graph", lambda: graphed.purify(x))]
        if trt_eager is not None:
            variants += [("tensorrt_device_loop", lambda: trt_eager.purify(x)),
                         ("tensorrt_device_loop_cuda_graph", lambda: trt_graph.purify(x))]
        for name, fn in variants:
            row[name] = _guarded(lambda: gpu_speed.time_calls(fn, sync, r))  # a failing variant does not cost the others
        base = row["torch_released_code_cost"].get("median_s", float("nan"))
        row["speedup_vs_released"] = {kk: base / v["median_s"] for kk, v in row.items()
                                      if isinstance(v, dict) and "median_s" in v}
        rows.append(row)
        print(f"  {model} batch {b}: " + ", ".join(f"{kk} {v['median_s'] * 1e3:.1f} ms" for kk, v in row.items()
                                                  if isinstance(v, dict) and "median_s" in v), flush=True)
    for p in (trt_eager, trt_graph, eager, graphed):
        if p is not None:
            p.close()
    return rows


def write_report(out: Path, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# ZeroPur GPU check", "", f"- device: {report.get('device', '-')}", f"- status: {report['status']}"]
    if report.get("reason"):
        lines.append(f"- reason: {report['reason']}")
    for key, v in report.get("versions", {}).items():
        lines.append(f"- {key}: {v}")
    if report.get("checks"):
        lines += ["", "## Checks", "", "| check | ok | detail |", "| --- | --- | --- |"]
        for name, c in report["checks"].items():
            detail = c.get("summary") or ", ".join(f"{k}={v}" for k, v in c.items() if k not in ("ok",))
            lines.append(f"| {name} | {c.get('ok')} | {detail} |")
    if report.get("latency"):
        keys = ["torch_released_code_cost", "torch_lean", "torch_cuda_plus_our_kernels",
                "torch_cuda_plus_our_kernels_cuda_graph", "tensorrt_device_loop", "tensorrt_device_loop_cuda_graph"]
        lines += ["", "## Latency (median ms per call; speed-up vs the released-code-cost torch reference)", "",
                  "| model | batch | " + " | ".join(keys) + " |", "| --- | --- |" + " --- |" * len(keys)]
        for row in report["latency"]:
            cells = []
            for k in keys:
                v = row.get(k)
                if v is None or "median_s" not in v:
                    cells.append("-" if v is None else "failed")
                else:
                    cells.append(f"{v['median_s'] * 1e3:.1f} ({row['speedup_vs_released'][k]:.1f}x)")
            lines.append(f"| {row['model']} | {row['batch']} | " + " | ".join(cells) + " |")
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/gpu_check")
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 256])
    ap.add_argument("--reps-small", type=int, default=10, help="timed repetitions at batch < 64")
    ap.add_argument("--reps-large", type=int, default=3, help="timed repetitions at batch >= 64")
    ap.add_argument("--skip-tests", action="store_true", help="latency only")
    ap.add_argument("--parity-n", type=int, default=1000, help="real test images for the device-loop vs reference parity")
    ap.add_argument("--test-timeout", type=int, default=900)
    args = ap.parse_args(argv)
    out = Path(args.out)
    from zeropur_rt.kernels.cuda import cuda_python_available

    ok, why = cuda_python_available()
    torch_cuda = False
    try:
        import torch
        torch_cuda = bool(torch.cuda.is_available())
    except ImportError:
        torch = None  # type: ignore[assignment]
    if not ok:
        print(f"gpu_check: no GPU here ({why}); nothing to check", file=sys.stderr)
        write_report(out, {"status": "skipped", "reason": why, "host": platform.node()})
        return 0
    import importlib.util
    have_trt = importlib.util.find_spec("tensorrt") is not None
    versions: dict[str, str] = {"python": platform.python_version()}
    if torch is not None:
        versions["torch"] = torch.__version__ + (f" (CUDA {torch.version.cuda})" if torch_cuda else " (no CUDA)")
    if have_trt:
        import tensorrt
        versions["tensorrt"] = tensorrt.__version__
    from zeropur_rt.kernels.cuda import CudaKernels
    k = CudaKernels()
    device = f"sm_{k.compute_capability[0]}{k.compute_capability[1]}, kernels: {k.image}"
    k.close()
    if torch_cuda:
        device = f"{torch.cuda.get_device_name(0)} ({device})"
    report: dict[str, Any] = {"status": "ran", "device": device, "versions": versions, "checks": {}, "latency": [],
                              "notes": "float32 throughout (TF32 off); cuDNN deterministic for the checks, "
                                       "autotuned (benchmark mode) for the latency rows"}
    out.mkdir(parents=True, exist_ok=True)
    art_root = Path(args.artifacts)
    if not args.skip_tests:
        print("1. CUDA kernels vs host twin; torch-CUDA device loop ...", flush=True)
        report["checks"]["cuda_kernels_bit_exact"] = _pytest("tests/gpu/test_cuda_kernels.py", out, args.test_timeout)
        if torch_cuda and (art_root / "resnet20" / "manifest.json").is_file():
            os.environ.setdefault("ZEROPUR_TEST_ART20", str(art_root / "resnet20"))
        report["checks"]["torch_cuda_loop_tests"] = _pytest("tests/gpu/test_torch_cuda_loop.py", out, args.test_timeout)
        if have_trt:
            print("3. TensorRT tests ...", flush=True)
            report["checks"]["tensorrt"] = _pytest("tests/gpu/test_tensorrt.py", out, args.test_timeout)
        else:
            report["checks"]["tensorrt"] = {"ok": None, "summary": "skipped: tensorrt not importable"}
        # skips itself (with the reason in the summary) where onnxruntime has no CUDA execution provider
        report["checks"]["onnxruntime_gpu"] = _pytest("tests/gpu/test_onnxruntime_gpu.py", out, args.test_timeout)
        write_report(out, report)
    from zeropur_export.artifacts import ensure_artifacts
    from zeropur_export.data import load_cifar10_test, to_nchw_float
    try:
        xs, ys = load_cifar10_test(stop=max(256, args.parity_n))
        x_all, y_all = to_nchw_float(xs), ys
    except Exception as e:  # noqa: BLE001 - no shared data: random images, no parity on real images
        print(f"CIFAR-10 test data not found ({e}); random images", file=sys.stderr)
        x_all, y_all = np.random.default_rng(0).random((256, 3, 32, 32), dtype=np.float32), None
    for model in args.models:
        try:
            art = ensure_artifacts(model, art_root / model)
            if have_trt:
                from zeropur_export.engines.builder import build_engines
                build_engines(art, precision="fp32")
        except Exception as e:  # noqa: BLE001 - e.g. weights missing
            report["checks"][f"{model}_artifacts"] = {"ok": False, "summary": f"{type(e).__name__}: {e}"}
            continue
        steps: list[tuple[str, Callable[[], Any]]] = []
        if torch_cuda and not args.skip_tests:
            steps.append((f"device_loop_{model}", lambda: check_device_loop(art, x_all[:64])))
            if y_all is not None and args.parity_n > 0:
                steps.append((f"reference_parity_{model}",
                              lambda: check_reference_parity(model, art, x_all[:args.parity_n], y_all[:args.parity_n])))
        for name, fn in steps:
            print(f"2. {name} ...", flush=True)
            report["checks"][name] = _guarded(fn)
            print(f"   {report['checks'][name]}", flush=True)
            write_report(out, report)
        if torch_cuda:
            print(f"4. latency {model} ...", flush=True)
            reps = {b: (args.reps_small if b < 64 else args.reps_large) for b in args.batches}
            try:
                report["latency"] += bench_model(model, art, args.batches, have_trt, reps, x_all)
            except Exception as e:  # noqa: BLE001 - keep the other model's rows
                report["checks"][f"latency_{model}"] = {"ok": False, "summary": f"{type(e).__name__}: {e}"}
            write_report(out, report)
    if torch_cuda:
        print("5. issue 18: the fast torch runner ...", flush=True)
        report["checks"]["fast_torch_runner"] = _guarded(lambda: _speed_report(out / "speed", args))
    report["ok"] = all(c.get("ok") is not False for c in report["checks"].values())
    write_report(out, report)
    return 0 if report["ok"] else 1


def _speed_report(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    rc = gpu_speed.main(["--out", str(out), "--artifacts", args.artifacts, "--models", *args.models,
                         "--batches", *map(str, args.batches), "--agree-n", str(args.parity_n)])
    written = out / "gpu_speed.json"
    agreed = json.loads(written.read_text())["agreement"] if written.exists() else {}
    floor = gpu_speed.FLOOR
    figures = "; ".join(f"{m}: fast float32 {a['fast-fp32']['same_prediction']:.1f}%"
                        + (f", float32 floor {a[floor]['same_prediction']:.1f}%" if floor in a else "")
                        for m, a in agreed.items() if "fast-fp32" in a)
    return {"ok": rc == 0, "summary": f"{out / 'gpu_speed.md'} (agreement of fast float32 >= 99%: {rc == 0}"
                                      + (f"; {figures})" if figures else ")")}


def _guarded(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one check; an exception becomes a failed check with its message (the others still run)."""
    import traceback
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        return {"ok": False, "summary": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
