"""The one CUDA driver wrapper (cuda-python's driver API), shared by the CUDA kernels and the TensorRT runner.

Nothing is imported from cuda-python until a function here is called. Device strings have one
grammar, ``parse_device``: "cpu", "cuda" or "cuda:N".
"""
from __future__ import annotations

from typing import Any

import numpy as np


class CudaError(RuntimeError):
    """The CUDA driver refused an operation."""


class DeviceMemoryError(CudaError, MemoryError):
    """A device allocation failed (out of GPU memory)."""


def parse_device(device: str) -> int | None:
    """None for "cpu"; N for "cuda" (N = 0) or "cuda:N"; anything else is refused."""
    text = str(device).strip().lower()
    if text == "cpu":
        return None
    head, sep, idx = text.partition(":")
    if head == "cuda" and (not sep or idx.isdigit()):
        return int(idx or 0)
    raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def import_driver() -> Any:
    """cuda-python's driver module (cuda.bindings.driver, or cuda.cuda in older releases)."""
    try:
        from cuda.bindings import driver  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cuda as driver  # type: ignore[no-redef]  # older cuda-python
        except ImportError as e:
            raise ImportError("GPU paths need cuda-python, which is not importable "
                              f"({e}): `pip install cuda-python` with the major version of your CUDA driver "
                              "(12.x for CUDA 12 / JetPack 6, 13.x for CUDA 13)") from e
    return driver


def import_runtime() -> Any:
    """cuda-python's CUDA runtime module (cuda.bindings.runtime, or cuda.cudart in older releases)."""
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart as runtime  # type: ignore[no-redef]  # older cuda-python
        except ImportError as e:
            raise ImportError(f"cuda-python's runtime bindings are not importable ({e}): `pip install cuda-python` "
                              "with the major version of your CUDA driver") from e
    return runtime


def cu_errstr(drv: Any, err: Any) -> str:
    """A CUresult's name and description (best effort)."""
    try:
        _, s = drv.cuGetErrorString(err)
        return f"{getattr(err, 'name', err)} ({s.decode() if isinstance(s, bytes) else s})"
    except Exception:  # noqa: BLE001
        return str(err)


def cu_check(drv: Any, result: Any, what: str, error: type[Exception]) -> Any:
    """Unpack a cuda.bindings driver call's (CUresult, values...) tuple, raising ``error`` on failure."""
    err = result[0] if isinstance(result, tuple) else result
    if err != drv.CUresult.CUDA_SUCCESS:
        raise error(f"{what} failed: {cu_errstr(drv, err)}")
    if not isinstance(result, tuple) or len(result) == 1:
        return None
    return result[1] if len(result) == 2 else result[1:]


def usable_current_context(drv: Any) -> Any:
    """The thread's current context, or None when there is none or it was destroyed.

    A primary context destroyed by its last cuDevicePrimaryCtxRelease stays current on the
    thread; cuCtxGetDevice still answers for it, calls that need the context fail with
    CUDA_ERROR_CONTEXT_IS_DESTROYED (seen on an H100, driver 580).
    """
    err, cur = drv.cuCtxGetCurrent()
    if err != drv.CUresult.CUDA_SUCCESS or cur is None or int(cur) == 0:
        return None
    return cur if drv.cuMemGetInfo()[0] == drv.CUresult.CUDA_SUCCESS else None


def release_primary_context(drv: Any, dev: Any, ctx: Any) -> None:
    """Release a retained primary context; if that destroyed it, do not leave it current on this thread."""
    drv.cuDevicePrimaryCtxRelease(dev)
    err, _flags, active = drv.cuDevicePrimaryCtxGetState(dev)
    if err == drv.CUresult.CUDA_SUCCESS and not active:
        err, cur = drv.cuCtxGetCurrent()
        if err == drv.CUresult.CUDA_SUCCESS and cur is not None and int(cur) == int(ctx):
            drv.cuCtxSetCurrent(drv.CUcontext(0))


class CudaDevice:
    """The device's primary context (shared with the CUDA runtime that TensorRT uses), allocations, streams.

    Uses cuDevicePrimaryCtxRetain + cuCtxSetCurrent, never cuCtxCreate (whose signature changed in
    CUDA 13: cuCtxCreate(ctxCreateParams, flags, dev)).
    """

    def __init__(self, ordinal: int = 0):
        drv = import_driver()
        self.drv = drv
        try:
            res = drv.cuInit(0)
        except Exception as e:  # the driver library itself is missing
            raise CudaError(f"the CUDA driver is not loadable ({e}): this path needs an NVIDIA GPU") from e
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
        return cu_check(self.drv, result, what, CudaError)

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
            except CudaError:
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

    # -- CUDA graphs of the work enqueued on a stream
    def begin_capture(self, stream: Any) -> None:
        mode = self.drv.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
        self._check(self.drv.cuStreamBeginCapture(stream, mode), "cuStreamBeginCapture")

    def end_capture(self, stream: Any) -> Any:
        """The captured graph, instantiated (a CUgraphExec); raises CudaError when capture or instantiation failed."""
        graph = self._check(self.drv.cuStreamEndCapture(stream), "cuStreamEndCapture")
        try:
            return self._check(self.drv.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")
        finally:
            self.drv.cuGraphDestroy(graph)

    def clear_runtime_error(self) -> str | None:
        """Read and reset the CUDA runtime's last error on this thread (cudaGetLastError); its name, or
        None when there was none. The driver API keeps no such state; TensorRT calls the runtime API."""
        rt = import_runtime()
        res = rt.cudaGetLastError()
        err = res[0] if isinstance(res, tuple) else res
        return None if err == rt.cudaError_t.cudaSuccess else str(getattr(err, "name", err))

    def launch_graph(self, graph_exec: Any, stream: Any) -> None:
        self._check(self.drv.cuGraphLaunch(graph_exec, stream), "cuGraphLaunch")

    def destroy_graph(self, graph_exec: Any) -> None:
        self.drv.cuGraphExecDestroy(graph_exec)

    def destroy_stream(self, stream: Any) -> None:
        self.drv.cuStreamDestroy(stream)

    def close(self) -> None:
        if getattr(self, "_retained", False):
            release_primary_context(self.drv, self.dev, self.ctx)
            self._retained = False
