"""Labelled (or unlabelled) image sets in the forms users have, brought to a model's input shape.

Forms (``read_dataset``):

* ``.npz`` with ``x`` (uint8 NHWC or float NCHW in [0, 1]) and ``y`` (integer labels);
* a folder tree with one subfolder per class (``root/<class>/<image>``), or a flat folder of images
  (unlabelled: purify and classify only);
* a ``.csv`` of ``path,label`` rows (an optional header row; paths relative to the CSV's folder).

Class names of a folder tree or a CSV map to labels by one rule: if every name is a non-negative
integer, the name is the label; otherwise the sorted names are labels 0, 1, 2, ...

The resize rule (``resize="crop"``, the default): scale the image so that it covers the input shape
(the shorter side relative to the target becomes the target's), bicubic, then cut the centre out.
``resize="refuse"`` refuses any image of another size instead. Every problem is a ``DataError``
(a ValueError) naming the file; nothing is written here, so a failure leaves nothing behind.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from zeropur_rt.errors import InputError

if TYPE_CHECKING:  # Pillow loads only when an image file is read
    from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
RESIZE_RULES = ("crop", "refuse")


class DataError(InputError):
    """An image set that cannot be read as asked: the message names the file and the problem."""


@dataclass
class ImageSet:
    """float32 NCHW images in [0, 1], int64 labels (None when unlabelled), one name per image, and the
    class names in label order where the source had names (folder tree, CSV)."""

    x: np.ndarray
    y: np.ndarray | None
    names: list[str]
    classes: list[str] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return len(self.x)

    def take(self, idx: Sequence[int] | slice) -> "ImageSet":
        idx = np.arange(len(self))[idx] if isinstance(idx, slice) else np.asarray(idx, dtype=np.int64)
        return ImageSet(self.x[idx], None if self.y is None else self.y[idx], [self.names[i] for i in idx],
                        self.classes, self.source)


def read_dataset(src: str | os.PathLike, chw: Sequence[int], *, resize: str = "crop", labels: bool = True,
                 num_classes: int | None = None) -> ImageSet:
    """The image set at ``src`` (an .npz, a folder or a .csv) at input shape ``chw``.

    ``labels``: require a label for every image (a flat folder or an .npz without ``y`` is refused).
    ``num_classes``: labels must lie in 0..num_classes-1 (a folder tree may not have more classes).
    """
    if resize not in RESIZE_RULES:
        raise DataError(f"resize rule must be one of {', '.join(RESIZE_RULES)}, got {resize!r}")
    c, h, w = (int(v) for v in chw)
    if c not in (1, 3):
        raise DataError(f"images can be read for 1 or 3 channels, the model takes {c}")
    p = Path(src)
    if p.is_dir():
        out = _read_tree(p, (c, h, w), resize)
    elif not p.exists():
        raise DataError(f"{p}: no such file or folder (expected an .npz, a .csv or a folder of images)")
    elif p.suffix.lower() == ".npz":
        out = _read_npz(p, (c, h, w), resize)
    elif p.suffix.lower() == ".csv":
        out = _read_csv(p, (c, h, w), resize)
    elif p.suffix.lower() in IMAGE_SUFFIXES:  # one image file: unlabelled, a batch of one
        out = ImageSet(_stack([read_image(p, (c, h, w), resize)]), None, [p.name], source=str(p))
    else:
        raise DataError(f"{p}: expected an image ({', '.join(IMAGE_SUFFIXES)}), an .npz, a .csv (path,label) or a "
                        f"folder of images, got a {p.suffix or 'suffix-less'} file")
    if labels and out.y is None:
        raise DataError(f"{p}: no labels (an .npz needs 'y'; a folder needs one subfolder per class; or pass a path,label CSV)")
    if out.y is not None and num_classes is not None and len(out.y) and (out.y.min() < 0 or out.y.max() >= num_classes):
        bad = int(np.flatnonzero((out.y < 0) | (out.y >= num_classes))[0])
        raise DataError(f"{p}: class-count mismatch: {out.names[bad]} has label {int(out.y[bad])}, the model has "
                        f"{num_classes} classes (labels 0..{num_classes - 1})"
                        + (f"; classes found: {len(out.classes)}" if out.classes else ""))
    return out


def class_labels(names: Sequence[str], where: Path) -> dict[str, int]:
    """The one class-name rule: integer names are their own labels, else sorted names count from 0."""
    uniq = sorted(set(names))
    if all(_is_label(n) for n in uniq):
        if any(len(n) > 9 for n in uniq):
            raise DataError(f"{where}: class label {max(uniq, key=len)[:20]}... is not a class index (more than 9 digits)")
        return {n: int(n) for n in uniq}
    if any(_is_label(n) for n in uniq):
        raise DataError(f"{where}: class names mix integers and words ({', '.join(uniq[:6])}...): use one or the other")
    return {n: i for i, n in enumerate(uniq)}


def _is_label(name: str) -> bool:
    """ASCII decimal digits only: str.isdigit() also takes '²' and other scripts' digits, which int() refuses."""
    return name.isascii() and name.isdigit()


