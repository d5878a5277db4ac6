"""Reading image sets for the CLI: an .npz (x, optional y) or a folder of PNG/JPEG files."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def read_images(src: str | os.PathLike, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """(float32 NCHW in [0,1], labels or None, names). The .npz may hold uint8 NHWC or float NCHW ``x``."""
    p = Path(src)
    if p.is_dir():
        return _read_folder(p, hw)
    if not p.is_file():
        raise FileNotFoundError(f"input {p} does not exist")
    if p.suffix != ".npz":
        raise ValueError(f"input {p} must be an .npz file or a folder of PNG/JPEG images")
    with np.load(p) as z:
        if "x" not in z:
            raise ValueError(f"{p} has no array 'x' (found {list(z.keys())})")
        x = z["x"]
        y = z["y"].astype(np.int64) if "y" in z else None
    if x.dtype == np.uint8 and x.ndim == 4 and x.shape[-1] in (1, 3):
        x = x.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
    return np.ascontiguousarray(x, dtype=np.float32) if x.dtype != np.float64 else x, y, [f"{p.name}[{i}]" for i in range(len(x))]


def _read_folder(d: Path, hw: tuple[int, int]) -> tuple[np.ndarray, None, list[str]]:
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("reading a folder of images needs Pillow: pip install pillow") from e
    files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no PNG/JPEG images in {d}")
    arrs = []
    for f in files:
        im = np.asarray(Image.open(f).convert("RGB"))
        if im.shape[:2] != hw:
            raise ValueError(f"{f} is {im.shape[1]}x{im.shape[0]}, the model takes {hw[1]}x{hw[0]}: resize it first")
        arrs.append(im)
    x = np.stack(arrs).transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
    return np.ascontiguousarray(x), None, [f.name for f in files]
