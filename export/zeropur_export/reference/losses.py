"""The reference losses: ZeroPur's Guided Shift and Adaptive Projection objectives, written as pure functions of
(victim, inputs) so that the exporter traces exactly these functions into the gradient graphs.

Two AP formulations: the lean one (AP constants computed once, one forward capturing every tap per AP step;
``ap_loss_lean`` below is what the exporter traces) and, as the "released-code cost" baseline, the re-computing
one of the authors' code (``ap_loss_recompute``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from zeropur_export.victims.taps import Victim
from zeropur_rt.blur import box_blur_weights
from zeropur_rt.config import ZeroPurConfig

APMode = Literal["lean", "recompute"]
NORM_FLOOR_SQ = 1e-30  # floor under squared norms: keeps sqrt's gradient finite (0, not NaN) at zero
LPIPS_EPS = 1e-10
# Floor under the squared LPIPS distance. On AP step 1 fine == x_in, but two graphs (or two
# kernels) computing the same features differ by float32 rounding (distance ~1e-7), where the
# gradient of the norm is a unit vector pointing along that noise. Distances below 1e-5 are
# treated as zero (gradient 0); one real AP step already moves the features by ~1e-3.
LPIPS_DIST_FLOOR_SQ = 1e-10


# ---------------------------------------------------------------- blur (torch twin of zeropur_rt.blur)
def blur_torch(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Pillow-exact GaussianBlur of floor(255*x) (quantised in float32), divided by 255; no gradient."""
    w = box_blur_weights(sigma)
    q = torch.floor(x.detach().to(torch.float32) * 255).clamp_(0, 255).to(torch.int64)
    if w.box_radius != 0:
        for dim in (-1, -2):
            n = q.shape[dim]
            idx = torch.arange(n, device=q.device)
            gather = [torch.clamp(idx + k, 0, n - 1) for k in range(-w.radius - 1, w.radius + 2)]
            for _ in range(3):
                taps = [q.index_select(dim, g) for g in gather]
                acc = torch.stack(taps[1:-1]).sum(0)
                q = (acc * w.ww + (taps[0] + taps[-1]) * w.fw + (1 << 23)) >> 24
    return (q.to(torch.float32) / 255).to(x.dtype)


# ---------------------------------------------------------------- losses (traced by the exporter)
def gs_loss(victim: Victim, x: torch.Tensor, x_blur: torch.Tensor, blur_graph: bool = False) -> torch.Tensor:
    """Guided Shift loss: -mean cos(E(x), E(blur(x))), the blurred branch a constant of the step.
    ``blur_graph`` keeps that branch's graph (same value and same gradient in x) for an attacker who
    differentiates the step itself (``zeropur_export.attacks.adaptive``)."""
    e = victim.embed(x)
    with torch.set_grad_enabled(blur_graph and torch.is_grad_enabled()):
        eb = victim.embed(x_blur)
    return -cosine(e, eb).mean()


