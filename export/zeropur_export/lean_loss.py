"""The Adaptive Projection loss as the exporter traces it: the reference's value (``reference.ap_loss``), with
the self-LPIPS distance differentiated in closed form instead of by autograd.

Autograd differentiates ``lpips_features`` op by op: per tap a normalisation, a reshape, a concat and their
backward, about 20 passes over each tap tensor. The same gradient takes about half of them when written out.
For one sample, with ``f`` a tap (C, H, W), ``N = sqrt(max(sum_c f^2, tiny))`` per pixel, ``n = N + eps``,
``s = sqrt(H W)``, ``d = f / (n s) - ref`` and ``D = sqrt(max(sum d^2, floor))`` (summed over every tap):

    dD/dd = d / D                                       (0 where sum d^2 < floor, as clamp_min's gradient)
    dD/df = d k / (n s) - f * sum_c(f d) k / (s n^2 N)  (the second term 0 where sum_c f^2 < tiny), k = 1 / D

Fewer passes (ResNet-20 ap_grad: 27.1 -> 25.2 ms per batch of 16 on one CPU thread, README), the same
function: ``tests/test_lean_loss.py`` holds the closed form to autograd of the reference in float64 (1e-12
relative, 6e-16 measured), and the parity tests hold the exported graphs to the reference, as every graph.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from zeropur_export.reference import LPIPS_DIST_FLOOR_SQ, LPIPS_EPS, NORM_FLOOR_SQ, APConstants, ila_term
from zeropur_export.taps import Victim
from zeropur_rt.config import ZeroPurConfig


class SelfLpipsDistance(torch.autograd.Function):
    """Per-sample self-LPIPS distance of ``taps`` to ``ref`` (``lpips_features`` flattened, as ``ap_setup``
    writes it). Outputs ``(D, q, d_0.., sum_c f_0^2..)``: all but D are kept for the backward (a forward without
    ``ctx`` and a ``setup_context``, so that ``torch.func`` and ``torch.compile`` trace it)."""

    @staticmethod
    def forward(ref: torch.Tensor, *taps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sizes = [f[0].numel() for f in taps]
        refs = torch.split(ref, sizes, dim=1)
        diffs, squares, q = [], [], None
        for f, r in zip(taps, refs):
            square = (f * f).sum(1, keepdim=True)
            norm = torch.sqrt(torch.clamp_min(square, NORM_FLOOR_SQ))
            d = f / ((norm + LPIPS_EPS) * math.sqrt(f.shape[2] * f.shape[3])) - r.view(f.shape)
            qt = (d * d).flatten(1).sum(1)
            q = qt if q is None else q + qt
            diffs.append(d)
            squares.append(square)
        dist = torch.sqrt(torch.clamp_min(q, LPIPS_DIST_FLOOR_SQ))
        return (dist, q, *diffs, *squares)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, ...], output: tuple[torch.Tensor, ...]) -> None:
        ctx.n_taps = len(inputs) - 1
        ctx.save_for_backward(*output[:2], *inputs[1:], *output[2:])

    @staticmethod
    def backward(ctx: Any, grad_dist: torch.Tensor, *_unused: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        dist, q, *rest = ctx.saved_tensors
        k = ctx.n_taps
        taps, diffs, squares = rest[:k], rest[k:2 * k], rest[2 * k:]
        scale = torch.where(q >= LPIPS_DIST_FLOOR_SQ, grad_dist / dist, torch.zeros_like(dist)).view(-1, 1, 1, 1)
        grads = []
        for f, d, square in zip(taps, diffs, squares):
            norm = torch.sqrt(torch.clamp_min(square, NORM_FLOOR_SQ))
            n = norm + LPIPS_EPS
            ks = scale / math.sqrt(f.shape[2] * f.shape[3])
            fd = (f * d).sum(1, keepdim=True)
            beta = torch.where(square >= NORM_FLOOR_SQ, fd * ks / (n * n * norm), torch.zeros_like(norm))
            grads.append(d * (ks / n) - f * beta)
        return (None, *grads)


def ap_loss_lean(victim: Victim, fine: torch.Tensor, c: APConstants, cfg: ZeroPurConfig) -> torch.Tensor:
    """``reference.ap_loss`` with the LPIPS term through ``SelfLpipsDistance``."""
    _, taps = victim.run(fine)
    dist = SelfLpipsDistance.apply(c.lpips_ref, *(taps[name] for name in victim.spec.lpips))[0]
    return cfg.ila_weight * ila_term(victim, taps, c) + cfg.lpips_weight * dist.mean()
