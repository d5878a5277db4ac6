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

import numpy as np

from zeropur_rt.blur import BoxBlurWeights, blur_uint8, quantize
from zeropur_rt.kernels.checks import blur_weights, check_array, split_np, validate_ap, validate_blur, validate_gs

BACKEND = "numpy"
LANES = 256
F32 = np.float32

__all__ = [
    "LANES",
    "l1_norms",
    "batch_l1",
    "gs_update",
    "ap_update",
    "quantize",
    "blur",
    "blur_into",
]


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
