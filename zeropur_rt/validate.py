"""Input checks shared by the reference and the runtime: one clear InputError (a ValueError) per problem."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from zeropur_rt.errors import InputError

_FLOAT_DTYPES = ("float32", "float64")


class BatchSizeError(InputError):
    """A batch outside the artifact's batch range (the engines' optimisation profile)."""


def _dtype_name(x: Any) -> str:
    return str(x.dtype).replace("torch.", "")


def check_images(x: Any, chw: Sequence[int] | None = None, max_batch: int | None = None, name: str = "images") -> None:
    """Validate an NCHW float batch in [0, 1] (numpy array or torch tensor)."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise InputError(f"{name} must be an array or tensor, got {type(x).__name__}")
    shape = tuple(int(s) for s in x.shape)
    if len(shape) != 4:
        raise InputError(f"{name} must be NCHW (rank 4), got rank {len(shape)} with shape {shape}")
    if shape[0] == 0:
        raise InputError(f"{name} is an empty batch (shape {shape})")
    if 0 in shape:
        raise InputError(f"{name} have an empty dimension (shape {shape})")
    if chw is not None:
        if shape[1] != chw[0]:
            raise InputError(f"{name} must have {chw[0]} channels (NCHW), got {shape[1]} (shape {shape}); "
                             "for NHWC uint8 input use the uint8/NHWC option")
        if shape[2:] != tuple(chw[1:]):
            raise InputError(f"{name} must be {chw[1]}x{chw[2]} pixels, got {shape[2]}x{shape[3]}")
    if max_batch is not None and shape[0] > max_batch:
        raise InputError(f"batch of {shape[0]} exceeds this artifact's maximum batch {max_batch}; split the input or re-export with a larger --max-batch")
    dt = _dtype_name(x)
    if dt not in _FLOAT_DTYPES:
        raise InputError(f"{name} must be float32 or float64 in [0, 1], got dtype {dt}")
    if isinstance(x, np.ndarray):
        finite, lo, hi = bool(np.isfinite(x).all()), None, None
        if finite:
            lo, hi = float(x.min()), float(x.max())
    else:
        finite = bool(x.isfinite().all())
        lo, hi = (float(x.min()), float(x.max())) if finite else (None, None)
    if not finite:
        raise InputError(f"{name} contain NaN or Inf")
    if lo < 0.0 or hi > 1.0:
        raise InputError(f"{name} must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")


def check_batch(n: int, batch: Mapping[str, int], what: str = "the TensorRT engines") -> int:
    """``n`` inside [batch["min"], batch["max"]], else a BatchSizeError saying what to do."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise BatchSizeError(f"batch size must be an integer, got {n!r}")
    n = int(n)
    lo, hi = int(batch["min"]), int(batch["max"])
    if n > hi:
        raise BatchSizeError(f"batch of {n} images exceeds the maximum batch {hi} of {what}' optimisation profile: "
                             f"split the input into batches of at most {hi}, or re-export with a larger --max-batch "
                             "and rebuild the engines (zeropur-export build-engines DIR)")
    if n < lo:
        raise BatchSizeError(f"batch of {n} images is below the minimum batch {lo} of {what}' optimisation profile: "
                             f"pad the batch to {lo}, or re-export with --min-batch {max(1, n)} and rebuild the engines")
    return n
