"""The Polygraphy check of an artifact (``zeropur-export check DIR``): every graph, before deploying.

1. Inspect: Polygraphy loads and summarises each ONNX graph; its I/O names are the manifest's, every
   tensor is float32, and the shapes admit a TensorRT optimisation profile for the manifest's batch
   range (``zeropur_export.engines.builder.input_profile``, the builder's own rule).
2. ONNX Runtime: at each of the manifest's batch sizes (min, opt, max), Polygraphy's ONNX Runtime
   runner and the runtime's own call (``Purifier.run_graph``) get the same inputs, and Polygraphy's
   comparator compares their outputs.
3. TensorRT, where ``tensorrt`` imports: ``build-engines`` (fp32), then the runtime's TensorRT
   engines against Polygraphy's ONNX Runtime outputs on the same inputs. Elsewhere this step is
   reported as skipped, with the reason.

Inputs are seeded random images in [0, 1] with their blur (the kernels' own), a sign-perturbed
copy for the AP graphs, and ap_setup's outputs (the runtime's) as ap_grad's constants, so every
graph sees the values it sees in the loop. Exit status: 0 every check passed, 1 a check failed,
2 the directory or the tools refused.

Polygraphy API used: polygraphy.backend.onnx.OnnxFromPath, util.str_from_onnx / get_input_metadata;
polygraphy.backend.onnxrt.OnnxrtRunner / SessionFromOnnx; polygraphy.comparator.Comparator.run /
compare_accuracy, RunResults, IterationResult, SimpleCompareFunc (CompareFunc.simple before 0.50).
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/polygraphy/index.html
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from zeropur_rt.manifest import Manifest, load_manifest

RUNNER = "polygraphy-onnxrt"


@dataclass(frozen=True)
class CheckRow:
    step: str  # "inspect", "onnxruntime", "tensorrt"
    graph: str
    batch: int | None
    ok: bool | None  # None: skipped
    detail: str


def _polygraphy() -> Any:
    try:
        import polygraphy
    except ImportError as e:
        raise ImportError(f"zeropur-export check needs Polygraphy ({e}): pip install 'zeropur-rt[check]'") from e
    from polygraphy.logger import G_LOGGER
    G_LOGGER.module_severity = G_LOGGER.ERROR  # our table reports; Polygraphy's per-run chatter is noise here
    return polygraphy


def _compare_func(rtol: float, atol: float, stat: str) -> Any:
    try:
        from polygraphy.comparator import SimpleCompareFunc  # Polygraphy >= 0.50
        return SimpleCompareFunc(rtol=rtol, atol=atol, check_error_stat=stat)
    except ImportError:
        from polygraphy.comparator import CompareFunc
        return CompareFunc.simple(rtol=rtol, atol=atol, check_error_stat=stat)


def inspect_graph(d: Path, m: Manifest, graph: str) -> CheckRow:
    """Polygraphy's inspection of one graph, held to the manifest's I/O and batch range."""
    from polygraphy.backend.onnx import OnnxFromPath
    from polygraphy.backend.onnx import util as onnx_util
    from polygraphy.datatype import DataType

    from zeropur_export.engines.builder import EngineBuildError, input_profile, onnx_input_dims

    spec = m.graphs[graph]
    path = d / spec["file"]
    try:
        model = OnnxFromPath(str(path))()
        summary = onnx_util.str_from_onnx(model)
        ins = onnx_util.get_input_metadata(model.graph)
        outs = onnx_util.get_output_metadata(model.graph)
    except Exception as e:  # noqa: BLE001 - any failure to inspect is the finding
        return CheckRow("inspect", graph, None, False, f"Polygraphy could not inspect {path.name}: {e}")
    problems = []
    if list(ins.keys()) != list(spec["inputs"]) or list(outs.keys()) != list(spec["outputs"]):
        problems.append(f"I/O {list(ins)} / {list(outs)}, the manifest says {spec['inputs']} / {spec['outputs']}")
    for name, meta in [*ins.items(), *outs.items()]:
        if DataType.to_dtype(meta.dtype, "numpy") != np.float32:
            problems.append(f"{name} is {meta.dtype}, the runtime exchanges float32 only")
    try:
        for name, dims in onnx_input_dims(path).items():
            input_profile(graph, name, dims, m.batch)
    except EngineBuildError as e:
        problems.append(str(e))
    nodes = summary.split("Node(s)")[0].rsplit("----", 1)[-1].strip() if "Node(s)" in summary else "?"
    if problems:
        return CheckRow("inspect", graph, None, False, "; ".join(problems))
    return CheckRow("inspect", graph, None, True, f"{nodes} nodes, {len(ins)} inputs, {len(outs)} outputs")


def graph_feeds(pur: Any, n: int, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Inputs of every graph at batch n, as the loop would feed them (see the module docstring)."""
    from zeropur_rt.kernels.sets import host_kernels

    rng = np.random.default_rng(seed + n)
    x = rng.random((n, *pur.chw), dtype=np.float32)
    xb = np.empty_like(x)
    host_kernels("auto").blur(x, xb, pur.cfg.blur_sigma)
    feeds = {"classifier": {"x": x}, "gs_grad": {"x": x, "x_blur": xb}}
    if "ap_setup" in pur.manifest.graphs:
        coarse = np.clip(x + pur.cfg.eps * np.sign(rng.random(x.shape) - 0.5), 0, 1).astype(np.float32)
        feeds["ap_setup"] = {"x_in": x, "coarse": coarse}
        feeds["ap_grad"] = pur.run_graph("ap_setup", feeds["ap_setup"]) | {"fine": coarse}
    return {g: f for g, f in feeds.items() if g in pur.manifest.graphs}


