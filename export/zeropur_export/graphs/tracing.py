"""Gradient-graph tracing: ``trace_grad`` turns a loss function into an fx graph of its input-gradient made only
of forward ops (``make_fx`` over ``torch.func.grad_and_value`` with ``decompositions.decomposition_table``), with
only the batch dimension symbolic; and the ONNX post-pass that keeps the ReLU masks in ONNX Runtime's blocked
layout. Which backward op is lowered to what: ``zeropur_export.graphs.decompositions``."""
from __future__ import annotations

import operator
from typing import Callable, Sequence

import numpy as np
import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from zeropur_export.graphs.decompositions import decomposition_table

aten = torch.ops.aten

# Backward ops that must never reach an exported graph (they have no forward-op ONNX lowering).
FORBIDDEN_TARGETS = (
    "convolution_backward", "threshold_backward", "native_batch_norm_backward", "max_pool2d_with_indices_backward",
    "avg_pool2d_backward", "adaptive_avg_pool2d_backward", "slice_backward", "scatter", "index_put",
)


def pick_trace_batch(example_dims: Sequence[int]) -> int:
    """A batch size for symbolic tracing that differs from every other input dim (duck sizing would
    otherwise merge the batch symbol with e.g. a 32-pixel width) and from 0/1 (specialised)."""
    for b in (7, 11, 13, 17, 19, 23, 29, 31, 37):
        if b not in example_dims:
            return b
    raise ValueError(f"no free trace batch size for dims {example_dims}")


def _drop_pool_indices(gm: fx.GraphModule) -> None:
    """max_pool2d_with_indices whose indices are unused -> max_pool2d (single-output ONNX MaxPool)."""
    g = gm.graph
    for node in list(g.nodes):
        if node.op != "call_function" or node.target is not aten.max_pool2d_with_indices.default:
            continue
        users = list(node.users)
        if any(u.target is not operator.getitem for u in users):
            continue
        if any(u.args[1] == 1 and u.users for u in users):
            continue  # indices really used
        with g.inserting_before(node):
            new = g.call_function(aten.max_pool2d.default, node.args, node.kwargs)
        for u in users:
            if u.args[1] == 0:
                u.replace_all_uses_with(new)
        for u in users:
            g.erase_node(u)
        g.erase_node(node)
    g.eliminate_dead_code()
    gm.recompile()


def _fold_weight_transforms(gm: fx.GraphModule) -> None:
    """Evaluate ops whose inputs are all constants (e.g. the flipped, transposed kernels of the
    stride-1 convolution gradients) once, so the ONNX graph holds initializers, not ops on them."""
    g = gm.graph
    const: dict[fx.Node, torch.Tensor] = {}
    for node in list(g.nodes):
        if node.op == "get_attr":
            const[node] = getattr(gm, node.target)
            continue
        if node.op != "call_function" or node.target not in (aten.flip.default, aten.transpose.int, aten.permute.default):
            continue
        src = node.args[0]
        if src not in const or any(isinstance(a, fx.Node) for a in node.args[1:]):
            continue
        value = node.target(const[src], *node.args[1:]).contiguous()
        name = f"_folded_weight_{len(const)}"
        gm.register_buffer(name, value)
        with g.inserting_before(node):
            new = g.get_attr(name)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        g.erase_node(node)
        const[new] = value
    g.eliminate_dead_code()
    gm.recompile()


def check_forward_only(gm: fx.GraphModule) -> None:
    bad = sorted({str(n.target) for n in gm.graph.nodes
                  if n.op == "call_function" and any(f in str(n.target) for f in FORBIDDEN_TARGETS)})
    if bad:
        raise RuntimeError(f"gradient graph still holds backward/scatter ops {bad}: no lowering for them; "
                           "add one to zeropur_export.graphs.decompositions.LOWERINGS")


