"""The torch runner: the reference's own loss functions under torch autograd, behind the runtime's Runner.

It is the oracle's side of every comparison and the GPU path where no TensorRT is installed:

* on the CPU its buffers are numpy arrays (shared with torch, no copies), so it runs with the host kernels
  or with the reference's torch twins of the kernels (``reference.steps.TorchKernels``);
* on CUDA its buffers are torch tensors on the device, its kernels our CUDA kernels launched on torch's
  current stream, and ``capture`` records the whole loop into a ``torch.cuda.CUDAGraph``.

``fast=True`` trades the oracle's eager autograd for speed (issue 18), and is checked against it like any
backend: BatchNorm folded into the convolutions (``fold.fold_batchnorm``, on a copy), channels-last
activations, the two gradient graphs' functions (``reference.graph_functions``, the exporter's own; the
classifier and the AP setup run once per purification and stay eager) compiled by ``torch.compile``
(inductor fuses the elementwise backward), cuDNN's
benchmark mode on CUDA; on CUDA the compiled steps are captured with the whole loop in one CUDA graph.
``precision`` is float32 by default; ``"tf32"`` (CUDA) and ``"bf16"`` (autocast) are opt-in: sign steps
amplify small gradient errors, so their agreement with float32 is measured (``benchmarks.gpu_speed``).
``autotune=True`` adds inductor's max-autotune: Triton convolution templates that take the elementwise work
after a convolution into its epilogue (in the backward, the ReLU mask multiply and the residual add follow
each data-gradient convolution), so fewer, fatter kernels per step; it compiles for minutes per graph and
batch size.

Build time only (it needs torch and the victim); the deploy-time pipeline takes it like any runner:
``load_purifier(artifact_dir, device="cuda")``.
"""
from __future__ import annotations

import contextlib
import copy
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping

import numpy as np
import torch

from zeropur_export.reference import losses as ref
from zeropur_export.reference.graph_functions import graph_functions
from zeropur_export.reference.steps import input_grad
from zeropur_export.victims.taps import Victim
from zeropur_rt.config import ZeroPurConfig
from zeropur_rt.cuda_driver import parse_device
from zeropur_rt.manifest import graph_io
from zeropur_rt.runners.base import DeviceBuffer, HostMemory

GRAPHS = ("classifier", "gs_grad", "ap_setup", "ap_grad")
COMPILED_GRAPHS = ("gs_grad", "ap_grad")  # every step calls one of them; compiling the others buys nothing
Precision = Literal["fp32", "tf32", "bf16"]
PRECISIONS = ("fp32", "tf32", "bf16")


class _TorchReplay:
    def __init__(self, graph: Any):
        self.graph = graph

    def launch(self) -> None:
        self.graph.replay()

    def close(self) -> None:
        self.graph = None


