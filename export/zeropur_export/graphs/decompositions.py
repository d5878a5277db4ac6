"""The lowerings of autograd's backward ATen ops into forward ops every TensorRT ONNX parser accepts.

TensorRT and ONNX Runtime have no autograd, so the exported graphs compute ZeroPur's
input-gradients themselves. ``tracing.trace_grad`` runs ``make_fx(torch.func.grad_and_value(fn))``
with a decomposition table = torch's core decompositions + ``LOWERINGS``: our own
lowerings of the backward ATen ops that autograd emits into forward ops that every
TensorRT ONNX parser accepts:

==================================  ==================================================
backward op                         lowered to
==================================  ==================================================
convolution_backward                input gradient only: Conv with the flipped kernel (stride 1),
                                    transposed convolution otherwise
threshold_backward (ReLU)           ``(result > t).to(dtype) * grad`` (no Where); after export
                                    ``tracing.relu_masks_to_hardsigmoid`` turns ``(r > 0)`` into one HardSigmoid
native_batch_norm_backward (eval)   ``grad * weight / sqrt(running_var + eps)``
avg_pool2d_backward                 ``grad / divisor`` + depthwise ConvTranspose of ones
_adaptive_avg_pool2d_backward       expand (global) / ConvTranspose (divisible) / MatMul
max_pool2d_with_indices_backward    index-free mask: ``x == up(max)`` times ``up(grad)``
slice_backward                      Unsqueeze + Pad + Reshape (stride) / Pad
==================================  ==================================================

Weights are frozen: only input gradients are lowered (asking for a weight gradient raises).
The max-pool forward keeps torch's ``max_pool2d_with_indices`` in the traced graph; after
tracing, ``tracing._drop_pool_indices`` replaces it by a plain ``max_pool2d`` so the ONNX graph has
a single-output MaxPool (TensorRT does not support the Indices output).
Only the batch dimension is symbolic while tracing (``batch_symbolic``); every other size is static.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch._decomp import core_aten_decompositions

aten = torch.ops.aten

# Channel block of ONNX Runtime's NCHWc CPU convolutions (AVX-512; a multiple of AVX2's 8).
NCHWC_BLOCK = 16

LOWERINGS: dict = {}


def _register(*ops):
    def deco(fn):
        for op in ops:
            LOWERINGS[op] = fn
        return fn
    return deco


def _static(v) -> int:
    """A spatial/channel size as a Python int (they are static while tracing; only the batch is symbolic)."""
    return int(v)


def _tuple(v, n: int, default: Sequence[int] | None = None) -> list[int]:
    v = list(v) if v is not None else []
    if not v:
        v = list(default) if default is not None else []
    if len(v) == 1:
        v = v * n
    if len(v) != n:
        raise ValueError(f"expected {n} values, got {v}")
    return [_static(i) for i in v]


def _fit_spatial(t: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Crop (slice) or zero-pad the trailing spatial dims of ``t`` to ``sizes``."""
    nsp = len(sizes)
    for i, want in enumerate(sizes):
        dim = t.dim() - nsp + i
        have = _static(t.shape[dim])
        if have > want:
            t = aten.slice.Tensor(t, dim, 0, want)
    pads: list[int] = []
    for i in reversed(range(nsp)):
        have = _static(t.shape[t.dim() - nsp + i])
        pads += [0, max(0, sizes[i] - have)]
    if any(pads):
        t = aten.constant_pad_nd.default(t, pads, 0.0)
    return t


def _conv_transpose(g: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int,
                    out_sizes: Sequence[int]) -> torch.Tensor:
    """ConvTranspose whose output has exactly ``out_sizes`` spatial sizes (output_padding or crop/pad)."""
    nsp = len(out_sizes)
    ks = [_static(k) for k in weight.shape[2:]]
    natural = [(_static(g.shape[2 + i]) - 1) * stride[i] - 2 * padding[i] + dilation[i] * (ks[i] - 1) + 1
               for i in range(nsp)]
    extra = [out_sizes[i] - natural[i] for i in range(nsp)]
    ok = all(0 <= e < max(stride[i], dilation[i]) for i, e in enumerate(extra))
    op = extra if ok else [0] * nsp
    out = aten.convolution.default(g, weight, None, stride, padding, dilation, True, op, groups)
    return out if ok else _fit_spatial(out, out_sizes)


