"""Image sets written as PNG folders: the purified images of ``zeropur-rt purify --out``, and the
class-folder tree of ``zeropur-export fetch --pngs`` that every command reads back (``zeropur_rt.datasets``)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np

from zeropur_rt.errors import OutputError


def to_uint8_nhwc(x: np.ndarray) -> np.ndarray:
    """float NCHW in [0, 1] -> uint8 NHWC, rounded to the nearest level (what an 8-bit PNG can hold)."""
    if x.dtype == np.uint8:
        return x
    return np.ascontiguousarray((np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1))


def png_names(names: Sequence[str]) -> list[str]:
    """A relative .png path per image: a folder tree's own (``cat/0001.jpg`` -> ``cat/0001.png``), else its index."""
    out = []
    for i, n in enumerate(names):
        p = PurePosixPath(str(n).replace(os.sep, "/"))
        plain = not p.is_absolute() and ".." not in p.parts and "[" not in str(p) and p.name
        out.append(str(p.with_suffix(".png")) if plain else f"{i:05d}.png")
    return out if len(set(out)) == len(out) else [f"{i:05d}.png" for i in range(len(names))]


def write_pngs(out_dir: str | os.PathLike, images: np.ndarray, names: Sequence[str]) -> Path:
    """Write each image (uint8 NHWC, or float NCHW in [0, 1]) as an 8-bit PNG under ``out_dir``.

    The files go to a temp folder beside ``out_dir`` that is renamed into place once all are written, so a
    failure leaves no half-written folder. An existing non-empty ``out_dir`` is refused.
    """
    from PIL import Image

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputError(f"{out} exists and is not an empty folder; name a new folder for the PNG files")
    u8 = to_uint8_nhwc(images)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        for img, rel in zip(u8, png_names(names)):
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(dest)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except OSError as e:
        raise OutputError(f"cannot write PNG files to {out}: {e}; nothing was written") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_class_folders(out_dir: str | os.PathLike, x_uint8_nhwc: np.ndarray, labels: np.ndarray) -> Path:
    """Labelled images as ``out_dir/<label>/<row>.png``: the class-folder tree every command reads."""
    return write_pngs(out_dir, x_uint8_nhwc, [f"{int(c)}/{i:05d}.png" for i, c in enumerate(labels)])
