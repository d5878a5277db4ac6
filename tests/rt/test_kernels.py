"""CPU tests of zeropur_rt.kernels: numpy twin == C host library, bit for bit; blur == Pillow.

Also compiles zeropur_kernels.cu with nvcc for every target architecture (prints
the ptxas register/spill report) and with cuda-python's NVRTC, when available.
"""
from __future__ import annotations

import ctypes
import logging
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

from zeropur_rt.blur import blur_images, box_blur_weights
from zeropur_rt.kernels import checks
from zeropur_rt.kernels import numpy_twin as twin
from zeropur_rt.kernels import host as host_mod

KDIR = Path(twin.__file__).resolve().parent
F32 = np.float32
TARGET_SMS = (72, 80, 86, 87, 89, 90)


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=F32).view(np.uint32)


def assert_bits_equal(a: np.ndarray, b: np.ndarray, what: str = "") -> None:
    assert a.shape == b.shape, what
    ba, bb = bits(a), bits(b)
    if not np.array_equal(ba, bb):
        bad = np.flatnonzero(ba.ravel() != bb.ravel())
        i = bad[0]
        raise AssertionError(f"{what}: {bad.size} elements differ; first at {i}: "
                             f"{a.ravel()[i]!r} vs {b.ravel()[i]!r}")


# ----------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """The native host kernels: the installed library, else one compiled here with g++/c++."""
    k = host_mod.load_host_kernels()
    if isinstance(k, host_mod.HostKernels):
        return k
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("host library not installed (pip install -e .) and no C++ compiler to build it")
    out = tmp_path_factory.mktemp("hostlib") / host_mod.LIB_NAME
    subprocess.run([cxx, "-O2", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC",
                    f"-I{KDIR}", str(KDIR / "zeropur_host.cpp"), "-o", str(out)], check=True)
    return host_mod.HostKernels(out)


@pytest.fixture(scope="module")
def lib(host):
    """Raw ctypes handle for ABI robustness tests."""
    return host._lib


def make_case(rng, shape, *, zero_grad_samples=(), tie_frac=0.0):
    x = rng.random(shape, dtype=F32)
    x_in = np.clip(x + rng.normal(0, 0.03, shape).astype(F32), 0, 1).astype(F32)
    grad = (rng.standard_normal(shape) * rng.choice([1e-4, 1.0, 30.0])).astype(F32)
    m = (rng.standard_normal(shape) * 0.01).astype(F32)
    for i in zero_grad_samples:
        grad[i] = 0
    if tie_frac:
        sel = rng.random(shape) < tie_frac
        x[sel] = x_in[sel]
        x[sel & (rng.random(shape) < 0.3)] = 0.0
        x[sel & (rng.random(shape) < 0.3)] = 1.0
    return x, grad, m, x_in


SHAPES = [(1, 1, 1, 1), (1, 3, 7, 5), (5, 3, 7, 5), (2, 3, 33, 31), (5, 1, 16, 16), (3, 1, 10, 10),
          (1, 3, 224, 224), (2, 257), (4, 511), (3, 1024), (6,)]


# --------------------------------------------------------------- L1 norms


def reference_l1(g: np.ndarray) -> np.float32:
    """The canonical order written as plain scalar loops (the spec, independently of the twin)."""
    lanes = [F32(0)] * 256
    for k in range(256):
        for j in range(k, g.size, 256):
            lanes[k] = F32(lanes[k] + F32(abs(g[j])))
    s = 128
    while s:
        for k in range(s):
            lanes[k] = F32(lanes[k] + lanes[k + s])
        s //= 2
    return lanes[0]


