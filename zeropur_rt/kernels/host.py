"""ctypes bindings of the C ABI host library ``libzeropur_host`` (built by CMake).

``load_host_kernels()`` returns an object exposing the same functions as
:mod:`zeropur_rt.kernels.numpy_twin` (``gs_update``, ``ap_update``, ``blur``,
``blur_into``, ``l1_norms``) backed by the native library, or -- with a
``logging`` warning, never silently -- the numpy twin itself when the library is
missing or unloadable. Both carry ``BACKEND`` ("host" or "numpy").

The library is ``$ZEROPUR_HOST_LIB`` (a file path; if set and unloadable: warning + numpy), else the
first found where ``zeropur_rt.kernels.locate`` looks.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from zeropur_rt.blur import BoxBlurWeights
from zeropur_rt.kernels import checks
from zeropur_rt.kernels import numpy_twin as _twin
from zeropur_rt.kernels.locate import find_file, search_dirs

log = logging.getLogger(__name__)

ABI_VERSION = 1
ENV_VAR = "ZEROPUR_HOST_LIB"

if sys.platform == "win32":
    LIB_NAME = "zeropur_host.dll"
elif sys.platform == "darwin":
    LIB_NAME = "libzeropur_host.dylib"
else:
    LIB_NAME = "libzeropur_host.so"

_c_ll = ctypes.c_longlong
_c_f = ctypes.c_float
_c_p = ctypes.c_void_p


def find_host_library() -> Path | None:
    """$ZEROPUR_HOST_LIB as given, else the library found by ``locate.find_file``, else None."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    return find_file(LIB_NAME)


class HostKernels:
    """The native host library behind numpy_twin's API (validated in Python first)."""

    BACKEND = "host"

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        lib = ctypes.CDLL(str(self.path))
        lib.zp_host_abi_version.restype = ctypes.c_int
        lib.zp_host_abi_version.argtypes = []
        version = lib.zp_host_abi_version()
        if version != ABI_VERSION:
            raise OSError(f"{self.path}: ABI version {version}, expected {ABI_VERSION}")
        lib.zp_strerror.restype = ctypes.c_char_p
        lib.zp_strerror.argtypes = [ctypes.c_int]
        lib.zp_host_l1_norms.restype = ctypes.c_int
        lib.zp_host_l1_norms.argtypes = [_c_p, _c_ll, _c_ll, _c_p]
        lib.zp_host_gs_update.restype = ctypes.c_int
        lib.zp_host_gs_update.argtypes = [_c_p, _c_p, _c_p, _c_p, _c_ll, _c_ll, _c_f, _c_f, _c_f,
                                          ctypes.c_int]
        lib.zp_host_ap_update.restype = ctypes.c_int
        lib.zp_host_ap_update.argtypes = [_c_p, _c_p, _c_p, _c_ll, _c_ll, _c_f, _c_f]
        lib.zp_host_blur.restype = ctypes.c_int
        lib.zp_host_blur.argtypes = [_c_p, _c_p, _c_ll, _c_ll, _c_ll, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint]
        self._lib = lib

    def __repr__(self) -> str:
        return f"HostKernels({str(self.path)!r})"

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            msg = self._lib.zp_strerror(rc).decode()
            raise RuntimeError(f"{what} failed in {self.path.name}: error {rc} ({msg})")

    @staticmethod
    def _f32(v: float) -> float:
        return float(np.float32(v))

    def l1_norms(self, grad: np.ndarray) -> np.ndarray:
        checks.check_array("grad", grad)
        n, p = checks.split_np(grad)
        out = np.zeros(n, dtype=np.float32)
        if n:
            self._check(self._lib.zp_host_l1_norms(grad.ctypes.data, n, p, out.ctypes.data),
                        "zp_host_l1_norms")
        return out

    def gs_update(self, x: np.ndarray, grad: np.ndarray, m: np.ndarray, x_in: np.ndarray, *,
                  eps: float, step: float, decay: float, l1_scope: str = "sample") -> None:
        eps, step, decay, scope = checks.validate_gs(x, grad, m, x_in, eps, step, decay, l1_scope)
        n, p = checks.split_np(x)
        if n == 0 or p == 0:
            return
        rc = self._lib.zp_host_gs_update(x.ctypes.data, grad.ctypes.data, m.ctypes.data,
                                         x_in.ctypes.data, n, p, self._f32(eps), self._f32(step),
                                         self._f32(decay), scope)
        self._check(rc, "zp_host_gs_update")

    def ap_update(self, x: np.ndarray, grad: np.ndarray, x_in: np.ndarray, *, eps: float,
                  step: float) -> None:
        eps, step = checks.validate_ap(x, grad, x_in, eps, step)
        n, p = checks.split_np(x)
        if n == 0 or p == 0:
            return
        rc = self._lib.zp_host_ap_update(x.ctypes.data, grad.ctypes.data, x_in.ctypes.data, n, p,
                                         self._f32(eps), self._f32(step))
        self._check(rc, "zp_host_ap_update")

    def blur_into(self, x: np.ndarray, out: np.ndarray, weights: BoxBlurWeights | float) -> None:
        checks.validate_blur(x, out)
        w = checks.blur_weights(weights)
        planes, h, wd = checks.planes_hw(x)
        if x.size == 0:
            return
        rc = self._lib.zp_host_blur(x.ctypes.data, out.ctypes.data, planes, h, wd, w.radius, w.ww,
                                    w.fw)
        self._check(rc, "zp_host_blur")

    def blur(self, x: np.ndarray, sigma: BoxBlurWeights | float) -> np.ndarray:
        checks.check_array("x", x, ndim_min=2)
        out = np.empty_like(x)
        self.blur_into(x, out, sigma)
        return out


@functools.lru_cache(maxsize=None)
def _load(path: str | None, env: str | None) -> Any:
    del env  # part of the cache key only
    if path is None:
        log.warning(
            "zeropur_rt: host kernel library %s not found (searched $%s and %s); "
            "falling back to the numpy twin (bit-identical, slower)",
            LIB_NAME, ENV_VAR, ", ".join(str(d) for d in search_dirs()))
        return _twin
    try:
        return HostKernels(path)
    except (OSError, AttributeError) as e:
        log.warning("zeropur_rt: host kernel library %s is unloadable (%s); "
                    "falling back to the numpy twin (bit-identical, slower)", path, e)
        return _twin


def load_host_kernels(path: str | os.PathLike[str] | None = None) -> Any:
    """The native host kernels, or the numpy twin (with a logging warning) if unavailable.

    ``path`` overrides the search (then ``$ZEROPUR_HOST_LIB``, then the package folders).
    """
    if path is None:
        found = find_host_library()
        path_s = str(found) if found is not None else None
    else:
        path_s = str(path)
    return _load(path_s, os.environ.get(ENV_VAR))
