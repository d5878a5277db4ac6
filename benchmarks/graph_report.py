"""Per-graph report: node counts by op type, MACs and achieved GFLOP/s (ONNX Runtime CPU), before and after folding.

    python -m benchmarks.graph_report --model resnet20                      # exports unfolded + folded, then times
    python -m benchmarks.graph_report --model resnet20 --profile ap_grad    # + ORT's per-op-type time split
    python -m benchmarks.graph_report --artifacts artifacts/resnet20-paper runs/graph_report_resnet20/folded

``--model`` exports the zoo model (real weights, its preset) twice under ``--out``: ``unfolded``
(``fold=False``) and ``folded`` (the default export), reused when present (``--force`` re-exports).
``--artifacts`` compares artifact directories as they are (e.g. one exported by older code). Every
variant of a graph is timed in one process, calls interleaved round by round, with the runtime's own
session options; the best call counts (the machine may be shared: other processes only ever slow a
call down). The sgemm ceiling is ``zeropur_export.bench.costs.cpu_peak_gflops`` at the same thread count,
taken before and after the timings (the larger counts).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

from zeropur_rt.files import atomic_write_json, atomic_write_text  # noqa: E402
from zeropur_rt.manifest import load_manifest  # noqa: E402

# op types shown in their own column (the rest is summed in "other")
COLUMNS = ("Conv", "ConvTranspose", "BatchNormalization", "Relu", "HardSigmoid", "Greater", "Cast", "Mul", "Add")


def op_counts(path: Path) -> collections.Counter:
    import onnx
    return collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def _feeds(sess: Any, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i.name: rng.random([batch if not isinstance(d, int) else d for d in i.shape], dtype=np.float32)
            for i in sess.get_inputs()}


def _session(path: Path, threads: int, profile_prefix: str | None = None) -> Any:
    import onnxruntime as ort

    from zeropur_rt.runners.onnxruntime import session_options
    opts = session_options(threads)
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def time_graphs(paths: dict[str, Path], batch: int, threads: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each path, calls interleaved round by round (one warm-up call each first)."""
    sess = {k: _session(p, threads) for k, p in paths.items()}
    feeds = {k: _feeds(s, batch) for k, s in sess.items()}
    for k, s in sess.items():
        s.run(None, feeds[k])
    out: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(rounds):
        for k, s in sess.items():
            t = time.perf_counter()
            s.run(None, feeds[k])
            out[k].append(time.perf_counter() - t)
    return out


