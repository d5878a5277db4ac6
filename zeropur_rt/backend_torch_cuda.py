"""ZeroPur on a GPU without TensorRT: torch-CUDA gradients + our CUDA kernels, device-resident.

    pur = Purifier.load("artifacts/resnet20", backend="torch", device="cuda")
    loop = TorchCudaLoop(pur)            # cuda_graph=True: capture once per batch size, replay after
    x_pure = loop.purify(x)              # numpy in -> numpy out; a CUDA tensor in -> a CUDA tensor out

The gradients are the reference's own loss functions under torch autograd (the oracle
itself, on the GPU); the blur, the GS update and the AP update are our kernels, launched
through cuda-python on torch's current stream, so nothing crosses to the host inside the
loop. With ``cuda_graph=True`` the whole GS+AP loop of one batch size (about 60 forward +
backward passes and 60 kernel launches) is captured into one ``torch.cuda.CUDAGraph`` on the
first call and replayed afterwards; our launches go to the capturing stream and are
captured with torch's.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from zeropur_rt.validate import check_images


class _BatchState:
    """Static device buffers of one batch size (a captured graph reads and writes these)."""

    def __init__(self, torch: Any, shape: tuple[int, ...], device: Any):
        def z():
            return torch.zeros(shape, dtype=torch.float32, device=device)
        self.x_in, self.x, self.m, self.x_blur, self.fine = z(), z(), z(), z(), z()
        self.l1 = torch.zeros(shape[0], dtype=torch.float32, device=device)
        self.graph: Any = None
        self.out: Any = None  # the tensor the last run (or the captured graph) leaves the result in


class TorchCudaLoop:
    """The ZeroPur loop of a torch-on-CUDA Purifier, run on the device (see the module docstring)."""

    def __init__(self, purifier: Any, *, cuda_graph: bool = True, kernels: Any = None):
        from zeropur_rt.backends import TorchRunner

        runner = purifier.runner
        if not isinstance(runner, TorchRunner) or not str(runner.device).startswith("cuda"):
            raise ValueError("TorchCudaLoop needs a Purifier loaded with backend='torch', device='cuda' "
                             f"(got backend {runner.name!r} on {runner.device!r})")
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("TorchCudaLoop: torch sees no CUDA device (a CPU-only torch build, or no GPU)")
        self.torch, self.pur, self.cfg = torch, purifier, purifier.cfg
        self.victim, self.ref = runner.victim, runner.ref
        self.device = torch.device(runner.device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        torch.zeros(1, device=self.device)  # torch makes the primary context current before cuda-python looks
        self._own_kernels = kernels is None
        if kernels is None:
            from zeropur_rt.kernels.cuda import CudaKernels
            with torch.cuda.device(self.device):
                kernels = CudaKernels(self.device.index)
        self.kernels = kernels
        self.cuda_graph = cuda_graph
        self._states: dict[int, _BatchState] = {}

    @classmethod
    def load(cls, artifact_dir: Any, device: str = "cuda", *, cuda_graph: bool = True, **kwargs: Any) -> "TorchCudaLoop":
        from zeropur_rt.purifier import Purifier
        return cls(Purifier.load(artifact_dir, backend="torch", device=device, **kwargs), cuda_graph=cuda_graph)

    # ------------------------------------------------------------------ the loop on the device
    def _enqueue(self, st: _BatchState) -> Any:
        """Issue the whole GS+AP loop on torch's current stream; returns the tensor holding the result."""
        torch, ref, v, cfg, k = self.torch, self.ref, self.victim, self.cfg, self.kernels
        n, c, h, w = st.x_in.shape
        p = c * h * w
        stream = torch.cuda.current_stream(self.device).cuda_stream  # the capture stream while capturing
        st.x.copy_(st.x_in)
        st.m.zero_()
        x_blur = st.x_blur
        for _ in range(cfg.gs_steps):
            k.blur(st.x.data_ptr(), x_blur.data_ptr(), n * c, h, w, self.pur.blur_weights, stream=stream)
            g = ref.input_grad(lambda t: ref.gs_loss(v, t, x_blur), st.x)[0].contiguous()
            k.gs_update(st.x.data_ptr(), g.data_ptr(), st.m.data_ptr(), st.x_in.data_ptr(), n, p, eps=cfg.eps,
                        step=cfg.gs_step, decay=cfg.momentum, l1_scope=cfg.l1_scope, stream=stream,
                        l1_scratch=st.l1.data_ptr())
        if cfg.ap_steps == 0:
            return st.x
        with torch.no_grad():
            consts = ref.ap_constants(v, st.x_in, st.x, cfg)
        st.fine.copy_(st.x_in)
        for _ in range(cfg.ap_steps):
            g = ref.input_grad(lambda f: ref.ap_loss(v, f, consts, cfg), st.fine)[0].contiguous()
            k.ap_update(st.fine.data_ptr(), g.data_ptr(), st.x_in.data_ptr(), n, p, eps=cfg.eps, step=cfg.ap_step,
                        stream=stream)
        return st.fine

    def _capture(self, st: _BatchState) -> None:
        torch = self.torch
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._enqueue(st)  # warm-up outside the capture: cuDNN plans, autograd and allocator state
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            st.out = self._enqueue(st)
        st.graph = graph

    def _run(self, x_dev: Any) -> Any:
        n = int(x_dev.shape[0])
        st = self._states.get(n)
        if st is None:
            st = self._states[n] = _BatchState(self.torch, tuple(x_dev.shape), self.device)
        st.x_in.copy_(x_dev)
        if not self.cuda_graph:
            st.out = self._enqueue(st)
        elif st.graph is None:
            self._capture(st)
            st.graph.replay()  # the capture only recorded the work
        else:
            st.graph.replay()
        return st.out

    # ------------------------------------------------------------------ public
    def _device_input(self, x: Any, uint8_nhwc: bool) -> tuple[Any, bool]:
        torch = self.torch
        if isinstance(x, torch.Tensor) and x.is_cuda and not uint8_nhwc:
            check_images(x, self.pur.chw, self.pur.max_batch)
            return x.detach().to(self.device, torch.float32), True
        return torch.from_numpy(self.pur.prepare(x, uint8_nhwc)).to(self.device), False

    def purify(self, x: Any, uint8_nhwc: bool = False) -> Any:
        """Purified images: numpy for host input, a new CUDA tensor (no host copy) for CUDA input."""
        x_dev, on_device = self._device_input(x, uint8_nhwc)
        out = self._run(x_dev).clone()  # the state buffers are overwritten by the next call
        return out if on_device else out.cpu().numpy()

    def purify_and_classify(self, x: Any, uint8_nhwc: bool = False) -> tuple[Any, Any]:
        x_dev, on_device = self._device_input(x, uint8_nhwc)
        out = self._run(x_dev).clone()
        with self.torch.no_grad():
            pred = self.victim(out).argmax(1)
        return (out, pred) if on_device else (out.cpu().numpy(), pred.cpu().numpy().astype(np.int64))

    def graph_captured(self, n: int) -> bool:
        st = self._states.get(n)
        return st is not None and st.graph is not None

    def close(self) -> None:
        self.torch.cuda.synchronize(self.device)
        self._states.clear()
        if self._own_kernels and self.kernels is not None:
            self.kernels.close()
        self.kernels = None

    def __enter__(self) -> "TorchCudaLoop":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
