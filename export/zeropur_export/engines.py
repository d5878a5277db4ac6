"""``zeropur-export build-engines DIR``: TensorRT engines for every graph of an artifact directory.

One engine per graph (``classifier``, ``gs_grad``, ``ap_setup``, ``ap_grad``), one optimisation
profile = the manifest's batch range (min/opt/max), stored beside the ONNX files as
``<graph>.sm<CC>.trt<MAJOR.MINOR>.<precision>.engine`` and recorded in the manifest's ``engines``
section under ``sm<CC>.trt<MAJOR.MINOR>.<precision>`` with their sha256 in ``files``. Engines are
written under temp names and renamed into place only after every graph built; the manifest is
rewritten atomically (temp file + rename) last, so a failed build leaves the directory as it was.

A persistent timing cache (``timing_cache.sm<CC>.trt<MAJOR.MINOR>.bin`` in the artifact directory,
or ``--timing-cache PATH``) makes rebuilds fast.

Precision (see ``zeropur_rt.engine_record.precision_plan``):
  TensorRT 10.x: builder flags (fp16 = BuilderFlag.FP16; fp32 = TF32 cleared for fp32 parity).
  TensorRT 11.x: no FP16/BF16 flags, strongly typed networks only: fp16 builds from an FP16 copy
  of the ONNX graph (``onnx_fp16_copy``: convolutions/matmuls in float16, float32 elsewhere and at
  the inputs/outputs), fp32 from the graph as is.

TensorRT Python API used (10.x / 11.x):
  Builder / create_network / create_optimization_profile:
    https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Builder.html
  IBuilderConfig (set_flag / clear_flag, set_timing_cache, add_optimization_profile, set_memory_pool_limit):
    https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/BuilderConfig.html
  OnnxParser.parse_from_file:
    https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/parsers/Onnx/pyOnnx.html
  NetworkDefinitionCreationFlag.STRONGLY_TYPED (10.x; deprecated and ignored in 11.x, always strongly typed):
    https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Graph/Network.html
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from zeropur_rt.cuda_driver import CudaDevice, CudaError
from zeropur_rt.engine_record import (PRECISIONS, PrecisionPlan, cc_str, engine_filename, engine_key, precision_plan,
                                      sm_tag, trt_major_minor)
from zeropur_rt.runners.trt_engine import import_tensorrt
from zeropur_rt.files import atomic_write_bytes, atomic_write_json, sha256_file
from zeropur_rt.manifest import MANIFEST, Manifest, load_manifest

# Ops run in FP16 in the FP16 ONNX copy: the convolutions and matrix products (where the time goes).
# Everything else (BatchNorm, the losses' reductions, norms, divisions, the 1e-30 / 1e-10 floors
# that underflow fp16, sums of squares that overflow its 65504) stays float32.
FP16_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class EngineBuildError(RuntimeError):
    """TensorRT could not build an engine (nothing in the artifact directory was changed)."""


def timing_cache_path(artifact_dir: Path, cc: Sequence[int] | str, trt_version: str) -> Path:
    return artifact_dir / f"timing_cache.{sm_tag(cc)}.trt{trt_major_minor(trt_version)}.bin"


def onnx_fp16_copy(src: Path, dst: Path, fp16_ops: Sequence[str] = FP16_OPS) -> Path:
    """An FP16 copy of an ONNX graph for TensorRT 11's strongly typed builds: FP16 islands.

    Every ``fp16_ops`` node computes in float16: its float32 weights (initializers used by such
    nodes only) are stored as float16, other float32 inputs get a Cast to float16, its outputs a
    Cast back to float32 under the original names. Graph inputs and outputs stay float32, and the
    result is type-consistent by construction (checked with the ONNX checker and strict shape
    inference). onnxconverter-common's convert_float_to_float16(keep_io_types=True) is not used: on
    our exported graphs it emits graphs that fail ONNX type checking (a float16 ``grad`` output, a
    Gemm with mixed float/float16 inputs) and clamps small weights to +-1e-7.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    g = model.graph
    ops = set(fp16_ops)
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, set[str]] = {}
    for node in g.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    converted: set[str] = set()
    nodes = []
    for k, node in enumerate(g.node):
        if node.op_type not in ops:
            nodes.append(node)
            continue
        for i, name in enumerate(node.input):
            if not name:
                continue
            t = inits.get(name)
            if t is not None and t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16) and consumers[name] <= ops:
                if t.data_type == TensorProto.FLOAT and name not in converted:
                    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), name))
                    converted.add(name)
                continue
            cast = f"{name}__zp_fp16_{k}_{i}"
            nodes.append(helper.make_node("Cast", [name], [cast], to=TensorProto.FLOAT16, name=f"zp_cast16_{k}_{i}"))
            node.input[i] = cast
        outs = list(node.output)
        for i, name in enumerate(outs):
            if name:
                node.output[i] = f"{name}__zp_fp16"
        nodes.append(node)
        for i, name in enumerate(outs):
            if name:
                nodes.append(helper.make_node("Cast", [f"{name}__zp_fp16"], [name], to=TensorProto.FLOAT,
                                              name=f"zp_cast32_{k}_{i}"))
    del g.node[:]
    g.node.extend(nodes)
    for coll in (g.value_info, g.input):  # stale float32 type records of the weights now stored as float16
        keep = [v for v in coll if v.name not in converted]
        del coll[:]
        coll.extend(keep)
    try:
        onnx.checker.check_model(model)
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as e:  # noqa: BLE001
        raise EngineBuildError(f"the FP16 copy of {src.name} is not a valid ONNX graph: {e}") from e
    onnx.save(model, str(dst))
    return dst


