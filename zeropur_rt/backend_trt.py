"""TensorRT backend: prebuilt engines, name-based I/O, and a device-resident ZeroPur loop.

Two levels:

* ``TensorRTRunner`` -- the ``Runner`` interface (``run(graph, feeds)`` with host numpy in and
  out; H2D/D2H copies around ``execute_async_v3``), so ``Purifier.load(dir, backend="tensorrt",
  device="cuda")`` runs the existing host loop on TensorRT.
* ``TensorRTLoop`` -- the whole GS + AP loop on the device: the engines and our CUDA kernels
  (``zeropur_rt.kernels.cuda.CudaKernels``) launched on one stream, no host round trip inside the
  loop, and (by default) one CUDA graph per batch size captured on the first call and replayed.

Engines are built by ``zeropur-export build-engines DIR`` (``zeropur_export.engines``) and
recorded in the manifest's ``engines`` section, one record per (compute capability, TensorRT
version, precision)::

    "engines": {"sm90.trt10.8.fp32": {"compute_capability": "9.0", "tensorrt": "10.8.0.43",
                                       "precision": "fp32", "batch": {"min": 1, "opt": 32, "max": 256},
                                       "graphs": {"gs_grad": {"file": "gs_grad.sm90.trt10.8.fp32.engine",
                                                              "device_memory_bytes": 123, ...}, ...}}}

The selection and batch checks (``select_engines``, ``check_batch``, ``precision_plan``) are pure
functions of the manifest and (compute capability, TensorRT version): no TensorRT needed to test them.

Nothing here imports tensorrt or cuda-python at module import time.

API references (TensorRT Python API, 10.x and 11.x):
  ICudaEngine:       https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Engine.html
  IExecutionContext: https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/ExecutionContext.html
  Runtime:           https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Runtime.html
  CUDA graphs with enqueueV3 (warm-up before capture, recapture on shape change):
                     https://docs.nvidia.com/deeplearning/tensorrt/latest/performance/best-practices.html#cuda-graphs
"""
from __future__ import annotations

import os
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from zeropur_rt.kernels.cuda import cu_check, cu_errstr, release_primary_context
from zeropur_rt.manifest import ArtifactError, Manifest

PRECISIONS = ("fp32", "fp16")
MIN_TRT_MAJOR = 10
ENGINE_SUFFIX = ".engine"
BUILD_CMD = "zeropur-export build-engines {dir}"
ALL_GRAPHS = ("classifier", "gs_grad", "ap_setup", "ap_grad")


class TensorRTError(RuntimeError):
    """TensorRT or CUDA refused an operation (deserialisation, execution, capture)."""


class EngineMismatchError(ArtifactError):
    """The artifact has no engine usable on this GPU / TensorRT (or no engines at all)."""


class BatchSizeError(ValueError):
    """A batch outside the engines' optimisation profile."""


class DeviceMemoryError(TensorRTError, MemoryError):
    """A device allocation failed (out of GPU memory)."""


# ====================================================================== pure helpers (no TensorRT, no CUDA)


def parse_trt_version(version: str) -> tuple[int, ...]:
    """``"10.8.0.43"`` -> ``(10, 8, 0, 43)``; at least major.minor."""
    parts = re.findall(r"\d+", str(version).split("+")[0])
    if len(parts) < 2:
        raise ValueError(f"cannot parse TensorRT version {version!r}")
    return tuple(int(p) for p in parts[:4])


def trt_major_minor(version: str) -> str:
    v = parse_trt_version(version)
    return f"{v[0]}.{v[1]}"


def cc_str(cc: Sequence[int] | str) -> str:
    """(9, 0) / "9.0" / "sm90" -> "9.0"."""
    if isinstance(cc, str):
        m = re.fullmatch(r"(?:sm_?)?(\d+)\.(\d+)", cc.strip()) or re.fullmatch(r"sm_?(\d)(\d+)", cc.strip())
        if not m:
            raise ValueError(f"cannot parse compute capability {cc!r}")
        return f"{int(m.group(1))}.{int(m.group(2))}"
    major, minor = (int(v) for v in cc)
    return f"{major}.{minor}"


def sm_tag(cc: Sequence[int] | str) -> str:
    major, minor = cc_str(cc).split(".")
    return f"sm{major}{minor}"


def engine_key(cc: Sequence[int] | str, trt_version: str, precision: str) -> str:
    """Manifest key of an engine set: ``sm90.trt10.8.fp32``."""
    check_precision(precision)
    return f"{sm_tag(cc)}.trt{trt_major_minor(trt_version)}.{precision}"


def engine_filename(graph: str, cc: Sequence[int] | str, trt_version: str, precision: str) -> str:
    """``gs_grad.sm90.trt10.8.fp32.engine``, stored beside the ONNX files."""
    return f"{graph}.{engine_key(cc, trt_version, precision)}{ENGINE_SUFFIX}"


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def versions_compatible(built: str, runtime: str) -> bool:
    """TensorRT engines load only in the TensorRT version that built them (no version-compatible
    builds here): major.minor.patch must match; the build number may differ."""
    return parse_trt_version(built)[:3] == parse_trt_version(runtime)[:3]