def _compare(reference: dict[str, np.ndarray], tested: dict[str, np.ndarray], name: str, compare_func: Any) -> tuple[bool, str]:
    """Polygraphy's comparator on one call's outputs: the ONNX Runtime runner's vs ``name``'s."""
    from polygraphy.comparator import Comparator, IterationResult, RunResults

    results = RunResults()
    results.append((RUNNER, [IterationResult(reference, runner_name=RUNNER)]))
    results.append((name, [IterationResult(tested, runner_name=name)]))
    ok = bool(Comparator.compare_accuracy(results, compare_func=compare_func))
    errs = []
    for k, a in reference.items():
        b = np.asarray(tested[k], np.float64)
        diff = np.abs(b - a)
        errs.append(f"{k} max abs {diff.max():.1e}, max rel {(diff / np.maximum(np.abs(a), 1e-12)).max():.1e}")
    return ok, "; ".join(errs)


def _polygraphy_outputs(d: Path, m: Manifest, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator

    runner = OnnxrtRunner(SessionFromOnnx(str(d / m.graphs[graph]["file"]), providers=["CPUExecutionProvider"]),
                          name=RUNNER)
    run = Comparator.run([runner], data_loader=[feeds])
    return {k: np.asarray(v) for k, v in run[0][1][0].items()}


def check_artifact(artifact_dir: str | os.PathLike, *, rtol: float = 1e-4, atol: float = 1e-5, stat: str = "elemwise",
                   trt: str = "auto", trt_rtol: float = 1e-3, trt_atol: float = 1e-5, trt_stat: str = "median",
                   threads: int | None = None, log: Callable[[str], None] = print) -> list[CheckRow]:
    """Every check of the module docstring; one row per (step, graph, batch). ``trt``: "auto" (where
    tensorrt imports), "off" or "on" (refuse without it)."""
    from zeropur_rt.pipeline import Purifier

    _polygraphy()
    d = Path(artifact_dir).absolute()
    m = load_manifest(d)  # every hash verified first
    rows = [inspect_graph(d, m, g) for g in m.graphs]
    for r in rows:
        log(_fmt(r))
    if not all(r.ok for r in rows):
        return rows
    batches = sorted({int(m.batch[k]) for k in ("min", "opt", "max")})
    pur = Purifier.load(d, threads=threads)
    try:
        feeds = {n: graph_feeds(pur, n) for n in batches}
        reference = {(n, g): _polygraphy_outputs(d, m, g, f) for n in batches for g, f in feeds[n].items()}
        func = _compare_func(rtol, atol, stat)
        for (n, g), ref in reference.items():
            ok, detail = _compare(ref, pur.run_graph(g, feeds[n][g]), "zeropur_rt-onnxruntime", func)
            rows.append(CheckRow("onnxruntime", g, n, ok, detail))
            log(_fmt(rows[-1]))
    finally:
        pur.close()
    rows += _check_tensorrt(d, m, feeds, reference, trt, _compare_func(trt_rtol, trt_atol, trt_stat), log)
    return rows


def _check_tensorrt(d: Path, m: Manifest, feeds: dict[int, dict[str, dict[str, np.ndarray]]],
                    reference: dict[tuple[int, str], dict[str, np.ndarray]], mode: str, func: Any,
                    log: Callable[[str], None]) -> list[CheckRow]:
    import importlib.util

    from zeropur_rt.pipeline import Purifier

    if mode == "off":
        why = "skipped (--trt off)"
    elif importlib.util.find_spec("tensorrt") is None:
        why = "skipped: tensorrt is not importable here (pip install 'zeropur-rt[trt-cu12]' or [trt-cu13] on a GPU machine)"
    else:
        why = ""
    if why:
        if mode == "on":
            raise ImportError(f"--trt on: {why}")
        row = CheckRow("tensorrt", "*", None, None, why)
        log(_fmt(row))
        return [row]
    from zeropur_export.engines.builder import build_engines

    build_engines(d, precision="fp32", log=log)
    rows = []
    with Purifier.load(d, backend="tensorrt", device="cuda", precision="fp32") as pur:
        for (n, g), ref in reference.items():
            ok, detail = _compare(ref, pur.run_graph(g, feeds[n][g]), "zeropur_rt-tensorrt", func)
            rows.append(CheckRow("tensorrt", g, n, ok, detail))
            log(_fmt(rows[-1]))
    return rows


def _fmt(r: CheckRow) -> str:
    verdict = {True: "ok  ", False: "FAIL", None: "skip"}[r.ok]
    where = r.graph if r.batch is None else f"{r.graph} @ batch {r.batch}"
    return f"{verdict} {r.step:<11} {where:<22} {r.detail}"