def batch_symbolic(example_inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Fake copies of the inputs whose dim 0 is symbolic and every other dim static.

    (``tracing_mode="symbolic"`` would make every dim symbolic: the reference computes with
    spatial sizes in numpy, and duck sizing could merge the batch with an equal spatial size.)
    Inputs with the same batch size share one batch symbol.
    """
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    out = []
    for t in example_inputs:
        dyn = [DimDynamic.DYNAMIC] + [DimDynamic.STATIC] * (t.dim() - 1)
        out.append(mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dyn)))
    return out


def trace(fn: Callable[..., object], example_inputs: Sequence[torch.Tensor]) -> fx.GraphModule:
    """make_fx of ``fn`` (batch dim symbolic) with the lowering table; post-processed and checked."""
    if any(t.shape[0] in (0, 1) for t in example_inputs):
        raise ValueError("trace with a batch size >= 2 (0 and 1 are specialised by the symbolic tracer)")
    gm = make_fx(fn, decomposition_table=decomposition_table(), tracing_mode="fake",
                 _allow_non_fake_inputs=True)(*batch_symbolic(example_inputs))
    _drop_pool_indices(gm)
    _fold_weight_transforms(gm)
    check_forward_only(gm)
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        if n.op == "placeholder" and isinstance(val, torch.Tensor) and not isinstance(val.shape[0], torch.SymInt):
            raise RuntimeError("an op specialised the batch dimension while tracing (the graph would have a fixed "
                               "batch size); add a batch-preserving lowering for it to LOWERINGS")
    return gm


def trace_grad(loss_fn: Callable[..., torch.Tensor], example_inputs: Sequence[torch.Tensor],
               with_value: bool = True) -> fx.GraphModule:
    """Graph of ``(d loss_fn / d arg0, loss)`` (or just the gradient) as forward ops only."""
    g = torch.func.grad_and_value(loss_fn) if with_value else torch.func.grad(loss_fn)
    return trace(g, example_inputs)


# ---------------------------------------------------------------- ONNX post-pass
# HardSigmoid(r) = max(0, min(1, alpha * r + beta)) with beta = 0 and alpha = the largest float32 is
# exactly (r > 0) for every r except a positive denormal under 1 / alpha (2.9e-39), which it maps into
# (0, 1): far below any pre-activation a float32 convolution resolves.
MASK_ALPHA = float(np.finfo(np.float32).max)


def relu_masks_to_hardsigmoid(model) -> int:
    """Rewrite ``Cast(Greater(r, 0), float)`` into ``HardSigmoid(r, alpha=MASK_ALPHA, beta=0)`` in place;
    returns how many. The ReLU backward's mask then stays in ONNX Runtime's blocked CPU layout (NCHWc, which
    has no Greater or Cast kernel): ResNet-20 ap_grad lost its 37 layout reorders and ran 16% faster
    (batch 32). HardSigmoid is on TensorRT's op list and runs in float32 in its FP16 copies."""
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    consts = {t.name: t for t in g.initializer}
    consts.update({n.output[0]: n.attribute[0].t for n in g.node if n.op_type == "Constant" and n.attribute
                   and n.attribute[0].name == "value"})
    users: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    out_names = {o.name for o in g.output}

    def float_zero(name: str) -> bool:
        t = consts.get(name)
        if t is None or t.data_type != TensorProto.FLOAT:
            return False
        a = numpy_helper.to_array(t)
        return a.size == 1 and float(a.ravel()[0]) == 0.0

    drop, dead = set(), set()
    for n in g.node:
        if n.op_type != "Greater" or n.domain not in ("", "ai.onnx") or not float_zero(n.input[1]):
            continue
        us = users.get(n.output[0], [])
        if len(us) != 1 or us[0].op_type != "Cast" or n.output[0] in out_names:
            continue
        cast = us[0]
        if [a.i for a in cast.attribute if a.name == "to"] != [TensorProto.FLOAT]:
            continue
        dead.add(n.output[0])
        drop.add(id(cast))
        n.CopyFrom(helper.make_node("HardSigmoid", [n.input[0]], [cast.output[0]], name=f"{n.name or 'mask'}_hardsigmoid",
                                    alpha=MASK_ALPHA, beta=0.0))
    if drop:
        keep = [n for n in g.node if id(n) not in drop]
        del g.node[:]
        g.node.extend(keep)
        vi = [v for v in g.value_info if v.name not in dead]
        del g.value_info[:]
        g.value_info.extend(vi)
    return len(drop)