@dataclass(frozen=True)
class PrecisionPlan:
    """How to build one precision with one TensorRT version.

    ``strongly_typed``: create the network with NetworkDefinitionCreationFlag.STRONGLY_TYPED
    (TensorRT 11: always on, the flag is accepted and ignored). ``set_flags`` / ``clear_flags``:
    BuilderFlag names. ``onnx_fp16``: build from an FP16 copy of the ONNX graph (float32 I/O kept).
    """

    precision: str
    trt_major: int
    strongly_typed: bool
    set_flags: tuple[str, ...]
    clear_flags: tuple[str, ...]
    onnx_fp16: bool

    def describe(self) -> str:
        how = "FP16 copy of the ONNX graph, " if self.onnx_fp16 else ""
        typed = "strongly typed" if self.strongly_typed else "weakly typed"
        flags = ", ".join([f"+{f}" for f in self.set_flags] + [f"-{f}" for f in self.clear_flags]) or "no flags"
        return f"{self.precision} on TensorRT {self.trt_major}: {how}{typed} network, builder flags {flags}"


def precision_plan(trt_version: str, precision: str) -> PrecisionPlan:
    """The build recipe for ``precision`` under TensorRT ``trt_version``.

    TensorRT 10.x: precision comes from builder flags: fp32 = no reduced-precision flag and TF32
    cleared (TF32 is on by default and rounds conv/matmul inputs to 10-bit mantissas, which breaks
    fp32 parity); fp16 = BuilderFlag.FP16 on a weakly typed network.
    https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/BuilderConfig.html

    TensorRT 11.x removed the FP16/BF16/INT8 builder flags and the INT8 calibrators; every network
    is strongly typed and precision comes from the graph's own types. fp32 = the float32 ONNX as is
    (TF32 still a flag there: cleared); fp16 = an FP16 copy of the ONNX graph with float32 I/O.
    https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/advanced.html#strongly-typed-networks
    """
    check_precision(precision)
    major = parse_trt_version(trt_version)[0]
    if major < MIN_TRT_MAJOR:
        raise ValueError(f"TensorRT {trt_version} is too old: zeropur-rt needs TensorRT >= {MIN_TRT_MAJOR} "
                         "(name-based I/O, opset 18 ONNX parsing)")
    if major == 10:
        if precision == "fp32":
            return PrecisionPlan("fp32", major, False, (), ("TF32",), False)
        return PrecisionPlan("fp16", major, False, ("FP16",), (), False)
    # TensorRT >= 11
    if precision == "fp32":
        return PrecisionPlan("fp32", major, True, (), ("TF32",), False)
    return PrecisionPlan("fp16", major, True, (), (), True)