@pytest.mark.parametrize("p", [1, 7, 255, 256, 257, 600, 1024])
def test_l1_canonical_order_matches_spec(p):
    rng = np.random.default_rng(p)
    g = (rng.standard_normal((2, p)) * 10).astype(F32)
    got = twin.l1_norms(g)
    for i in range(2):
        assert bits(got[i : i + 1])[0] == bits(np.array([reference_l1(g[i])]))[0]
        np.testing.assert_allclose(got[i], np.abs(g[i].astype(np.float64)).sum(), rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_l1_norms_host_equals_twin(host, shape):
    rng = np.random.default_rng(1)
    g = (rng.standard_normal(shape) * 3).astype(F32)
    assert_bits_equal(host.l1_norms(g), twin.l1_norms(g), "l1")


def test_batch_l1_is_sequential_sum():
    v = np.array([1e8, 1.0, -1e8, 3.0], dtype=F32)
    total = F32(0)
    for t in v:
        total = F32(total + t)
    assert twin.batch_l1(v) == total


# ---------------------------------------------------------------- GS / AP


@pytest.mark.parametrize("scope", ["sample", "batch"])
@pytest.mark.parametrize("shape", SHAPES)
def test_gs_update_host_equals_twin(host, shape, scope):
    rng = np.random.default_rng(zlib.crc32(repr((shape, scope)).encode()))  # hash() of a str changes per process
    for rep in range(3):
        zero = (0,) if rep == 1 else ()
        x, g, m, x_in = make_case(rng, shape, zero_grad_samples=zero, tie_frac=0.2 if rep == 2 else 0)
        eps, step, decay = F32(10 / 255), F32(1 / 255), [1.0, 0.9, 0.0][rep]
        xa, ma, xb, mb = x.copy(), m.copy(), x.copy(), m.copy()
        twin.gs_update(xa, g, ma, x_in, eps=eps, step=step, decay=decay, l1_scope=scope)
        host.gs_update(xb, g, mb, x_in, eps=eps, step=step, decay=decay, l1_scope=scope)
        assert_bits_equal(xa, xb, f"x {shape} {scope} rep{rep}")
        assert_bits_equal(ma, mb, f"m {shape} {scope} rep{rep}")
        assert np.all((xa >= 0) & (xa <= 1))
        assert np.all(np.abs(xa - x_in) <= eps + 1e-7)


@pytest.mark.parametrize("shape", SHAPES)
def test_ap_update_host_equals_twin(host, shape):
    rng = np.random.default_rng(7)
    x, g, _, x_in = make_case(rng, shape, tie_frac=0.2)
    g[..., ::3] = 0
    xa, xb = x.copy(), x.copy()
    twin.ap_update(xa, g, x_in, eps=6 / 255, step=(6 / 255) / 50)
    host.ap_update(xb, g, x_in, eps=6 / 255, step=(6 / 255) / 50)
    assert_bits_equal(xa, xb, f"ap {shape}")


def test_gs_zero_gradients(host):
    shape = (3, 3, 7, 5)
    rng = np.random.default_rng(3)
    x, _, m, x_in = make_case(rng, shape)
    g = np.zeros(shape, F32)
    for scope in ("sample", "batch"):
        xa, ma, xb, mb = x.copy(), m.copy(), x.copy(), m.copy()
        twin.gs_update(xa, g, ma, x_in, eps=0.04, step=0.004, decay=1.0, l1_scope=scope)
        host.gs_update(xb, g, mb, x_in, eps=0.04, step=0.004, decay=1.0, l1_scope=scope)
        assert_bits_equal(ma, m, "m unchanged: g = 0 + 1*m")
        assert_bits_equal(xa, xb, "x")
        assert_bits_equal(ma, mb, "m")
    # zero everything: m stays 0, sign 0, x only projected
    xa, ma = x.copy(), np.zeros(shape, F32)
    twin.gs_update(xa, g, ma, x, eps=0.04, step=0.004, decay=1.0)
    assert_bits_equal(xa, x, "no move")


def test_exact_clip_boundary_ties(host):
    """x - step lands exactly on x_in - eps, on 0, and x + step beyond 1 / x_in + eps."""
    step = eps = F32(2 / 255)
    n, p = 4, 300
    rng = np.random.default_rng(11)
    x_in = rng.random((n, p), dtype=F32)
    x_in[:, :10] = 0.0
    x_in[:, 10:20] = 1.0
    x = x_in.copy()  # x - step == x_in - eps exactly (same float32 op)
    x[:, :10] = step  # x - step == 0 exactly
    x[:, 20:25] = 0.0
    x[:, 25:30] = -0.0  # signed zero input
    grad_pos = np.abs(rng.standard_normal((n, p))).astype(F32) + F32(0.5)  # sign(m) = +1
    for grad in (grad_pos, -grad_pos):
        xa, ma, xb, mb = x.copy(), np.zeros_like(x), x.copy(), np.zeros_like(x)
        twin.gs_update(xa, grad, ma, x_in, eps=eps, step=step, decay=1.0, l1_scope="sample")
        host.gs_update(xb, grad, mb, x_in, eps=eps, step=step, decay=1.0, l1_scope="sample")
        assert_bits_equal(xa, xb, "gs ties")
        assert_bits_equal(ma, mb, "gs ties m")
        ya, yb = x.copy(), x.copy()
        twin.ap_update(ya, grad, x_in, eps=eps, step=step)
        host.ap_update(yb, grad, x_in, eps=eps, step=step)
        assert_bits_equal(ya, yb, "ap ties")
        assert_bits_equal(xa, ya, "gs == ap when sign(m) == sign(grad)")
    # the tie values themselves
    xa = x.copy()
    twin.ap_update(xa, grad_pos, x_in, eps=eps, step=step)
    assert_bits_equal(xa[:, 30:], (x_in[:, 30:] - eps).clip(0, 1), "lands on x_in - eps")
    assert np.all(bits(xa[:, :10]) == 0), "lands on +0"
    xb = x.copy()
    twin.ap_update(xb, -grad_pos, x_in, eps=eps, step=step)
    assert np.all(xb[:, 10:20] == 1.0)


def test_decay_and_sign_semantics():
    x = np.array([[0.5, 0.5, 0.5]], F32)
    m = np.array([[0.0, -0.0, 1.0]], F32)
    g = np.zeros_like(x)
    twin.gs_update(x, g, m, x.copy(), eps=0.1, step=0.01, decay=1.0)
    assert x.tolist() == [[0.5, 0.5, F32(0.5) - F32(0.01)]]


# ------------------------------------------------------------------- blur


SIGMAS = [0.7, 1.0, 1.8, 3.0]


def pillow_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    from PIL import Image, ImageFilter

    q = twin.quantize(x)  # (N, 3, H, W)
    out = np.empty_like(q)
    for i in range(q.shape[0]):
        im = Image.fromarray(np.ascontiguousarray(q[i].transpose(1, 2, 0)), "RGB")
        out[i] = np.asarray(im.filter(ImageFilter.GaussianBlur(sigma))).transpose(2, 0, 1)
    return out.astype(F32) / F32(255)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_blur_bit_exact_32(host, sigma):
    pytest.importorskip("PIL")
    rng = np.random.default_rng(int(sigma * 10))
    x = rng.random((200, 3, 32, 32), dtype=F32)
    x[:5] = np.round(x[:5] * 255) / F32(255)  # exact quantization boundaries
    ref = blur_images(x, sigma)
    assert_bits_equal(twin.blur(x, sigma), ref, "twin vs blur_images")
    assert_bits_equal(host.blur(x, sigma), ref, "host vs blur_images")
    assert_bits_equal(pillow_blur(x, sigma), ref, "Pillow vs blur_images")


@pytest.mark.parametrize("sigma", SIGMAS)
def test_blur_bit_exact_224(host, sigma):
    pytest.importorskip("PIL")
    rng = np.random.default_rng(100 + int(sigma * 10))
    x = rng.random((3, 3, 224, 224), dtype=F32)
    ref = blur_images(x, sigma)
    assert_bits_equal(host.blur(x, sigma), ref, "host vs blur_images")
    assert_bits_equal(pillow_blur(x, sigma), ref, "Pillow vs blur_images")
    assert_bits_equal(twin.blur(x[:1], sigma), ref[:1], "twin vs blur_images")


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 3, 7, 5), (2, 3, 33, 31), (1, 1, 2, 300), (1, 1, 300, 3)])
@pytest.mark.parametrize("sigma", [0.0, 0.5, 1.8, 3.0, 10.0])
def test_blur_odd_shapes(host, shape, sigma):
    rng = np.random.default_rng(5)
    x = rng.random(shape, dtype=F32) * F32(1.2) - F32(0.1)  # out-of-range values are clamped
    ref = blur_images(x, sigma)
    assert_bits_equal(twin.blur(x, sigma), ref, "twin")
    assert_bits_equal(host.blur(x, sigma), ref, "host")


