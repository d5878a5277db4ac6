"""GPU path: the ZeroPur CUDA kernels launched through NVIDIA cuda-python (driver API) or pycuda.

Every import of cuda-python / pycuda is lazy (inside functions), so importing this
module costs nothing on machines without CUDA. The kernel image (prebuilt fatbin,
NVRTC, nvcc) is found or compiled by ``zeropur_rt.kernels.cuda_images``; the
arguments are checked by ``zeropur_rt.kernels.checks`` before a launch.

Launches take raw device pointers (ints) and run on the caller's stream:
``CudaKernels`` takes a ``CUstream`` (a ``cuda.bindings.driver.CUstream`` or its
integer handle, 0 = legacy default stream); ``PyCudaKernels`` takes a
``pycuda.driver.Stream`` or None (pycuda cannot wrap a foreign handle).
The arrays are C-contiguous float32 on the device: N samples of P = C*H*W
values for the updates, ``planes`` = N*C planes of H x W for the blur.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from zeropur_rt.blur import BoxBlurWeights
from zeropur_rt.cuda_driver import cu_check, cu_errstr, release_primary_context, usable_current_context
from zeropur_rt.kernels.checks import MAX_PLANE, check_blur_launch, check_gs_scalars, check_np, check_ptr, check_scalar
from zeropur_rt.kernels.cuda_images import (KERNEL_NAMES, CudaKernelError, fatbin_archs, fatbin_fits, find_fatbin,
                                            import_cuda_python, kernel_images, nvcc_image, nvrtc_image_for)

LANES = 256  # ZP_LANES: block size of the GS-update / L1 kernels (one block per sample)
BLUR_THREADS = 256
BLUR_MAX_SMEM = 48 * 1024  # ZP_BLUR_MAX_SMEM: no opt-in attribute needed on any GPU
AP_THREADS = 256
AP_MAX_BLOCKS = 65535 * 8


# ------------------------------------------------------------ launch plans


def blur_plan(h: int, w: int, max_smem: int = BLUR_MAX_SMEM) -> tuple[int, int]:
    """(lines, dynamic smem bytes) of zp_blur_kernel; mirrors zp_blur_plan() in the header."""
    if h <= 0 or w <= 0 or h * w > MAX_PLANE:
        raise ValueError(f"bad blur plane {h}x{w}")
    if 2 * h * w <= max_smem:
        return 0, 2 * h * w
    longest = max(h, w)
    lines = min(32, max_smem // (2 * longest))
    if lines < 1:
        raise ValueError(f"blur line of {longest} pixels does not fit {max_smem} bytes of shared memory")
    return lines, 2 * lines * longest


def _ap_blocks(total: int) -> int:
    return max(1, min(AP_MAX_BLOCKS, (total + AP_THREADS - 1) // AP_THREADS))


# ------------------------------------------------------------- cuda-python


class CudaKernels:
    """The kernels on one device through cuda-python's driver API.

    Uses the context current on the calling thread if there is one (e.g. the one
    torch or TensorRT made current), else retains and makes current the device's
    primary context. ``image`` says which kernel image was loaded.
    """

    BACKEND = "cuda-python"

    def __init__(self, device: int = 0, *, allow_nvrtc: bool = True):
        drv, _ = import_cuda_python()
        self._drv = drv
        self._check(drv.cuInit(0), "cuInit")
        self._retained = None
        cur = usable_current_context(drv)
        if cur is not None:
            self._ctx = cur
            self._dev = self._check(drv.cuCtxGetDevice(), "cuCtxGetDevice")
        else:
            self._dev = self._check(drv.cuDeviceGet(device), "cuDeviceGet")
            self._ctx = self._check(drv.cuDevicePrimaryCtxRetain(self._dev), "cuDevicePrimaryCtxRetain")
            self._retained = self._dev
            self._check(drv.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")
        attr = drv.CUdevice_attribute
        major = self._check(drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, self._dev), "cuDeviceGetAttribute")
        minor = self._check(drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, self._dev), "cuDeviceGetAttribute")
        self.compute_capability = (int(major), int(minor))
        self._module = None
        errors = []
        for how, get_image in kernel_images(self.compute_capability, allow_nvrtc=allow_nvrtc):
            try:
                data = get_image()
            except Exception as e:  # NVRTC missing / failed, file unreadable
                errors.append(f"{how}: {e}")
                continue
            buf = np.frombuffer(data, dtype=np.uint8).copy()
            err, module = drv.cuModuleLoadData(buf.ctypes.data)
            if err == drv.CUresult.CUDA_SUCCESS:
                self._module, self.image = module, how
                break
            errors.append(f"{how}: {cu_errstr(self._drv, err)}")
        if self._module is None:
            raise CudaKernelError("no usable ZeroPur kernel image for sm_%d%d: %s"
                                  % (*self.compute_capability, "; ".join(errors) or "none found"))
        self._fn = {name: self._check(drv.cuModuleGetFunction(self._module, name.encode()), "cuModuleGetFunction")
                    for name in KERNEL_NAMES}
        self._scratch = 0
        self._scratch_n = 0

    # -- plumbing
    def _check(self, result: Any, what: str) -> Any:
        return cu_check(self._drv, result, what, CudaKernelError)

    def _make_current(self) -> None:
        cur = self._check(self._drv.cuCtxGetCurrent(), "cuCtxGetCurrent")
        if cur is None or int(cur) != int(self._ctx):
            self._check(self._drv.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")

    def _stream(self, stream: Any) -> Any:
        if stream is None:
            return self._drv.CUstream(0)
        if isinstance(stream, self._drv.CUstream):
            return stream
        return self._drv.CUstream(int(stream))

    def _launch(self, name: str, grid: int, block: int, smem: int, stream: Any, args: list[tuple[Any, type]]) -> None:
        # kernelParams = array of pointers to each argument's value (cuda-python's documented form)
        holders = [np.array([v], dtype=t) for v, t in args]
        ptrs = np.array([h.ctypes.data for h in holders], dtype=np.uint64)
        self._make_current()
        self._check(self._drv.cuLaunchKernel(self._fn[name], grid, 1, 1, block, 1, 1, smem,
                                             self._stream(stream), ptrs.ctypes.data, 0), f"cuLaunchKernel({name})")

    def _get_scratch(self, n: int) -> int:
        if n > self._scratch_n:
            self._make_current()
            if self._scratch:
                self._check(self._drv.cuMemFree(self._scratch), "cuMemFree")
                self._scratch, self._scratch_n = 0, 0
            self._scratch = int(self._check(self._drv.cuMemAlloc(4 * n), "cuMemAlloc"))
            self._scratch_n = n
        return self._scratch

    def close(self) -> None:
        if getattr(self, "_module", None) is not None:
            self._make_current()
            if self._scratch:
                self._drv.cuMemFree(self._scratch)
                self._scratch = 0
            self._drv.cuModuleUnload(self._module)
            self._module = None
        if getattr(self, "_retained", None) is not None:
            release_primary_context(self._drv, self._retained, self._ctx)
            self._retained = None

    # -- kernels (device pointers as ints; sizes validated)
    def l1_norms(self, grad: int, l1_out: int, n: int, p: int, *, stream: Any = 0) -> None:
        n, p = check_np(n, p)
        if n == 0:
            return
        self._launch("zp_l1_kernel", n, LANES, 0, stream,
                     [(check_ptr("grad", grad) if p else 0, np.uint64), (check_ptr("l1_out", l1_out), np.uint64),
                      (p, np.int64)])

    def gs_update(self, x: int, grad: int, m: int, x_in: int, n: int, p: int, *, eps: float, step: float,
                  decay: float, l1_scope: str = "sample", stream: Any = 0, l1_scratch: int | None = None) -> None:
        """One GS step in place on x and m: one launch ("sample"), two ("batch").

        ``l1_scratch`` (n floats of device memory) receives the per-sample norms; for
        "batch" it defaults to a buffer cached on this object (pass your own when
        launching concurrently on several streams).
        """
        eps, step, decay, scope = check_gs_scalars(eps, step, decay, l1_scope)
        n, p = check_np(n, p)
        if n == 0 or p == 0:
            return
        ptrs = [(check_ptr(k, v), np.uint64) for k, v in (("x", x), ("grad", grad), ("m", m), ("x_in", x_in))]
        scratch = int(l1_scratch) if l1_scratch else (self._get_scratch(n) if scope == 1 else 0)
        if scope == 1:
            self._launch("zp_l1_kernel", n, LANES, 0, stream, [ptrs[1], (scratch, np.uint64), (p, np.int64)])
        self._launch("zp_gs_update_kernel", n, LANES, 0, stream,
                     ptrs + [(scratch, np.uint64), (n, np.int64), (p, np.int64), (eps, np.float32),
                             (step, np.float32), (decay, np.float32), (scope, np.int32)])

    def ap_update(self, x: int, grad: int, x_in: int, n: int, p: int, *, eps: float, step: float,
                  stream: Any = 0) -> None:
        eps, step = check_scalar("eps", eps), check_scalar("step", step)
        n, p = check_np(n, p)
        total = n * p
        if total == 0:
            return
        self._launch("zp_ap_update_kernel", _ap_blocks(total), AP_THREADS, 0, stream,
                     [(check_ptr("x", x), np.uint64), (check_ptr("grad", grad), np.uint64),
                      (check_ptr("x_in", x_in), np.uint64), (total, np.int64), (eps, np.float32),
                      (step, np.float32)])

    def blur(self, x: int, out: int, planes: int, h: int, w: int, weights: BoxBlurWeights | float, *,
             stream: Any = 0) -> None:
        """Pillow-exact blur of ``planes`` float32 planes of h x w (out may equal x)."""
        planes, h, w, wt = check_blur_launch(planes, h, w, weights)
        if planes == 0 or h == 0 or w == 0:
            return
        lines, smem = blur_plan(h, w)
        self._launch("zp_blur_kernel", planes, BLUR_THREADS, smem, stream,
                     [(check_ptr("x", x), np.uint64), (check_ptr("out", out), np.uint64), (h, np.int32),
                      (w, np.int32), (wt.radius, np.int32), (wt.ww, np.uint32), (wt.fw, np.uint32),
                      (lines, np.int32)])


# ------------------------------------------------------------------- pycuda


class PyCudaKernels:
    """The same kernels through pycuda (never pycuda.autoinit).

    Retains the device's primary context (shared with the CUDA runtime, torch,
    cuda-python) and pushes it around each call. ``stream``: a
    ``pycuda.driver.Stream`` or None (the legacy default stream).
    """

    BACKEND = "pycuda"

    def __init__(self, device: int = 0):
        import pycuda.driver as drv

        self._drv = drv
        drv.init()
        self._dev = drv.Device(device)
        self._ctx = self._dev.retain_primary_context()
        cc = self._dev.compute_capability()
        self.compute_capability = (int(cc[0]), int(cc[1]))
        self._ctx.push()
        try:
            self._module, self.image = self._load_module()
            self._fn = {name: self._module.get_function(name) for name in KERNEL_NAMES}
            self._scratch = None
            self._scratch_n = 0
        finally:
            drv.Context.pop()

    def _load_module(self) -> tuple[Any, str]:
        errors = []
        fb = find_fatbin()
        if fb is not None and fatbin_fits(fatbin_archs(fb), self.compute_capability):
            try:
                return self._drv.module_from_buffer(fb.read_bytes()), f"prebuilt {fb}"
            except self._drv.Error as e:
                errors.append(f"{fb}: {e}")
        try:
            data, kind = nvrtc_image_for(self.compute_capability)
            return self._drv.module_from_buffer(data), f"NVRTC {kind}"
        except Exception as e:  # cuda-python/NVRTC missing or failed
            errors.append(f"NVRTC: {e}")
        try:
            return self._drv.module_from_buffer(nvcc_image()), "pycuda.compiler (nvcc)"
        except Exception as e:
            errors.append(f"pycuda.compiler: {e}")
        raise CudaKernelError("no usable ZeroPur kernel image: " + "; ".join(errors))

    def _launch(self, name: str, grid: int, block: int, smem: int, stream: Any, args: list[tuple[Any, type]]) -> None:
        if stream is not None and not isinstance(stream, self._drv.Stream):
            if isinstance(stream, int) and stream == 0:
                stream = None
            else:
                raise ValueError("PyCudaKernels needs a pycuda.driver.Stream or None as stream")
        vals = [t(v) for v, t in args]
        self._ctx.push()
        try:
            self._fn[name](*vals, block=(block, 1, 1), grid=(grid, 1), stream=stream, shared=smem)
        finally:
            self._drv.Context.pop()

    def _get_scratch(self, n: int) -> int:
        if n > self._scratch_n:
            self._ctx.push()
            try:
                self._scratch = self._drv.mem_alloc(4 * n)
            finally:
                self._drv.Context.pop()
            self._scratch_n = n
        return int(self._scratch)

    def close(self) -> None:
        if getattr(self, "_ctx", None) is not None:
            self._ctx.push()
            try:
                self._scratch = None
                self._fn = {}
                self._module = None
            finally:
                self._drv.Context.pop()
            self._ctx.detach()  # releases the retained primary context
            self._ctx = None

    l1_norms = CudaKernels.l1_norms
    gs_update = CudaKernels.gs_update
    ap_update = CudaKernels.ap_update
    blur = CudaKernels.blur


def cuda_python_available() -> tuple[bool, str]:
    """(True, "") if cuda-python imports and a CUDA device is visible, else (False, reason)."""
    try:
        drv, _ = import_cuda_python()
    except ImportError as e:
        return False, f"cuda-python not importable: {e}"
    try:
        (err,) = drv.cuInit(0)
    except Exception as e:  # driver library missing
        return False, f"CUDA driver not loadable: {e}"
    if err != drv.CUresult.CUDA_SUCCESS:
        return False, f"cuInit failed: {err}"
    err, count = drv.cuDeviceGetCount()
    if err != drv.CUresult.CUDA_SUCCESS or count == 0:
        return False, "no CUDA device"
    return True, ""