def check_batch(n: int, batch: Mapping[str, int], what: str = "the TensorRT engines") -> int:
    """``n`` inside [batch["min"], batch["max"]], else a BatchSizeError saying what to do."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise BatchSizeError(f"batch size must be an integer, got {n!r}")
    n = int(n)
    lo, hi = int(batch["min"]), int(batch["max"])
    if n > hi:
        raise BatchSizeError(f"batch of {n} images exceeds the maximum batch {hi} of {what}' optimisation profile: "
                             f"split the input into batches of at most {hi}, or re-export with a larger --max-batch "
                             "and rebuild the engines (zeropur-export build-engines DIR)")
    if n < lo:
        raise BatchSizeError(f"batch of {n} images is below the minimum batch {lo} of {what}' optimisation profile: "
                             f"pad the batch to {lo}, or re-export with --min-batch {max(1, n)} and rebuild the engines")
    return n


def _describe_record(key: str, rec: Mapping[str, Any]) -> str:
    return (f"{key} (sm{cc_str(rec.get('compute_capability', '?.?')).replace('.', '')}, "
            f"TensorRT {rec.get('tensorrt', '?')}, {rec.get('precision', '?')})")


def select_engines(engines: Mapping[str, Any], cc: Sequence[int] | str, trt_version: str, *,
                   precision: str | None = None, graphs: Iterable[str] = (), batch: Mapping[str, int] | None = None,
                   artifact_dir: str | os.PathLike | None = None) -> tuple[str, dict[str, Any]]:
    """Pick the manifest engine record usable on this GPU and TensorRT, or refuse with how to rebuild.

    ``engines``: the manifest's ``engines`` section. ``cc``: this GPU's compute capability.
    ``precision``: the one wanted, or None = fp32 if present, else fp16. ``graphs``: graphs that
    must be in the record. ``batch``: the manifest's batch range, which the record must equal.
    Returns (key, record).
    """
    where = str(artifact_dir) if artifact_dir is not None else "DIR"
    rebuild = f"rebuild them on this machine with `{BUILD_CMD.format(dir=where)}`"
    if precision is not None:
        check_precision(precision)
        rebuild += f" --precision {precision}" if precision != "fp32" else ""
    want_cc = cc_str(cc)
    here = f"this machine has an sm{want_cc.replace('.', '')} GPU and TensorRT {trt_version}"
    if not engines:
        raise EngineMismatchError(f"{where} has no TensorRT engines; {rebuild}")
    usable, seen = [], []
    for key, rec in engines.items():
        if not isinstance(rec, Mapping):
            raise EngineMismatchError(f"engine record {key!r} in {where} is malformed; {rebuild}")
        seen.append(_describe_record(key, rec))
        try:
            same_cc = cc_str(rec["compute_capability"]) == want_cc
            same_trt = versions_compatible(str(rec["tensorrt"]), trt_version)
        except (KeyError, ValueError, TypeError):
            continue
        if same_cc and same_trt and (precision is None or rec.get("precision") == precision):
            usable.append((key, rec))
    if not usable:
        raise EngineMismatchError(f"the TensorRT engines in {where} were built for {', '.join(seen)}; {here}. "
                                  f"Engines run only on the GPU architecture and TensorRT version that built them: {rebuild}")
    usable.sort(key=lambda kr: PRECISIONS.index(kr[1].get("precision", "fp32")) if kr[1].get("precision") in PRECISIONS else 9)
    key, rec = usable[0]
    missing = sorted(set(graphs) - set(rec.get("graphs", {})))
    if missing:
        raise EngineMismatchError(f"engine set {key} in {where} lacks the graphs {missing}; {rebuild}")
    if batch is not None and {k: int(v) for k, v in rec.get("batch", {}).items()} != {k: int(v) for k, v in batch.items()}:
        raise EngineMismatchError(f"engine set {key} in {where} was built for batch range {rec.get('batch')}, the "
                                  f"artifact's is {dict(batch)} (re-exported since?); {rebuild}")
    return key, dict(rec)


def parse_device(device: str | int | None) -> int:
    """"cuda" / "cuda:1" / "gpu" / 1 -> device ordinal."""
    if device is None:
        return 0
    if isinstance(device, (int, np.integer)) and not isinstance(device, bool):
        return int(device)
    m = re.fullmatch(r"(?:cuda|gpu)(?::(\d+))?", str(device).strip().lower())
    if not m:
        raise ValueError(f"the tensorrt backend runs on a CUDA device: device='cuda' or 'cuda:N', got {device!r}")
    return int(m.group(1) or 0)


# ====================================================================== lazy imports


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as e:
        raise ImportError("backend 'tensorrt' needs the TensorRT (>= 10) Python bindings, which are not importable "
                          f"({e}): on x86-64 `pip install 'zeropur-rt[trt]'` (tensorrt + cuda-python); on Jetson use "
                          "JetPack's TensorRT in a venv made with --system-site-packages (docs/jetson.md)") from e
    major = parse_trt_version(trt.__version__)[0]
    if major < MIN_TRT_MAJOR:
        raise ImportError(f"TensorRT {trt.__version__} is too old: zeropur-rt needs TensorRT >= {MIN_TRT_MAJOR}")
    return trt


def import_cuda_driver() -> Any:
    try:
        from cuda.bindings import driver  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cuda as driver  # type: ignore[no-redef]  # older cuda-python
        except ImportError as e:
            raise ImportError("the tensorrt backend needs cuda-python for device memory and streams, which is not "
                              f"importable ({e}): `pip install cuda-python` with the major version of your CUDA driver "
                              "(12.x for CUDA 12 / JetPack 6, 13.x for CUDA 13)") from e
    return driver


# ====================================================================== CUDA device (driver API)


class CudaDevice:
    """The device's primary context (shared with the CUDA runtime that TensorRT uses), allocations, streams.

    Uses cuDevicePrimaryCtxRetain + cuCtxSetCurrent, never cuCtxCreate (whose signature changed in
    CUDA 13: cuCtxCreate(ctxCreateParams, flags, dev)).
    """

    def __init__(self, ordinal: int = 0):
        drv = import_cuda_driver()
        self.drv = drv
        try:
            res = drv.cuInit(0)
        except Exception as e:  # the driver library itself is missing
            raise TensorRTError(f"the CUDA driver is not loadable ({e}): the tensorrt backend needs an NVIDIA GPU") from e
        self._check(res, "cuInit (is there an NVIDIA GPU and driver?)")
        count = self._check(drv.cuDeviceGetCount(), "cuDeviceGetCount")
        if not 0 <= ordinal < int(count):
            raise ValueError(f"CUDA device {ordinal} does not exist ({count} visible)")
        self.ordinal = ordinal
        self.dev = self._check(drv.cuDeviceGet(ordinal), "cuDeviceGet")
        self.ctx = self._check(drv.cuDevicePrimaryCtxRetain(self.dev), "cuDevicePrimaryCtxRetain")
        self._retained = True
        self.make_current()
        attr = drv.CUdevice_attribute
        self.compute_capability = (
            int(self._check(drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, self.dev), "cuDeviceGetAttribute")),
            int(self._check(drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, self.dev), "cuDeviceGetAttribute")))
        name = self._check(drv.cuDeviceGetName(256, self.dev), "cuDeviceGetName")
        self.name = (name.split(b"\0", 1)[0].decode(errors="replace") if isinstance(name, (bytes, bytearray)) else str(name))

    # -- plumbing
    def _check(self, result: Any, what: str) -> Any:
        return cu_check(self.drv, result, what, TensorRTError)

    def make_current(self) -> None:
        self._check(self.drv.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")

    def mem_info(self) -> tuple[int, int]:
        free, total = self._check(self.drv.cuMemGetInfo(), "cuMemGetInfo")
        return int(free), int(total)

    # -- memory
    def alloc(self, nbytes: int, what: str = "buffer") -> int:
        self.make_current()
        err, ptr = self.drv.cuMemAlloc(max(int(nbytes), 256))
        if err == self.drv.CUresult.CUDA_ERROR_OUT_OF_MEMORY:
            try:
                free, total = self.mem_info()
                mem = f" ({free / 2**20:.0f} MiB free of {total / 2**20:.0f} MiB)"
            except TensorRTError:
                mem = ""
            raise DeviceMemoryError(
                f"out of GPU memory allocating {nbytes / 2**20:.1f} MiB for {what} on {self.name}{mem}: use a smaller "
                "batch (split the input), free GPU memory held by other processes, or rebuild the engines for a "
                "smaller --max-batch (activation memory grows with the profile maximum); see docs/jetson.md for "
                "the footprint per batch size")
        self._check((err,), f"cuMemAlloc({nbytes}) for {what}")
        return int(ptr)

    def free(self, ptr: int) -> None:
        if ptr:
            self.make_current()
            self.drv.cuMemFree(ptr)

    def stream(self) -> Any:
        self.make_current()
        return self._check(self.drv.cuStreamCreate(self.drv.CUstream_flags.CU_STREAM_NON_BLOCKING), "cuStreamCreate")

    def htod(self, dst: int, src: np.ndarray, stream: Any) -> None:
        if src.nbytes:
            self._check(self.drv.cuMemcpyHtoDAsync(dst, src.ctypes.data, src.nbytes, stream), "cuMemcpyHtoDAsync")

    def dtoh(self, dst: np.ndarray, src: int, stream: Any) -> None:
        if dst.nbytes:
            self._check(self.drv.cuMemcpyDtoHAsync(dst.ctypes.data, src, dst.nbytes, stream), "cuMemcpyDtoHAsync")

    def dtod(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        if nbytes:
            self._check(self.drv.cuMemcpyDtoDAsync(dst, src, nbytes, stream), "cuMemcpyDtoDAsync")

    def zero(self, dst: int, nbytes: int, stream: Any) -> None:
        if nbytes:
            self._check(self.drv.cuMemsetD8Async(dst, 0, nbytes, stream), "cuMemsetD8Async")

    def sync(self, stream: Any) -> None:
        self._check(self.drv.cuStreamSynchronize(stream), "cuStreamSynchronize")

    def close(self) -> None:
        if getattr(self, "_retained", False):
            release_primary_context(self.drv, self.dev, self.ctx)
            self._retained = False


# ====================================================================== one engine


class _TrtLogger:
    """A trt.ILogger that keeps errors for the exception message (and prints warnings if verbose)."""

    @staticmethod
    def make(trt: Any, verbose: bool) -> Any:
        class Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, severity: Any, msg: str) -> None:
                if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                    self.errors.append(msg)
                    if len(self.errors) > 20:
                        del self.errors[0]
                if verbose or severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                    print(f"[TensorRT] {msg}")

        return Logger()


class TrtEngine:
    """A deserialised engine: I/O names, modes, static dims, profile batch range; makes contexts."""

    def __init__(self, trt: Any, runtime: Any, logger: Any, path: Path, graph: str, inputs: Sequence[str],
                 outputs: Sequence[str]):
        self.trt, self.graph, self.path = trt, graph, path
        data = path.read_bytes()
        # IRuntime.deserialize_cuda_engine(serialized_engine) -> ICudaEngine | None
        self.engine = runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            errs = "; ".join(getattr(logger, "errors", [])[-3:])
            raise EngineMismatchError(f"TensorRT could not deserialise {path.name} ({errs or 'no message'}): it was built "
                                      f"by another TensorRT version or for another GPU; rebuild it with "
                                      f"`{BUILD_CMD.format(dir=path.parent)}`")
        e = self.engine
        # Name-based I/O (TensorRT >= 8.5; the only API in 10/11): num_io_tensors / get_tensor_name / get_tensor_mode
        names = [e.get_tensor_name(i) for i in range(e.num_io_tensors)]
        ins = [n for n in names if e.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if e.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if sorted(ins) != sorted(inputs) or sorted(outs) != sorted(outputs):
            raise EngineMismatchError(f"{path.name} has inputs {ins} / outputs {outs}, the manifest's {graph} graph has "
                                      f"{list(inputs)} / {list(outputs)}; rebuild with `{BUILD_CMD.format(dir=path.parent)}`")
        self.inputs, self.outputs = list(inputs), list(outputs)
        self.dims: dict[str, tuple[int, ...]] = {}
        for n in names:
            dt = e.get_tensor_dtype(n)
            if dt != trt.DataType.FLOAT:
                raise EngineMismatchError(f"{path.name}: tensor {n!r} is {dt}, the runtime exchanges float32 only; rebuild")
            self.dims[n] = tuple(int(d) for d in e.get_tensor_shape(n))
        # Profile 0's (min, opt, max) shape of the first input: the batch range the engine accepts.
        lo, _opt, hi = e.get_tensor_profile_shape(self.inputs[0], 0)
        self.batch = {"min": int(lo[0]), "opt": int(_opt[0]), "max": int(hi[0])}
        self.device_memory_bytes = int(getattr(e, "device_memory_size_v2", 0) or getattr(e, "device_memory_size", 0))

    def input_shape(self, name: str, n: int) -> tuple[int, ...]:
        d = self.dims[name]
        return (n, *d[1:])

    def create_context(self, scratch: int | None = None) -> Any:
        """An execution context; with ``scratch`` (device pointer of >= device_memory_bytes) its activation
        memory is that buffer (ExecutionContextAllocationStrategy.USER_MANAGED, TensorRT >= 10.0)."""
        trt, e = self.trt, self.engine
        strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
        if scratch is not None and strategy is not None:
            ctx = e.create_execution_context(strategy.USER_MANAGED)
            if ctx is not None:
                # set_device_memory(memory, size): TensorRT >= 10.1; 10.0 has the device_memory property.
                try:
                    ctx.set_device_memory(int(scratch), self.device_memory_bytes)
                except (AttributeError, TypeError):
                    ctx.device_memory = int(scratch)
        else:
            ctx = e.create_execution_context()
        if ctx is None:
            raise DeviceMemoryError(f"TensorRT could not create an execution context for {self.path.name} (out of GPU "
                                    "memory?): use a smaller batch profile (rebuild with a smaller --max-batch) or free "
                                    "GPU memory")
        return ctx

    def set_shapes(self, ctx: Any, n: int) -> dict[str, tuple[int, ...]]:
        """Set every input to batch n; returns every I/O tensor's concrete shape."""
        for name in self.inputs:
            if not ctx.set_input_shape(name, self.input_shape(name, n)):
                raise TensorRTError(f"{self.graph}: set_input_shape({name}, {self.input_shape(name, n)}) refused")
        shapes = {}
        for name in self.inputs + self.outputs:
            s = tuple(int(d) for d in ctx.get_tensor_shape(name))
            if any(d < 0 for d in s):
                raise TensorRTError(f"{self.graph}: shape of {name} unresolved after setting batch {n}: {s}")
            shapes[name] = s
        return shapes

    def bind(self, ctx: Any, addresses: Mapping[str, int]) -> None:
        for name in self.inputs + self.outputs:
            if not ctx.set_tensor_address(name, int(addresses[name])):
                raise TensorRTError(f"{self.graph}: set_tensor_address({name}) refused")

    def execute(self, ctx: Any, stream: Any) -> None:
        # IExecutionContext.execute_async_v3(stream_handle: int) -> bool (TensorRT >= 8.5, 10.x, 11.x)
        if not ctx.execute_async_v3(int(stream)):
            raise TensorRTError(f"TensorRT execute_async_v3 failed for {self.graph}")