def test_blur_in_place_and_weights_object(host):
    rng = np.random.default_rng(9)
    x = rng.random((2, 3, 32, 32), dtype=F32)
    ref = blur_images(x, 1.8)
    w = box_blur_weights(1.8)
    for k in (twin, host):
        y = x.copy()
        k.blur_into(y, y, w)
        assert_bits_equal(y, ref, f"{k} in place")


def test_blur_identity_when_box_radius_zero(host):
    w = box_blur_weights(0.0)
    assert w.box_radius == 0 and (w.radius, w.ww, w.fw) == (0, 1 << 24, 0)
    x = np.random.default_rng(0).random((2, 3, 8, 8), dtype=F32)
    assert_bits_equal(host.blur(x, w), twin.quantize(x).astype(F32) / F32(255))


# ------------------------------------------------------------- validation


@pytest.mark.parametrize("kname", ["twin", "host"])
def test_validation_errors(host, kname):
    k = twin if kname == "twin" else host
    x = np.zeros((2, 3, 4, 4), F32)
    ok = dict(eps=0.1, step=0.01, decay=1.0, l1_scope="sample")
    with pytest.raises(ValueError, match="float32"):
        k.gs_update(x.astype(np.float64), x, x.copy(), x.copy(), **ok)
    with pytest.raises(ValueError, match="contiguous"):
        k.gs_update(x.copy(), np.zeros((2, 3, 4, 8), F32)[..., ::2], x.copy(), x.copy(), **ok)
    with pytest.raises(ValueError, match="shape"):
        k.gs_update(x.copy(), x.copy(), x.copy(), np.zeros((2, 3, 4, 5), F32), **ok)
    with pytest.raises(ValueError, match="l1_scope"):
        k.gs_update(x.copy(), x.copy(), x.copy(), x.copy(), **{**ok, "l1_scope": "global"})
    with pytest.raises(ValueError, match="finite"):
        k.gs_update(x.copy(), x.copy(), x.copy(), x.copy(), **{**ok, "eps": float("nan")})
    with pytest.raises(ValueError, match="share memory"):
        y = x.copy()
        k.gs_update(y, x.copy(), y, x.copy(), **ok)
    with pytest.raises(ValueError, match="writeable"):
        r = x.copy()
        r.flags.writeable = False
        k.ap_update(r, x.copy(), x.copy(), eps=0.1, step=0.01)
    with pytest.raises(ValueError, match="numpy"):
        k.ap_update([0.0], x, x, eps=0.1, step=0.01)
    with pytest.raises(ValueError):
        k.blur(np.zeros(4, F32), 1.0)
    with pytest.raises(ValueError):
        k.blur(x, -1.0)
    with pytest.raises(ValueError, match="out"):
        k.blur_into(x, np.zeros((2, 3, 4, 5), F32), 1.0)
    # empty batch is a no-op
    e = np.zeros((0, 3, 4, 4), F32)
    k.gs_update(e, e.copy(), e.copy(), e.copy(), **ok)
    k.ap_update(e, e.copy(), e.copy(), eps=0.1, step=0.01)


