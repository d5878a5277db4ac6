"""The TensorRT engine builder (``zeropur-export build-engines DIR``): engines for every graph of an artifact directory.

One engine per graph (``classifier``, ``gs_grad``, ``ap_setup``, ``ap_grad``), one optimisation
profile = the manifest's batch range (min/opt/max; a fixed-batch export, --max-batch 1, gets
min = opt = max = 1), stored beside the ONNX files as
``<graph>.sm<CC>.trt<MAJOR.MINOR>.<precision>.engine`` and recorded in the manifest's ``engines``
section under ``sm<CC>.trt<MAJOR.MINOR>.<precision>`` with their sha256 in ``files``. Engines are
written under temp names and renamed into place only after every graph built; the manifest is
rewritten atomically (temp file + rename) last, so a failed build leaves the directory as it was.

A persistent timing cache (``timing_cache.sm<CC>.trt<MAJOR.MINOR>.bin`` in the artifact directory,
or ``--timing-cache PATH``) makes rebuilds fast.

``plan_build`` (and ``--dry-run``) computes what will be built from the manifest and the ONNX
files alone, without TensorRT; the builder follows that plan.

Precision (see ``zeropur_rt.engine_record.precision_plan``), the same on TensorRT 10.x and 11.x:
fp32 builds the graph as is with TF32 cleared; fp16 builds an FP16 copy of the ONNX graph
(``onnx_fp16_copy``: convolutions/matmuls in float16, float32 elsewhere and at the inputs/outputs)
on a strongly typed network, so no layer the graph keeps in float32 runs in half precision.

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

import datetime as _dt
import os
import tempfile
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from zeropur_export.engines.fp16 import EngineBuildError, onnx_fp16_copy
from zeropur_rt.cuda_driver import CudaDevice, CudaError
from zeropur_rt.engine_record import (PrecisionPlan, cc_str, check_precision, engine_filename, engine_key,
                                      precision_plan, sm_tag, trt_major_minor, versions_compatible)
from zeropur_rt.runners.trt_engine import engine_device_memory, import_tensorrt, trt_logger
from zeropur_rt.files import atomic_write_bytes, atomic_write_json, sha256_file
from zeropur_rt.manifest import MANIFEST, Manifest, load_manifest

def timing_cache_path(artifact_dir: Path, cc: Sequence[int] | str, trt_version: str) -> Path:
    return artifact_dir / f"timing_cache.{sm_tag(cc)}.trt{trt_major_minor(trt_version)}.bin"


def _builder_flag(trt: Any, name: str) -> Any:
    flag = getattr(trt.BuilderFlag, name, None)
    if flag is None:
        raise EngineBuildError(f"TensorRT {trt.__version__} has no BuilderFlag.{name}")
    return flag


# ---------------------------------------------------------------- the plan (no TensorRT needed)
Profile = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def input_profile(where: str, name: str, dims: Sequence[int], batch: Mapping[str, int]) -> Profile:
    """The (min, opt, max) shapes of one network input for the manifest's batch range.

    ``dims``: the input's shape with -1 for a dynamic dimension (as TensorRT's network and
    ``onnx_input_dims`` give it). A dynamic batch gets the manifest's range; a fixed batch (an
    export with --max-batch 1 has static shapes) is accepted when the range is that one size and
    gets min = opt = max = it. Every other dimension must be fixed.
    """
    dims = tuple(int(d) for d in dims)
    lo, opt, hi = int(batch["min"]), int(batch["opt"]), int(batch["max"])
    if not dims or any(d < 0 for d in dims[1:]):
        raise EngineBuildError(f"{where}: input {name} has shape {dims}; the format has a dynamic batch dimension "
                               "at most (re-export the artifact)")
    rest = dims[1:]
    if dims[0] < 0:
        return (lo, *rest), (opt, *rest), (hi, *rest)
    if not dims[0] == lo == hi:
        raise EngineBuildError(f"{where}: input {name} has a fixed batch of {dims[0]}, the manifest's batch range is "
                               f"{dict(batch)}; re-export the artifact")
    return dims, dims, dims


def onnx_input_dims(path: Path) -> dict[str, tuple[int, ...]]:
    """Each graph input's shape from the ONNX file, -1 for a symbolic or unknown dimension."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    return {i.name: tuple(d.dim_value if d.HasField("dim_value") else -1 for d in i.type.tensor_type.shape.dim)
            for i in model.graph.input if i.name not in weights}


@dataclass(frozen=True)
class GraphPlan:
    graph: str
    onnx: str  # file in the artifact directory
    engine: str  # file it will be written to
    profiles: dict[str, Profile]