def _nbytes(shape: Sequence[int]) -> int:
    return 4 * int(np.prod(shape, dtype=np.int64))


# ====================================================================== level 1: the Runner


class TensorRTRunner:
    """Runner over prebuilt TensorRT engines: host numpy in, host numpy out.

    ``precision``: "fp32", "fp16" or None (fp32 if built, else fp16). ``share_activation_memory``:
    one activation scratch buffer for all engines (they run one after the other on one stream).
    Device buffers are allocated once per batch size and kept (``max_cached_batches`` sizes, least
    recently used dropped first).
    """

    name = "tensorrt"

    def __init__(self, artifact_dir: Path, manifest: Manifest, device: str = "cuda", *, precision: str | None = None,
                 share_activation_memory: bool = True, max_cached_batches: int = 4, verbose: bool = False):
        self.artifact_dir, self.manifest = Path(artifact_dir), manifest
        self.device = str(device)
        ordinal = parse_device(device)
        trt = import_tensorrt()
        self.cuda = CudaDevice(ordinal)
        self.trt = trt
        self.trt_version = str(trt.__version__)
        self.compute_capability = self.cuda.compute_capability
        graphs = list(manifest.graphs)
        self.engine_key, self.record = select_engines(manifest.engines, self.compute_capability, self.trt_version,
                                                      precision=precision, graphs=graphs, batch=manifest.batch,
                                                      artifact_dir=self.artifact_dir)
        self.precision = self.record.get("precision", "fp32")
        self.logger = _TrtLogger.make(trt, verbose)
        self.runtime = trt.Runtime(self.logger)
        self.engines: dict[str, TrtEngine] = {}
        for g in graphs:
            fname = self.record["graphs"][g]["file"]
            if fname not in manifest.files:
                raise ArtifactError(f"engine {fname} is not hashed in the manifest; rebuild with "
                                    f"`{BUILD_CMD.format(dir=self.artifact_dir)}`")
            spec = manifest.graphs[g]
            self.engines[g] = TrtEngine(trt, self.runtime, self.logger, self.artifact_dir / fname, g,
                                        spec["inputs"], spec["outputs"])
        self.batch = dict(manifest.batch)
        self.share_activation_memory = share_activation_memory
        self.scratch_bytes = max(e.device_memory_bytes for e in self.engines.values()) if share_activation_memory else 0
        self._scratch = self.cuda.alloc(self.scratch_bytes, "TensorRT activations") if share_activation_memory else None
        self.stream = self.cuda.stream()
        self.contexts = {g: e.create_context(self._scratch) for g, e in self.engines.items()}
        self._buffers: OrderedDict[int, dict[str, dict[str, int]]] = OrderedDict()
        self._shapes: dict[tuple[str, int], dict[str, tuple[int, ...]]] = {}
        self.max_cached_batches = max(1, int(max_cached_batches))

    # -- buffers
    def _buffers_for(self, n: int) -> dict[str, dict[str, int]]:
        if n in self._buffers:
            self._buffers.move_to_end(n)
            return self._buffers[n]
        while len(self._buffers) >= self.max_cached_batches:
            _, old = self._buffers.popitem(last=False)
            self.cuda.sync(self.stream)
            for bufs in old.values():
                for p in bufs.values():
                    self.cuda.free(p)
        sets: dict[str, dict[str, int]] = {}
        try:
            for g, e in self.engines.items():
                shapes = e.set_shapes(self.contexts[g], n)
                self._shapes[(g, n)] = shapes
                sets[g] = {}
                for name, s in shapes.items():
                    sets[g][name] = self.cuda.alloc(_nbytes(s), f"{g}.{name} at batch {n}")
        except BaseException:
            for bufs in sets.values():
                for p in bufs.values():
                    self.cuda.free(p)
            raise
        self._buffers[n] = sets
        return sets

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if graph not in self.engines:
            raise ValueError(f"unknown graph {graph!r}; this artifact has {', '.join(self.engines)}")
        e, ctx = self.engines[graph], self.contexts[graph]
        missing = [i for i in e.inputs if i not in feeds]
        if missing:
            raise ValueError(f"{graph} needs inputs {missing}")
        n = check_batch(int(np.shape(feeds[e.inputs[0]])[0]), self.batch)
        self.cuda.make_current()
        bufs = self._buffers_for(n)[graph]
        shapes = e.set_shapes(ctx, n)
        host_in = {}
        for name in e.inputs:
            a = np.ascontiguousarray(feeds[name], dtype=np.float32)
            if a.shape != shapes[name]:
                raise ValueError(f"{graph} input {name} must have shape {shapes[name]}, got {a.shape}")
            host_in[name] = a
        e.bind(ctx, bufs)
        for name, a in host_in.items():
            self.cuda.htod(bufs[name], a, self.stream)
        e.execute(ctx, self.stream)
        outs = [np.empty(shapes[name], np.float32) for name in self.manifest.graphs[graph]["outputs"]]
        for name, o in zip(self.manifest.graphs[graph]["outputs"], outs):
            self.cuda.dtoh(o, bufs[name], self.stream)
        self.cuda.sync(self.stream)
        return outs

    def close(self) -> None:
        cuda = getattr(self, "cuda", None)
        if cuda is None:
            return
        try:
            cuda.make_current()
            cuda.sync(self.stream)
        except TensorRTError:
            pass
        self.contexts = {}
        for sets in self._buffers.values():
            for bufs in sets.values():
                for p in bufs.values():
                    cuda.free(p)
        self._buffers.clear()
        self.engines = {}
        if self._scratch:
            cuda.free(self._scratch)
            self._scratch = None
        cuda.drv.cuStreamDestroy(self.stream)
        cuda.close()
        self.cuda = None

    def __enter__(self) -> "TensorRTRunner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ====================================================================== level 2: the device-resident loop