# ---------------------------------------------------------------- convolution
@_register(aten.convolution_backward.default)
def convolution_backward(grad_output, input, weight, bias_sizes, stride, padding, dilation, transposed,
                         output_padding, groups, output_mask):
    if output_mask[1] or output_mask[2]:
        raise NotImplementedError("weight/bias gradients requested: the exporter freezes every parameter "
                                  "and lowers the input gradient only")
    if not output_mask[0]:
        return None, None, None
    nsp = input.dim() - 2
    stride, padding, dilation = _tuple(stride, nsp), _tuple(padding, nsp), _tuple(dilation, nsp)
    groups = _static(groups)
    in_sizes = [_static(s) for s in input.shape[2:]]
    ks = [_static(k) for k in weight.shape[2:]]
    if not transposed and groups == 1 and all(s == 1 for s in stride) and \
            all(padding[i] <= dilation[i] * (ks[i] - 1) for i in range(nsp)) and \
            _static(input.shape[1]) % NCHWC_BLOCK == 0:
        # Stride 1: the input gradient is a plain convolution with the kernel flipped and its
        # in/out channels swapped (folded into a constant at export). CPU and GPU runtimes
        # optimise Conv far better than ConvTranspose (ConvTranspose was ~40% of ap_grad time).
        # Not for a narrow gradient (the image's 3 channels): ONNX Runtime's blocked (NCHWc) CPU
        # convolution needs whole 16-channel blocks, and its plain Conv with 3 output channels
        # took 2.6x the time of the equivalent ConvTranspose (1.84 vs 0.70 ms, 16 -> 3, 32x32, batch 32).
        w = weight.flip(list(range(2, 2 + nsp))).transpose(0, 1)
        pad = [dilation[i] * (ks[i] - 1) - padding[i] for i in range(nsp)]
        gi = aten.convolution.default(grad_output, w, None, [1] * nsp, pad, dilation, False, [0] * nsp, 1)
    elif not transposed:
        gi = _conv_transpose(grad_output, weight, stride, padding, dilation, groups, in_sizes)
    else:
        gi = aten.convolution.default(grad_output, weight, None, stride, padding, dilation, False, [0] * nsp, groups)
        gi = _fit_spatial(gi, in_sizes)
    return gi, None, None


# ---------------------------------------------------------------- ReLU
@_register(aten.threshold_backward.default)
def threshold_backward(grad_output, self, threshold):
    # A multiply by a 0/1 mask, not Where: Where cost ~35% of ONNX Runtime time on these graphs.
    return (self > threshold).to(grad_output.dtype) * grad_output


# ---------------------------------------------------------------- BatchNorm (eval)
@_register(aten.native_batch_norm_backward.default)
def native_batch_norm_backward(grad_out, input, weight, running_mean, running_var, save_mean, save_invstd,
                               train, eps, output_mask):
    if train:
        fallback = core_aten_decompositions()[aten.native_batch_norm_backward.default]
        return fallback(grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, train, eps,
                        output_mask)
    if output_mask[1] or output_mask[2]:
        raise NotImplementedError("BatchNorm weight/bias gradients requested: parameters are frozen")
    c = _static(input.shape[1])
    shape = [1, c] + [1] * (input.dim() - 2)
    # The per-channel scale is a function of constants only; it is folded into one initializer at export.
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    return grad_out * scale.to(grad_out.dtype).reshape(shape), None, None


