"""Eval-mode BatchNorm folded into the convolution before it, on a copy of a victim.

In eval mode ``bn(conv(x))`` is one affine convolution: ``w' = w * s``, ``b' = (b - mean) * s + beta``
with ``s = gamma / sqrt(var + eps)``, and the backward of the folded convolution is the backward of the
pair. Folding before tracing takes every BatchNormalization node (forward) and its per-channel Mul
(backward) out of the exported graphs, so no backend pays for them.

A pair is folded only when nothing can tell the difference: found on a ``torch.fx`` trace of the
network, the convolution's output feeds the BatchNorm alone, each module is called once, and no tap
reads the convolution's output (a tap on the convolution, on ``bn:in``, or on a module whose boundary
lies between the two). The BatchNorm is replaced by ``nn.Identity`` at the same module path, so a tap
on the BatchNorm's name reads the same value. A network ``torch.fx`` cannot trace is exported unfolded
(``FoldReport.reason`` says why). The reference (``zeropur_export.reference``) always runs the unfolded victim.
The folded copy also takes the zoo's option-A shortcuts as 1x1 selection convolutions (``_SelectConv``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from zeropur_export.victims.taps import Victim, _split

# A wrong fold changes a result by O(1); float32 rounding of a right one stays near 1e-6.
SANITY_REL_ERR = 1e-3


@dataclass(frozen=True)
class FoldReport:
    """What ``fold_batchnorm`` did: the (conv, bn) module paths folded, the BatchNorms left, and why."""

    folded: tuple[tuple[str, str], ...]
    batchnorms: int  # BatchNorm modules in the network
    reason: str = ""  # why none could be folded at all (an untraceable network), else empty

    def summary(self) -> str:
        s = f"{len(self.folded)}/{self.batchnorms}"
        return f"{s} ({self.reason})" if self.reason else s


def _ancestors(path: str) -> set[str]:
    parts = path.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def _tap_blocks(conv: str, bn: str, taps: tuple[str, ...]) -> bool:
    """True when a tap reads the conv's output (which folding changes): an output tap on the conv or on a
    module holding the conv but not the BN, or an input tap on the BN or a module holding it but not the conv."""
    conv_up, bn_up = _ancestors(conv), _ancestors(bn)
    for tap in taps:
        path, is_input = _split(tap)
        if not is_input and path in conv_up and path not in bn_up:
            return True
        if is_input and path in bn_up and path not in conv_up:
            return True
    return False


def find_pairs(net: nn.Module, taps: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """(conv, bn) module paths that can be folded (raises what torch.fx raises on an untraceable net)."""
    graph = fx.symbolic_trace(net).graph
    modules = dict(net.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    owners: dict[int, int] = {}  # a parameter shared by two modules (weight tying) must keep its value
    for _name, m in net.named_modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], _BatchNorm):
            continue
        bn = modules[node.target]
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            continue
        src = node.args[0]
        if src.op != "call_module" or not isinstance(modules[src.target], _ConvNd) or len(src.users) != 1:
            continue
        conv = modules[src.target]
        if (conv.transposed or conv.out_channels != bn.num_features or bn.running_mean is None
                or bn.running_var is None or calls[src.target] != 1 or calls[node.target] != 1
                or any(owners[id(p)] > 1 for p in (*conv.parameters(recurse=False), *bn.parameters(recurse=False)))):
            continue
        if not _tap_blocks(src.target, node.target, taps):
            pairs.append((src.target, node.target))
    return pairs


def _fold_pair(conv: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn`` into ``conv`` in place, computed in float64 and stored in the conv's dtype."""
    dtype = conv.weight.dtype
    with torch.no_grad():
        var, mean = bn.running_var.double(), bn.running_mean.double()
        scale = torch.rsqrt(var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
        bias = (bias - mean) * scale
        if bn.bias is not None:
            bias = bias + bn.bias.double()
        w = conv.weight.double() * scale.reshape(-1, *[1] * (conv.weight.dim() - 1))
    conv.weight = nn.Parameter(w.to(dtype), requires_grad=False)
    conv.bias = nn.Parameter(bias.to(dtype), requires_grad=False)


class _SelectConv(nn.Conv2d):
    """The zoo's option-A shortcut (stride-2 subsample, zero channels on each side) as a 1x1 stride-2
    convolution with a 0/1 selection weight: every output is ``1 * x`` plus exact zeros, so the same values.
    Unlike Slice + Concat it stays in ONNX Runtime's blocked CPU layout, which then carries the whole
    residual chain of the later stages (Add + ReLU fused into the convolutions): ResNet-20 ap_grad lost
    12 of its 35 layout reorders and ran ~20% faster at batch 32."""

    def __init__(self, cin: int, pad: int, dtype: torch.dtype):
        super().__init__(cin, cin + 2 * pad, 1, 2, bias=False, dtype=dtype)
        w = torch.zeros(cin + 2 * pad, cin, 1, 1, dtype=dtype)
        w[pad:pad + cin, :, 0, 0] = torch.eye(cin, dtype=dtype)
        self.weight = nn.Parameter(w, requires_grad=False)


def _select_shortcuts(net: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Replace every option-A shortcut of ``net`` by its ``_SelectConv`` in place; returns how many."""
    from zeropur_export.victims.zoo import _OptionAShortcut

    found = {n: m for n, m in net.named_modules() if isinstance(m, _OptionAShortcut)}
    if not found:
        return 0
    channels: dict[str, int] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: channels.__setitem__(n, a[0].shape[1]))
             for n, m in found.items()]
    p = next(net.parameters())
    try:
        with torch.no_grad():
            net(torch.zeros((1, *input_shape), dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
    modules = dict(net.named_modules())
    for n, m in found.items():
        if n in channels:  # a shortcut the forward never calls stays as it is
            parent, _, leaf = n.rpartition(".")
            setattr(modules[parent] if parent else net, leaf, _SelectConv(channels[n], m.pad, p.dtype))
    return len(channels)


def _bare_copy(victim: Victim) -> nn.Module:
    """A deep copy of ``victim.net`` without the victim's tap hooks (their closures point at ``victim``)."""
    for h in victim._hooks:
        h.remove()
    victim._hooks = []
    try:
        return copy.deepcopy(victim.net)
    finally:
        victim._attach_hooks()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _sanity(victim: Victim, folded: Victim) -> None:
    """The folded victim's logits and taps equal the original's on a probe batch (a structural check)."""
    g = torch.Generator().manual_seed(0)
    dtype = next(victim.net.parameters(), victim.mean).dtype
    x = torch.rand((2, *victim.spec.input_shape), generator=g).to(dtype)
    with torch.no_grad():
        (la, ta), (lb, tb) = victim.run(x), folded.run(x)
    bad = {k: e for k, e in [("logits", _rel(lb, la)), *((t, _rel(tb[t], ta[t])) for t in ta)] if not e <= SANITY_REL_ERR}
    if bad:
        raise RuntimeError(f"folding BatchNorm into the convolutions of {victim.name} changed its outputs {bad}: "
                           "a fold the checks let through is wrong; export with fold=False and report this network")


def fold_batchnorm(victim: Victim) -> tuple[Victim, FoldReport]:
    """A new victim whose eval-mode conv -> BatchNorm pairs are folded (``victim`` is left as it is)."""
    n_bn = sum(isinstance(m, _BatchNorm) for m in victim.net.modules())
    if n_bn == 0:
        return victim, FoldReport((), 0)
    if victim.net.training:
        return victim, FoldReport((), n_bn, "network in training mode")
    try:
        pairs = find_pairs(victim.net, victim.spec.all_taps())
    except Exception as e:  # noqa: BLE001 - torch.fx raises many types on untraceable Python
        return victim, FoldReport((), n_bn, f"not traceable by torch.fx: {type(e).__name__}")
    if not pairs:
        return victim, FoldReport((), n_bn)
    net = _bare_copy(victim)
    modules = dict(net.named_modules())
    for conv, bn in pairs:
        _fold_pair(modules[conv], modules[bn])
        parent, _, leaf = bn.rpartition(".")
        setattr(modules[parent] if parent else net, leaf, nn.Identity())
    _select_shortcuts(net, victim.spec.input_shape)
    folded = Victim(net, victim.spec, victim.name).to(victim.mean.device)
    _sanity(victim, folded)
    return folded, FoldReport(tuple(pairs), n_bn)


__all__ = ["FoldReport", "find_pairs", "fold_batchnorm"]
