"""Data access: the shared folder, the CIFAR-10 test copy, and the original CIFAR-10 pickle batches."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from zeropur_rt import sources


def shared_dir(path: str | os.PathLike | None = None) -> Path:
    """The shared data folder: ``path``, else ``$ZEROPUR_SHARED``, else ``../shared`` beside the checkout.

    Only the location is resolved here; callers check for the files they need.
    """
    return Path(path) if path is not None else sources.shared_dir()


def cifar10_test_path(shared: str | os.PathLike | None = None) -> Path:
    """The shared folder's copy (tests read this one); commands resolve theirs with ``sources.cifar10_test_file``."""
    return shared_dir(shared) / "data" / sources.CIFAR10_NPZ


def load_cifar10_test(path: str | os.PathLike | None = None, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``start:stop`` of the CIFAR-10 test copy: (uint8 NHWC images, int64 labels).

    ``path`` is the .npz file (default: the first of ``sources.cifar10_test_file``'s places).
    """
    p = sources.cifar10_test_file(path)
    with np.load(p) as z:
        if "x" not in z or "y" not in z:
            raise ValueError(f"{p} must hold arrays 'x' (N,32,32,3 uint8) and 'y' (N,) labels; found {list(z.keys())}")
        x, y = z["x"], z["y"]
    if x.ndim != 4 or x.shape[1:] != (32, 32, 3) or x.dtype != np.uint8:
        raise ValueError(f"{p}: 'x' must be uint8 (N,32,32,3), got {x.dtype} {x.shape}")
    if not 0 <= start <= (stop if stop is not None else len(x)) <= len(x):
        raise ValueError(f"rows {start}:{stop} out of range for {len(x)} images")
    return x[start:stop], y[start:stop].astype(np.int64)


def load_cifar_pickle_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One batch file of the original CIFAR-10/100 python release -> (uint8 NHWC, int64 labels)
    (``sources.read_cifar_batch``, which the fetched archive is read with too)."""
    with open(path, "rb") as f:
        return sources.read_cifar_batch(f, str(path))


def to_nchw_float(x_uint8_nhwc: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW in [0, 1]."""
    if x_uint8_nhwc.dtype != np.uint8 or x_uint8_nhwc.ndim != 4:
        raise ValueError(f"expected uint8 NHWC images, got {x_uint8_nhwc.dtype} with shape {x_uint8_nhwc.shape}")
    return np.ascontiguousarray(x_uint8_nhwc.transpose(0, 3, 1, 2)).astype(np.float32) / np.float32(255)
