"""The ZeroPur CUDA kernels' image: found prebuilt, or compiled at run time.

Every import of cuda-python / pycuda is lazy (inside functions), so importing this
module costs nothing on machines without CUDA. For a device, the first image that
fits wins (``kernel_images``):

1. the prebuilt fatbin ``zeropur_kernels.fatbin`` installed next to the package by
   CMake (found by ``zeropur_rt.kernels.locate``; ``$ZEROPUR_CUDA_FATBIN`` overrides
   the path), when its sidecar ``zeropur_kernels.archs`` lists a cubin for the
   device's major architecture with a minor <= the device's, or PTX of an
   architecture <= the device's (the driver JIT-compiles it);
2. ``zeropur_kernels.cu`` compiled at run time by NVRTC with ``--fmad=false``:
   a cubin for the device's sm, or PTX of the newest architecture NVRTC knows
   that is <= the device's;
3. (pycuda only, if cuda-python's NVRTC is missing) ``pycuda.compiler.compile``
   (runs nvcc): ``nvcc_image``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from zeropur_rt.cuda_driver import import_driver
from zeropur_rt.kernels.locate import find_file, search_dirs

SOURCE_NAME = "zeropur_kernels.cu"
HEADER_NAME = "zeropur_kernels.h"
FATBIN_NAME = "zeropur_kernels.fatbin"
ARCHS_NAME = "zeropur_kernels.archs"
FATBIN_ENV = "ZEROPUR_CUDA_FATBIN"
KERNEL_NAMES = ("zp_gs_update_kernel", "zp_l1_kernel", "zp_ap_update_kernel", "zp_blur_kernel")
NVRTC_OPTIONS = ("--fmad=false", "--std=c++11")


class CudaKernelError(RuntimeError):
    pass


# ------------------------------------------------------------------ sources


def kernel_source() -> tuple[bytes, bytes]:
    """(zeropur_kernels.cu, zeropur_kernels.h) as bytes."""
    cu, h = find_file(SOURCE_NAME), find_file(HEADER_NAME)
    if cu is None or h is None:
        raise CudaKernelError(f"{SOURCE_NAME}/{HEADER_NAME} not found in {search_dirs()}")
    return cu.read_bytes(), h.read_bytes()


def find_fatbin() -> Path | None:
    env = os.environ.get(FATBIN_ENV)
    if env:
        return Path(env) if Path(env).is_file() else None
    return find_file(FATBIN_NAME)


def fatbin_archs(fatbin: Path) -> tuple[list[int], int | None] | None:
    """(cubin SMs, PTX arch) from the sidecar written by CMake, or None if absent."""
    side = fatbin.with_name(ARCHS_NAME)
    if not side.is_file():
        return None
    sms: list[int] = []
    ptx = None
    for line in side.read_text().splitlines():
        key, _, rest = line.partition(" ")
        if key == "sm":
            sms = [int(v) for v in rest.split()]
        elif key == "ptx" and rest.strip():
            ptx = int(rest.strip())
    return sms, ptx


def fatbin_fits(archs: tuple[list[int], int | None] | None, cc: tuple[int, int]) -> bool:
    """Does the fatbin hold a cubin (same major, minor <= device) or PTX (<= device) for cc?"""
    if archs is None:
        return True  # unknown: try loading, fall back to NVRTC on failure
    sms, ptx = archs
    major, minor = cc
    dev = major * 10 + minor
    if any(s // 10 == major and s % 10 <= minor for s in sms):
        return True
    return ptx is not None and ptx <= dev


# --------------------------------------------------------------------- NVRTC


def import_cuda_python() -> tuple[Any, Any]:
    """(driver, nvrtc) of cuda-python."""
    driver = import_driver()
    try:
        from cuda.bindings import nvrtc  # cuda-python >= 12.6
    except ImportError:
        from cuda import nvrtc  # type: ignore[no-redef]  # older cuda-python
    return driver, nvrtc


def _nvrtc_check(nvrtc: Any, result: Any, what: str) -> Any:
    err = result[0]
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, msg = nvrtc.nvrtcGetErrorString(err)
        raise CudaKernelError(f"{what}: {msg.decode() if isinstance(msg, bytes) else msg}")
    return result[1] if len(result) == 2 else result[1:]


def nvrtc_compile(arch: str, *, output: str = "auto", extra_options: tuple[str, ...] = ()) -> tuple[bytes, str]:
    """Compile zeropur_kernels.cu with cuda-python's NVRTC; needs no GPU.

    ``arch``: ``"sm_80"`` (cubin by default) or ``"compute_80"`` (PTX).
    ``output``: "auto", "ptx" or "cubin". Returns (image bytes, "ptx"|"cubin"); PTX
    is NUL-terminated as cuModuleLoadData wants it.
    """
    _, nvrtc = import_cuda_python()
    src, hdr = kernel_source()
    if output == "auto":
        output = "cubin" if arch.startswith("sm_") else "ptx"
    prog = _nvrtc_check(nvrtc, nvrtc.nvrtcCreateProgram(src, SOURCE_NAME.encode(), 1, [hdr],
                                                        [HEADER_NAME.encode()]), "nvrtcCreateProgram")
    try:
        opts = [f"--gpu-architecture={arch}".encode()] + [o.encode() for o in NVRTC_OPTIONS + tuple(extra_options)]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            size = _nvrtc_check(nvrtc, nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            log = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise CudaKernelError(f"NVRTC failed to compile {SOURCE_NAME} for {arch}:\n"
                                  f"{log.decode(errors='replace')}")
        if output == "cubin":
            size = _nvrtc_check(nvrtc, nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
            buf = b" " * size
            _nvrtc_check(nvrtc, nvrtc.nvrtcGetCUBIN(prog, buf) + (None,), "nvrtcGetCUBIN")
            return buf, "cubin"
        size = _nvrtc_check(nvrtc, nvrtc.nvrtcGetPTXSize(prog), "nvrtcGetPTXSize")
        buf = b" " * size  # size includes the terminating NUL
        _nvrtc_check(nvrtc, nvrtc.nvrtcGetPTX(prog, buf) + (None,), "nvrtcGetPTX")
        return buf, "ptx"
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def nvrtc_image_for(cc: tuple[int, int]) -> tuple[bytes, str]:
    """NVRTC image for a device: a cubin for its sm, else PTX of the newest arch <= it."""
    _, nvrtc = import_cuda_python()
    dev = cc[0] * 10 + cc[1]
    try:
        supported = list(_nvrtc_check(nvrtc, nvrtc.nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs"))
    except (CudaKernelError, AttributeError):
        supported = []
    if not supported or dev in supported:
        try:
            return nvrtc_compile(f"sm_{dev}", output="cubin")
        except CudaKernelError:
            if not supported:
                raise
    below = [a for a in supported if a <= dev]
    if not below:
        raise CudaKernelError(f"NVRTC supports {supported}, none <= sm_{dev}")
    return nvrtc_compile(f"compute_{max(below)}", output="ptx")


def kernel_images(cc: tuple[int, int], *, allow_nvrtc: bool = True) -> list[tuple[str, Callable[[], bytes]]]:
    """Candidate kernel images for a device, best first: (description, thunk -> bytes).

    Thunks are lazy so that NVRTC only runs when the prebuilt fatbin is absent,
    does not fit, or fails to load.
    """
    out: list[tuple[str, Any]] = []
    fb = find_fatbin()
    if fb is not None and fatbin_fits(fatbin_archs(fb), cc):
        out.append((f"prebuilt {fb}", fb.read_bytes))
    if allow_nvrtc:
        out.append((f"NVRTC for sm_{cc[0]}{cc[1]}", lambda: nvrtc_image_for(cc)[0]))
    return out


def nvrtc_available() -> tuple[bool, str]:
    try:
        _, nvrtc = import_cuda_python()
        err, major, minor = nvrtc.nvrtcVersion()
    except Exception as e:
        return False, f"NVRTC not available: {type(e).__name__}: {e}"
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        return False, f"nvrtcVersion failed: {err}"
    return True, f"{major}.{minor}"


def nvcc_image() -> bytes:
    """A cubin of ``zeropur_kernels.cu`` from pycuda's compiler (nvcc), for pycuda's current device."""
    from pycuda.compiler import compile as nvcc_compile

    src, _ = kernel_source()
    return nvcc_compile(src.decode(), options=["--fmad=false"], no_extern_c=True,
                        include_dirs=[str(find_file(HEADER_NAME).parent)])
