"""Every GPU-side check in one run, plus the latency benchmark; one JSON + one markdown report.

    python -m benchmarks.gpu_check [--out runs/gpu_check] [--models resnet20 resnet56] [--batches 1 256]

1. CUDA kernels == host twin, bit for bit (pytest tests/gpu/test_cuda_kernels.py).
2. torch-CUDA gradients + our CUDA kernels, full loop on the device (torch's stream, device pointers)
   against the Purifier's torch backend on CUDA with the host kernels.
3. TensorRT, if importable: pytest tests/gpu/test_tensorrt.py (engine builds, FP32 parity, Purifier
   vs torch reference, device loop, CUDA graph replay bit for bit).
4. Latency per (model, batch): the released-code-cost torch reference (``ap_mode="recompute"``) on
   this GPU, the lean torch reference, torch-CUDA + our kernels, and on TensorRT the host loop and
   the device loop with a CUDA graph -- all in this run, on this GPU.

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


def _timeit(fn: Callable[[], Any], sync: Callable[[], None], reps: int) -> dict[str, float]:
    fn()  # warm-up (cuDNN / TensorRT tactics, CUDA graph capture)
    sync()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return {"median_s": float(np.median(ts)), "min_s": float(np.min(ts)), "reps": reps}


def torch_kernels_loop(victim: Any, cfg: Any, x: np.ndarray, kernels: Any) -> Any:
    """ZeroPur on the GPU: torch gradients (the reference's losses) + our CUDA kernels on torch's stream."""
    import torch

    from zeropur_export import reference as ref
    from zeropur_rt.blur import box_blur_weights

    dev = victim.mean.device
    stream = torch.cuda.current_stream(dev).cuda_stream
    x_in = torch.from_numpy(np.ascontiguousarray(x)).to(dev)
    n, c, h, w = x_in.shape
    p = c * h * w
    xc, m, xb = x_in.clone(), torch.zeros_like(x_in), torch.empty_like(x_in)
    l1 = torch.empty(n, device=dev)
    bw = box_blur_weights(cfg.blur_sigma)
    for _ in range(cfg.gs_steps):
        kernels.blur(xc.data_ptr(), xb.data_ptr(), n * c, h, w, bw, stream=stream)
        g = ref.input_grad(lambda v: ref.gs_loss(victim, v, xb), xc)[0].contiguous()
        kernels.gs_update(xc.data_ptr(), g.data_ptr(), m.data_ptr(), x_in.data_ptr(), n, p, eps=cfg.eps,
                          step=cfg.gs_step, decay=cfg.momentum, l1_scope=cfg.l1_scope, stream=stream,
                          l1_scratch=l1.data_ptr())
    if cfg.ap_steps == 0:
        return xc
    with torch.no_grad():
        consts = ref.ap_constants(victim, x_in, xc, cfg)
    fine = x_in.clone()
    for _ in range(cfg.ap_steps):
        g = ref.input_grad(lambda f: ref.ap_loss(victim, f, consts, cfg), fine)[0].contiguous()
        kernels.ap_update(fine.data_ptr(), g.data_ptr(), x_in.data_ptr(), n, p, eps=cfg.eps, step=cfg.ap_step,
                          stream=stream)
    return fine


def check_torch_kernels(art: Path, victim: Any, x: np.ndarray) -> dict[str, Any]:
    import torch

    from zeropur_rt.kernels.cuda import CudaKernels
    from zeropur_rt.purifier import Purifier

    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    pur = Purifier.load(art, backend="torch", device="cuda", victim=victim)
    k = CudaKernels()  # the context torch made current (the primary one)
    try:
        dev_out = torch_kernels_loop(pur.runner.victim, pur.cfg, x, k)
        torch.cuda.synchronize()
        dev_out = dev_out.cpu().numpy()
        host_out = pur.purify(x)
        p_dev, p_host = pur.logits(dev_out).argmax(1), pur.logits(host_out).argmax(1)
    finally:
        k.close()
    same_pred = float(np.mean(p_dev == p_host))
    return {"n": len(x), "same_prediction": same_pred, "same_pixels": float(np.mean(dev_out == host_out)),
            "max_abs_diff": float(np.max(np.abs(dev_out - host_out))), "ok": same_pred >= 1 - 1 / 64}


def bench_model(model: str, art: Path, batches: list[int], have_trt: bool, reps: dict[int, int],
                x_all: np.ndarray) -> list[dict[str, Any]]:
    import torch

    from zeropur_export.reference import ReferencePurifier
    from zeropur_export.zoo import load_victim
    from zeropur_rt.kernels.cuda import CudaKernels
    from zeropur_rt.purifier import Purifier

    torch.backends.cudnn.benchmark = True
    victim = load_victim(model).cuda()
    pur_t = Purifier.load(art, backend="torch", device="cuda", victim=victim)
    cfg = pur_t.cfg
    k = CudaKernels()
    sync = torch.cuda.synchronize
    rows = []
    trt_pur = trt_loop = None
    if have_trt:
        from zeropur_rt.backend_trt import TensorRTLoop
        trt_pur = Purifier.load(art, backend="tensorrt", device="cuda")
        trt_loop = TensorRTLoop(trt_pur, cuda_graph=True)
    for b in batches:
        x = x_all[np.arange(b) % len(x_all)]
        xt = torch.from_numpy(x).cuda()
        r = reps.get(b, 3)
        row: dict[str, Any] = {"model": model, "batch": b}
        released = ReferencePurifier(victim, cfg, ap_mode="recompute")
        lean = ReferencePurifier(victim, cfg, ap_mode="lean")
        row["torch_released_code_cost"] = _timeit(lambda: released.purify(xt), sync, r)
        row["torch_lean"] = _timeit(lambda: lean.purify(xt), sync, r)
        row["torch_cuda_plus_our_kernels"] = _timeit(lambda: torch_kernels_loop(victim, cfg, x, k), sync, r)
        if trt_pur is not None:
            row["tensorrt_host_loop"] = _timeit(lambda: trt_pur.purify(x), sync, r)
            row["tensorrt_device_loop_cuda_graph"] = _timeit(lambda: trt_loop.purify(x), sync, r)
        base = row["torch_released_code_cost"]["median_s"]
        row["speedup_vs_released"] = {kk: base / v["median_s"] for kk, v in row.items()
                                      if isinstance(v, dict) and "median_s" in v}
        rows.append(row)
        print(f"  {model} batch {b}: " + ", ".join(f"{kk} {v['median_s'] * 1e3:.1f} ms" for kk, v in row.items()
                                                  if isinstance(v, dict) and "median_s" in v), flush=True)
    if trt_loop is not None:
        trt_loop.close()
        trt_pur.runner.close()
    k.close()
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
        keys = ["torch_released_code_cost", "torch_lean", "torch_cuda_plus_our_kernels", "tensorrt_host_loop",
                "tensorrt_device_loop_cuda_graph"]
        lines += ["", "## Latency (median ms per call; speed-up vs the released-code-cost torch reference)", "",
                  "| model | batch | " + " | ".join(keys) + " |", "| --- | --- |" + " --- |" * len(keys)]
        for row in report["latency"]:
            cells = []
            for k in keys:
                v = row.get(k)
                cells.append("-" if v is None else f"{v['median_s'] * 1e3:.1f} ({row['speedup_vs_released'][k]:.1f}x)")
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
    report: dict[str, Any] = {"status": "ran", "device": device, "versions": versions, "checks": {}, "latency": []}
    if not args.skip_tests:
        print("1. CUDA kernels vs host twin ...", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        report["checks"]["cuda_kernels_bit_exact"] = _pytest("tests/gpu/test_cuda_kernels.py", out, args.test_timeout)
        if have_trt:
            print("3. TensorRT tests ...", flush=True)
            report["checks"]["tensorrt"] = _pytest("tests/gpu/test_tensorrt.py", out, args.test_timeout)
        else:
            report["checks"]["tensorrt"] = {"ok": None, "summary": "skipped: tensorrt not importable"}
    from zeropur_export.build import ensure_artifacts
    from zeropur_rt.data import load_cifar10_test, to_nchw_float
    try:
        xs, _ = load_cifar10_test(stop=256)
        x_all = to_nchw_float(xs)
    except Exception as e:  # noqa: BLE001 - no shared data: random images
        print(f"CIFAR-10 test data not found ({e}); random images", file=sys.stderr)
        x_all = np.random.default_rng(0).random((256, 3, 32, 32), dtype=np.float32)
    for model in args.models:
        try:
            art = ensure_artifacts(model, Path(args.artifacts) / model)
        except Exception as e:  # noqa: BLE001 - e.g. weights missing
            report["checks"][f"{model}_artifacts"] = {"ok": False, "summary": f"{type(e).__name__}: {e}"}
            continue
        if have_trt:
            from zeropur_export.engines import build_engines
            build_engines(art, precision="fp32")
        if torch_cuda and not args.skip_tests:
            print(f"2. torch-CUDA + our kernels, {model} ...", flush=True)
            from zeropur_export.zoo import load_victim
            report["checks"][f"torch_cuda_plus_kernels_{model}"] = check_torch_kernels(art, load_victim(model), x_all[:64])
        if torch_cuda:
            print(f"4. latency {model} ...", flush=True)
            reps = {b: (args.reps_small if b < 64 else args.reps_large) for b in args.batches}
            report["latency"] += bench_model(model, art, args.batches, have_trt, reps, x_all)
    report["ok"] = all(c.get("ok") is not False for c in report["checks"].values())
    write_report(out, report)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
