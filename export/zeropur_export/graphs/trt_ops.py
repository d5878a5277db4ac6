"""TensorRT ONNX-parser allowlist and a checker for exported graphs.

The allowlist is the set of operators marked supported ("Y") in onnx-tensorrt's
``docs/operators.md`` for **TensorRT 10.15** ("supports operators in the inclusive range of
opset 9 to opset 24"), restricted to the non-quantised float/int/bool operators. On top of
it, ``check_model`` enforces the restrictions that document lists for the operators we use,
plus conservative rules of our own so that the graphs also parse on older TensorRT 10.x /
8.6 (Jetson) parsers:

* only the default ONNX domain (no ``com.microsoft`` or other custom domains, no local functions);
* no Scatter / ScatterElements / ScatterND / TensorScatter (the index-free lowerings never need them);
* Conv / ConvTranspose: 2D or 3D, weights ``W`` an initializer or Constant (required by
  TensorRT < 10 and what lets TensorRT pick deconvolution kernels);
* MaxPool: no ``Indices`` output; MaxPool / AveragePool / LpPool: dilations empty or all ones, 2D/3D;
* Pad: ``mode`` constant;
* Reduce* ``axes``, Squeeze / Unsqueeze ``axes``, Slice ``axes``: initializers / Constants;
* opset of the default domain within [9, 24]; no DOUBLE tensors (TensorRT casts them down).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto

TRT_VERSION = "10.15"
OPSET_RANGE = (9, 24)

# "Y" rows of onnx-tensorrt docs/operators.md (TensorRT 10.15), quantisation-only operators left out.
TRT_SUPPORTED_OPS: frozenset[str] = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization
BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum
DeformConv DepthToSpace Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements
GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If ImageScaler
InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM
LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression
NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum
ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
ReverseSequence RMSNormalization RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape
Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan
Tanh TensorScatter ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

# Supported by TensorRT but never wanted in ZeroPur gradient graphs (the issue rules them out).
FORBIDDEN_OPS: frozenset[str] = frozenset({"Scatter", "ScatterElements", "ScatterND", "TensorScatter"})

_AXES_INPUT = {  # operator -> index of an `axes` input that must be a build-time constant
    **{op: 1 for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                        "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Squeeze", "Unsqueeze")},
    "Slice": 3,
}
_BAD_DTYPES = {TensorProto.DOUBLE: "DOUBLE", TensorProto.STRING: "STRING", TensorProto.COMPLEX64: "COMPLEX64",
               TensorProto.COMPLEX128: "COMPLEX128"}


@dataclass(frozen=True)
class Violation:
    node: str
    op_type: str
    problem: str

    def __str__(self) -> str:
        return f"{self.op_type} ({self.node}): {self.problem}"


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def check_model(model: onnx.ModelProto | str | Path) -> list[Violation]:
    """Every operator / attribute of ``model`` that TensorRT's ONNX parser (or our rules) would reject."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    g = model.graph
    out: list[Violation] = []
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            if not OPSET_RANGE[0] <= imp.version <= OPSET_RANGE[1]:
                out.append(Violation("<model>", "opset", f"opset {imp.version} outside TensorRT {TRT_VERSION}'s "
                                                        f"range {OPSET_RANGE}"))
    if model.functions:
        out.append(Violation("<model>", "functions", f"local functions {[f.name for f in model.functions]} "
                                                    "(inline them)"))
    constants = {i.name for i in g.initializer}
    constants |= {o for n in g.node if n.op_type == "Constant" for o in n.output}
    for init in g.initializer:
        if init.data_type in _BAD_DTYPES:
            out.append(Violation(init.name, "initializer", f"{_BAD_DTYPES[init.data_type]} tensor"))
    for n in g.node:
        name, op = n.name or "?", n.op_type
        if n.domain not in ("", "ai.onnx"):
            out.append(Violation(name, op, f"custom domain {n.domain!r}"))
            continue
        if op not in TRT_SUPPORTED_OPS:
            out.append(Violation(name, op, f"not supported by TensorRT {TRT_VERSION}'s ONNX parser"))
            continue
        if op in FORBIDDEN_OPS:
            out.append(Violation(name, op, "scatter operators are not allowed in ZeroPur graphs"))
        if op in ("Conv", "ConvTranspose"):
            if len(n.input) < 2 or n.input[1] not in constants:
                out.append(Violation(name, op, "weights W must be an initializer/Constant"))
            ks = _attr(n, "kernel_shape")
            if ks is not None and len(ks) not in (2, 3):
                out.append(Violation(name, op, f"{len(ks)}D convolution (TensorRT: 2D or 3D only)"))
        if op in ("MaxPool", "AveragePool", "LpPool"):
            if op == "MaxPool" and len([o for o in n.output if o]) > 1:
                out.append(Violation(name, op, "Indices output is unsupported"))
            dil = _attr(n, "dilations")
            if dil and any(d != 1 for d in dil):
                out.append(Violation(name, op, f"dilations {list(dil)} (must be all ones)"))
            ks = _attr(n, "kernel_shape")
            if ks is not None and len(ks) not in (2, 3):
                out.append(Violation(name, op, f"{len(ks)}D pooling (2D or 3D only)"))
        if op == "Pad":
            mode = _attr(n, "mode", b"constant")
            mode = mode.decode() if isinstance(mode, bytes) else mode
            if mode != "constant":
                out.append(Violation(name, op, f"mode {mode!r} (only constant)"))
        if op in _AXES_INPUT:
            i = _AXES_INPUT[op]
            if len(n.input) > i and n.input[i] and n.input[i] not in constants:
                out.append(Violation(name, op, "axes must be an initializer/Constant"))
        if op == "Cast" and _attr(n, "to") in _BAD_DTYPES:
            out.append(Violation(name, op, f"cast to {_BAD_DTYPES[_attr(n, 'to')]}"))
    return out


def ops_used(model: onnx.ModelProto | str | Path) -> set[str]:
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    return {n.op_type for n in model.graph.node}


def assert_trt_compatible(model: onnx.ModelProto | str | Path, what: str = "graph") -> None:
    bad = check_model(model)
    if bad:
        raise ValueError(f"{what} is not TensorRT {TRT_VERSION}-compatible:\n  " + "\n  ".join(map(str, bad)))
