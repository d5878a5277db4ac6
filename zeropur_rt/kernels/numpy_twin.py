"""numpy twin of the ZeroPur kernels: the definition of the math, bit for bit.

The C host library (``zeropur_host.cpp``) and the CUDA kernels
(``zeropur_kernels.cu``) implement exactly this arithmetic through
``zeropur_kernels.h``; the tests assert byte equality against this module. It
is also the last-resort fallback backend (see ``host.load_host_kernels``).

Definitions (float32 throughout; x, grad, m, x_in are C-contiguous float32 arrays
of the same shape whose first axis is the batch: N samples of P values each):

* ``l1_norms``: per-sample ``sum_j |grad[i, j]|`` in one canonical order: 256 lanes,
  lane k accumulates j = k, k+256, ... sequentially (from +0.0), then the tree
  ``lane[k] += lane[k+s]`` for s = 128, 64, ..., 1; the norm is lane 0.
* batch norm (``l1_scope="batch"``): the per-sample norms summed sequentially
  i = 0..N-1 in float32 (from +0.0); every sample is divided by that scalar.
* ``gs_update``: ``g = grad / l1`` (0 where l1 == 0); ``m = g + decay*m``;
  ``x = project(x - step*sign(m))`` with sign in {-1, 0, +1}.
* ``ap_update``: ``x = project(x - step*sign(grad))``.
* ``project(x)``: ``x < lo ? lo : x`` then ``x > hi ? hi : x`` with lo = x_in - eps,
  hi = x_in + eps (float32), then the same against 0 and 1. Ties keep x.
* ``blur``: q = clamp(floor(x*255), 0, 255) (float32), Pillow's GaussianBlur in
  integers (3 horizontal then 3 vertical box passes with the weights of
  ``zeropur_rt.blur.box_blur_weights``), then ``q / 255`` in float32; equal to
  ``zeropur_rt.blur.blur_images`` bit for bit.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from zeropur_rt.blur import BoxBlurWeights, blur_uint8, box_blur_weights, quantize

BACKEND = "numpy"
LANES = 256
MAX_PLANE = 1 << 30  # ZP_MAX_PLANE: h*w of one blur plane (int indexing in C/CUDA)
F32 = np.float32
L1_SCOPES = {"sample": 0, "batch": 1}

__all__ = [
    "LANES",
    "l1_norms",
    "batch_l1",
    "gs_update",
    "ap_update",
    "quantize",
    "blur",
    "blur_into",
    "blur_weights",
]


# ------------------------------------------------------------------ validation
# Shared with host.py (and cuda.py for shapes): clear ValueErrors before any
# native code sees a pointer.


def check_array(name: str, a: Any, *, writeable: bool = False, ndim_min: int = 1) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.dtype != np.float32:
        raise ValueError(f"{name} must be float32, got dtype {a.dtype}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (use np.ascontiguousarray)")
    if a.ndim < ndim_min:
        raise ValueError(f"{name} must have at least {ndim_min} dimension(s), got shape {a.shape}")
    if writeable and not a.flags.writeable:
        raise ValueError(f"{name} is updated in place and must be writeable")
    return a


def check_same_shape(ref_name: str, ref: np.ndarray, **others: np.ndarray) -> None:
    for name, a in others.items():
        if a.shape != ref.shape:
            raise ValueError(f"{name} has shape {a.shape}, expected the shape of {ref_name} {ref.shape}")


def check_scalar(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
        raise ValueError(f"{name} must be a real number, got {v!r}")
    f = float(v)
    if not math.isfinite(f) or not math.isfinite(float(F32(f))):
        raise ValueError(f"{name} must be finite in float32, got {v!r}")
    return f


def check_scope(l1_scope: Any) -> int:
    if l1_scope not in L1_SCOPES:
        raise ValueError(f"l1_scope must be 'sample' or 'batch', got {l1_scope!r}")
    return L1_SCOPES[l1_scope]


def check_no_overlap(**arrays: np.ndarray) -> None:
    items = list(arrays.items())
    for i, (na, a) in enumerate(items):
        for nb, b in items[i + 1 :]:
            if a.size and b.size and np.shares_memory(a, b):
                raise ValueError(f"{na} and {nb} must not share memory")


def validate_gs(x, grad, m, x_in, eps, step, decay, l1_scope):
    check_array("x", x, writeable=True)
    check_array("grad", grad)
    check_array("m", m, writeable=True)
    check_array("x_in", x_in)
    check_same_shape("x", x, grad=grad, m=m, x_in=x_in)
    check_no_overlap(x=x, m=m, grad=grad, x_in=x_in)
    return (check_scalar("eps", eps), check_scalar("step", step), check_scalar("decay", decay),
            check_scope(l1_scope))


def validate_ap(x, grad, x_in, eps, step):
    check_array("x", x, writeable=True)
    check_array("grad", grad)
    check_array("x_in", x_in)
    check_same_shape("x", x, grad=grad, x_in=x_in)
    check_no_overlap(x=x, grad=grad, x_in=x_in)
    return check_scalar("eps", eps), check_scalar("step", step)


def validate_blur(x, out):
    check_array("x", x, ndim_min=2)
    check_array("out", out, writeable=True, ndim_min=2)
    check_same_shape("x", x, out=out)
    if x is not out and x.size and np.shares_memory(x, out) and x.ctypes.data != out.ctypes.data:
        raise ValueError("out must be x itself or not overlap x")
    h, w = x.shape[-2], x.shape[-1]
    if h * w > MAX_PLANE:
        raise ValueError(f"blur planes of {h}x{w} exceed the kernels' limit of {MAX_PLANE} pixels")


def blur_weights(weights_or_sigma: BoxBlurWeights | float) -> BoxBlurWeights:
    """Accepts a ``BoxBlurWeights`` or a sigma; returns validated weights."""
    if isinstance(weights_or_sigma, BoxBlurWeights):
        w = weights_or_sigma
    else:
        w = box_blur_weights(check_scalar("sigma", weights_or_sigma))
    if not (0 <= w.radius <= (1 << 23) and 0 < w.ww and 0 <= w.fw
            and (2 * w.radius + 1) * w.ww + 2 * w.fw <= (1 << 24)):
        raise ValueError(f"invalid Pillow box-blur weights {w}")
    return w


def split_np(a: np.ndarray) -> tuple[int, int]:
    """(N, P) of an array whose first axis is the batch."""
    n = a.shape[0]
    return n, (a.size // n if n else 0)


def planes_hw(a: np.ndarray) -> tuple[int, int, int]:
    h, w = a.shape[-2], a.shape[-1]
    return (a.size // (h * w) if h * w else 0), h, w


# --------------------------------------------------------------------- kernels


def l1_norms(grad: np.ndarray) -> np.ndarray:
    """Canonical per-sample L1 norms (float32, shape (N,)) of an (N, ...) float32 array."""
    check_array("grad", grad)
    n, p = split_np(grad)
    return _l1_norms(grad.reshape(n, p))


def _l1_norms(g2: np.ndarray) -> np.ndarray:
    n, p = g2.shape
    lanes = np.zeros((n, LANES), dtype=F32)
    full = p // LANES
    if full:
        chunks = g2[:, : full * LANES].reshape(n, full, LANES)
        for c in range(full):  # lane k adds element c*256 + k: increasing j per lane
            lanes += np.abs(chunks[:, c, :])
    rem = p - full * LANES
    if rem:
        lanes[:, :rem] += np.abs(g2[:, full * LANES :])
    s = LANES // 2
    while s:
        lanes[:, :s] += lanes[:, s : 2 * s]
        s //= 2
    return lanes[:, 0].copy()


def batch_l1(per_sample: np.ndarray) -> np.float32:
    """The batch norm: per-sample norms summed sequentially i = 0..N-1 in float32."""
    total = F32(0.0)
    for v in np.asarray(per_sample, dtype=F32):
        total = F32(total + v)
    return total


def _sign(v: np.ndarray) -> np.ndarray:
    # explicit {-1, 0, +1} (np.sign would return -0.0 for -0.0)
    return np.where(v > 0, F32(1), np.where(v < 0, F32(-1), F32(0))).astype(F32)


def _project(x: np.ndarray, x_in: np.ndarray, eps: np.float32) -> np.ndarray:
    lo = x_in - eps
    hi = x_in + eps
    x = np.where(x < lo, lo, x)
    x = np.where(x > hi, hi, x)
    x = np.where(x < F32(0), F32(0), x)
    x = np.where(x > F32(1), F32(1), x)
    return x.astype(F32, copy=False)


def gs_update(x: np.ndarray, grad: np.ndarray, m: np.ndarray, x_in: np.ndarray, *,
              eps: float, step: float, decay: float, l1_scope: str = "sample") -> None:
    """One Guided-Shift step, in place on ``x`` and ``m``."""
    eps, step, decay, scope = validate_gs(x, grad, m, x_in, eps, step, decay, l1_scope)
    n, p = split_np(x)
    if n == 0 or p == 0:
        return
    g2 = grad.reshape(n, p)
    l1 = _l1_norms(g2)
    if scope == 1:
        l1 = np.full(n, batch_l1(l1), dtype=F32)
    l1c = l1[:, None]
    zero = l1c == F32(0)
    g = np.where(zero, F32(0), g2 / np.where(zero, F32(1), l1c)).astype(F32, copy=False)
    m2 = m.reshape(n, p)
    mv = g + F32(decay) * m2
    m2[...] = mv
    x2 = x.reshape(n, p)
    x2[...] = _project(x2 - F32(step) * _sign(mv), x_in.reshape(n, p), F32(eps))


def ap_update(x: np.ndarray, grad: np.ndarray, x_in: np.ndarray, *, eps: float, step: float) -> None:
    """One Adaptive-Projection step, in place on ``x``."""
    eps, step = validate_ap(x, grad, x_in, eps, step)
    if x.size == 0:
        return
    x[...] = _project(x - F32(step) * _sign(grad), x_in, F32(eps))


def blur_into(x: np.ndarray, out: np.ndarray, weights: BoxBlurWeights | float) -> None:
    """Pillow-exact blur of (..., H, W) float32 images into ``out`` (may be ``x`` itself)."""
    validate_blur(x, out)
    w = blur_weights(weights)
    if x.size == 0:
        return
    out[...] = blur_uint8(quantize(x), w).astype(F32) / F32(255)


def blur(x: np.ndarray, sigma: BoxBlurWeights | float) -> np.ndarray:
    """Pillow-exact blur of (..., H, W) float32 images in [0, 1]; returns a new float32 array."""
    check_array("x", x, ndim_min=2)
    out = np.empty_like(x)
    blur_into(x, out, sigma)
    return out
