"""The reference purifier: the one trusted definition of ZeroPur that every backend is checked against.

The losses are written as pure functions of (victim, inputs) so that the exporter traces
exactly these functions into the gradient graphs. The loop runs the lean formulation
(AP constants computed once, one forward capturing every tap per AP step) or, as the
"released-code cost" baseline, the re-computing formulation of the authors' code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F

from zeropur_export.taps import Victim
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
    differentiates the step itself (``zeropur_export.adaptive``)."""
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


# ---------------------------------------------------------------- updates (torch twins of the kernels)
Sign = Callable[[torch.Tensor], torch.Tensor]


def gs_update(x: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, x_in: torch.Tensor,
              cfg: ZeroPurConfig, sign: Sign = torch.sign) -> tuple[torch.Tensor, torch.Tensor]:
    """L1-normalise (per sample, or over the batch), momentum, sign step, eps-ball clip, [0,1] clamp.
    ``sign`` is swapped only by the unrolled attack (``zeropur_export.adaptive``), for a straight-through one."""
    a = grad.abs()
    l1 = a.flatten(1).sum(1).view(-1, 1, 1, 1) if cfg.l1_scope == "sample" else a.sum().view(1, 1, 1, 1)
    g = torch.where(l1 > 0, grad / torch.where(l1 > 0, l1, torch.ones_like(l1)), torch.zeros_like(grad))
    m = g + cfg.momentum * m
    return _step_and_clip(x, m, x_in, cfg.eps, cfg.gs_step, sign), m


def ap_update(x: torch.Tensor, grad: torch.Tensor, x_in: torch.Tensor, cfg: ZeroPurConfig,
              sign: Sign = torch.sign) -> torch.Tensor:
    return _step_and_clip(x, grad, x_in, cfg.eps, cfg.ap_step, sign)


def _step_and_clip(x: torch.Tensor, direction: torch.Tensor, x_in: torch.Tensor, eps: float, step: float,
                   sign: Sign = torch.sign) -> torch.Tensor:
    x = x - step * sign(direction)
    x = torch.minimum(torch.maximum(x, x_in - eps), x_in + eps)
    return x.clamp(0.0, 1.0)


# ---------------------------------------------------------------- the loop
def input_grad(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(x)
        (g,) = torch.autograd.grad(loss, x)
    return g, loss.detach()


class TorchKernels:
    """The kernel set of the reference: the torch twins above, in place on a torch runner's buffers
    (any float dtype, any device)."""

    name = "torch"

    def __init__(self, tensor: Callable[[object], torch.Tensor]):
        self.t = tensor

    def blur(self, src, dst, sigma: float) -> None:
        self.t(dst).copy_(blur_torch(self.t(src), sigma))

    def gs_update(self, x, grad, m, x_in, l1, cfg: ZeroPurConfig) -> None:
        xt, mt = self.t(x), self.t(m)
        new_x, new_m = gs_update(xt, self.t(grad), mt, self.t(x_in), cfg)
        xt.copy_(new_x)
        mt.copy_(new_m)

    def ap_update(self, x, grad, x_in, cfg: ZeroPurConfig) -> None:
        xt = self.t(x)
        xt.copy_(ap_update(xt, self.t(grad), self.t(x_in), cfg))

    def close(self) -> None:
        pass


class ReferencePurifier:
    """ZeroPur in PyTorch: the runtime's one loop (``zeropur_rt.schedule``) over the reference's losses
    (``TorchRunner``) and its torch update twins, in the victim's precision (float64 for the truth).
    ``ap_mode='recompute'`` reproduces the released code's cost."""

    def __init__(self, victim: Victim, cfg: ZeroPurConfig, ap_mode: APMode = "lean", seed: int | None = None):
        from zeropur_export.torch_runner import TorchRunner
        from zeropur_rt.pipeline import Purifier
        if cfg.ap_steps > 0 and not victim.spec.supports_ap:
            raise ValueError(f"{victim.name} declares no ILA/LPIPS taps (Guided Shift only): set ap_steps=0")
        self.victim, self.cfg, self.ap_mode = victim, cfg, ap_mode
        device = "cpu" if victim.mean.device.type == "cpu" else f"cuda:{victim.mean.device.index or 0}"
        self.runner = TorchRunner(victim, cfg, device, ap_mode=ap_mode)
        self.pipeline = Purifier(self.runner, TorchKernels(self.runner.tensor), cfg, input_shape=victim.spec.input_shape,
                                 batch={"min": 1, "max": 1 << 30}, has_ap=victim.spec.supports_ap, cuda_graph=False,
                                 seed=seed)

    def gs_grad(self, x: torch.Tensor, x_blur: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return input_grad(lambda v: gs_loss(self.victim, v, x_blur), x)

    def ap_setup(self, x_in: torch.Tensor, coarse: torch.Tensor) -> APConstants:
        with torch.no_grad():
            return ap_constants(self.victim, x_in, coarse, self.cfg)

    def ap_grad(self, fine: torch.Tensor, c: APConstants) -> torch.Tensor:
        return input_grad(lambda v: ap_loss(self.victim, v, c, self.cfg), fine)[0]

    def _out(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(self.victim.mean.device)

    def purify(self, x: torch.Tensor, iterates: bool = False):
        """Purified images (the AP output; the GS output when ``ap_steps == 0``), as a tensor on the
        victim's device; with ``iterates=True`` also the run's ``zeropur_rt.batch_loops.Iterates``."""
        res = self.pipeline.run(self._host(x), iterates=iterates)
        return (self._out(res.images), res.iterates) if iterates else self._out(res.images)

    def project(self, x_in: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """Adaptive Projection alone, along a given Guided Shift result."""
        return self._out(self.pipeline.project(self._host(x_in), self._host(coarse)))

    @staticmethod
    def _host(x: torch.Tensor) -> np.ndarray:
        return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)

    @torch.no_grad()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.victim(x.to(self.victim.mean.device, self.victim.mean.dtype)).argmax(1)
