"""GPU tests: the CUDA kernels equal the host twin bit for bit (cuda-python, and pycuda if importable).

Skipped, with the reason, where cuda-python or a CUDA device is missing. Exercises
both kernel images: the prebuilt fatbin (when installed) and NVRTC's.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from zeropur_rt.blur import blur_images, box_blur_weights
from zeropur_rt.kernels import checks
from zeropur_rt.kernels import cuda as zc
from zeropur_rt.kernels import cuda_images
from zeropur_rt.kernels import numpy_twin as twin

_ok, _why = zc.cuda_python_available()
if not _ok:
    pytest.skip(f"no GPU path: {_why}", allow_module_level=True)

F32 = np.float32


def bits(a):
    return np.ascontiguousarray(a, dtype=F32).view(np.uint32)


def assert_bits_equal(a, b, what=""):
    assert a.shape == b.shape, what
    if not np.array_equal(bits(a), bits(b)):
        bad = np.flatnonzero(bits(a).ravel() != bits(b).ravel())
        i = bad[0]
        raise AssertionError(f"{what}: {bad.size} differ; first at {i}: {a.ravel()[i]!r} vs {b.ravel()[i]!r}")


@pytest.fixture(scope="module")
def host():
    from zeropur_rt.kernels.host import load_host_kernels

    return load_host_kernels()  # the numpy twin if the library is missing: same bits by contract


class Dev:
    """Minimal device buffers through cuda-python (primary context, shared with pycuda)."""

    def __init__(self, kernels: zc.CudaKernels):
        self.k = kernels
        self.drv = kernels._drv
        self.ptrs: list[int] = []
        self.stream = self.k._check(self.drv.cuStreamCreate(0), "cuStreamCreate")

    def put(self, a: np.ndarray) -> int:
        self.k._make_current()
        d = int(self.k._check(self.drv.cuMemAlloc(max(a.nbytes, 4)), "cuMemAlloc"))
        self.ptrs.append(d)
        if a.nbytes:
            self.k._check(self.drv.cuMemcpyHtoD(d, a.ctypes.data, a.nbytes), "cuMemcpyHtoD")
        return d

    def get(self, d: int, like: np.ndarray) -> np.ndarray:
        self.sync()
        out = np.empty_like(like)
        if out.nbytes:
            self.k._check(self.drv.cuMemcpyDtoH(out.ctypes.data, d, out.nbytes), "cuMemcpyDtoH")
        return out

    def sync(self) -> None:
        self.k._check(self.drv.cuCtxSynchronize(), "cuCtxSynchronize")

    def free(self) -> None:
        for d in self.ptrs:
            self.drv.cuMemFree(d)
        self.ptrs.clear()
        self.drv.cuStreamDestroy(self.stream)


def _kernels(source: str) -> zc.CudaKernels:
    import os

    if source == "nvrtc":
        ok, why = cuda_images.nvrtc_available()
        if not ok:
            pytest.skip(why)
        old = os.environ.get(cuda_images.FATBIN_ENV)
        os.environ[cuda_images.FATBIN_ENV] = "/nonexistent/zeropur_kernels.fatbin"  # force NVRTC
        try:
            k = zc.CudaKernels()
        finally:
            if old is None:
                del os.environ[cuda_images.FATBIN_ENV]
            else:
                os.environ[cuda_images.FATBIN_ENV] = old
        assert k.image.startswith("NVRTC")
        return k
    if cuda_images.find_fatbin() is None:
        pytest.skip("no prebuilt zeropur_kernels.fatbin installed (pip install -e . with nvcc)")
    k = zc.CudaKernels(allow_nvrtc=False)
    assert k.image.startswith("prebuilt")
    return k


@pytest.fixture(scope="module", params=["fatbin", "nvrtc"])
def gpu(request):
    k = _kernels(request.param)
    dev = Dev(k)
    print(f"\n{k.BACKEND} sm_{k.compute_capability[0]}{k.compute_capability[1]} image: {k.image}")
    yield k, dev
    dev.free()
    k.close()


SHAPES = [(1, 1, 1, 1), (5, 3, 7, 5), (2, 3, 33, 31), (1, 3, 224, 224), (4, 3, 32, 32), (3, 511), (7, 100)]


def _case(rng, shape, tie=False):
    x = rng.random(shape, dtype=F32)
    x_in = np.clip(x + rng.normal(0, 0.03, shape).astype(F32), 0, 1).astype(F32)
    g = (rng.standard_normal(shape) * 5).astype(F32)
    m = (rng.standard_normal(shape) * 0.01).astype(F32)
    if tie:
        x[..., ::4] = x_in[..., ::4]
        x[..., 1::8] = 0.0
        x_in[..., 1::8] = 0.0
        x[..., 2::8] = 1.0
        g[0] = 0
    return x, g, m, x_in


@pytest.mark.parametrize("scope", ["sample", "batch"])
@pytest.mark.parametrize("shape", SHAPES)
def test_gs_update_gpu_equals_host(gpu, host, shape, scope):
    k, dev = gpu
    rng = np.random.default_rng(zlib.crc32(repr((shape, scope)).encode()))  # hash() of a str changes per process
    for tie in (False, True):
        x, g, m, x_in = _case(rng, shape, tie)
        eps, step = F32(2 / 255), F32(2 / 255)
        n, p = checks.split_np(x)
        dx, dg, dm, dxin, dl1 = dev.put(x), dev.put(g), dev.put(m), dev.put(x_in), dev.put(np.zeros(n, F32))
        for _ in range(3):  # three steps: momentum carries over
            k.gs_update(dx, dg, dm, dxin, n, p, eps=eps, step=step, decay=1.0, l1_scope=scope,
                        stream=dev.stream, l1_scratch=dl1)
            host.gs_update(x, g, m, x_in, eps=eps, step=step, decay=1.0, l1_scope=scope)
        assert_bits_equal(dev.get(dx, x), x, f"x {shape} {scope}")
        assert_bits_equal(dev.get(dm, m), m, f"m {shape} {scope}")
        assert_bits_equal(dev.get(dl1, np.zeros(n, F32)), twin.l1_norms(g), "per-sample l1")


@pytest.mark.parametrize("shape", SHAPES)
def test_ap_update_gpu_equals_host(gpu, host, shape):
    k, dev = gpu
    rng = np.random.default_rng(3)
    x, g, _, x_in = _case(rng, shape, tie=True)
    n, p = checks.split_np(x)
    dx, dg, dxin = dev.put(x), dev.put(g), dev.put(x_in)
    k.ap_update(dx, dg, dxin, n, p, eps=6 / 255, step=6 / 255 / 50, stream=dev.stream)
    host.ap_update(x, g, x_in, eps=6 / 255, step=6 / 255 / 50)
    assert_bits_equal(dev.get(dx, x), x, f"ap {shape}")


@pytest.mark.parametrize("sigma", [0.0, 0.7, 1.0, 1.8, 3.0])
@pytest.mark.parametrize("shape", [(64, 3, 32, 32), (2, 3, 224, 224), (1, 3, 7, 5), (1, 1, 1, 1), (2, 1, 3, 300)])
def test_blur_gpu_equals_pillow_exact(gpu, host, shape, sigma):
    k, dev = gpu
    x = np.random.default_rng(int(sigma * 10)).random(shape, dtype=F32)
    ref = blur_images(x, sigma)
    planes, h, w = checks.planes_hw(x)
    dx, dout = dev.put(x), dev.put(np.zeros_like(x))
    k.blur(dx, dout, planes, h, w, box_blur_weights(sigma), stream=dev.stream)
    assert_bits_equal(dev.get(dout, x), ref, f"blur {shape} sigma={sigma} plan={zc.blur_plan(h, w)}")
    k.blur(dx, dx, planes, h, w, sigma, stream=dev.stream)  # in place
    assert_bits_equal(dev.get(dx, x), ref, "in-place blur")
    assert_bits_equal(host.blur(x, sigma), ref, "host blur")


def test_pycuda_binding(host):
    pycuda = pytest.importorskip("pycuda.driver", reason="pycuda not installed")
    del pycuda
    ck = zc.CudaKernels()  # retains the same primary context for the buffers
    dev = Dev(ck)
    pk = zc.PyCudaKernels()
    print(f"\npycuda image: {pk.image}")
    try:
        rng = np.random.default_rng(0)
        for scope in ("sample", "batch"):
            x, g, m, x_in = _case(rng, (3, 3, 33, 31), tie=True)
            n, p = checks.split_np(x)
            dx, dg, dm, dxin = dev.put(x), dev.put(g), dev.put(m), dev.put(x_in)
            pk.gs_update(dx, dg, dm, dxin, n, p, eps=2 / 255, step=1 / 255, decay=1.0, l1_scope=scope, stream=None)
            host.gs_update(x, g, m, x_in, eps=2 / 255, step=1 / 255, decay=1.0, l1_scope=scope)
            assert_bits_equal(dev.get(dx, x), x, f"pycuda gs {scope}")
            assert_bits_equal(dev.get(dm, m), m, f"pycuda gs m {scope}")
            pk.ap_update(dx, dg, dxin, n, p, eps=2 / 255, step=1 / 255, stream=None)
            host.ap_update(x, g, x_in, eps=2 / 255, step=1 / 255)
            assert_bits_equal(dev.get(dx, x), x, "pycuda ap")
        x = rng.random((8, 3, 32, 32), dtype=F32)
        dx, dout = dev.put(x), dev.put(np.zeros_like(x))
        pk.blur(dx, dout, 24, 32, 32, 1.8, stream=None)
        assert_bits_equal(dev.get(dout, x), blur_images(x, 1.8), "pycuda blur")
    finally:
        dev.free()
        pk.close()
        ck.close()


def test_new_kernels_after_last_release(host):
    """Closing the only holder of the primary context destroys it; the next CudaKernels must not reuse it."""
    x = np.random.default_rng(5).random((2, 3, 32, 32), dtype=F32)
    for _ in range(2):
        k = zc.CudaKernels()
        dev = Dev(k)
        dx, dout = dev.put(x), dev.put(np.zeros_like(x))
        k.blur(dx, dout, 6, 32, 32, 1.8, stream=dev.stream)
        assert_bits_equal(dev.get(dout, x), host.blur(x, 1.8), "blur after a release")
        dev.free()
        k.close()
