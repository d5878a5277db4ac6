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
    inits = {i.name: i for i in model.graph.initializer}
    macs = 0
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose") and _is_selection(inits.get(node.input[1])):
            continue  # data movement written as a convolution (fold._SelectConv): not arithmetic
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


def _is_selection(init) -> bool:
    """A 1x1 kernel of zeros and ones with at most one 1 per output and per input channel: it moves values."""
    if init is None or len(init.dims) != 4 or tuple(init.dims[2:]) != (1, 1):
        return False
    from onnx import numpy_helper
    w = numpy_helper.to_array(init).reshape(init.dims[0], init.dims[1])
    return bool(np.isin(w, (0, 1)).all() and (w.sum(0) <= 1).all() and (w.sum(1) <= 1).all())


def purification_macs(artifact_dir: str | Path, cfg: ZeroPurConfig) -> dict[str, object]:
    """MACs per image of one purification, from the exported graphs."""
    d = Path(artifact_dir)
    per = {g: graph_macs(d / f"{g}.onnx") for g in ("classifier", "gs_grad", "ap_setup", "ap_grad") if (d / f"{g}.onnx").exists()}
    total = cfg.gs_steps * per["gs_grad"] + (per.get("ap_setup", 0) + cfg.ap_steps * per.get("ap_grad", 0) if cfg.ap_steps else 0)
    return dict(per_graph=per, purification=total)


def cpu_peak_gflops(threads: int = 1, n: int = 1024, repeats: int = 10) -> float:
    """A practical float32 ceiling of ``threads`` cores: ``threads`` x the best one-thread sgemm rate (torch's BLAS).

    One thread timed and multiplied, not ``threads`` timed together: the ceiling must not depend on
    OMP_NUM_THREADS (at 1, a BLAS that honours it reports one core's rate against a runtime on two), and on
    a shared machine another process on one core drags a multi-threaded sgemm far down (2-thread OpenBLAS
    measured 41 GFLOP/s beside 97 for one thread) while the best of a few one-thread runs holds. Perfect
    scaling makes it an upper bound of what the threads reach together, so a percentage of it is a lower bound.
    """
    import time

    import torch

    a = torch.rand(n, n)
    b = torch.rand(n, n)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t)
    finally:
        torch.set_num_threads(before)
    return threads * 2 * n ** 3 / best / 1e9