@dataclass(frozen=True)
class BuildPlan:
    """What ``build_engines`` will build: the record key, the precision recipe, one profile per input."""

    key: str
    precision: PrecisionPlan
    batch: dict[str, int]
    graphs: tuple[GraphPlan, ...]

    def describe(self) -> list[str]:
        lines = [f"engine set {self.key}: {self.precision.describe()}, batch {self.batch}"]
        for g in self.graphs:
            shapes = "; ".join(f"{n} min {p[0]} opt {p[1]} max {p[2]}" for n, p in g.profiles.items())
            lines.append(f"  {g.graph}: {g.onnx} -> {g.engine}: {shapes}")
        return lines


def plan_build(artifact_dir: Path, m: Manifest, trt_version: str, cc: Sequence[int] | str, precision: str) -> BuildPlan:
    """The build plan from the manifest and the ONNX files alone (``--dry-run``; also what the
    builder checks its parsed networks against)."""
    plan = precision_plan(trt_version, precision)
    graphs = []
    for g, spec in m.graphs.items():
        dims = onnx_input_dims(artifact_dir / spec["file"])
        graphs.append(GraphPlan(g, spec["file"], engine_filename(g, cc, trt_version, precision),
                                {n: input_profile(f"{g} ({spec['file']})", n, d, m.batch) for n, d in dims.items()}))
    return BuildPlan(engine_key(cc, trt_version, precision), plan, dict(m.batch), tuple(graphs))


# ---------------------------------------------------------------- the build (TensorRT)
def build_one(trt: Any, logger: Any, onnx_path: Path, plan: PrecisionPlan, profiles: Mapping[str, Profile],
              cache: Any, workspace_bytes: int | None = None, opt_level: int | None = None) -> tuple[bytes, Any]:
    """Parse one ONNX graph and build a serialised engine; returns (plan bytes, the timing cache in use)."""
    mark = logger.errors.mark()
    builder = trt.Builder(logger)
    flags = 0
    if plan.strongly_typed and plan.trt_major < 11:  # 11.x: always strongly typed, the flag is deprecated
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
        if t.name not in profiles:
            raise EngineBuildError(f"{onnx_path.name}: TensorRT sees an input {t.name} the plan does not have")
        if tuple(int(d) for d in t.shape)[1:] != profiles[t.name][0][1:]:
            raise EngineBuildError(f"{onnx_path.name}: TensorRT parsed input {t.name} as {tuple(t.shape)}, the ONNX "
                                   f"graph says {profiles[t.name][0]}")
        profile.set_shape(t.name, *profiles[t.name])
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        errs = "; ".join(logger.errors.since(mark)[-3:])
        raise EngineBuildError(f"TensorRT failed to build {onnx_path.name} ({plan.describe()}): {errs or 'no message'}")
    return bytes(memoryview(serialized)), cache


def _engine_info(trt: Any, logger: Any, data: bytes) -> dict[str, Any]:
    engine = trt.Runtime(logger).deserialize_cuda_engine(data)
    if engine is None:
        raise EngineBuildError("the engine just built does not deserialise")
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    return {"device_memory_bytes": engine_device_memory(engine),
            "inputs": [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT],
            "outputs": [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]}


def engines_up_to_date(artifact_dir: Path, m: Manifest, key: str, trt_version: str) -> bool:
    """The recorded set ``key`` has every graph, the manifest's batch range, its files, and was built by
    a TensorRT the runtime will load it with (same major.minor.patch: the key has major.minor only,
    so after a patch upgrade the set under the same key is stale)."""
    rec = m.engines.get(key)
    if not rec:
        return False
    try:
        same_trt = versions_compatible(str(rec.get("tensorrt", "")), trt_version)
    except ValueError:
        return False
    files = [g["file"] for g in rec.get("graphs", {}).values()]
    return (same_trt and set(rec.get("graphs", {})) >= set(m.graphs) and rec.get("batch") == m.batch
            and all(f in m.files and (artifact_dir / f).is_file() for f in files))


