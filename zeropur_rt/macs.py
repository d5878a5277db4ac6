"""Multiply-accumulates of the exported graphs, counted from the ONNX files (needs the ``onnx`` package).

Deploy time (``zeropur-rt bench``) and build time (``zeropur-export bench``, ``benchmarks``) both turn
latencies into achieved GFLOP/s with these counts; the count is of the graphs as exported, so a graph that
does less work counts less.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from zeropur_rt.config import ZeroPurConfig


def graph_macs(onnx_path: str | Path) -> int:
    """Multiply-accumulates of one batch-1 call: Conv, ConvTranspose, Gemm and MatMul nodes (shape inference)."""
    try:
        import onnx
        from onnx import shape_inference
    except ImportError as e:
        raise ImportError("counting a graph's MACs needs the onnx package: pip install onnx") from e

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


def _is_selection(init: Any) -> bool:
    """A 1x1 kernel of zeros and ones with at most one 1 per output and per input channel: it moves values."""
    if init is None or len(init.dims) != 4 or tuple(init.dims[2:]) != (1, 1):
        return False
    from onnx import numpy_helper
    w = numpy_helper.to_array(init).reshape(init.dims[0], init.dims[1])
    return bool(np.isin(w, (0, 1)).all() and (w.sum(0) <= 1).all() and (w.sum(1) <= 1).all())


def purification_macs(artifact_dir: str | Path, cfg: ZeroPurConfig) -> dict[str, Any]:
    """MACs per image of one purification, from the exported graphs."""
    d = Path(artifact_dir)
    per = {g: graph_macs(d / f"{g}.onnx") for g in ("classifier", "gs_grad", "ap_setup", "ap_grad") if (d / f"{g}.onnx").exists()}
    total = cfg.gs_steps * per["gs_grad"] + (per.get("ap_setup", 0) + cfg.ap_steps * per.get("ap_grad", 0) if cfg.ap_steps else 0)
    return dict(per_graph=per, purification=total)
