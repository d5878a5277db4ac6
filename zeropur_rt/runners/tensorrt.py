"""TensorRT runner: prebuilt engines on device buffers, one stream, CUDA-graph capture.

Engines are built by ``zeropur-export build-engines DIR`` and recorded in the manifest (schema:
``zeropur_rt.engine_record``). Per batch size the runner keeps one execution context per engine with
that batch's input shapes set once; tensor addresses are set on every call (host-side only, so a
captured CUDA graph sees the loop's fixed buffers). All engines run one after the other on the
runner's stream and share one activation scratch buffer. The pipeline drives it through the same
schedule as every other runner, with the CUDA kernels launched on this stream.

CUDA graphs with enqueueV3 (one plain enqueue at the same shapes before capture):
  https://docs.nvidia.com/deeplearning/tensorrt/latest/performance/best-practices.html#cuda-graphs
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from zeropur_rt.cuda_driver import CudaDevice, CudaError, parse_device
from zeropur_rt.engine_record import BUILD_CMD, select_engines
from zeropur_rt.manifest import ArtifactError, Manifest
from zeropur_rt.runners.base import DeviceBuffer
from zeropur_rt.runners.trt_engine import TrtEngine, import_tensorrt, trt_logger
from zeropur_rt.validate import check_batch


class _Replay:
    """A captured loop: ``launch()`` enqueues it on the runner's stream."""

    def __init__(self, cuda: CudaDevice, graph_exec: Any, stream: Any):
        self.cuda, self.graph_exec, self.stream = cuda, graph_exec, stream

    def launch(self) -> None:
        self.cuda.launch_graph(self.graph_exec, self.stream)

    def close(self) -> None:
        if self.graph_exec is not None:
            self.cuda.destroy_graph(self.graph_exec)
            self.graph_exec = None