# ---------------------------------------------------------------- pooling
def _const(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """A constant built outside the trace (becomes one initializer; building it with traced
    in-place writes would leave ScatterElements in the graph)."""
    return torch.tensor(np.ascontiguousarray(a), dtype=like.dtype, device=like.device)


def _ones_kernel(c: int, ks: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    return _const(np.ones([c, 1, *ks]), like)


def _avg_divisor(in_sizes, ks, stride, padding, out_sizes, count_include_pad: bool, divisor_override) -> np.ndarray:
    """PyTorch's per-window divisor of avg_pool2d (incl. ceil_mode windows) as an (oh, ow) array."""
    if divisor_override:
        return np.full(out_sizes, float(divisor_override))
    per_dim = []
    for n, k, s, p, o in zip(in_sizes, ks, stride, padding, out_sizes):
        start = np.arange(o) * s - p
        end = np.minimum(start + k, n + p)
        size_incl = end - start
        size_excl = np.minimum(end, n) - np.maximum(start, 0)
        per_dim.append((size_incl, size_excl))
    if count_include_pad:
        return np.outer(per_dim[0][0], per_dim[1][0]).astype(np.float64)
    return np.outer(per_dim[0][1], per_dim[1][1]).astype(np.float64)


@_register(aten.avg_pool2d_backward.default)
def avg_pool2d_backward(grad_output, self, kernel_size, stride, padding, ceil_mode, count_include_pad,
                        divisor_override=None):
    ks = _tuple(kernel_size, 2)
    st = _tuple(stride, 2, default=ks)
    pd = _tuple(padding, 2)
    in_sizes = [_static(s) for s in self.shape[-2:]]
    out_sizes = [_static(s) for s in grad_output.shape[-2:]]
    div = _avg_divisor(in_sizes, ks, st, pd, out_sizes, bool(count_include_pad), divisor_override)
    if np.all(div == div.flat[0]):
        g = grad_output / float(div.flat[0])
    else:
        g = grad_output * _const(1.0 / div, grad_output)
    c = _static(self.shape[-3])
    squeeze = self.dim() == 3
    if squeeze:
        g = g.unsqueeze(0)
    out = _conv_transpose(g, _ones_kernel(c, ks, g), st, pd, [1, 1], c, in_sizes)
    return out.squeeze(0) if squeeze else out


def _adaptive_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) averaging matrix of adaptive pooling (PyTorch's start/end index rule)."""
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        a = (o * n_in) // n_out
        b = -((-(o + 1) * n_in) // n_out)
        m[o, a:b] = 1.0 / (b - a)
    return m


@_register(aten._adaptive_avg_pool2d_backward.default)
def adaptive_avg_pool2d_backward(grad_output, self):
    h, w = (_static(s) for s in self.shape[-2:])
    oh, ow = (_static(s) for s in grad_output.shape[-2:])
    if oh == 1 and ow == 1:  # global pooling: broadcast
        return (grad_output / float(h * w)).expand(self.shape)
    if h % oh == 0 and w % ow == 0:  # an ordinary average pool
        return avg_pool2d_backward(grad_output, self, [h // oh, w // ow], [h // oh, w // ow], [0, 0], False, True)
    mh = _const(_adaptive_matrix(h, oh).T, grad_output)  # (h, oh)
    mw = _const(_adaptive_matrix(w, ow), grad_output)  # (ow, w)
    return torch.matmul(torch.matmul(mh, grad_output), mw)


@_register(aten.max_pool2d_with_indices_backward.default)
def max_pool2d_with_indices_backward(grad_output, self, kernel_size, stride, padding, dilation, ceil_mode, indices):
    """Index-free: every input equal to its window's max receives that window's gradient.

    For each kernel offset, a depthwise one-hot ConvTranspose places every window's max and
    gradient at the input position of that offset; ``(x == max_k) * grad_k`` summed over the
    offsets is the gradient. Ties inside a window all receive the gradient (torch gives it to
    the first); for ReLU features, ties at 0 are masked by the ReLU backward anyway.
    """
    ks = _tuple(kernel_size, 2)
    st = _tuple(stride, 2, default=ks)
    pd = _tuple(padding, 2)
    dl = _tuple(dilation, 2, default=[1, 1])
    in_sizes = [_static(s) for s in self.shape[-2:]]
    c = _static(self.shape[-3])
    squeeze = self.dim() == 3
    x, g = (self.unsqueeze(0), grad_output.unsqueeze(0)) if squeeze else (self, grad_output)
    pooled = aten.max_pool2d.default(x, ks, st, pd, dl, ceil_mode)
    if ks == st and pd == [0, 0] and dl == [1, 1]:  # non-overlapping windows: one nearest upsample
        w = _ones_kernel(c, ks, g)
        up_max = _conv_transpose(pooled, w, st, pd, dl, c, in_sizes)
        up_g = _conv_transpose(g, w, st, pd, dl, c, in_sizes)
        out = (x == up_max).to(g.dtype) * up_g
    else:
        out = None
        for i in range(ks[0]):
            for j in range(ks[1]):
                onehot = np.zeros([c, 1, *ks])
                onehot[:, :, i, j] = 1.0
                w = _const(onehot, g)
                up_max = _conv_transpose(pooled, w, st, pd, dl, c, in_sizes)
                up_g = _conv_transpose(g, w, st, pd, dl, c, in_sizes)
                term = (x == up_max).to(g.dtype) * up_g
                out = term if out is None else out + term
    return out.squeeze(0) if squeeze else out


# ---------------------------------------------------------------- slicing
@_register(aten.slice_backward.default)
def slice_backward(grad_output, input_sizes, dim, start, end, step):
    dim = dim % grad_output.dim()
    n = _static(input_sizes[dim])
    step = _static(step)
    start = _static(start) if start is not None else 0
    start = start + n if start < 0 else start
    start = min(max(start, 0), n)
    m = _static(grad_output.shape[dim])
    g = grad_output
    if step > 1:
        # interleave step-1 zeros after every element: unsqueeze, pad the new axis, merge it
        g = g.unsqueeze(dim + 1)
        pads = [0, 0] * (g.dim() - dim - 2) + [0, step - 1]
        g = aten.constant_pad_nd.default(g, pads, 0.0)
        shape = list(grad_output.shape)
        shape[dim] = m * step
        g = g.reshape(shape)
        length = m * step
    else:
        length = m
    keep = min(length, n - start)
    if keep < length:
        g = aten.slice.Tensor(g, dim, 0, keep)
    after = n - start - keep
    if start or after:
        pads = [0, 0] * (g.dim() - dim - 1) + [start, after]
        g = aten.constant_pad_nd.default(g, pads, 0.0)
    return g


# ---------------------------------------------------------------- padding (forward)
@_register(aten.constant_pad_nd.default)
def constant_pad_nd(x, pad, value=0.0):
    """Crop (negative pads) with slices and pad with Concat of constant blocks.

    torch's own constant_pad_nd specialises a symbolic batch dimension when the padded dim is
    not the last one (e.g. ResNet option-A channel padding), which would freeze the exported
    batch size; this form keeps it symbolic. Only non-batch dims may be padded.
    """
    pad = [_static(p) for p in pad]
    nd = x.dim()
    for k in range(len(pad) // 2):
        dim = nd - 1 - k
        lo, hi = pad[2 * k], pad[2 * k + 1]
        if (lo or hi) and dim == 0:
            raise NotImplementedError("padding the batch dimension is not supported by the exporter")
        n = _static(x.shape[dim])
        if lo < 0 or hi < 0:
            start, stop = max(0, -lo), n - max(0, -hi)
            x = aten.slice.Tensor(x, dim, start, stop)
        lo, hi = max(lo, 0), max(hi, 0)
        if lo or hi:
            parts = []
            for p in (lo, hi):
                if p:
                    shape = list(x.shape)
                    shape[dim] = p
                    parts.append(aten.full.default(shape, value, dtype=x.dtype, device=x.device))
                else:
                    parts.append(None)
            x = aten.cat.default([t for t in (parts[0], x, parts[1]) if t is not None], dim)
    return x


# ---------------------------------------------------------------- the table
def decomposition_table() -> dict:
    table = dict(core_aten_decompositions())
    table.update(LOWERINGS)
    return table