class TorchRunner(HostMemory):
    """``ap_mode="recompute"`` makes every AP step recompute its constants with its own forwards: the
    released code's cost, for the latency baseline. ``fast`` and ``precision``: see the module docstring.
    ``victim`` stays the unfolded network the reference runs; ``compute_victim`` is the one this runner runs."""

    name = "torch"

    def __init__(self, victim: Victim, cfg: ZeroPurConfig, device: str = "cpu", *, ap_mode: ref.APMode = "lean",
                 threads: int | None = None, fast: bool = False, precision: Precision = "fp32",
                 autotune: bool = False):
        if ap_mode not in ("lean", "recompute"):
            raise ValueError(f"ap_mode must be 'lean' or 'recompute', got {ap_mode!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if autotune and not fast:
            raise ValueError("autotune=True is an option of the compiled runner: pass fast=True too")
        if fast and ap_mode == "recompute":
            raise ValueError("fast=True runs the lean AP step; ap_mode='recompute' is the released code's cost, "
                             "a baseline that is measured as it is")
        self.device = str(device)
        self.ordinal = parse_device(self.device)
        self.on_device = self.ordinal is not None
        if self.on_device and not torch.cuda.is_available():
            raise ValueError(f"the torch runner on {device!r} needs a GPU and a CUDA build of torch; this torch "
                             f"({torch.__version__}) sees no CUDA device: use device='cpu'")
        if precision == "tf32" and not self.on_device:
            raise ValueError("precision 'tf32' is a mode of NVIDIA GPUs (Ampere and later); on the CPU use 'fp32' "
                             "or 'bf16'")
        if threads:
            torch.set_num_threads(threads)
        self.dev = torch.device("cuda", self.ordinal) if self.on_device else torch.device("cpu")
        self.victim = victim.to(self.dev)
        self.fast, self.precision, self.autotune = fast, precision, autotune
        self.compute_victim = _fast_victim(self.victim) if fast else self.victim
        self._steps: dict[str, Callable[..., Any]] = {}
        if fast and self.on_device:
            torch.backends.cudnn.benchmark = True  # process-wide: cuDNN times its algorithms per shape, once
        self.cfg, self.ap_mode = cfg, ap_mode
        self.dtype = victim.mean.dtype
        self._np_dtype = np.float64 if self.dtype == torch.float64 else np.float32
        self._shapes: dict[str, dict[str, tuple[int, ...]]] | None = None
        self._recompute: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- buffers: numpy on the host (torch views them), torch tensors on a device
    def tensor(self, buf: Any) -> torch.Tensor:
        return buf.owner if isinstance(buf, DeviceBuffer) else torch.from_numpy(buf)

    def alloc(self, shape: tuple[int, ...], name: str) -> Any:
        if not self.on_device:
            return np.zeros(shape, self._np_dtype)
        t = torch.zeros(shape, dtype=self.dtype, device=self.dev)
        return DeviceBuffer(t.data_ptr(), tuple(t.shape), t)

    def copy(self, dst: Any, src: Any) -> None:
        self.tensor(dst).copy_(self.tensor(src))

    def zero(self, buf: Any) -> None:
        self.tensor(buf).zero_()

    def upload(self, dst: Any, src: np.ndarray) -> None:
        self.tensor(dst).copy_(torch.from_numpy(np.ascontiguousarray(src)))

    def download(self, src: Any) -> np.ndarray:
        return self.tensor(src).detach().cpu().numpy().copy()

    def sync(self) -> None:
        if self.on_device:
            torch.cuda.synchronize(self.dev)

    # -- graphs
    def output_shapes(self, graph: str, n: int) -> dict[str, tuple[int, ...]]:
        if self._shapes is None:  # one probe at batch 1: every output but the scalar loss scales with the batch
            v = self.victim
            with torch.no_grad():
                x = torch.zeros((1, *v.spec.input_shape), dtype=self.dtype, device=self.dev)
                logits, taps = v.run(x)
            s = {"classifier": {"logits": tuple(logits.shape), "embedding": tuple(taps[v.spec.embedding].shape)},
                 "gs_grad": {"grad": tuple(x.shape), "loss": ()}, "ap_grad": {"grad": tuple(x.shape)}, "ap_setup": {}}
            if v.spec.supports_ap:
                c = ref.ap_constants(v, x, x, self.cfg)
                s["ap_setup"] = {f"ila_dir_{i}": tuple(d.shape) for i, d in enumerate(c.ila_dir)}
                s["ap_setup"]["lpips_ref"] = tuple(c.lpips_ref.shape)
            self._shapes = s
        return {k: ((n, *v[1:]) if v else ()) for k, v in self._shapes[graph].items()}

    def run(self, graph: str, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
        t = {k: self.tensor(b) for k, b in inputs.items()}
        if graph not in GRAPHS:
            raise ValueError(f"unknown graph {graph!r}; the graphs are {', '.join(GRAPHS)}")
        with self._precision():
            results = self._run_fast(graph, t) if self.fast else self._run_reference(graph, t)
        for name, r in results.items():
            self.tensor(outputs[name]).copy_(r)

    @contextlib.contextmanager
    def _precision(self) -> Iterator[None]:
        if self.precision == "bf16":
            with torch.autocast(self.dev.type, dtype=torch.bfloat16):
                yield
        elif self.precision == "tf32":
            flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
            try:
                yield
            finally:
                torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
        else:
            yield

    def _run_fast(self, graph: str, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The graph's function on the folded victim, compiled for the gradient graphs (once per runner; dynamo
        specialises it per batch size). Called under no_grad so that inductor freezes the weights;
        ``torch.func.grad`` differentiates inside regardless."""
        if graph not in self._steps:
            self._steps[graph] = _graph_step(self.compute_victim, self.cfg, graph,
                                             compiled=graph in COMPILED_GRAPHS, autotune=self.autotune)
        in_names, out_names = graph_io(graph, len(self.victim.spec.ila))
        with torch.no_grad():
            out = self._steps[graph](*(t[k] for k in in_names))
        return dict(zip(out_names, out))

    def _run_reference(self, graph: str, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        v = self.victim
        if graph == "classifier":
            with torch.no_grad():
                logits, taps = v.run(t["x"])
            results = {"logits": logits, "embedding": taps[v.spec.embedding]}
        elif graph == "gs_grad":
            g, loss = input_grad(lambda x: ref.gs_loss(v, x, t["x_blur"]), t["x"])
            results = {"grad": g, "loss": loss}
        elif graph == "ap_setup":
            with torch.no_grad():
                c = ref.ap_constants(v, t["x_in"], t["coarse"], self.cfg)
            results = {f"ila_dir_{i}": d for i, d in enumerate(c.ila_dir)} | {"lpips_ref": c.lpips_ref}
            if self.ap_mode == "recompute":
                self._recompute = (t["x_in"].clone(), t["coarse"].clone())
        elif graph == "ap_grad":
            if self.ap_mode == "recompute":
                x_in, coarse = self._recompute
                loss_fn: Callable = lambda f: ref.ap_loss_recompute(v, f, x_in, coarse, self.cfg)  # noqa: E731
            else:
                c = ref.APConstants([t[f"ila_dir_{i}"] for i in range(len(v.spec.ila))], t["lpips_ref"])
                loss_fn = lambda f: ref.ap_loss(v, f, c, self.cfg)  # noqa: E731
            results = {"grad": input_grad(loss_fn, t["fine"])[0]}
        return results

    # -- the device loop: our CUDA kernels on torch's stream, captured with torch's work
    def stream_handle(self) -> int:
        return torch.cuda.current_stream(self.dev).cuda_stream

    @contextlib.contextmanager
    def device_context(self) -> Iterator[None]:
        torch.zeros(1, device=self.dev)  # torch makes its primary context current before cuda-python looks
        with torch.cuda.device(self.dev):
            yield

    def capture(self, enqueue: Callable[[], None]) -> _TorchReplay | None:
        if not self.on_device:
            return None
        side = torch.cuda.Stream(self.dev)
        side.wait_stream(torch.cuda.current_stream(self.dev))
        with torch.cuda.stream(side):
            enqueue()  # warm-up outside the capture: cuDNN plans, autograd and allocator state
        torch.cuda.current_stream(self.dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                enqueue()
        except RuntimeError as e:
            warnings.warn(f"CUDA graph capture of the ZeroPur loop failed ({e}); running it without a graph",
                          RuntimeWarning, stacklevel=3)
            return None
        return _TorchReplay(graph)

    def close(self) -> None:
        self._recompute = None


def _fast_victim(victim: Victim) -> Victim:
    """The victim as the fast runner runs it: a folded copy (``victim`` is left as it is), channels-last."""
    from zeropur_export.victims.fold import fold_batchnorm

    folded, _ = fold_batchnorm(victim)
    if folded is victim:  # nothing folded: still a copy, the memory format below must not touch the caller's
        folded = copy.deepcopy(victim)
    return folded.to(memory_format=torch.channels_last)


def _graph_step(victim: Victim, cfg: ZeroPurConfig, graph: str, compiled: bool,
                autotune: bool = False) -> Callable[..., tuple[torch.Tensor, ...]]:
    """``graph``'s function as the exporter traces it (``reference.graph_functions``), gradients by
    ``torch.func``, inputs taken channels-last, outputs as a tuple in ``graph_io`` order; compiled or not."""

    fn, is_grad = graph_functions(victim, cfg)[graph]
    with_loss = graph == "gs_grad"

    def step(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args = tuple(a.contiguous(memory_format=torch.channels_last) if a.dim() == 4 else a for a in args)
        if not is_grad:
            out = fn(*args)
            return tuple(out) if isinstance(out, (tuple, list)) else (out,)
        if with_loss:
            g, loss = torch.func.grad_and_value(fn)(*args)
            return g, loss
        return (torch.func.grad(fn)(*args),)

    if not compiled:
        return step
    # Every runner's ``step`` shares this one code object, and dynamo counts compilations per code object:
    # 2 graphs x batch sizes x precisions x architectures pass its default of 8, past which it runs eager
    # without a word but a log line. (Runners of one architecture share one compilation, each with its own
    # weights: tests/export/test_torch_fast.py.)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    # freezing (inductor's inference-only weight passes; needs no_grad calls): ResNet-20's batch-16 ap_grad
    # on one CPU thread 28.9 ms with it, 33.8 ms without
    return torch.compile(step, dynamic=False, options={"freezing": True, "max_autotune": autotune})


def load_purifier(artifact_dir: str | os.PathLike, device: str = "cpu", *, kernels: str = "auto",
                  overrides: dict[str, Any] | None = None, cuda_graph: bool = True, victim: Victim | None = None,
                  weights: str | None = None, threads: int | None = None, fast: bool = False,
                  precision: Precision = "fp32", autotune: bool = False) -> Any:
    """A Purifier over an artifact directory whose graphs run as the reference under torch (``fast``:
    compiled, see the module docstring).

    The victim is rebuilt from the manifest's model name and its weights file (whose sha256 must match the
    manifest), or passed in. On CUDA the loop is device-resident with our CUDA kernels and a CUDA graph.
    """
    from zeropur_export.victims.weights import find_weights
    from zeropur_export.victims.zoo import load_victim
    from zeropur_rt.config import apply_overrides
    from zeropur_rt.files import sha256_file
    from zeropur_rt.manifest import load_manifest
    from zeropur_rt.pipeline import Purifier

    manifest = load_manifest(Path(artifact_dir))
    if victim is None:
        path = weights or find_weights(manifest.model)
        if manifest.weights_sha256 and sha256_file(path) != manifest.weights_sha256:
            raise ValueError(f"weights {path} are not the ones this artifact was exported from "
                             f"(sha256 {manifest.weights_sha256[:12]}…)")
        victim = load_victim(manifest.model, weights=str(path))
    cfg = apply_overrides(manifest.zeropur_config, overrides, baked=True)
    runner = TorchRunner(victim, cfg, device, threads=threads, fast=fast, precision=precision,
                         autotune=autotune)
    return Purifier.from_manifest(manifest, runner, kernels, overrides, cuda_graph)