def stratified_order(y: np.ndarray) -> np.ndarray:
    """A permutation that deals the rows out class by class (round robin, classes in order of first
    appearance, rows of one class in file order): every prefix and every slice is about class-balanced."""
    y = np.asarray(y)
    groups = [np.flatnonzero(y == c) for c in dict.fromkeys(y.tolist())]
    rank = np.empty(len(y), dtype=np.int64)
    for g in groups:
        rank[g] = np.arange(len(g))
    first = {c: i for i, c in enumerate(dict.fromkeys(y.tolist()))}
    cls = np.array([first[v] for v in y.tolist()], dtype=np.int64)
    return np.lexsort((cls, rank))


# ---------------------------------------------------------------- one image
def fit_image(im: "Image.Image", hw: tuple[int, int], resize: str, name: str) -> np.ndarray:
    """One Pillow image at ``hw`` by the resize rule, as uint8 HWC (or HW for 1 channel)."""
    from PIL import Image
    h, w = hw
    if (im.height, im.width) != (h, w):
        if resize == "refuse":
            raise DataError(f"{name} is {im.width}x{im.height}, the model takes {w}x{h}: resize it first, or use "
                            "the resize rule 'crop' (--resize crop: scale to cover, then cut out the centre)")
        scale = max(h / im.height, w / im.width)
        sw, sh = max(w, round(im.width * scale)), max(h, round(im.height * scale))
        im = im.resize((sw, sh), Image.BICUBIC)
        left, top = (sw - w) // 2, (sh - h) // 2
        im = im.crop((left, top, left + w, top + h))
    return np.asarray(im)


def read_image(path: Path, chw: tuple[int, int, int], resize: str) -> np.ndarray:
    """uint8 HWC of one image file; a file Pillow cannot decode is a DataError naming it."""
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("reading image files needs Pillow: pip install pillow") from e
    try:
        with Image.open(path) as im:
            im.load()
            im = im.convert("RGB" if chw[0] == 3 else "L")
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None
    a = fit_image(im, chw[1:], resize, str(path))
    return a[..., None] if a.ndim == 2 else a


def _stack(arrs: list[np.ndarray]) -> np.ndarray:
    x = np.stack(arrs).transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
    return np.ascontiguousarray(x)


