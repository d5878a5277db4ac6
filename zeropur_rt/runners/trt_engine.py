"""Loading TensorRT engines (apart from running them): the tensorrt import, the logger, one engine's I/O.

API used (TensorRT Python API 10.x and 11.x): IRuntime.deserialize_cuda_engine, name-based I/O
(num_io_tensors / get_tensor_name / get_tensor_mode), IExecutionContext.set_input_shape /
set_tensor_address / execute_async_v3, ExecutionContextAllocationStrategy.USER_MANAGED with
IExecutionContext.set_device_memory (10.1+; the device_memory property on 10.0),
ICudaEngine.device_memory_size_v2 (10.1+, the only one on 11.x), ILogger (one per process).
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Engine.html
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/ExecutionContext.html
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Logger.html
"""
from __future__ import annotations

import threading
from collections import deque
from pathlib import Path
from typing import Any, Mapping, Sequence

from zeropur_rt.cuda_driver import CudaError, DeviceMemoryError
from zeropur_rt.engine_record import BUILD_CMD, MIN_TRT_MAJOR, EngineMismatchError, parse_trt_version


class TensorRTError(CudaError):
    """TensorRT refused an operation (deserialisation, shapes, execution)."""


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as e:
        raise ImportError("backend 'tensorrt' needs the TensorRT (>= 10) Python bindings, which are not importable "
                          f"({e}): on x86-64 `pip install 'zeropur-rt[trt-cu12]'` (NVIDIA driver >= R535) or "
                          "'zeropur-rt[trt-cu13]' (driver >= R580); on Jetson use JetPack 6's TensorRT in a venv made "
                          "with --system-site-packages (docs/jetson.md)") from e
    major = parse_trt_version(trt.__version__)[0]
    if major < MIN_TRT_MAJOR:
        raise ImportError(f"TensorRT {trt.__version__} is too old: zeropur-rt needs TensorRT >= {MIN_TRT_MAJOR}")
    return trt


class ErrorLog:
    """The last error messages of TensorRT's logger, numbered, so each caller reads only its own.

    Thread safe: TensorRT may log from any thread and requires the logger to lock for itself.
    """

    def __init__(self, keep: int = 64):
        self._lock = threading.Lock()
        self._seq = 0
        self._msgs: deque[tuple[int, str]] = deque(maxlen=keep)

    def add(self, msg: str) -> None:
        with self._lock:
            self._seq += 1
            self._msgs.append((self._seq, str(msg)))

    def mark(self) -> int:
        """A position; ``since(mark)`` returns the errors logged after it."""
        with self._lock:
            return self._seq

    def since(self, mark: int) -> list[str]:
        with self._lock:
            return [m for s, m in self._msgs if s > mark]


_LOGGER: Any = None
_LOGGER_LOCK = threading.Lock()


def trt_logger(trt: Any, verbose: bool = False) -> Any:
    """TensorRT's one logger for this process: every Builder, Runtime and parser gets this instance.

    TensorRT keeps the first logger it is handed as its global one (``getLogger()``, and the
    messages not tied to one object go there); a second logger would see none of them and its
    error list would stay empty. So there is one, and each caller reads its own errors with
    ``logger.errors.mark()`` / ``logger.errors.since(mark)``. ``verbose`` (print warnings and
    info) follows the latest caller; errors are always printed.
    """
    global _LOGGER
    with _LOGGER_LOCK:
        if _LOGGER is None:
            _LOGGER = _make_logger(trt)
        _LOGGER.verbose = bool(verbose)
        return _LOGGER


def _make_logger(trt: Any) -> Any:
    severity = trt.ILogger.Severity
    errors = (severity.INTERNAL_ERROR, severity.ERROR)

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors = ErrorLog()
            self.verbose = False

        def log(self, sev: Any, msg: str) -> None:
            if sev in errors:
                self.errors.add(msg)
            if self.verbose or sev in errors:
                print(f"[TensorRT] {msg}", flush=True)

    return Logger()


def engine_device_memory(engine: Any) -> int:
    """Activation bytes an execution context of ``engine`` needs.

    ``device_memory_size_v2`` (TensorRT >= 10.1, the only one in 11.x) when the binding has it,
    else ``device_memory_size`` (10.0). A v2 of 0 is an answer (an engine without activation
    memory), not a missing attribute: falling back on 0 would read an attribute 11.x removed.
    """
    v2 = getattr(engine, "device_memory_size_v2", None)
    return int(v2) if v2 is not None else int(engine.device_memory_size)


class TrtEngine:
    """A deserialised engine: I/O names, modes, static dims, profile batch range; makes contexts."""

    def __init__(self, trt: Any, runtime: Any, logger: Any, path: Path, graph: str, inputs: Sequence[str],
                 outputs: Sequence[str]):
        self.trt, self.graph, self.path = trt, graph, path
        data = path.read_bytes()
        mark = logger.errors.mark()
        # IRuntime.deserialize_cuda_engine(serialized_engine) -> ICudaEngine | None
        self.engine = runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            errs = "; ".join(logger.errors.since(mark)[-3:])
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
        # The batch range the engine accepts: a fixed batch (a --max-batch 1 export) is its own
        # range; a dynamic one is profile 0's (min, opt, max) of the first input.
        fixed = self.dims[self.inputs[0]][0]
        if fixed >= 0:
            self.batch = {"min": fixed, "opt": fixed, "max": fixed}
        else:
            lo, opt, hi = e.get_tensor_profile_shape(self.inputs[0], 0)
            self.batch = {"min": int(lo[0]), "opt": int(opt[0]), "max": int(hi[0])}
        self.device_memory_bytes = engine_device_memory(e)

    def input_shape(self, name: str, n: int) -> tuple[int, ...]:
        d = self.dims[name]
        return (n, *d[1:])

    def create_context(self, scratch: int, scratch_bytes: int) -> Any:
        """An execution context whose activation memory is the caller's ``scratch`` buffer
        (ExecutionContextAllocationStrategy.USER_MANAGED, TensorRT >= 10.0): TensorRT allocates none
        of its own, so every context of every engine shares the runner's one scratch buffer."""
        if scratch_bytes < self.device_memory_bytes:
            raise DeviceMemoryError(f"{self.path.name} needs {self.device_memory_bytes} B of activation memory, the "
                                    f"shared scratch buffer has {scratch_bytes} B")
        ctx = self.engine.create_execution_context(self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if ctx is not None:
            # set_device_memory(memory, size): TensorRT >= 10.1 (11.x); 10.0 has the device_memory property.
            try:
                ctx.set_device_memory(int(scratch), int(scratch_bytes))
            except (AttributeError, TypeError):
                ctx.device_memory = int(scratch)
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
