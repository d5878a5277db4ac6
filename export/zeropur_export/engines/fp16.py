"""The FP16 copy of an ONNX graph that the fp16 engine builds parse: convolutions and matrix products in float16,
float32 everywhere else and at the inputs and outputs."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

# Ops run in FP16 in the FP16 ONNX copy: the convolutions and matrix products (where the time goes).
# Everything else (BatchNorm, the losses' reductions, norms, divisions, the 1e-30 / 1e-10 floors
# that underflow fp16, sums of squares that overflow its 65504) stays float32.
FP16_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class EngineBuildError(RuntimeError):
    """TensorRT could not build an engine (nothing in the artifact directory was changed)."""


def onnx_fp16_copy(src: Path, dst: Path, fp16_ops: Sequence[str] = FP16_OPS) -> Path:
    """An FP16 copy of an ONNX graph for the strongly typed fp16 builds: FP16 islands.

    Every ``fp16_ops`` node computes in float16: its float32 weights (initializers used by such
    nodes only) are stored as float16, other float32 inputs get a Cast to float16, its outputs a
    Cast back to float32 under the original names. Graph inputs and outputs stay float32, and the
    result is type-consistent by construction (checked with the ONNX checker and strict shape
    inference). onnxconverter-common's convert_float_to_float16(keep_io_types=True) is not used: on
    our exported graphs it emits graphs that fail ONNX type checking (a float16 ``grad`` output, a
    Gemm with mixed float/float16 inputs) and clamps small weights to +-1e-7.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    g = model.graph
    ops = set(fp16_ops)
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, set[str]] = {}
    for node in g.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    converted: set[str] = set()
    nodes = []
    for k, node in enumerate(g.node):
        if node.op_type not in ops:
            nodes.append(node)
            continue
        for i, name in enumerate(node.input):
            if not name:
                continue
            t = inits.get(name)
            if t is not None and t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16) and consumers[name] <= ops:
                if t.data_type == TensorProto.FLOAT and name not in converted:
                    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), name))
                    converted.add(name)
                continue
            cast = f"{name}__zp_fp16_{k}_{i}"
            nodes.append(helper.make_node("Cast", [name], [cast], to=TensorProto.FLOAT16, name=f"zp_cast16_{k}_{i}"))
            node.input[i] = cast
        outs = list(node.output)
        for i, name in enumerate(outs):
            if name:
                node.output[i] = f"{name}__zp_fp16"
        nodes.append(node)
        for i, name in enumerate(outs):
            if name:
                nodes.append(helper.make_node("Cast", [f"{name}__zp_fp16"], [name], to=TensorProto.FLOAT,
                                              name=f"zp_cast32_{k}_{i}"))
    del g.node[:]
    g.node.extend(nodes)
    for coll in (g.value_info, g.input):  # stale float32 type records of the weights now stored as float16
        keep = [v for v in coll if v.name not in converted]
        del coll[:]
        coll.extend(keep)
    try:
        onnx.checker.check_model(model)
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as e:  # noqa: BLE001
        raise EngineBuildError(f"the FP16 copy of {src.name} is not a valid ONNX graph: {e}") from e
    onnx.save(model, str(dst))
    return dst
