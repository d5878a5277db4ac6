"""ONNX Runtime runner: one InferenceSession per exported graph, host buffers.

``device="cpu"``: the CPU execution provider. ``device="cuda[:N]"``: ``provider="cuda"`` (CUDA EP, cuDNN,
TF32 off) or ``provider="tensorrt"`` (TensorRT EP with its engine cache, falling back to the CUDA EP for
nodes it does not take); both come with the onnxruntime-gpu package. On a GPU each call goes through an
IOBinding: inputs bound from the host, outputs in ORT's device allocator and copied back, so the loop and
its kernels stay on the host and every step moves its iterate and gradient across. The device-resident
loops are the tensorrt runner's and the torch runner's on CUDA. A GPU session that onnxruntime made on
the CPU (its provider failed to load) is refused: ``check_session_providers``.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from zeropur_rt.cuda_driver import parse_device
from zeropur_rt.manifest import REBUILD_HINT, ArtifactError, Manifest
from zeropur_rt.runners.base import HostMemory

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


class ProviderLoadError(ImportError):
    """onnxruntime made the session without the GPU provider that was asked for (its libraries did not load)."""


def check_session_providers(session_providers: list[str], provider: str, graph: str) -> None:
    """Refuse a session that does not run on the provider asked for.

    ``get_available_providers()`` lists what the package was built with, not what loads: when
    the CUDA EP's libraries (CUDA, cuDNN of the right major version) fail to load, onnxruntime
    logs the reason and makes the session on the next provider in the list, the CPU, without
    raising (microsoft/onnxruntime#17801, #23372). ``session.get_providers()`` is what the
    session really has. A TensorRT EP that fell back to the CUDA EP still runs on the GPU: warned.
    """
    want = PROVIDERS[provider]
    got = session_providers[0] if session_providers else "no provider"
    if got == want:
        return
    if provider == "tensorrt" and got == PROVIDERS["cuda"]:
        warnings.warn(f"onnxruntime could not load its TensorRT execution provider for the {graph} graph and runs it on "
                      "the CUDA execution provider (the reason is in onnxruntime's log above; usually the TensorRT "
                      "libraries onnxruntime-gpu was built against are missing)", RuntimeWarning, stacklevel=3)
        return
    raise ProviderLoadError(
        f"onnxruntime made the {graph} session on {got}, not on the {want} that was asked for: the provider is in "
        "this onnxruntime build but failed to load (the reason is in onnxruntime's log above; usually a CUDA or "
        "cuDNN library of the major version this onnxruntime-gpu needs is missing, see "
        "https://onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider.html#requirements). Refusing to run "
        "the GPU path on the CPU; use device='cpu' to run on the CPU on purpose")


def session_options(threads: int | None = None) -> Any:
    """The runner's SessionOptions (benchmarks time and profile sessions made with the same ones)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # ENABLE_ALL includes the NCHWc layout transformer (blocked CPU convolutions); EXTENDED would drop it
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    threads = threads or int(os.environ.get("ZEROPUR_THREADS", "0")) or None
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    # Spinning worker threads burn the other core between our small kernels: turn it off.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


class OnnxRuntimeRunner(HostMemory):
    name = "onnxruntime"

    def __init__(self, artifact_dir: Path, manifest: Manifest, device: str = "cpu", threads: int | None = None,
                 provider: str | None = None, trt_cache_dir: str | os.PathLike | None = None):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ImportError("backend 'onnxruntime' needs the onnxruntime package: pip install onnxruntime") from e
        self.device = str(device)
        self.device_id = parse_device(self.device)
        provider = provider or ("cpu" if self.device_id is None else "cuda")
        if provider not in PROVIDERS:
            raise ValueError(f"unknown onnxruntime provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
        if (provider == "cpu") != (self.device_id is None):
            raise ValueError(f"provider {provider!r} does not run on device {self.device!r}: "
                             "use device='cpu' with provider='cpu', device='cuda[:N]' with 'cuda' or 'tensorrt'")
        have = ort.get_available_providers()
        if PROVIDERS[provider] not in have:
            raise ValueError(f"this onnxruntime ({ort.__version__}) has no {PROVIDERS[provider]} (it has "
                             f"{', '.join(have)}): the GPU providers come with `pip install onnxruntime-gpu` "
                             "(in place of onnxruntime), or use backend='tensorrt'")
        self.provider = provider
        opts = session_options(threads)
        providers = _providers(provider, self.device_id, manifest, trt_cache_dir)
        self.sessions: dict[str, Any] = {}
        for g, spec in manifest.graphs.items():
            path = str(artifact_dir / spec["file"])
            try:
                sess = ort.InferenceSession(path, opts, providers=providers)
            except Exception:  # noqa: BLE001 - an older onnxruntime-gpu that does not know use_tf32
                if provider == "cpu":
                    raise
                sess = ort.InferenceSession(path, opts, providers=_providers(provider, self.device_id, manifest,
                                                                            trt_cache_dir, tf32_option=False))
            check_session_providers(sess.get_providers(), provider, g)
            got = [i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()]
            if got != (spec["inputs"], spec["outputs"]):  # a manifest naming another graph's (hashed) file
                raise ArtifactError(f"{spec['file']} has inputs {got[0]} / outputs {got[1]}, the manifest's graph {g!r} "
                                    f"{spec['inputs']} / {spec['outputs']}; {REBUILD_HINT}")
            image = list(sess.get_inputs()[0].shape[1:])  # every graph's first input is the image batch
            if image != list(manifest.input_shape) or (g == "classifier" and sess.get_outputs()[0].shape[1:] != [manifest.num_classes]):
                raise ArtifactError(f"{spec['file']} takes images {image} and gives {sess.get_outputs()[0].shape[1:]}, the "
                                    f"manifest says {list(manifest.input_shape)} and {manifest.num_classes} classes; {REBUILD_HINT}")
            self.sessions[g] = sess
        self.outputs = {g: [o.name for o in s.get_outputs()] for g, s in self.sessions.items()}

    def output_shapes(self, graph: str, n: int) -> dict[str, tuple[int, ...]]:
        """Each output's shape at batch n: the exported graphs have a dynamic batch and static other dims."""
        return {o.name: tuple(n if i == 0 else int(d) for i, d in enumerate(o.shape))
                for o in self.sessions[graph].get_outputs()}

    def run(self, graph: str, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        sess, names = self.sessions[graph], self.outputs[graph]
        if self.device_id is None:
            results = sess.run(names, dict(inputs))
        else:
            io = sess.io_binding()
            for name, a in inputs.items():
                io.bind_cpu_input(name, a)
            for name in names:
                io.bind_output(name, "cuda", self.device_id)
            sess.run_with_iobinding(io)
            results = io.copy_outputs_to_cpu()
        for name, r in zip(names, results):
            np.copyto(outputs[name], r)

    def close(self) -> None:
        self.sessions = {}


def _providers(provider: str, device_id: int | None, manifest: Manifest, trt_cache_dir: Any,
               tf32_option: bool = True) -> list[Any]:
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    # cuDNN would otherwise run float32 convolutions in TF32 on Ampere and later (10-bit mantissa).
    cuda = ("CUDAExecutionProvider", {"device_id": device_id, "cudnn_conv_algo_search": "EXHAUSTIVE",
                                      **({"use_tf32": "0"} if tf32_option else {})})
    if provider == "cuda":
        return [cuda, "CPUExecutionProvider"]
    cache = Path(trt_cache_dir or Path.home() / ".cache" / "zeropur-rt" / "ort-trt" / manifest.model)
    cache.mkdir(parents=True, exist_ok=True)
    return [("TensorrtExecutionProvider", {"device_id": device_id, "trt_engine_cache_enable": "True",
                                           "trt_engine_cache_path": str(cache), "trt_timing_cache_enable": "True"}),
            cuda, "CPUExecutionProvider"]