def build_engines(artifact_dir: str | os.PathLike, *, precision: str = "fp32", timing_cache: str | os.PathLike | None = None,
                  workspace_mb: int | None = None, opt_level: int | None = None, device: int = 0, force: bool = False,
                  verbose: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build (or keep, when up to date and not ``force``) the engine set for this GPU + TensorRT + precision.

    Returns the manifest record of the engine set.
    """
    d = Path(artifact_dir).absolute()
    m = load_manifest(d)  # verifies every hash first: never build engines from tampered graphs
    check_precision(precision)
    trt = import_tensorrt()
    # The device's primary context stays current on this thread for the whole build: TensorRT builds
    # on the CUDA runtime's current device, which is device 0 once no context is current.
    cuda = CudaDevice(device)
    try:
        cc, gpu = cuda.compute_capability, cuda.name
        plan = plan_build(d, m, trt.__version__, cc, precision)
        if not force and engines_up_to_date(d, m, plan.key, trt.__version__):
            log(f"engines {plan.key} are up to date in {d} (pass --force to rebuild)")
            return dict(m.engines[plan.key])
        log(f"building on {gpu} (device {device}):")
        for line in plan.describe():
            log(line)
        cache_path = Path(timing_cache) if timing_cache else timing_cache_path(d, cc, trt.__version__)
        built = _build_all(trt, d, m, plan, cuda, cache_path, workspace_mb, opt_level, verbose, log)
    finally:
        cuda.close()
    return _record(trt, d, m, plan, cc, gpu, built, log)


def _build_all(trt: Any, d: Path, m: Manifest, plan: BuildPlan, cuda: CudaDevice, cache_path: Path,
               workspace_mb: int | None, opt_level: int | None, verbose: bool,
               log: Callable[[str], None]) -> dict[str, tuple[bytes, dict[str, Any]]]:
    """Every graph's engine in memory (nothing written yet but the timing cache)."""
    logger = trt_logger(trt, verbose)
    cache = None
    if cache_path.is_file():
        cache = trt.Builder(logger).create_builder_config().create_timing_cache(cache_path.read_bytes())
    built: dict[str, tuple[bytes, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix=".engines.", dir=d) as tmp:
        for gp in plan.graphs:
            spec = m.graphs[gp.graph]
            src = d / gp.onnx
            if plan.precision.onnx_fp16:
                src = onnx_fp16_copy(src, Path(tmp) / f"{gp.graph}.fp16.onnx")
            t0 = time.perf_counter()
            cuda.make_current()
            data, cache = build_one(trt, logger, src, plan.precision, gp.profiles, cache,
                                    workspace_bytes=workspace_mb * 2**20 if workspace_mb else None, opt_level=opt_level)
            info = _engine_info(trt, logger, data)
            if sorted(info["inputs"]) != sorted(spec["inputs"]) or sorted(info["outputs"]) != sorted(spec["outputs"]):
                raise EngineBuildError(f"{gp.graph}: engine I/O {info['inputs']} / {info['outputs']} differ from the "
                                       f"graph's {spec['inputs']} / {spec['outputs']}")
            built[gp.graph] = (data, info)
            log(f"  {gp.graph}: {len(data) / 2**20:.1f} MiB engine, {info['device_memory_bytes'] / 2**20:.1f} MiB "
                f"activations at batch {plan.batch['max']}, {time.perf_counter() - t0:.1f}s")
    if cache is not None:
        try:
            atomic_write_bytes(cache_path, bytes(memoryview(cache.serialize())))
            log(f"  timing cache: {cache_path}")
        except OSError as e:  # a read-only user path must not lose the engines
            log(f"  warning: could not write the timing cache {cache_path}: {e}")
    return built


def _record(trt: Any, d: Path, m: Manifest, plan: BuildPlan, cc: Sequence[int], gpu: str,
            built: Mapping[str, tuple[bytes, dict[str, Any]]], log: Callable[[str], None]) -> dict[str, Any]:
    """Everything built: write the engines (temp + rename), then the manifest."""
    record: dict[str, Any] = {"compute_capability": cc_str(cc), "tensorrt": str(trt.__version__),
                              "precision": plan.precision.precision, "device": gpu, "batch": dict(m.batch),
                              "strongly_typed": plan.precision.strongly_typed, "onnx_fp16": plan.precision.onnx_fp16,
                              "built": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "graphs": {}}
    for gp in plan.graphs:
        data, info = built[gp.graph]
        atomic_write_bytes(d / gp.engine, data)
        m.files[gp.engine] = sha256_file(d / gp.engine)
        record["graphs"][gp.graph] = {"file": gp.engine, "bytes": len(data),
                                      "device_memory_bytes": info["device_memory_bytes"]}
    m.engines[plan.key] = record
    atomic_write_json(d / MANIFEST, m.to_dict())
    load_manifest(d)  # round trip
    log(f"recorded engines {plan.key} in {d / MANIFEST}")
    return record


def dry_run(artifact_dir: str | os.PathLike, *, precision: str = "fp32", trt_version: str | None = None,
            compute_capability: str | None = None, log: Callable[[str], None] = print) -> BuildPlan:
    """The plan ``build_engines`` would follow, without TensorRT or a GPU where both versions are given."""
    d = Path(artifact_dir).absolute()
    m = load_manifest(d)
    if trt_version is None:
        try:
            trt_version = import_tensorrt().__version__
        except ImportError as e:
            raise ValueError(f"--dry-run without TensorRT needs --trt-version (e.g. 10.3.0): {e}") from e
    if compute_capability is None:
        try:
            cuda = CudaDevice(0)
        except (ImportError, CudaError, ValueError) as e:
            raise ValueError(f"--dry-run without a GPU needs --compute-capability (e.g. 8.7): {e}") from e
        compute_capability = cc_str(cuda.compute_capability)
        cuda.close()
    plan = plan_build(d, m, trt_version, compute_capability, precision)
    for line in plan.describe():
        log(line)
    return plan
