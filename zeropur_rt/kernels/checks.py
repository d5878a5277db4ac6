"""Argument checks of the kernels, shared by the numpy twin, the host library's bindings and the CUDA
launchers: a clear ValueError for each bad argument before any native code sees a pointer.

Host arrays (twin, host library): C-contiguous float32 of one shape whose first axis is the batch, updated
arrays writeable and not sharing memory. Device launches (CUDA): non-NULL pointers and sizes inside the
grid's limits. Scalars: real numbers finite in float32.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from zeropur_rt.blur import BoxBlurWeights, box_blur_weights, check_weights

MAX_PLANE = 1 << 30  # ZP_MAX_PLANE: h*w of one blur plane (int indexing in C/CUDA)
MAX_GRID_X = 0x7FFFFFFF  # a launch's largest grid: one block per sample (updates) or per plane (blur)
L1_SCOPES = {"sample": 0, "batch": 1}
F32 = np.float32


# ------------------------------------------------------------------ host arrays


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
    return check_gs_scalars(eps, step, decay, l1_scope)


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
    """Accepts a ``BoxBlurWeights`` or a sigma; returns weights the kernels take (``blur.check_weights``)."""
    if isinstance(weights_or_sigma, BoxBlurWeights):
        return check_weights(weights_or_sigma)
    return check_weights(box_blur_weights(check_scalar("sigma", weights_or_sigma)))


def split_np(a: np.ndarray) -> tuple[int, int]:
    """(N, P) of an array whose first axis is the batch."""
    n = a.shape[0]
    return n, (a.size // n if n else 0)


def planes_hw(a: np.ndarray) -> tuple[int, int, int]:
    h, w = a.shape[-2], a.shape[-1]
    return (a.size // (h * w) if h * w else 0), h, w


# ------------------------------------------------------------------ device launches (pointers and sizes)


def check_ptr(name: str, v: Any) -> int:
    p = int(v)
    if p <= 0:
        raise ValueError(f"{name} must be a non-NULL device pointer, got {v!r}")
    return p


def check_np(n: Any, p: Any) -> tuple[int, int]:
    """(N, P) of a launch over N samples of P values."""
    for name, v in (("n", n), ("p", p)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
    n, p = int(n), int(p)
    if n > MAX_GRID_X:
        raise ValueError(f"batch size {n} exceeds the grid limit {MAX_GRID_X}")
    if n * p >= 1 << 63:
        raise ValueError("n * p overflows int64")
    return n, p


def check_blur_launch(planes: Any, h: Any, w: Any, weights: BoxBlurWeights | float
                      ) -> tuple[int, int, int, BoxBlurWeights]:
    for name, v in (("planes", planes), ("h", h), ("w", w)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
    if int(planes) > MAX_GRID_X:
        raise ValueError(f"{planes} planes exceed the grid limit")
    return int(planes), int(h), int(w), blur_weights(weights)


def check_gs_scalars(eps: Any, step: Any, decay: Any, l1_scope: Any) -> tuple[float, float, float, int]:
    return check_scalar("eps", eps), check_scalar("step", step), check_scalar("decay", decay), check_scope(l1_scope)