def op_profile(path: Path, batch: int, threads: int, calls: int = 5) -> dict[str, Any]:
    """ONNX Runtime's profiler: per op type (of the optimised graph: NCHWc Conv, ReorderInput/Output, ...)
    the kernel milliseconds per call, the share of kernel time, and nodes per call; and per convolution
    shape (Conv nodes, whose weight shape the profiler reports) the achieved GFLOP/s."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        s = _session(path, threads, str(Path(d) / "ort"))
        f = _feeds(s, batch)
        s.run(None, f)  # warm-up, dropped below
        for _ in range(calls):
            s.run(None, f)
        events = json.loads(Path(s.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    start = runs[0]["ts"] + runs[0]["dur"] if len(runs) > calls else 0  # skip the warm-up call
    per: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    convs: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0, 0])
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            a = e["args"]
            per[a["op_name"]][0] += e["dur"]
            per[a["op_name"]][1] += 1
            shapes = [next(iter(x.values())) for x in a.get("input_type_shape", [])]
            out = [next(iter(x.values())) for x in a.get("output_type_shape", [])]
            if a["op_name"] == "Conv" and len(shapes) >= 2 and len(shapes[1]) == 4 and out:
                w = shapes[1]
                key = f"{shapes[0][1]}->{out[0][1]} ch, {w[2]}x{w[3]}, out {out[0][2]}x{out[0][3]}"
                convs[key][0] += e["dur"]
                convs[key][1] += 1
                convs[key][2] += int(np.prod(out[0])) * w[1] * w[2] * w[3]
    total = sum(v[0] for v in per.values()) or 1.0
    ops = {op: {"ms": us / calls / 1e3, "pct": 100 * us / total, "nodes": n / calls}
           for op, (us, n) in sorted(per.items(), key=lambda kv: -kv[1][0])}
    conv_rows = {k: {"nodes": n / calls, "ms": us / calls / 1e3, "gflops": 2 * macs / (us / 1e6) / 1e9}
                 for k, (us, n, macs) in sorted(convs.items(), key=lambda kv: -kv[1][0])}
    return {"ops": ops, "convs": conv_rows}


def export_variants(model: str, out: Path, force: bool) -> dict[str, Path]:
    from zeropur_export.graphs.onnx_export import export_artifacts
    from zeropur_export.victims.weights import find_weights
    from zeropur_export.victims.zoo import ZOO, load_victim
    from zeropur_rt.config import preset
    from zeropur_rt.files import sha256_file
    if model not in ZOO:
        raise SystemExit(f"unknown model {model!r}; known: {', '.join(sorted(ZOO))}")
    weights = find_weights(model)
    dirs = {}
    for name, fold in (("unfolded", False), ("folded", True)):
        d = out / name
        if force or not (d / "manifest.json").is_file():
            print(f"exporting {model} ({name}) to {d} ...")
            export_artifacts(load_victim(model, weights=str(weights)), preset(ZOO[model][2]), d, force=True,
                             fold=fold, model=model, weights_sha256=sha256_file(weights))
        dirs[name] = d
    return dirs


def report(dirs: dict[str, Path], batch: int, threads: int, rounds: int, profile: list[str]) -> dict[str, Any]:
    from zeropur_export.bench.costs import cpu_peak_gflops
    from zeropur_rt.macs import graph_macs
    manifests = {k: load_manifest(d) for k, d in dirs.items()}
    graphs = [g for g in next(iter(manifests.values())).graphs if all(g in m.graphs for m in manifests.values())]
    peaks = [cpu_peak_gflops(threads)]
    rows = []
    for g in graphs:
        paths = {k: dirs[k] / manifests[k].graphs[g]["file"] for k in dirs}
        t = time_graphs(paths, batch, threads, rounds)
        for k, p in paths.items():
            macs = graph_macs(p)
            best = min(t[k])
            rows.append(dict(graph=g, variant=k, ops=dict(op_counts(p)), macs=macs, best_s=best,
                             median_s=float(np.median(t[k])), gflops=2 * macs * batch / best / 1e9))
    peaks.append(cpu_peak_gflops(threads))
    prof = {f"{g}/{k}": op_profile(dirs[k] / manifests[k].graphs[g]["file"], batch, threads)
            for g in profile for k in dirs if g in manifests[k].graphs}
    return dict(batch=batch, threads=threads, rounds=rounds, peak_gflops=max(peaks), peaks=peaks,
                dirs={k: str(d) for k, d in dirs.items()}, bn_folded={k: m.tools.get("bn_folded", "-") for k, m in manifests.items()},
                rows=rows, profile=prof)


def markdown(res: dict[str, Any]) -> str:
    pk = res["peak_gflops"]
    lines = [f"Graphs at batch {res['batch']}, ONNX Runtime CPU, {res['threads']} threads, best of {res['rounds']} "
             f"interleaved calls; sgemm ceiling {pk:.0f} GFLOP/s ({res['threads']} x one-thread sgemm; measured "
             f"{', '.join(f'{p:.0f}' for p in res['peaks'])}). BatchNorm folded: "
             + ", ".join(f"{k} {v}" for k, v in res["bn_folded"].items()) + ".", "",
             "| graph | variant | nodes | " + " | ".join(COLUMNS) + " | other | MMAC/image | ms/call (median) | GFLOP/s | % of sgemm |",
             "|---|---|---|" + "---|" * len(COLUMNS) + "---|---|---|---|---|"]
    for r in res["rows"]:
        ops = r["ops"]
        other = sum(v for k, v in ops.items() if k not in COLUMNS)
        lines.append(f"| {r['graph']} | {r['variant']} | {sum(ops.values())} | " + " | ".join(str(ops.get(c, 0)) for c in COLUMNS)
                     + f" | {other} | {r['macs'] / 1e6:.1f} | {r['best_s'] * 1e3:.1f} ({r['median_s'] * 1e3:.1f}) | "
                     f"{r['gflops']:.1f} | {100 * r['gflops'] / pk:.0f}% |")
    for key, prof in res["profile"].items():
        lines += ["", f"ONNX Runtime profile, {key}, batch {res['batch']} (optimised graph's op types; kernel time):", "",
                  "| op type | nodes | ms/call | % |", "|---|---|---|---|"]
        lines += [f"| {op} | {v['nodes']:.0f} | {v['ms']:.2f} | {v['pct']:.1f} |" for op, v in prof["ops"].items()]
        lines += ["", f"Its Conv nodes by shape (channels in -> out, kernel, output size; % of the {pk:.0f} GFLOP/s "
                  "ceiling):", "", "| convolution | nodes | ms/call | GFLOP/s | % of sgemm |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {v['nodes']:.0f} | {v['ms']:.2f} | {v['gflops']:.1f} | {100 * v['gflops'] / pk:.0f}% |"
                  for k, v in prof["convs"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="zoo model: export it unfolded and folded under --out")
    src.add_argument("--artifacts", nargs="+", type=Path, help="artifact directories to compare as they are")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=10, help="timed calls per graph and variant")
    p.add_argument("--profile", nargs="*", default=[], metavar="GRAPH", help="graphs to profile per op type")
    p.add_argument("--out", type=Path, default=None, help="folder for the exports and the report "
                   "(default runs/graph_report_<model>)")
    p.add_argument("--force", action="store_true", help="re-export the --model variants")
    args = p.parse_args(argv)
    if args.model:
        out = args.out or Path(f"runs/graph_report_{args.model}")
        dirs = export_variants(args.model, out, args.force)
    else:
        out = args.out or Path("runs/graph_report")
        names = [d.name for d in args.artifacts]
        keys = names if len(set(names)) == len(names) else [str(d) for d in args.artifacts]
        dirs = dict(zip(keys, args.artifacts))
    res = report(dirs, args.batch, args.threads, args.rounds, args.profile)
    md = markdown(res)
    print(md)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "graph_report.md", md + "\n")
    atomic_write_json(out / "graph_report.json", res)
    print(f"\nwrote {out}/graph_report.md, .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