def test_c_abi_rejects_bad_arguments(lib):
    f = ctypes.c_float
    buf = (ctypes.c_float * 16)()
    p = ctypes.cast(buf, ctypes.c_void_p)
    # NULL pointers with non-empty sizes
    assert lib.zp_host_gs_update(None, p, p, p, 2, 8, f(0.1), f(0.01), f(1.0), 0) == -1
    assert lib.zp_host_ap_update(p, None, p, 2, 8, f(0.1), f(0.01)) == -1
    assert lib.zp_host_blur(None, p, 1, 4, 4, 1, 4898947, 1040187) == -1
    assert lib.zp_host_l1_norms(None, 2, 8, p) == -1
    # negative / overflowing sizes
    assert lib.zp_host_gs_update(p, p, p, p, -1, 8, f(0.1), f(0.01), f(1.0), 0) == -2
    assert lib.zp_host_ap_update(p, p, p, 1 << 40, 1 << 40, f(0.1), f(0.01)) == -2
    assert lib.zp_host_blur(p, p, 1, -4, 4, 1, 4898947, 1040187) == -2
    assert lib.zp_host_blur(p, p, 1, 1 << 20, 1 << 20, 1, 4898947, 1040187) == -2
    # bad scalars / flags / weights
    assert lib.zp_host_gs_update(p, p, p, p, 2, 8, f(float("inf")), f(0.01), f(1.0), 0) == -3
    assert lib.zp_host_gs_update(p, p, p, p, 2, 8, f(0.1), f(0.01), f(1.0), 2) == -3
    assert lib.zp_host_blur(p, p, 1, 4, 4, 1, 1 << 24, 1) == -4
    assert lib.zp_host_blur(p, p, 1, 4, 4, -1, 1000, 0) == -4
    assert lib.zp_host_blur(p, p, 1, 4, 4, 0, 0, 0) == -4
    # empty sizes are a no-op even with NULL
    assert lib.zp_host_gs_update(None, None, None, None, 0, 8, f(0.1), f(0.01), f(1.0), 0) == 0
    assert lib.zp_host_blur(None, None, 0, 4, 4, 1, 4898947, 1040187) == 0
    assert lib.zp_strerror(-4).decode().startswith("invalid Pillow")


