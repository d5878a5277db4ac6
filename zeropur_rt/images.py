"""Reading image sets for the deploy-time CLI: any form ``zeropur_rt.datasets`` reads, labels optional."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from zeropur_rt.datasets import read_dataset


def read_images(src: str | os.PathLike, chw: Sequence[int], resize: str = "refuse",
                num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """(float32 NCHW in [0,1], labels or None, names) of an .npz, a folder (flat or one subfolder per class)
    or a path,label CSV, brought to ``chw`` by the resize rule (``crop`` or ``refuse``)."""
    s = read_dataset(src, chw, resize=resize, labels=False, num_classes=num_classes)
    return s.x, s.y, s.names