def blocked_sum(v: torch.Tensor) -> torch.Tensor:
    """Row sums of a (B, D) tensor as sums of k-term sums, k ~ sqrt(D) (zero-padded to a multiple of k).

    A backend may reduce sequentially (ONNX Runtime's ReduceSum does): float32 error ~ D eps,
    1e-6 relative on a 2048-d embedding, where torch's cascade sum is at 1e-7. Two short
    reductions bound every backend near sqrt(D) eps, whatever order its ReduceSum uses.
    """
    d = v.shape[1]
    k = 1 << max(0, math.ceil(math.log2(math.ceil(math.sqrt(d)))))
    if d <= k:
        return v.sum(1)
    pad = -d % k
    if pad:
        v = F.pad(v, (0, pad))
    return v.unflatten(1, ((d + pad) // k, k)).sum(2).sum(1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row cosine of (B, D) tensors, as F.cosine_similarity (unit vectors first, norms floored
    at 1e-8, where the gradient is 0, not NaN) but with blocked sums: its float32 error enters the
    GS gradient amplified by 1/sin(angle), since d cos/d a is a difference of two nearly parallel
    vectors."""
    ua = a / torch.sqrt(torch.clamp_min(blocked_sum(a * a), 1e-16)).unsqueeze(1)
    ub = b / torch.sqrt(torch.clamp_min(blocked_sum(b * b), 1e-16)).unsqueeze(1)
    return blocked_sum(ua * ub)


def safe_norm(v: torch.Tensor, dim: int | tuple[int, ...], keepdim: bool = False, floor_sq: float = NORM_FLOOR_SQ) -> torch.Tensor:
    """L2 norm whose gradient at (near) zero is 0 instead of NaN: sqrt of a square sum floored at ``floor_sq``."""
    return torch.sqrt(torch.clamp_min((v * v).sum(dim=dim, keepdim=keepdim), floor_sq))


def lpips_features(victim: Victim, taps: dict[str, torch.Tensor]) -> torch.Tensor:
    """Self-LPIPS embedding: per layer unit-normalise over channels, divide by sqrt(H*W), flatten, concat."""
    parts = []
    for name in victim.spec.lpips:
        f = taps[name]
        f = f / (safe_norm(f, 1, keepdim=True) + LPIPS_EPS)
        parts.append(f.flatten(1) / float(np.sqrt(f.shape[2] * f.shape[3])))
    return torch.cat(parts, dim=1)


@dataclass
class APConstants:
    """What AP needs from (x_in, coarse), computed once per purification.

    ``ila_dir[l]`` = h_l(coarse) - h_l(x_in) (divided by its per-sample norm + eps when the
    normalised ILA is on). ``ila_offset[l]`` = <h_l(x_in), ila_dir[l]> per sample: a constant of
    the loss with no gradient, kept only so that the reported ILA value is the paper's.
    """

    ila_dir: list[torch.Tensor]
    lpips_ref: torch.Tensor
    ila_offset: list[torch.Tensor] | None = field(default=None)


def ap_constants(victim: Victim, x_in: torch.Tensor, coarse: torch.Tensor, cfg: ZeroPurConfig) -> APConstants:
    _, t_in = victim.run(x_in)
    _, t_c = victim.run(coarse)
    dirs, offsets = [], []
    for name in victim.spec.ila:
        d = t_c[name] - t_in[name]
        if cfg.ila_normalized:
            d = d / (safe_norm(d.flatten(1), 1).view(-1, 1, 1, 1) + cfg.ila_norm_eps)
        dirs.append(d)
        offsets.append((t_in[name] * d).flatten(1).sum(1))
    return APConstants(dirs, lpips_features(victim, t_in), offsets)


def ap_loss_terms(victim: Victim, fine: torch.Tensor, c: APConstants) -> tuple[torch.Tensor, torch.Tensor]:
    """(ILA, LPIPS_self), both batch means, from one forward of ``fine`` that captures every tap."""
    _, taps = victim.run(fine)
    lp = safe_norm(lpips_features(victim, taps) - c.lpips_ref, 1, floor_sq=LPIPS_DIST_FLOOR_SQ).mean()
    return ila_term(victim, taps, c), lp


def ila_term(victim: Victim, taps: dict[str, torch.Tensor], c: APConstants) -> torch.Tensor:
    """-sum over the ILA layers of the batch mean of <h_l(fine), ila_dir[l]> (minus the offsets, if any)."""
    ila = next(iter(taps.values())).new_zeros(())
    for l, name in enumerate(victim.spec.ila):
        dot = (taps[name] * c.ila_dir[l]).flatten(1).sum(1)
        if c.ila_offset is not None:
            dot = dot - c.ila_offset[l]
        ila = ila - dot.mean()
    return ila


def ap_loss(victim: Victim, fine: torch.Tensor, c: APConstants, cfg: ZeroPurConfig) -> torch.Tensor:
    ila, lp = ap_loss_terms(victim, fine, c)
    return cfg.ila_weight * ila + cfg.lpips_weight * lp


def ap_loss_recompute(victim: Victim, fine: torch.Tensor, x_in: torch.Tensor, coarse: torch.Tensor,
                      cfg: ZeroPurConfig) -> torch.Tensor:
    """The released code's AP step: every constant recomputed, ILA and LPIPS each with its own forwards."""
    with torch.no_grad():
        c_ila = ap_constants(victim, x_in, coarse, cfg)  # h(x_in), h(coarse): 2 forwards
        c_lp = ap_constants(victim, x_in, x_in, cfg)  # LPIPS reference of x_in: 2 more
    ila, _ = ap_loss_terms(victim, fine, c_ila)  # forward of fine for ILA
    _, lp = ap_loss_terms(victim, fine, c_lp)  # and again for LPIPS
    return cfg.ila_weight * ila + cfg.lpips_weight * lp


# ---------------------------------------------------------------- the lean AP loss (what the exporter traces)
# The Adaptive Projection loss as the exporter traces it: the reference's value (``ap_loss`` above), with
# the self-LPIPS distance differentiated in closed form instead of by autograd.
#
# Autograd differentiates ``lpips_features`` op by op: per tap a normalisation, a reshape, a concat and their
# backward, about 20 passes over each tap tensor. The same gradient takes about half of them when written out.
# For one sample, with ``f`` a tap (C, H, W), ``N = sqrt(max(sum_c f^2, tiny))`` per pixel, ``n = N + eps``,
# ``s = sqrt(H W)``, ``d = f / (n s) - ref`` and ``D = sqrt(max(sum d^2, floor))`` (summed over every tap):
#
#     dD/dd = d / D                                       (0 where sum d^2 < floor, as clamp_min's gradient)
#     dD/df = d k / (n s) - f * sum_c(f d) k / (s n^2 N)  (the second term 0 where sum_c f^2 < tiny), k = 1 / D
#
# Fewer passes (ResNet-20 ap_grad: 27.1 -> 25.2 ms per batch of 16 on one CPU thread, README), the same
# function: ``tests/export/test_lean_loss.py`` holds the closed form to autograd of the reference in float64 (1e-12
# relative, 6e-16 measured), and the parity tests hold the exported graphs to the reference, as every graph.


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
    """``ap_loss`` with the LPIPS term through ``SelfLpipsDistance``."""
    _, taps = victim.run(fine)
    dist = SelfLpipsDistance.apply(c.lpips_ref, *(taps[name] for name in victim.spec.lpips))[0]
    return cfg.ila_weight * ila_term(victim, taps, c) + cfg.lpips_weight * dist.mean()