def test_loader_falls_back_with_warning(caplog, tmp_path, monkeypatch):
    bogus = tmp_path / host_mod.LIB_NAME
    bogus.write_bytes(b"not a shared library")
    with caplog.at_level(logging.WARNING, logger="zeropur_rt.kernels.host"):
        k = host_mod.load_host_kernels(bogus)
    assert k is twin and k.BACKEND == "numpy"
    assert "falling back to the numpy twin" in caplog.text
    monkeypatch.setenv(host_mod.ENV_VAR, str(tmp_path / "missing.so"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="zeropur_rt.kernels.host"):
        assert host_mod.load_host_kernels() is twin
    assert "unloadable" in caplog.text


def test_env_var_overrides_path(host, monkeypatch):
    monkeypatch.setenv(host_mod.ENV_VAR, str(host.path))
    k = host_mod.load_host_kernels()
    assert isinstance(k, host_mod.HostKernels) and k.path == host.path


def test_installed_library_is_found():
    """After `pip install -e .` or `pip install .` the library sits in a package __path__ folder."""
    found = host_mod.find_host_library()
    if found is None:
        pytest.skip("zeropur_rt not installed with its native library (run pip install -e . --no-build-isolation)")
    k = host_mod.load_host_kernels()
    assert isinstance(k, host_mod.HostKernels), k


# -------------------------------------------------------------- CUDA builds


def _nvcc_codes(nvcc: str) -> set[int]:
    out = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True).stdout
    return {int(t[3:]) for t in out.split() if t.startswith("sm_") and t[3:].isdigit()}