def _builder_flag(trt: Any, name: str) -> Any:
    flag = getattr(trt.BuilderFlag, name, None)
    if flag is None:
        raise EngineBuildError(f"TensorRT {trt.__version__} has no BuilderFlag.{name}")
    return flag


def build_one(trt: Any, logger: Any, onnx_path: Path, plan: PrecisionPlan, batch: dict[str, int], cache: Any,
              workspace_bytes: int | None = None, opt_level: int | None = None) -> tuple[bytes, Any]:
    """Parse one ONNX graph and build a serialised engine; returns (plan bytes, the timing cache in use)."""
    builder = trt.Builder(logger)
    flags = 0
    if plan.strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED") and plan.trt_major < 11:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)  # explicit batch is the only mode in TensorRT >= 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT's ONNX parser rejected {onnx_path.name}:\n  {errs}")
    config = builder.create_builder_config()
    for name in plan.set_flags:
        config.set_flag(_builder_flag(trt, name))
    for name in plan.clear_flags:
        if hasattr(trt.BuilderFlag, name):
            config.clear_flag(getattr(trt.BuilderFlag, name))
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if opt_level is not None:
        config.builder_optimization_level = int(opt_level)
    if cache is None:
        cache = config.create_timing_cache(b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        cache = config.create_timing_cache(b"")  # a cache from another device / version: start afresh
        config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        dims = tuple(int(d) for d in t.shape)
        if dims[0] != -1 or any(d < 0 for d in dims[1:]):
            raise EngineBuildError(f"{onnx_path.name}: input {t.name} has shape {dims}; the format has a dynamic batch "
                                   "dimension only (re-export the artifact)")
        rest = dims[1:]
        profile.set_shape(t.name, (batch["min"], *rest), (batch["opt"], *rest), (batch["max"], *rest))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT failed to build {onnx_path.name} ({plan.describe()}); see the messages above")
    return bytes(memoryview(serialized)), cache


def _engine_info(trt: Any, logger: Any, data: bytes) -> dict[str, Any]:
    engine = trt.Runtime(logger).deserialize_cuda_engine(data)
    if engine is None:
        raise EngineBuildError("the engine just built does not deserialise")
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    return {"device_memory_bytes": int(getattr(engine, "device_memory_size_v2", 0) or engine.device_memory_size),
            "inputs": [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT],
            "outputs": [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]}


def engines_up_to_date(artifact_dir: Path, m: Manifest, key: str) -> bool:
    rec = m.engines.get(key)
    if not rec:
        return False
    files = [g["file"] for g in rec.get("graphs", {}).values()]
    return (set(rec.get("graphs", {})) >= set(m.graphs) and rec.get("batch") == m.batch
            and all(f in m.files and (artifact_dir / f).is_file() for f in files))


def build_engines(artifact_dir: str | os.PathLike, *, precision: str = "fp32", timing_cache: str | os.PathLike | None = None,
                  workspace_mb: int | None = None, opt_level: int | None = None, device: int = 0, force: bool = False,
                  verbose: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build (or keep, when up to date and not ``force``) the engine set for this GPU + TensorRT + precision.

    Returns the manifest record of the engine set.
    """
    d = Path(artifact_dir).absolute()
    m = load_manifest(d)  # verifies every hash first: never build engines from tampered graphs
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    trt = import_tensorrt()
    plan = precision_plan(trt.__version__, precision)
    cuda = CudaDevice(device)
    try:
        cc = cuda.compute_capability
        gpu = cuda.name
    finally:
        cuda.close()
    key = engine_key(cc, trt.__version__, precision)
    if not force and engines_up_to_date(d, m, key):
        log(f"engines {key} are up to date in {d} (pass --force to rebuild)")
        return dict(m.engines[key])
    log(f"building {key} for {gpu}: {plan.describe()}")
    from zeropur_rt.runners.trt_engine import TrtLogger

    logger = TrtLogger.make(trt, verbose)
    cache_path = Path(timing_cache) if timing_cache else timing_cache_path(d, cc, trt.__version__)
    cache = None
    if cache_path.is_file():
        cfg = trt.Builder(logger).create_builder_config()
        cache = cfg.create_timing_cache(cache_path.read_bytes())
    built: dict[str, tuple[bytes, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix=".engines.", dir=d) as tmp:
        for g, spec in m.graphs.items():
            src = d / spec["file"]
            if plan.onnx_fp16:
                src = onnx_fp16_copy(src, Path(tmp) / f"{g}.fp16.onnx")
            t0 = time.perf_counter()
            data, cache = build_one(trt, logger, src, plan, m.batch, cache,
                                    workspace_bytes=workspace_mb * 2**20 if workspace_mb else None, opt_level=opt_level)
            info = _engine_info(trt, logger, data)
            if sorted(info["inputs"]) != sorted(spec["inputs"]) or sorted(info["outputs"]) != sorted(spec["outputs"]):
                raise EngineBuildError(f"{g}: engine I/O {info['inputs']} / {info['outputs']} differ from the graph's "
                                       f"{spec['inputs']} / {spec['outputs']}")
            built[g] = (data, info)
            log(f"  {g}: {len(data) / 2**20:.1f} MiB engine, {info['device_memory_bytes'] / 2**20:.1f} MiB activations "
                f"at batch {m.batch['max']}, {time.perf_counter() - t0:.1f}s")
    # everything built: write engines (temp + rename), the timing cache, then the manifest
    record: dict[str, Any] = {"compute_capability": cc_str(cc), "tensorrt": str(trt.__version__), "precision": precision,
                              "device": gpu, "batch": dict(m.batch), "strongly_typed": plan.strongly_typed,
                              "onnx_fp16": plan.onnx_fp16,
                              "built": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "graphs": {}}
    for g, (data, info) in built.items():
        fname = engine_filename(g, cc, trt.__version__, precision)
        atomic_write_bytes(d / fname, data)
        m.files[fname] = sha256_file(d / fname)
        record["graphs"][g] = {"file": fname, "bytes": len(data), "device_memory_bytes": info["device_memory_bytes"]}
    if cache is not None:
        try:
            atomic_write_bytes(cache_path, bytes(memoryview(cache.serialize())))
            log(f"  timing cache: {cache_path}")
        except OSError as e:  # a read-only user path must not lose the engines
            log(f"  warning: could not write the timing cache {cache_path}: {e}")
    m.engines[key] = record
    atomic_write_json(d / MANIFEST, m.to_dict())
    load_manifest(d)  # round trip
    log(f"recorded engines {key} in {d / MANIFEST}")
    return record


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zeropur-export build-engines",
                                description="Build TensorRT engines for an artifact directory on this GPU.")
    p.add_argument("artifact_dir", help="artifact directory written by `zeropur-export export MODEL --out DIR`")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32 (parity with the reference; TF32 off) or fp16 (TensorRT 10: BuilderFlag.FP16; "
                        "TensorRT 11: an FP16 copy of the ONNX graphs, convolutions in float16)")
    p.add_argument("--timing-cache", help="timing cache file (default: timing_cache.smXX.trtX.Y.bin in the artifact dir)")
    p.add_argument("--workspace-mb", type=int, help="builder workspace limit in MiB (default: TensorRT's, the device memory)")
    p.add_argument("--opt-level", type=int, choices=range(0, 6), metavar="0-5", help="builder optimisation level (default 3)")
    p.add_argument("--device", type=int, default=0, help="CUDA device ordinal")
    p.add_argument("--force", action="store_true", help="rebuild even if up-to-date engines are recorded")
    p.add_argument("--verbose", action="store_true", help="print TensorRT's info/warning messages")
    return p


def main_build_engines(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``zeropur-export build-engines DIR [--precision fp32|fp16] ...``; returns the exit code."""
    args = make_parser().parse_args(argv)
    try:
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


if __name__ == "__main__":
    sys.exit(main_build_engines())
