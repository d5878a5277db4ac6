"""What runners share: host buffers for host runners, and the device-buffer record for device runners."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np


@dataclass(frozen=True)
class DeviceBuffer:
    """Device memory of one loop tensor: float32, C-contiguous. ``owner`` keeps it alive where the runner
    does not (a torch tensor)."""

    ptr: int
    shape: tuple[int, ...]
    owner: Any = None

    @property
    def nbytes(self) -> int:
        return 4 * int(np.prod(self.shape, dtype=np.int64))


class HostMemory:
    """Buffers of a host runner: numpy arrays; the loop runs eagerly (nothing to capture)."""

    on_device = False

    def alloc(self, shape: tuple[int, ...], name: str) -> np.ndarray:
        return np.zeros(shape, np.float32)

    def copy(self, dst: np.ndarray, src: np.ndarray) -> None:
        np.copyto(dst, src)

    def zero(self, buf: np.ndarray) -> None:
        buf.fill(0)

    def upload(self, dst: np.ndarray, src: np.ndarray) -> None:
        np.copyto(dst, src)

    def download(self, src: np.ndarray) -> np.ndarray:
        return src.copy()

    def sync(self) -> None:
        pass

    def capture(self, enqueue: Callable[[], None]) -> None:
        return None

    def release(self, buffers: list[Any], n: int | None = None) -> None:
        pass