class _LoopState:
    """Everything for one batch size: contexts with fixed shapes and addresses, buffers, the CUDA graph."""

    def __init__(self) -> None:
        self.contexts: dict[str, Any] = {}
        self.buf: dict[str, int] = {}
        self.nbytes: dict[str, int] = {}
        self.graph: Any = None
        self.graph_exec: Any = None
        self.graph_failed: str | None = None
        self.runs = 0


class TensorRTLoop:
    """The ZeroPur loop on the GPU: TensorRT engines + our CUDA kernels on one stream.

        pur = Purifier.load(dir, backend="tensorrt", device="cuda")
        loop = TensorRTLoop(pur)                 # or TensorRTLoop.load(dir)
        x_pure, pred = loop.purify_and_classify(x)

    Per batch size: one execution context per engine with its shapes and tensor addresses set
    once (a captured CUDA graph bakes both in), device buffers for every tensor of the loop, and
    (``cuda_graph=True``) a CUDA graph of the full GS + AP loop, captured after a first, plain run
    and replayed on later calls. The only host transfers are the input upload before and the
    result download after the loop.
    """

    def __init__(self, purifier: Any, *, cuda_graph: bool = True, kernels: Any = None):
        runner = purifier.runner
        if not isinstance(runner, TensorRTRunner):
            raise TypeError("TensorRTLoop needs a Purifier loaded with backend='tensorrt'")
        self.purifier, self.runner, self.cfg = purifier, runner, purifier.cfg
        self.cuda = runner.cuda
        self.cuda.make_current()
        if kernels is None:
            from zeropur_rt.kernels.cuda import CudaKernels
            kernels = CudaKernels(self.cuda.ordinal)  # picks up our (current) primary context
        self.kernels = kernels
        self.cuda_graph = bool(cuda_graph)
        self.stream = self.cuda.stream()
        # Own activation scratch: the loop's contexts run on its own stream, never concurrently with
        # each other, but possibly concurrently with the runner's.
        self._scratch = self.cuda.alloc(runner.scratch_bytes, "TensorRT activations (loop)") \
            if runner.share_activation_memory else None
        self.chw = tuple(runner.manifest.input_shape)
        self.n_ila = runner.manifest.n_ila
        self.has_ap = "ap_grad" in runner.engines
        self._states: dict[int, _LoopState] = {}

    @classmethod
    def load(cls, artifact_dir: str | os.PathLike, device: str = "cuda", *, cuda_graph: bool = True,
             overrides: dict[str, Any] | None = None, **backend_kwargs: Any) -> "TensorRTLoop":
        from zeropur_rt.purifier import Purifier
        pur = Purifier.load(artifact_dir, backend="tensorrt", device=device, overrides=overrides, **backend_kwargs)
        return cls(pur, cuda_graph=cuda_graph)

    # -- per batch size
    def _state(self, n: int) -> _LoopState:
        st = self._states.get(n)
        if st is not None:
            return st
        st = _LoopState()
        r = self.runner
        try:
            shapes: dict[str, dict[str, tuple[int, ...]]] = {}
            for g, e in r.engines.items():
                st.contexts[g] = e.create_context(self._scratch)
                shapes[g] = e.set_shapes(st.contexts[g], n)
            img = (n, *self.chw)
            # loop tensors: x_in, x (GS iterate = coarse), xb (blur), m (momentum), fine (AP iterate),
            # g_gs / loss (gs_grad outputs), g_ap (ap_grad output), l1 (per-sample norms), logits/embedding
            sizes = {"x_in": _nbytes(img), "x": _nbytes(img), "xb": _nbytes(img), "m": _nbytes(img),
                     "fine": _nbytes(img), "g_gs": _nbytes(shapes["gs_grad"]["grad"]),
                     "loss": _nbytes(shapes["gs_grad"]["loss"]), "l1": 4 * max(n, 1),
                     "logits": _nbytes(shapes["classifier"]["logits"]),
                     "embedding": _nbytes(shapes["classifier"]["embedding"])}
            if self.has_ap:
                sizes["g_ap"] = _nbytes(shapes["ap_grad"]["grad"])
                for name in [f"ila_dir_{i}" for i in range(self.n_ila)] + ["lpips_ref"]:
                    sizes[name] = _nbytes(shapes["ap_setup"][name])
            for k, b in sizes.items():
                st.buf[k] = self.cuda.alloc(b, f"loop tensor {k} at batch {n}")
                st.nbytes[k] = b
            b = st.buf
            r.engines["gs_grad"].bind(st.contexts["gs_grad"], {"x": b["x"], "x_blur": b["xb"], "grad": b["g_gs"],
                                                               "loss": b["loss"]})
            if self.has_ap:
                consts = {f"ila_dir_{i}": b[f"ila_dir_{i}"] for i in range(self.n_ila)} | {"lpips_ref": b["lpips_ref"]}
                r.engines["ap_setup"].bind(st.contexts["ap_setup"], {"x_in": b["x_in"], "coarse": b["x"], **consts})
                r.engines["ap_grad"].bind(st.contexts["ap_grad"], {"fine": b["fine"], **consts, "grad": b["g_ap"]})
            # the classifier reads the loop's result buffer
            self._bind_classifier(st, n)
        except BaseException:
            self._free_state(st)
            raise
        self._states[n] = st
        return st

    def _result_key(self) -> str:
        return "fine" if (self.has_ap and self.cfg.ap_steps > 0) else "x"

    def _bind_classifier(self, st: _LoopState, n: int) -> None:
        self.runner.engines["classifier"].bind(st.contexts["classifier"], {"x": st.buf[self._result_key()],
                                                                          "logits": st.buf["logits"],
                                                                          "embedding": st.buf["embedding"]})

    def _free_state(self, st: _LoopState) -> None:
        drv = self.cuda.drv
        if st.graph_exec is not None:
            drv.cuGraphExecDestroy(st.graph_exec)
            st.graph_exec = None
        if st.graph is not None:
            drv.cuGraphDestroy(st.graph)
            st.graph = None
        st.contexts.clear()
        for p in st.buf.values():
            self.cuda.free(p)
        st.buf.clear()

    # -- the loop body, enqueued on self.stream (also what gets captured)
    def _enqueue_loop(self, st: _LoopState, n: int) -> None:
        cfg, k, b, s = self.cfg, self.kernels, st.buf, self.stream
        r, c, h, w = self.runner, self.chw[0], self.chw[1], self.chw[2]
        p = c * h * w
        self.cuda.dtod(b["x"], b["x_in"], st.nbytes["x"], s)
        self.cuda.zero(b["m"], st.nbytes["m"], s)
        bw = self.purifier.blur_weights
        gs, gs_ctx = r.engines["gs_grad"], st.contexts["gs_grad"]
        for _ in range(cfg.gs_steps):
            k.blur(b["x"], b["xb"], n * c, h, w, bw, stream=s)
            gs.execute(gs_ctx, s)
            k.gs_update(b["x"], b["g_gs"], b["m"], b["x_in"], n, p, eps=cfg.eps, step=cfg.gs_step,
                        decay=cfg.momentum, l1_scope=cfg.l1_scope, stream=s, l1_scratch=b["l1"])
        if not self.has_ap or cfg.ap_steps == 0:
            return
        r.engines["ap_setup"].execute(st.contexts["ap_setup"], s)
        self.cuda.dtod(b["fine"], b["x_in"], st.nbytes["fine"], s)
        ap, ap_ctx = r.engines["ap_grad"], st.contexts["ap_grad"]
        for _ in range(cfg.ap_steps):
            ap.execute(ap_ctx, s)
            k.ap_update(b["fine"], b["g_ap"], b["x_in"], n, p, eps=cfg.eps, step=cfg.ap_step, stream=s)

    def _capture(self, st: _LoopState, n: int) -> None:
        """Record the loop into a CUDA graph (cuStreamBeginCapture .. cuStreamEndCapture, cuGraphInstantiate).
        TensorRT: enqueueV3 is capturable after one plain enqueue with the same shapes (done by the first run)."""
        drv = self.cuda.drv
        mode = drv.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
        self.cuda._check(drv.cuStreamBeginCapture(self.stream, mode), "cuStreamBeginCapture")
        err: BaseException | None = None
        try:
            self._enqueue_loop(st, n)
        except BaseException as e:  # noqa: BLE001 - always end the capture
            err = e
        res = drv.cuStreamEndCapture(self.stream)
        graph = res[1] if res[0] == drv.CUresult.CUDA_SUCCESS else None
        if err is not None or graph is None:
            if graph is not None:
                drv.cuGraphDestroy(graph)
            why = f"{type(err).__name__}: {err}" if err is not None else cu_errstr(drv, res[0])
            st.graph_failed = why
            warnings.warn(f"CUDA graph capture of the ZeroPur loop at batch {n} failed ({why}); running it without a "
                          "graph", RuntimeWarning, stacklevel=3)
            self.cuda.sync(self.stream)
            return
        try:
            st.graph_exec = self.cuda._check(drv.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")
            st.graph = graph
        except TensorRTError as e:
            drv.cuGraphDestroy(graph)
            st.graph_failed = str(e)
            warnings.warn(f"{e}; running the loop at batch {n} without a CUDA graph", RuntimeWarning, stacklevel=3)

    def _run_device(self, st: _LoopState, n: int) -> None:
        """Enqueue the loop for batch n (graph replay where there is one) on self.stream."""
        if st.graph_exec is not None:
            self.cuda._check(self.cuda.drv.cuGraphLaunch(st.graph_exec, self.stream), "cuGraphLaunch")
        else:
            self._enqueue_loop(st, n)
            if self.cuda_graph and st.graph_failed is None:
                # first run done plainly (TensorRT's warm-up enqueue at these shapes): capture for the next calls
                self.cuda.sync(self.stream)
                self._capture(st, n)
        st.runs += 1

    # -- public API
    def purify(self, x: Any, uint8_nhwc: bool = False) -> np.ndarray:
        """Purified images (float32 NCHW, host)."""
        return self._purify(self.purifier.prepare(x, uint8_nhwc), classify=False)[0]

    def purify_and_classify(self, x: Any, uint8_nhwc: bool = False) -> tuple[np.ndarray, np.ndarray]:
        out, logits = self._purify(self.purifier.prepare(x, uint8_nhwc), classify=True)
        return out, logits.argmax(1)

    def _purify(self, x_in: np.ndarray, classify: bool) -> tuple[np.ndarray, np.ndarray | None]:
        n = check_batch(x_in.shape[0], self.runner.batch)
        self.cuda.make_current()
        st = self._state(n)
        self.cuda.htod(st.buf["x_in"], x_in, self.stream)
        self._run_device(st, n)
        logits = None
        if classify:
            self.runner.engines["classifier"].execute(st.contexts["classifier"], self.stream)
            logits = np.empty((n, self.runner.manifest.num_classes), np.float32)
            self.cuda.dtoh(logits, st.buf["logits"], self.stream)
        out = np.empty_like(x_in)
        self.cuda.dtoh(out, st.buf[self._result_key()], self.stream)
        self.cuda.sync(self.stream)
        return out, logits

    def graph_captured(self, n: int) -> bool:
        st = self._states.get(n)
        return st is not None and st.graph_exec is not None

    def close(self) -> None:
        if getattr(self, "cuda", None) is None:
            return
        try:
            self.cuda.make_current()
            self.cuda.sync(self.stream)
        except TensorRTError:
            pass
        for st in self._states.values():
            self._free_state(st)
        self._states.clear()
        if self._scratch:
            self.cuda.free(self._scratch)
            self._scratch = None
        self.cuda.drv.cuStreamDestroy(self.stream)
        self.kernels.close()
        self.cuda = None

    def __enter__(self) -> "TensorRTLoop":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
