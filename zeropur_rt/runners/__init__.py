"""Runners: execute one exported graph on their buffers (see ``zeropur_rt.runners.base.Runner``).

* ``onnxruntime``: ONNX Runtime, CPU or (onnxruntime-gpu) its CUDA / TensorRT execution providers; host buffers.
* ``tensorrt``: prebuilt TensorRT engines on device buffers, CUDA-graph capture of the whole loop.

The torch runner (the reference's own gradients, CPU or CUDA) needs the build-time package:
``zeropur_export.reference.torch_runner``. Heavy imports happen inside the runners' constructors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from zeropur_rt.manifest import Manifest

BACKENDS = ("onnxruntime", "tensorrt")


def load_runner(backend: str, artifact_dir: Path, manifest: Manifest, device: str = "cpu",
                threads: int | None = None, **kwargs: Any) -> Any:
    if backend == "onnxruntime":
        from zeropur_rt.runners.onnxruntime import OnnxRuntimeRunner
        return OnnxRuntimeRunner(artifact_dir, manifest, device, threads, **kwargs)
    if backend == "tensorrt":
        from zeropur_rt.runners.tensorrt import TensorRTRunner
        return TensorRTRunner(artifact_dir, manifest, device, **kwargs)
    if backend == "torch":
        raise ValueError("backend 'torch' runs the reference's gradients and needs the build-time package: "
                         "zeropur_export.reference.torch_runner.load_purifier(artifact_dir, device=...) "
                         "(pip install 'zeropur-rt[export]')")
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