def test_nvcc_compiles_every_target_arch(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    codes = _nvcc_codes(nvcc)
    archs = [a for a in TARGET_SMS if a in codes]
    skipped = [a for a in TARGET_SMS if a not in codes]
    if skipped:
        print(f"\nnvcc cannot build sm_{skipped} (CUDA 13 dropped sm_72 / Volta: build it with CUDA <= 12)")
    assert archs, "nvcc supports none of the target architectures"
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    r = subprocess.run([nvcc, "--fatbin", "--fmad=false", "-Xptxas=-v", *gencode, f"-I{KDIR}",
                        "-o", str(tmp_path / "k.fatbin"), str(KDIR / "zeropur_kernels.cu")],
                       capture_output=True, text=True)
    print(r.stdout + r.stderr)
    assert r.returncode == 0, r.stderr
    report = r.stdout + r.stderr
    for a in archs:
        assert f"for 'sm_{a}'" in report
    assert "bytes spill stores" in report
    spills = [ln for ln in report.splitlines() if "spill" in ln and not ln.strip().startswith("0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads")]
    assert not spills, spills
    # --fmad=false: no fused multiply-add in the PTX
    r = subprocess.run([nvcc, "--ptx", "--fmad=false", f"-arch=compute_{archs[0]}", f"-I{KDIR}", "-o",
                        str(tmp_path / "k.ptx"), str(KDIR / "zeropur_kernels.cu")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ptx = (tmp_path / "k.ptx").read_text()
    assert "fma." not in ptx and "div.rn.f32" in ptx


def test_header_compiles_as_plain_c_and_cpp(tmp_path):
    for comp, flags in (("cc", ["-x", "c", "-std=c99"]), ("c++", ["-x", "c++", "-std=c++11"])):
        exe = shutil.which(comp)
        if exe is None:
            continue
        r = subprocess.run([exe, *flags, "-fsyntax-only", "-Wall", "-Werror", str(KDIR / "zeropur_kernels.h")],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


def test_nvrtc_compiles_to_ptx_without_gpu():
    try:
        from zeropur_rt.kernels import cuda_images
    except ImportError as e:  # pragma: no cover
        pytest.skip(str(e))
    ok, why = cuda_images.nvrtc_available()
    if not ok:
        pytest.skip(f"{why} (pip install cuda-python nvidia-cuda-nvrtc)")
    ptx, kind = cuda_images.nvrtc_compile("compute_80")
    assert kind == "ptx" and ptx.endswith(b"\0")
    text = ptx.rstrip(b"\0").decode()
    for name in cuda_images.KERNEL_NAMES:
        assert f".entry {name}(" in text
    assert "fma." not in text and "div.rn.f32" in text
    cubin, kind = cuda_images.nvrtc_compile("sm_87")
    assert kind == "cubin" and cubin[:4] == b"\x7fELF"


# ------------------------------------------- CUDA kernels emulated on the CPU
# The .cu compiled by g++ with one std::thread per CUDA thread and a real barrier
# for __syncthreads: checks the kernels' indexing, shared-memory use, barrier
# placement and launch plans (both blur modes) against the twin without a GPU.

_EMU = r"""
#include <cmath>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>
struct zp_dim3 { unsigned int x = 0, y = 1, z = 1; };
static thread_local zp_dim3 threadIdx, blockIdx;
static zp_dim3 blockDim, gridDim;
struct Barrier {
    std::mutex m; std::condition_variable cv; int n; int count = 0; long gen = 0;
    explicit Barrier(int n_) : n(n_) {}
    void wait() {
        std::unique_lock<std::mutex> l(m);
        long g = gen;
        if (++count == n) { count = 0; ++gen; cv.notify_all(); }
        else cv.wait(l, [&] { return gen != g; });
    }
};
static Barrier* g_bar = nullptr;
static inline void __syncthreads() { g_bar->wait(); }
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static
#define __CUDACC_RTC__ 1
#define ZP_EXTERN_SHARED extern
unsigned char zp_smem[1 << 16];
#include "zeropur_kernels.cu"

template <class F> static void launch(unsigned grid, unsigned block, F f) {
    gridDim.x = grid; blockDim.x = block;
    for (unsigned b = 0; b < grid; ++b) {
        Barrier bar((int)block); g_bar = &bar;
        std::vector<std::thread> ts;
        for (unsigned t = 0; t < block; ++t) ts.emplace_back([=] { threadIdx.x = t; blockIdx.x = b; f(); });
        for (auto& th : ts) th.join();
    }
}
extern "C" int emu_gs_update(float* x, const float* g, float* m, const float* xin, float* l1, long long n,
                             long long p, float eps, float step, float decay, int scope) {
    if (scope == 1) launch((unsigned)n, ZP_LANES, [=] { zp_l1_kernel(g, l1, p); });
    launch((unsigned)n, ZP_LANES, [=] { zp_gs_update_kernel(x, g, m, xin, l1, n, p, eps, step, decay, scope); });
    return 0;
}
extern "C" int emu_ap_update(float* x, const float* g, const float* xin, long long total, float eps,
                             float step, unsigned blocks, unsigned threads) {
    launch(blocks, threads, [=] { zp_ap_update_kernel(x, g, xin, total, eps, step); });
    return 0;
}
extern "C" int emu_blur(const float* x, float* out, long long planes, int h, int w, int radius,
                        unsigned ww, unsigned fw, long long max_smem, unsigned threads) {
    int lines = 0; long long smem = 0;
    int rc = zp_blur_plan(h, w, max_smem, &lines, &smem);
    if (rc != ZP_OK) return rc;
    if (smem > (long long)sizeof(zp_smem)) return -99;
    launch((unsigned)planes, threads, [=] { zp_blur_kernel(x, out, h, w, radius, ww, fw, lines); });
    return lines;
}
"""


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler for the CUDA emulation")
    d = tmp_path_factory.mktemp("emu")
    (d / "emu.cpp").write_text(_EMU)
    so = d / "libemu.so"
    subprocess.run([cxx, "-std=c++11", "-O1", "-ffp-contract=off", "-fno-fast-math", "-pthread", "-shared",
                    "-fPIC", f"-I{KDIR}", str(d / "emu.cpp"), "-o", str(so)], check=True)
    lib = ctypes.CDLL(str(so))
    ll, fl, vp, ui, ci = ctypes.c_longlong, ctypes.c_float, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int
    lib.emu_gs_update.argtypes = [vp, vp, vp, vp, vp, ll, ll, fl, fl, fl, ci]
    lib.emu_ap_update.argtypes = [vp, vp, vp, ll, fl, fl, ui, ui]
    lib.emu_blur.argtypes = [vp, vp, ll, ci, ci, ci, ui, ui, ll, ui]
    return lib


@pytest.mark.parametrize("scope", ["sample", "batch"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 3, 7, 5), (2, 3, 33, 31), (1, 3, 64, 64)])
def test_cuda_gs_ap_kernels_emulated(emu, shape, scope):
    rng = np.random.default_rng(21)
    x, g, m, x_in = make_case(rng, shape, zero_grad_samples=(0,) if shape[0] > 1 else (), tie_frac=0.2)
    n, p = checks.split_np(x)
    xa, ma, xb, mb, l1 = x.copy(), m.copy(), x.copy(), m.copy(), np.zeros(n, F32)
    eps, step = F32(2 / 255), F32(2 / 255)
    for _ in range(2):
        twin.gs_update(xa, g, ma, x_in, eps=eps, step=step, decay=1.0, l1_scope=scope)
        emu.emu_gs_update(xb.ctypes.data, g.ctypes.data, mb.ctypes.data, x_in.ctypes.data, l1.ctypes.data, n, p,
                          eps, step, 1.0, 1 if scope == "batch" else 0)
    assert_bits_equal(xa, xb, "emulated gs x")
    assert_bits_equal(ma, mb, "emulated gs m")
    if scope == "batch":
        assert_bits_equal(l1, twin.l1_norms(g), "emulated l1 kernel")
    twin.ap_update(xa, g, x_in, eps=eps, step=step)
    emu.emu_ap_update(xb.ctypes.data, g.ctypes.data, x_in.ctypes.data, x.size, eps, step, 3, 64)
    assert_bits_equal(xa, xb, "emulated ap")


@pytest.mark.parametrize("sigma", [0.0, 1.0, 3.0])
@pytest.mark.parametrize("shape,max_smem,mode", [
    ((4, 3, 32, 32), 48 * 1024, "plane"), ((1, 3, 7, 5), 48 * 1024, "plane"), ((1, 1, 1, 1), 48 * 1024, "plane"),
    ((1, 2, 224, 224), 48 * 1024, "strip"), ((1, 2, 33, 31), 700, "strip"), ((1, 1, 5, 40), 150, "strip")])
def test_cuda_blur_kernel_emulated(emu, shape, max_smem, mode, sigma):
    rng = np.random.default_rng(int(sigma * 10))
    x = rng.random(shape, dtype=F32)
    ref = blur_images(x, sigma)
    w = box_blur_weights(sigma)
    planes, h, wd = checks.planes_hw(x)
    for inplace in (False, True):
        out = x.copy() if inplace else np.zeros_like(x)
        lines = emu.emu_blur(x.ctypes.data if not inplace else out.ctypes.data, out.ctypes.data, planes, h, wd,
                             w.radius, w.ww, w.fw, max_smem, 256 if mode == "plane" else 64)
        assert lines >= 0, lines
        assert (lines == 0) == (mode == "plane")
        assert_bits_equal(out, ref, f"emulated blur {shape} {mode} lines={lines}")
