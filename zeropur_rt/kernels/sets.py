"""Kernel sets: our kernels behind the schedule's ``KernelSet`` interface, on a runner's buffers.

* ``HostKernelSet``: numpy buffers; the native host library, or the numpy twin (bit-identical).
* ``CudaKernelSet``: device buffers (``.ptr``, ``.shape``); the CUDA kernels, launched on the runner's
  stream so that they order with its graphs (and are captured with them into a CUDA graph).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np

from zeropur_rt.blur import BoxBlurWeights, box_blur_weights
from zeropur_rt.config import ZeroPurConfig


@functools.lru_cache(maxsize=16)
def _weights(sigma: float) -> BoxBlurWeights:
    return box_blur_weights(sigma)


class HostKernelSet:
    """The host library (``kernels="host"``/``"auto"``) or the numpy twin (``"numpy"``) on numpy buffers."""

    def __init__(self, impl: Any):
        self.impl = impl
        self.name = impl.BACKEND

    def blur(self, src: np.ndarray, dst: np.ndarray, sigma: float) -> None:
        self.impl.blur_into(src, dst, _weights(sigma))

    def gs_update(self, x: np.ndarray, grad: np.ndarray, m: np.ndarray, x_in: np.ndarray, l1: np.ndarray,
                  cfg: ZeroPurConfig) -> None:
        self.impl.gs_update(x, grad, m, x_in, eps=cfg.eps, step=cfg.gs_step, decay=cfg.momentum, l1_scope=cfg.l1_scope)

    def ap_update(self, x: np.ndarray, grad: np.ndarray, x_in: np.ndarray, cfg: ZeroPurConfig) -> None:
        self.impl.ap_update(x, grad, x_in, eps=cfg.eps, step=cfg.ap_step)

    def close(self) -> None:
        pass


def host_kernels(kind: str = "auto") -> HostKernelSet:
    """``auto``: the host library, or the numpy twin with a warning; ``host``: the library or an error."""
    if kind == "numpy":
        from zeropur_rt.kernels import numpy_twin
        return HostKernelSet(numpy_twin)
    if kind in ("auto", "host"):
        from zeropur_rt.kernels.host import HostKernels, load_host_kernels
        impl = load_host_kernels()
        if kind == "host" and not isinstance(impl, HostKernels):
            raise ValueError("kernels='host' asked for the native host library, which was not found or not loadable "
                             "(see the warning above); build it with `pip install -e .` or use kernels='auto'")
        return HostKernelSet(impl)
    raise ValueError(f"unknown host kernels {kind!r}; choose auto, host or numpy")


class CudaKernelSet:
    """``zeropur_rt.kernels.cuda.CudaKernels`` on device buffers, launched on ``stream()`` (asked at each
    launch: under torch's graph capture the current stream is the capturing one)."""

    def __init__(self, kernels: Any, stream: Callable[[], Any], owned: bool = True):
        self.kernels, self.stream, self.owned = kernels, stream, owned
        self.name = f"cuda ({kernels.image})" if hasattr(kernels, "image") else "cuda"

    @staticmethod
    def _np(buf: Any) -> tuple[int, int]:
        n = int(buf.shape[0])
        return n, int(np.prod(buf.shape[1:], dtype=np.int64))

    def blur(self, src: Any, dst: Any, sigma: float) -> None:
        n, c, h, w = src.shape
        self.kernels.blur(src.ptr, dst.ptr, n * c, h, w, _weights(sigma), stream=self.stream())

    def gs_update(self, x: Any, grad: Any, m: Any, x_in: Any, l1: Any, cfg: ZeroPurConfig) -> None:
        n, p = self._np(x)
        self.kernels.gs_update(x.ptr, grad.ptr, m.ptr, x_in.ptr, n, p, eps=cfg.eps, step=cfg.gs_step,
                               decay=cfg.momentum, l1_scope=cfg.l1_scope, stream=self.stream(), l1_scratch=l1.ptr)

    def ap_update(self, x: Any, grad: Any, x_in: Any, cfg: ZeroPurConfig) -> None:
        n, p = self._np(x)
        self.kernels.ap_update(x.ptr, grad.ptr, x_in.ptr, n, p, eps=cfg.eps, step=cfg.ap_step, stream=self.stream())

    def close(self) -> None:
        if self.owned:
            self.kernels.close()
