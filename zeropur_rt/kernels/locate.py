"""Where the kernels' files are: one search for the host library, the CUDA fatbin and the CUDA sources.

A file is looked for in these folders, first hit wins:

1. every directory of the ``zeropur_rt.kernels`` package ``__path__``. In a scikit-build-core editable
   install (redirect mode) that list holds the install tree ``site-packages/zeropur_rt/kernels`` (where
   CMake installs the library and the fatbin) before the source folder; in a regular install it is the one
   installed package folder.
2. this module's own folder.
3. ``zeropur_rt/kernels`` under the interpreter's platlib / purelib.

An environment variable that names one file ($ZEROPUR_HOST_LIB, $ZEROPUR_CUDA_FATBIN) overrides the
search; its reader (``host``, ``cuda_images``) looks at it first.
"""
from __future__ import annotations

import sys
import sysconfig
from pathlib import Path


def search_dirs() -> list[Path]:
    """The folders searched, in order, each once."""
    dirs: list[Path] = []
    pkg = sys.modules.get("zeropur_rt.kernels")
    for d in list(getattr(pkg, "__path__", []) or []):
        dirs.append(Path(d))
    dirs.append(Path(__file__).resolve().parent)
    for key in ("platlib", "purelib"):
        try:
            dirs.append(Path(sysconfig.get_paths()[key]) / "zeropur_rt" / "kernels")
        except KeyError:
            pass
    return list(dict.fromkeys(dirs))


def find_file(name: str) -> Path | None:
    """The first ``name`` found in ``search_dirs()``, else None."""
    for d in search_dirs():
        p = d / name
        if p.is_file():
            return p
    return None
