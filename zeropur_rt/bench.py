"""``zeropur-rt bench``: the runtime's purification latency per batch size and worker count, without torch.

    zeropur-rt bench artifacts/resnet20 --batch 1 32 --workers 1 2 --threads 2
    zeropur-rt bench artifacts/resnet20 --backend tensorrt --batch 1 8 64 --repeats 20

Each row purifies the same images ``--repeats`` times after ``--warmup`` calls (a device runner's first
call captures its CUDA graph, which the timed calls replay) and reports the p50/p90/p99 of a call, seconds
per image and images per second; then one more call with stage timings (eager, as timings need) says
where the time goes. Achieved GFLOP/s come from the graphs' MACs where the onnx package is installed.
Latency does not depend on the pixels (no step of the loop branches on them), so without ``--data`` the
rows time seeded uniform noise of the artifact's input shape.

``zeropur-export bench`` times its runtime rows with ``time_purifier`` too, beside the torch baselines
(the released code's cost) and the CPU's sgemm ceiling.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from zeropur_rt.errors import ConfigError


def timed(fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def rss_mib() -> dict[str, float]:
    """This process's resident memory now and at its peak (MiB)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmRSS", "VmHWM")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    except OSError:
        out["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def latency_stats(times: Sequence[float], batch: int) -> dict[str, Any]:
    """A latency row's figures from the seconds of its timed calls of ``batch`` images."""
    t = np.asarray(times, dtype=np.float64)
    p50 = float(np.percentile(t, 50))
    return dict(repeats=len(t), p50_s=p50, p90_s=float(np.percentile(t, 90)), p99_s=float(np.percentile(t, 99)),
                s_per_image=p50 / batch, images_per_s=batch / p50, mem_mib=rss_mib())


def time_purifier(pur: Any, x: np.ndarray, warmup: int, repeats: int) -> dict[str, Any]:
    """Time ``pur.purify(x)`` as a user calls it, then take one call's stage timings (an eager loop: on a
    device that is not the replayed CUDA graph the timed calls ran, so the shares are indicative)."""
    row = latency_stats(timed(lambda: pur.purify(x), warmup, repeats), len(x))
    st = pur.run(x, timings=True).times
    total = sum(st.seconds.values())
    if total > 0:
        row["stages_pct"] = {k: 100 * v / total for k, v in st.seconds.items()}
    if len(x) == 1 and pur.single_image_probe:
        row["single_image"] = pur.single_image_probe
    return row


def machine_facts() -> dict[str, Any]:
    """What the figures were measured on, as far as deploy time can tell."""
    info: dict[str, Any] = dict(python=platform.python_version(), machine=platform.machine(),
                                processor=platform.processor(), cpus=os.cpu_count(), numpy=np.__version__,
                                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"))
    try:
        import onnxruntime
        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    try:
        info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                                 if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def label(row: dict[str, Any]) -> str:
    w = row.get("workers")
    return row["backend"] if w is None else f"{row['backend']} ({w} worker{'s' if w > 1 else ''})"


def detail_lines(rows: Sequence[dict[str, Any]], threads: int | None) -> list[str]:
    """Markdown after a latency table: where the runtime rows' time goes, and where their single images ran."""
    lines: list[str] = []
    staged = [r for r in rows if "stages_pct" in r]
    if staged:
        keys = list(staged[0]["stages_pct"])
        lines += ["", "Where the runtime's time goes (% of one purify call with stage timings):", "",
                  "| backend | batch | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
        for r in staged:
            lines.append(f"| {label(r)} | {r['batch']} | " + " | ".join(f"{r['stages_pct'].get(k, 0):.1f}" for k in keys) + " |")
    for r in rows:
        if "single_image" in r:
            pr = r["single_image"]
            session = f"{threads}-thread session" if threads else "session with onnxruntime's default threads"
            lines += ["", f"{label(r)}, batch 1: one Guided Shift gradient call took {pr['own_ms']:.2f} ms on the "
                      f"{session} and {pr['worker_ms']:.2f} ms on a one-thread worker's (same bytes: "
                      f"{'yes' if pr['same_bytes'] else 'no'}); single images ran on the "
                      f"{'former' if pr['chosen'] == 'own' else 'latter'}."]
    return lines


def markdown(res: dict[str, Any]) -> str:
    macs = res.get("macs_per_image")
    lines = [f"Latency of zeropur-rt, {res['model']} ({res['artifact']}), {res['threads'] or 'default'} threads, "
             f"{res['machine'].get('cpu_model', res['machine']['machine'])}; each row p50 of its repeats, one run.", "",
             "| backend | device | batch | p50 s | p90 s | p99 s | s/image | images/s | GFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        gf = f"{r['achieved_gflops']:.1f}" if "achieved_gflops" in r else "-"
        lines.append(f"| {label(r)} | {r['device']} | {r['batch']} | {r['p50_s']:.4f} | {r['p90_s']:.4f} | "
                     f"{r['p99_s']:.4f} | {r['s_per_image']:.4f} | {r['images_per_s']:.1f} | {gf} |")
    lines += detail_lines(res["rows"], res["threads"])
    lines += ["", f"Graph MACs per purification: {macs / 1e9:.2f} G per image." if macs else
              "GFLOP/s need the graphs' MACs, counted with the onnx package (pip install onnx)."]
    return "\n".join(lines)


def bench_images(data: str | None, chw: Sequence[int], n: int, resize: str) -> np.ndarray:
    """``n`` images: the first ``n`` of ``data`` (any form ``zeropur-rt purify`` reads), or seeded noise."""
    if data is None:
        return np.random.default_rng(0).random((n, *chw), dtype=np.float32)
    from zeropur_rt.datasets import read_dataset
    x = read_dataset(data, chw, resize=resize, labels=False).x
    if len(x) < n:
        raise ConfigError(f"{data} holds {len(x)} images; the largest --batch needs {n}")
    return np.ascontiguousarray(x[:n], dtype=np.float32)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="batch sizes, a row each (default 1 32)")
    p.add_argument("--workers", type=int, nargs="+", default=None,
                   help="CPU: worker counts, a row each (default: as Purifier.load, --threads)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per row (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    p.add_argument("--data", default=None, help="images to time (.npz, folder or CSV; default: seeded noise)")
    p.add_argument("--resize", choices=["crop", "refuse"], default="crop",
                   help="--data images of another size: scale to cover + centre crop (default), or refuse")
    p.add_argument("--out", default=None, help="folder for latency.json and latency.md (default runs/bench_rt_<model>)")


def run(args: argparse.Namespace, load: Callable[..., Any]) -> int:
    """The command's body; ``load(workers)`` is the CLI's Purifier.load with every other option applied."""
    from zeropur_rt.config import apply_overrides, parse_sets
    from zeropur_rt.validate import check_batch
    from zeropur_rt.files import atomic_write_json, atomic_write_text
    from zeropur_rt.manifest import load_manifest
    from zeropur_rt.progress import progress

    if args.repeats < 1 or args.warmup < 0:
        raise ConfigError(f"need --repeats >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    manifest = load_manifest(args.artifact_dir)
    for b in args.batch:
        check_batch(b, manifest.batch, "this artifact")
    cfg = apply_overrides(manifest.zeropur_config, parse_sets(args.set), baked=True)
    x = bench_images(args.data, manifest.input_shape, max(args.batch), args.resize)
    try:
        from zeropur_rt.macs import purification_macs
        macs = purification_macs(args.artifact_dir, cfg)["purification"]
    except ImportError:
        macs = None
    rows = []
    for w in progress(args.workers or [None], "bench"):
        with load(w) as pur:
            for b in args.batch:
                row = dict(backend=args.backend, device=pur.runner.device, workers=pur.workers, batch=b,
                           **time_purifier(pur, x[:b], args.warmup, args.repeats))
                if macs:
                    row["achieved_gflops"] = 2 * macs * b / row["p50_s"] / 1e9
                rows.append(row)
    res = dict(kind="latency", tool="zeropur-rt bench", artifact=str(args.artifact_dir), model=manifest.model,
               config=cfg.to_dict(), threads=args.threads, machine=machine_facts(), macs_per_image=macs, rows=rows)
    md = markdown(res)
    out = Path(args.out or f"runs/bench_rt_{manifest.model}")
    atomic_write_json(out / "latency.json", res)
    atomic_write_text(out / "latency.md", md + "\n")
    print(md + f"\n\nwrote {out / 'latency.json'}, .md")
    return 0