class TensorRTRunner:
    """``precision``: "fp32", "fp16" or None (fp32 if built, else fp16)."""

    name = "tensorrt"
    on_device = True

    def __init__(self, artifact_dir: Path, manifest: Manifest, device: str = "cuda", *, precision: str | None = None,
                 verbose: bool = False):
        self.artifact_dir, self.manifest = Path(artifact_dir), manifest
        self.device = str(device)
        ordinal = parse_device(self.device)
        if ordinal is None:
            raise ValueError("backend 'tensorrt' runs on a GPU: device='cuda' or 'cuda:N'")
        trt = import_tensorrt()
        self.cuda = CudaDevice(ordinal)
        self.ordinal = ordinal
        self.trt_version = str(trt.__version__)
        self.compute_capability = self.cuda.compute_capability
        self.engine_key, self.record = select_engines(manifest.engines, self.compute_capability, self.trt_version,
                                                      precision=precision, graphs=list(manifest.graphs),
                                                      batch=manifest.batch, artifact_dir=self.artifact_dir)
        self.precision = self.record.get("precision", "fp32")
        self.logger = trt_logger(trt, verbose)
        self.runtime = trt.Runtime(self.logger)
        self.engines: dict[str, TrtEngine] = {}
        for g, spec in manifest.graphs.items():
            fname = self.record["graphs"][g]["file"]
            if fname not in manifest.files:
                raise ArtifactError(f"engine {fname} is not hashed in the manifest; rebuild with "
                                    f"`{BUILD_CMD.format(dir=self.artifact_dir)}`")
            self.engines[g] = TrtEngine(trt, self.runtime, self.logger, self.artifact_dir / fname, g,
                                        spec["inputs"], spec["outputs"])
        self.batch = dict(manifest.batch)
        # The one activation buffer of the runner: every context (each graph, each batch size) runs
        # on it, one after the other on one stream. Sized for the largest engine at the profile max.
        self.scratch_bytes = max(256, *(e.device_memory_bytes for e in self.engines.values()))
        self._scratch = self.cuda.alloc(self.scratch_bytes, "TensorRT activations")
        self.stream = self.cuda.stream()
        self._contexts: dict[tuple[str, int], Any] = {}
        self._shapes: dict[tuple[str, int], dict[str, tuple[int, ...]]] = {}

    # -- graphs
    def _context(self, graph: str, n: int) -> Any:
        key = (graph, n)
        if key not in self._contexts:
            check_batch(n, self.batch)
            e = self.engines[graph]
            ctx = e.create_context(self._scratch, self.scratch_bytes)
            self._shapes[key] = e.set_shapes(ctx, n)
            self._contexts[key] = ctx
        return self._contexts[key]

    def output_shapes(self, graph: str, n: int) -> dict[str, tuple[int, ...]]:
        self._context(graph, n)
        shapes = self._shapes[(graph, n)]
        return {name: shapes[name] for name in self.engines[graph].outputs}

    def run(self, graph: str, inputs: Mapping[str, DeviceBuffer], outputs: Mapping[str, DeviceBuffer]) -> None:
        e = self.engines[graph]
        n = next(iter(inputs.values())).shape[0]
        ctx = self._context(graph, n)
        shapes = self._shapes[(graph, n)]
        bufs = {**inputs, **outputs}
        for name in e.inputs + e.outputs:
            if tuple(bufs[name].shape) != shapes[name]:
                raise ValueError(f"{graph}: tensor {name} has shape {bufs[name].shape}, the engine wants {shapes[name]}")
        e.bind(ctx, {name: b.ptr for name, b in bufs.items()})
        e.execute(ctx, self.stream)

    # -- memory, on the runner's stream
    def alloc(self, shape: tuple[int, ...], name: str) -> DeviceBuffer:
        shape = tuple(int(s) for s in shape)
        nbytes = 4 * int(np.prod(shape, dtype=np.int64))
        return DeviceBuffer(self.cuda.alloc(nbytes, f"loop tensor {name} {shape}"), shape)

    def copy(self, dst: DeviceBuffer, src: DeviceBuffer) -> None:
        self.cuda.dtod(dst.ptr, src.ptr, dst.nbytes, self.stream)

    def zero(self, buf: DeviceBuffer) -> None:
        self.cuda.zero(buf.ptr, buf.nbytes, self.stream)

    def upload(self, dst: DeviceBuffer, src: np.ndarray) -> None:
        a = np.ascontiguousarray(src, dtype=np.float32)
        if a.shape != dst.shape:
            raise ValueError(f"upload of {a.shape} into a buffer of {dst.shape}")
        self.cuda.htod(dst.ptr, a, self.stream)
        self.sync()  # the host array may go away as soon as this returns

    def download(self, src: DeviceBuffer) -> np.ndarray:
        out = np.empty(src.shape, np.float32)
        self.cuda.dtoh(out, src.ptr, self.stream)
        self.sync()
        return out

    def sync(self) -> None:
        self.cuda.sync(self.stream)

    def stream_handle(self) -> Any:
        return self.stream

    @contextlib.contextmanager
    def device_context(self) -> Iterator[None]:
        self.cuda.make_current()
        yield

    def capture(self, enqueue: Callable[[], None]) -> _Replay | None:
        """The work ``enqueue`` issues on this stream as a CUDA graph, or None (with a warning) if the
        capture failed; the caller then keeps running eagerly."""
        self.cuda.make_current()
        self.cuda.begin_capture(self.stream)
        err: BaseException | None = None
        try:
            enqueue()
        except BaseException as e:  # noqa: BLE001 - the capture must always be ended
            err = e
        try:
            graph_exec = self.cuda.end_capture(self.stream)
        except CudaError as e:
            err = err or e
            graph_exec = None
        if err is not None:
            if graph_exec is not None:
                self.cuda.destroy_graph(graph_exec)
            # TensorRT runs on the CUDA runtime API, whose last error the failed capture left set on
            # this thread; uncleared, the next TensorRT call of the eager fallback would fail on it
            # (trtexec calls cudaGetLastError() after a failed capture for the same reason).
            stale = self.cuda.clear_runtime_error()
            warnings.warn(f"CUDA graph capture of the ZeroPur loop failed ({type(err).__name__}: {err}"
                          f"{'; cleared CUDA runtime error ' + stale if stale else ''}); running it without a graph",
                          RuntimeWarning, stacklevel=3)
            self.sync()
            return None
        return _Replay(self.cuda, graph_exec, self.stream)

    def release(self, buffers: list[DeviceBuffer], n: int | None = None) -> None:
        """Free ``buffers``; with ``n``, also the execution contexts of batch n."""
        self.sync()
        for b in buffers:
            self.cuda.free(b.ptr)
        for key in [k for k in self._contexts if k[1] == n]:
            del self._contexts[key]
            self._shapes.pop(key, None)

    def close(self) -> None:
        if getattr(self, "cuda", None) is None:
            return
        try:
            self.sync()
        except CudaError:
            pass
        self._contexts.clear()
        self.engines = {}
        self.cuda.free(self._scratch)
        self.cuda.destroy_stream(self.stream)
        self.cuda.close()
        self.cuda = None
