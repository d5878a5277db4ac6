"""The cost model: forward-equivalents per purification (counted, not assumed) and MACs from the graphs."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from zeropur_rt.config import ZeroPurConfig

if TYPE_CHECKING:
    from zeropur_export.reference import APMode
    from zeropur_export.taps import Victim


@contextmanager
def count_passes(victim: "Victim") -> Iterator[dict[str, int]]:
    """Counts forward passes through ``victim.net`` per image, and those recorded for autograd (each one is
    back-propagated exactly once by the reference, so it also counts one backward pass)."""
    import torch

    counts = {"forward": 0, "backward": 0}

    def hook(_m, args):
        x = args[0]
        counts["forward"] += x.shape[0]
        if torch.is_grad_enabled() and x.requires_grad:
            counts["backward"] += x.shape[0]

    h = victim.net.register_forward_pre_hook(hook)
    try:
        yield counts
    finally:
        h.remove()


def forward_equivalents(victim: "Victim", cfg: ZeroPurConfig, ap_mode: "APMode") -> dict[str, float]:
    """Forward passes, backward passes and F-equivalents per image. With frozen weights a backward pass
    computes input gradients only (one transposed conv per conv): about 1 F of MACs, 2 F by the usual
    convention that also counts weight gradients; both are reported."""
    import torch

    from zeropur_export.reference import ReferencePurifier

    pur = ReferencePurifier(victim, cfg, ap_mode)
    pur.runner.output_shapes("classifier", 1)  # the runner's one-time shape probe runs forwards too: not counted
    x = torch.rand(2, *victim.spec.input_shape)
    with count_passes(victim) as c:
        pur.purify(x)
    f, b = c["forward"] / 2, c["backward"] / 2
    return dict(forward=f, backward=b, F_bwd1=f + b, F_bwd2=f + 2 * b)


def graph_macs(onnx_path: str | Path) -> int:
    """Multiply-accumulates of one batch-1 call: Conv, ConvTranspose, Gemm and MatMul nodes (shape inference)."""
    import onnx
    from onnx import shape_inference

    model = shape_inference.infer_shapes(onnx.load(str(onnx_path)))
    shapes = {}
    for vi in (*model.graph.value_info, *model.graph.input, *model.graph.output):
        # the only symbolic dimension is the batch: count it as 1
        shapes[vi.name] = [x.dim_value if x.HasField("dim_value") else 1 for x in vi.type.tensor_type.shape.dim]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    macs = 0
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose"):
            # Conv weights are (Cout, Cin/g, kh, kw): each output element takes Cin/g*kh*kw MACs.
            # ConvTranspose weights are (Cin, Cout/g, kh, kw): each input element scatters Cout/g*kh*kw.
            w = shapes.get(node.input[1])
            per_elem = shapes.get(node.output[0] if node.op_type == "Conv" else node.input[0])
            if w and per_elem:
                macs += int(np.prod(per_elem)) * w[1] * w[2] * w[3]
        elif node.op_type in ("Gemm", "MatMul"):
            a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
            if a and b:
                macs += int(np.prod(a)) * b[-1]
    return macs


def purification_macs(artifact_dir: str | Path, cfg: ZeroPurConfig) -> dict[str, object]:
    """MACs per image of one purification, from the exported graphs."""
    d = Path(artifact_dir)
    per = {g: graph_macs(d / f"{g}.onnx") for g in ("classifier", "gs_grad", "ap_setup", "ap_grad") if (d / f"{g}.onnx").exists()}
    total = cfg.gs_steps * per["gs_grad"] + (per.get("ap_setup", 0) + cfg.ap_steps * per.get("ap_grad", 0) if cfg.ap_steps else 0)
    return dict(per_graph=per, purification=total)


def cpu_peak_gflops(n: int = 1024, repeats: int = 5) -> float:
    """A practical float32 ceiling of this machine: the best sgemm rate numpy's BLAS reaches."""
    import time

    a = np.random.rand(n, n).astype(np.float32)
    b = np.random.rand(n, n).astype(np.float32)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9
