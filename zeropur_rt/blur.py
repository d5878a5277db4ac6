"""Pillow-exact Gaussian blur (``ImageFilter.GaussianBlur``) in integer arithmetic.

ZeroPur's released code blurs ``floor(255 * x)`` with Pillow and divides by 255.
Pillow's GaussianBlur is not a Gaussian: it is 3 horizontal then 3 vertical passes
of a fractional box filter whose radius is derived from sigma (Gwosdek et al.,
SSVM 2011), accumulated in 32-bit integers with 24 fractional bits. This module
reproduces it bit for bit so that no backend needs Pillow, and so that the CUDA
and host kernels have a numpy oracle.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PASSES = 3
_ONE = 1 << 24
_HALF = 1 << 23


@dataclass(frozen=True)
class BoxBlurWeights:
    """Integer taps of one Pillow box-blur pass: ``2*radius+1`` taps of ``ww``, two edge taps of ``fw``."""

    sigma: float
    box_radius: float  # Pillow's fractional box radius (float32 in Pillow)
    radius: int  # integer part: the number of full taps on each side of the centre
    ww: int
    fw: int


def box_blur_weights(sigma: float, passes: int = PASSES) -> BoxBlurWeights:
    """Derive Pillow's box radius and integer weights from a Gaussian sigma.

    Pillow computes in C ``float`` (binary32) except for the ``sqrt`` and ``floor``
    calls, which take and return ``double``; each intermediate is rounded where the
    C code stores it into a ``float`` variable, and so is it here.
    """
    if not np.isfinite(sigma) or sigma < 0:
        raise ValueError(f"blur sigma must be a finite number >= 0, got {sigma!r}")
    with np.errstate(over="raise", invalid="raise"):
        try:
            return _pillow_box(sigma, passes)
        except (FloatingPointError, OverflowError):  # a sigma whose box Pillow's float arithmetic cannot hold
            raise ValueError(f"blur sigma {sigma!r} overflows Pillow's float32 box-blur arithmetic") from None


def _pillow_box(sigma: float, passes: int) -> BoxBlurWeights:
    f32 = np.float32
    s = f32(sigma)
    # _gaussian_blur_radius(): sigma2 = radius * radius / passes (float arithmetic)
    sigma2 = f32(f32(s * s) / f32(passes))
    # L = sqrt(12.0 * sigma2 + 1.0): double arithmetic, stored as float
    L = f32(np.sqrt(12.0 * float(sigma2) + 1.0))
    # l = floor((L - 1.0) / 2.0): double arithmetic, stored as float
    l = f32(np.floor((float(L) - 1.0) / 2.0))
    # a = (2 * l + 1) * (l * (l + 1) - 3 * sigma2); a /= 6 * (sigma2 - (l + 1) * (l + 1));
    a = f32(f32(f32(2) * l + f32(1)) * f32(f32(l * f32(l + f32(1))) - f32(f32(3) * sigma2)))
    a = f32(a / f32(f32(6) * f32(sigma2 - f32(f32(l + f32(1)) * f32(l + f32(1))))))
    box_radius = f32(l + a)
    radius = int(box_radius)
    # ww = (UINT32)(1 << 24) / (floatRadius * 2 + 1): float division, truncated
    ww = int(f32(f32(_ONE) / f32(box_radius * f32(2) + f32(1))))
    fw = (_ONE - (radius * 2 + 1) * ww) // 2
    return BoxBlurWeights(float(sigma), float(box_radius), radius, ww, fw)


def check_weights(w: BoxBlurWeights) -> BoxBlurWeights:
    """``w`` if the blur kernels' integer arithmetic holds it, else ValueError: the taps of one pass sum to
    at most 1.0 in 24 fractional bits, so a pass fits uint32 (``zp_blur_weights_ok`` in zeropur_kernels.h)."""
    if not (0 <= w.radius <= (1 << 23) and 0 < w.ww and 0 <= w.fw
            and (2 * w.radius + 1) * w.ww + 2 * w.fw <= _ONE):
        raise ValueError(f"invalid Pillow box-blur weights {w}")
    return w


def _box_pass(a: np.ndarray, w: BoxBlurWeights) -> np.ndarray:
    """One box pass along the last axis of an int64 array, edges replicated."""
    n = a.shape[-1]
    idx = np.arange(n)
    acc = np.zeros_like(a)
    for k in range(-w.radius, w.radius + 1):
        acc += a[..., np.clip(idx + k, 0, n - 1)]
    far = a[..., np.clip(idx - w.radius - 1, 0, n - 1)] + a[..., np.clip(idx + w.radius + 1, 0, n - 1)]
    return (acc * w.ww + far * w.fw + _HALF) >> 24


def blur_uint8(img: np.ndarray, sigma: float | BoxBlurWeights = 1.8) -> np.ndarray:
    """Pillow-exact GaussianBlur of (..., H, W) uint8 images; each plane alone, as Pillow blurs each band."""
    if img.dtype != np.uint8:
        raise ValueError(f"blur_uint8 expects uint8 pixels, got dtype {img.dtype}")
    w = sigma if isinstance(sigma, BoxBlurWeights) else box_blur_weights(sigma)
    if w.box_radius == 0:
        return img.copy()
    a = img.astype(np.int64)
    for _ in range(PASSES):
        a = _box_pass(a, w)
    a = np.swapaxes(a, -1, -2)
    for _ in range(PASSES):
        a = _box_pass(a, w)
    return np.ascontiguousarray(np.swapaxes(a, -1, -2)).astype(np.uint8)


def quantize(x: np.ndarray) -> np.ndarray:
    """``floor(255 * x)`` as uint8, computed in float32 as the released code does (ToPILImage)."""
    q = np.floor(np.asarray(x, dtype=np.float32) * np.float32(255))
    return np.clip(q, 0, 255).astype(np.uint8)


def blur_images(x: np.ndarray, sigma: float = 1.8) -> np.ndarray:
    """ZeroPur's blur of NCHW float images in [0, 1]: quantize, Pillow blur, divide by 255 (float32)."""
    return blur_uint8(quantize(x), sigma).astype(np.float32) / np.float32(255)
