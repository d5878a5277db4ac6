"""Loading TensorRT engines (apart from running them): the tensorrt import, the logger, one engine's I/O.

API used (TensorRT Python API 10.x and 11.x): IRuntime.deserialize_cuda_engine, name-based I/O
(num_io_tensors / get_tensor_name / get_tensor_mode), IExecutionContext.set_input_shape /
set_tensor_address / execute_async_v3, ExecutionContextAllocationStrategy.USER_MANAGED.
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Engine.html
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/ExecutionContext.html
"""
from __future__ import annotations

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
                          f"({e}): on x86-64 `pip install 'zeropur-rt[trt]'` (tensorrt + cuda-python); on Jetson use "
                          "JetPack's TensorRT in a venv made with --system-site-packages (docs/jetson.md)") from e
    major = parse_trt_version(trt.__version__)[0]
    if major < MIN_TRT_MAJOR:
        raise ImportError(f"TensorRT {trt.__version__} is too old: zeropur-rt needs TensorRT >= {MIN_TRT_MAJOR}")
    return trt


class TrtLogger:
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
