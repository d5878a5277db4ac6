"""ZeroPur kernels: GS/AP updates and the Pillow-exact blur, three bit-identical backends.

* :mod:`.numpy_twin` -- the numpy definition (test oracle, last-resort fallback).
* :mod:`.host` -- ctypes bindings of the C ABI host library; ``load_host_kernels()``.
* :mod:`.cuda` -- CUDA kernels launched via cuda-python (driver API) or pycuda; their image (prebuilt
  fatbin, NVRTC) comes from :mod:`.cuda_images`.
* :mod:`.checks` -- the argument checks all three share; :mod:`.locate` -- where their files are;
  :mod:`.sets` -- the kernel sets the schedule drives.

Nothing heavy is imported here: numpy_twin, host and cuda load on first use.
"""
from __future__ import annotations

from typing import Any

__all__ = ["load_host_kernels"]


def load_host_kernels(path: Any = None) -> Any:
    """See :func:`zeropur_rt.kernels.host.load_host_kernels`."""
    from zeropur_rt.kernels.host import load_host_kernels as _load

    return _load(path)