# ---------------------------------------------------------------- the three forms
def _read_npz(p: Path, chw: tuple[int, int, int], resize: str) -> ImageSet:
    try:
        with np.load(p, allow_pickle=False) as z:
            keys = list(z.keys())
            if "x" not in keys:
                raise DataError(f"{p} has no array 'x' (found {keys})")
            x, y = z["x"], (z["y"] if "y" in keys else None)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - zip, pickle and format errors vary
        raise DataError(f"{p}: not a readable .npz ({e})") from None
    c, h, w = chw
    if x.ndim != 4 or 0 in x.shape:  # an empty batch or zero-size images
        raise DataError(f"{p}: 'x' must be a non-empty batch of images (N,H,W,C uint8 or N,C,H,W float), got shape {x.shape}")
    if x.dtype == np.uint8:
        if x.shape[-1] != c:
            raise DataError(f"{p}: uint8 'x' must be NHWC with {c} channels, got shape {x.shape}")
        if x.shape[1:3] != (h, w):
            from PIL import Image
            x = np.stack([fit_image(Image.fromarray(a[..., 0] if c == 1 else a), (h, w), resize, f"{p}[{i}]")
                          .reshape(h, w, c) for i, a in enumerate(x)])
        xf = _stack(list(x))
    elif x.dtype in (np.float32, np.float64):
        if x.shape[1] != c:
            raise DataError(f"{p}: float 'x' must be NCHW with {c} channels, got shape {x.shape}")
        if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
            raise DataError(f"{p}: float 'x' must be finite and in [0, 1]")
        xf = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape[2:] != (h, w):
            from PIL import Image
            xf = np.stack([np.stack([fit_image(Image.fromarray(ch.astype(np.float32), "F"), (h, w), resize, f"{p}[{i}]")
                                     for ch in a]) for i, a in enumerate(xf)]).clip(0, 1).astype(np.float32)
    else:
        raise DataError(f"{p}: 'x' must be uint8 (NHWC) or float32/float64 (NCHW), got {x.dtype}")
    yl = None
    if y is not None:
        if y.shape != (len(x),) or not (np.issubdtype(y.dtype, np.integer) or
                                        (np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y)))):
            raise DataError(f"{p}: 'y' must hold one integer label per image ({len(x)}), got {y.dtype} {y.shape}")
        yl = y.astype(np.int64)
    return ImageSet(xf, yl, [f"{p.name}[{i}]" for i in range(len(x))], source=str(p))


def _read_tree(d: Path, chw: tuple[int, int, int], resize: str) -> ImageSet:
    subdirs = sorted(s for s in d.iterdir() if s.is_dir() and not s.name.startswith("."))
    flat = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if subdirs and flat:
        raise DataError(f"{d} holds both images and subfolders: use one subfolder per class, or a flat folder (unlabelled)")
    if not subdirs:
        if not flat:
            raise DataError(f"{d}: no images ({', '.join(IMAGE_SUFFIXES)}) and no class subfolders")
        return ImageSet(_stack([read_image(f, chw, resize) for f in flat]), None, [f.name for f in flat], source=str(d))
    labels = class_labels([s.name for s in subdirs], d)
    files, ys = [], []
    for s in subdirs:
        imgs = sorted(f for f in s.iterdir() if f.is_file() and not f.name.startswith("."))
        if not imgs:
            raise DataError(f"class folder {s} holds no images")
        odd = [f.name for f in imgs if f.suffix.lower() not in IMAGE_SUFFIXES]
        if odd:
            raise DataError(f"{s / odd[0]}: not an image file ({', '.join(IMAGE_SUFFIXES)})")
        files += imgs
        ys += [labels[s.name]] * len(imgs)
    x = _stack([read_image(f, chw, resize) for f in files])
    return ImageSet(x, np.array(ys, dtype=np.int64), [str(f.relative_to(d)) for f in files],
                    sorted(labels, key=labels.__getitem__), str(d))


def _read_csv(p: Path, chw: tuple[int, int, int], resize: str) -> ImageSet:
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            rows = [(i, r) for i, r in enumerate(csv.reader(f), 1) if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{p}: not a readable CSV ({e})") from None
    if rows and [c.strip().lower() for c in rows[0][1]][:2] == ["path", "label"]:
        rows = rows[1:]
    if not rows:
        raise DataError(f"{p}: no path,label rows")
    paths, names = [], []
    for line, r in rows:
        if len(r) < 2 or not r[1].strip():
            raise DataError(f"{p}, line {line}: missing label (each row is path,label), got {r}")
        if len(r) > 2:
            raise DataError(f"{p}, line {line}: expected two columns path,label, got {len(r)}")
        paths.append(p.parent / r[0].strip())
        names.append(r[1].strip())
    labels = class_labels(names, p)
    x = _stack([read_image(f, chw, resize) for f in paths])
    return ImageSet(x, np.array([labels[n] for n in names], dtype=np.int64), [str(f) for f in paths],
                    sorted(labels, key=labels.__getitem__) if not all(_is_label(n) for n in labels) else [], str(p))
