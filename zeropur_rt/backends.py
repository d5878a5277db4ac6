"""Backends behind one small interface: a loader builds a runner from an artifact directory,
and ``runner.run(graph, feeds)`` returns the graph's outputs in manifest order.

Heavy imports (onnxruntime, torch, tensorrt) happen inside the loaders, never at import time.
Host runners take and return numpy arrays.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from zeropur_rt.manifest import Manifest

BACKENDS = ("onnxruntime", "torch", "tensorrt")


class Runner(Protocol):
    name: str
    device: str

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


class OnnxRuntimeRunner:
    """ONNX Runtime: one InferenceSession per graph, created once.

    ``device="cpu"``: the CPU execution provider. ``device="cuda[:i]"``: ``provider="cuda"`` (CUDA EP,
    cuDNN, TF32 off) or ``provider="tensorrt"`` (TensorRT EP with its engine cache in ``trt_cache_dir``,
    falling back to the CUDA EP for nodes it does not take); both come with the onnxruntime-gpu
    package. On a GPU each call goes through an IOBinding (inputs bound from the host, outputs in ORT's
    device allocator, copied back once); the Purifier's loop and kernels stay on the host, so every
    step moves its iterate and gradient across. The device-resident loops are TensorRTLoop and
    TorchCudaLoop.
    """

    name = "onnxruntime"

    def __init__(self, artifact_dir: Path, manifest: Manifest, device: str = "cpu", threads: int | None = None,
                 provider: str | None = None, trt_cache_dir: str | os.PathLike | None = None):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ImportError("backend 'onnxruntime' needs the onnxruntime package: pip install onnxruntime") from e
        self.device = str(device)
        self.device_id = _cuda_ordinal(self.device)
        provider = provider or ("cpu" if self.device_id is None else "cuda")
        if provider not in ORT_PROVIDERS:
            raise ValueError(f"unknown onnxruntime provider {provider!r}; choose one of {', '.join(ORT_PROVIDERS)}")
        if (provider == "cpu") != (self.device_id is None):
            raise ValueError(f"provider {provider!r} does not run on device {self.device!r}: "
                             "use device='cpu' with provider='cpu', device='cuda[:i]' with 'cuda' or 'tensorrt'")
        have = ort.get_available_providers()
        if ORT_PROVIDERS[provider] not in have:
            raise ValueError(f"this onnxruntime ({ort.__version__}) has no {ORT_PROVIDERS[provider]} (it has "
                             f"{', '.join(have)}): the GPU providers come with `pip install onnxruntime-gpu` "
                             "(in place of onnxruntime), or use backend='tensorrt' / 'torch'")
        self.provider = provider
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        threads = threads or int(os.environ.get("ZEROPUR_THREADS", "0")) or None
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        # Spinning worker threads burn the other core between our small kernels: turn it off.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = _ort_providers(provider, self.device_id, manifest, trt_cache_dir)
        self.sessions: dict[str, Any] = {}
        self.outputs: dict[str, list[str]] = {}
        for g, spec in manifest.graphs.items():
            path = str(artifact_dir / spec["file"])
            try:
                sess = ort.InferenceSession(path, opts, providers=providers)
            except Exception:  # noqa: BLE001 - an older onnxruntime-gpu that does not know use_tf32
                if provider == "cpu":
                    raise
                sess = ort.InferenceSession(path, opts, providers=_ort_providers(provider, self.device_id, manifest,
                                                                                trt_cache_dir, tf32_option=False))
            self.sessions[g] = sess
            self.outputs[g] = list(spec["outputs"])

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        sess = self.sessions[graph]
        if self.device_id is None:
            return sess.run(self.outputs[graph], feeds)
        io = sess.io_binding()
        for name, a in feeds.items():
            io.bind_cpu_input(name, np.ascontiguousarray(a))
        for name in self.outputs[graph]:
            io.bind_output(name, "cuda", self.device_id)
        sess.run_with_iobinding(io)
        return io.copy_outputs_to_cpu()


def _cuda_ordinal(device: str) -> int | None:
    """None for 'cpu', i for 'cuda' / 'cuda:i'; anything else is refused."""
    if device == "cpu":
        return None
    head, _, idx = device.partition(":")
    if head == "cuda" and (idx == "" or idx.isdigit()):
        return int(idx or 0)
    raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:i', got {device!r}")


def _ort_providers(provider: str, device_id: int | None, manifest: Manifest, trt_cache_dir: Any,
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


class TorchRunner:
    """The reference's graph functions, eager, on CPU or CUDA (the oracle; needs zeropur_export + torch).

    The victim is rebuilt from the manifest's model name and its weights file, whose sha256
    must match the manifest, or passed in directly.
    """

    name = "torch"

    def __init__(self, artifact_dir: Path, manifest: Manifest, device: str = "cpu", threads: int | None = None,
                 victim: Any = None, weights: str | None = None):
        try:
            import torch
            from zeropur_export import reference as ref
            from zeropur_export.zoo import load_victim
        except ImportError as e:
            raise ImportError("backend 'torch' needs torch and the export extra: pip install 'zeropur-rt[export]'") from e
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"backend 'torch' on device {device!r} needs a GPU and a CUDA build of torch; this torch "
                             f"({torch.__version__}) sees no CUDA device: use device='cpu'")
        if threads:
            torch.set_num_threads(threads)
        if victim is None:
            from zeropur_export.weights import find_weights
            from zeropur_rt.files import sha256_file
            path = weights or find_weights(manifest.model)
            if manifest.weights_sha256 and sha256_file(path) != manifest.weights_sha256:
                raise ValueError(f"weights {path} are not the ones this artifact was exported from "
                                 f"(sha256 {manifest.weights_sha256[:12]}…)")
            victim = load_victim(manifest.model, weights=str(path))
        self.torch, self.ref, self.device = torch, ref, device
        self.victim = victim.to(device)
        self.cfg = manifest.zeropur_config
        self.n_ila = manifest.n_ila

    def _t(self, a: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        torch, ref, v = self.torch, self.ref, self.victim
        out: list[Any]
        if graph == "classifier":
            with torch.no_grad():
                logits, taps = v.run(self._t(feeds["x"]))
            out = [logits, taps[v.spec.embedding]]
        elif graph == "gs_grad":
            xb = self._t(feeds["x_blur"])
            out = list(ref.input_grad(lambda x: ref.gs_loss(v, x, xb), self._t(feeds["x"])))
        elif graph == "ap_setup":
            with torch.no_grad():
                c = ref.ap_constants(v, self._t(feeds["x_in"]), self._t(feeds["coarse"]), self.cfg)
            out = [*c.ila_dir, c.lpips_ref]
        elif graph == "ap_grad":
            c = ref.APConstants([self._t(feeds[f"ila_dir_{i}"]) for i in range(self.n_ila)], self._t(feeds["lpips_ref"]))
            out = [ref.input_grad(lambda f: ref.ap_loss(v, f, c, self.cfg), self._t(feeds["fine"]))[0]]
        else:
            raise ValueError(f"unknown graph {graph!r}")
        return [o.detach().cpu().numpy() for o in out]


def make_runner(backend: str, artifact_dir: Path, manifest: Manifest, device: str = "cpu",
                threads: int | None = None, **kwargs: Any) -> Runner:
    if backend == "onnxruntime":
        return OnnxRuntimeRunner(artifact_dir, manifest, device, threads, **kwargs)
    if backend == "torch":
        return TorchRunner(artifact_dir, manifest, device, threads, **kwargs)
    if backend == "tensorrt":
        from zeropur_rt.backend_trt import TensorRTRunner
        return TensorRTRunner(artifact_dir, manifest, device, **kwargs)
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")

