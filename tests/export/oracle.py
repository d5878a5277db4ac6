"""ZeroPur in plain torch, written from the paper's equations (Liu et al., arXiv 2406.03143, Sec. 3-4) and the
released code's conventions, as a test oracle that shares no code with what it checks.

It imports nothing of ``zeropur_rt`` or ``zeropur_export``: the blur, Guided Shift, Adaptive Projection, the
self-LPIPS and the ILA term are all here, and a victim is a bare ``nn.Module`` read through its own forward hooks.
A bug in the runtime's schedule, kernels or config, or in the reference's losses, therefore shows as a
disagreement with this file (tests/export/test_oracle.py, tests/export/test_loop.py).

Conventions fixed by the released code (not by the equations), followed so that float64 runs agree bit for bit:
the blur is Pillow's GaussianBlur of floor(255 x) computed in float32; batch losses are batch means; square roots
of squared norms are floored (1e-30 for norms, 1e-16 for the cosine's, 1e-10 for the LPIPS distance) so that
their gradient at zero is 0; the LPIPS features are unit vectors over channels (+1e-10) scaled by 1/sqrt(H W).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch


# ---------------------------------------------------------------- Pillow's GaussianBlur (ImageFilter.GaussianBlur)
def pillow_box_radius(sigma: float, passes: int = 3) -> float:
    """Pillow's ``_gaussian_blur_radius`` (Gwosdek et al. 2011): the fractional box radius whose ``passes``
    repetitions approximate a Gaussian of ``sigma``. Pillow stores every intermediate in a C float."""
    f = np.float32
    s2 = f(f(f(sigma) * f(sigma)) / f(passes))
    big_l = f(math.sqrt(12.0 * float(s2) + 1.0))
    small_l = f(math.floor((float(big_l) - 1.0) / 2.0))
    lp1 = f(small_l + f(1))
    a = f(f(f(2) * small_l + f(1)) * f(f(small_l * lp1) - f(f(3) * s2)))
    a = f(a / f(f(6) * f(s2 - f(lp1 * lp1))))
    return float(f(small_l + a))


def _box_line(q: torch.Tensor, r: float) -> torch.Tensor:
    """One box pass along the last axis of int64 pixels: a window of 2*floor(r)+1 full taps and two fractional
    edge taps, edges replicated, 24-bit fixed point rounded half up (Pillow's ImagingLineBoxBlur)."""
    ri = int(r)
    ww = int(np.float32(1 << 24) / np.float32(np.float32(r) * np.float32(2) + np.float32(1)))
    fw = ((1 << 24) - (2 * ri + 1) * ww) // 2
    pad = ri + 1
    padded = torch.cat([q[..., :1].expand(*q.shape[:-1], pad), q, q[..., -1:].expand(*q.shape[:-1], pad)], -1)
    csum = torch.nn.functional.pad(padded.cumsum(-1), (1, 0))
    n = q.shape[-1]
    window = csum[..., 2 * ri + 2:2 * ri + 2 + n] - csum[..., 1:1 + n]  # taps i-ri .. i+ri of the padded line
    edges = padded[..., :n] + padded[..., 2 * pad:2 * pad + n]  # taps i-ri-1 and i+ri+1
    return (window * ww + edges * fw + (1 << 23)) >> 24


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The released code's blur: ToPILImage (floor(255 x) of float32 pixels), GaussianBlur(sigma) per band
    (3 horizontal then 3 vertical box passes), ToTensor (/255 in float32); returned in x's dtype, no gradient."""
    q = torch.clamp(torch.floor(x.detach().float() * 255), 0, 255).long()
    r = pillow_box_radius(sigma)
    if r != 0:
        for _ in range(3):
            q = _box_line(q, r)
        q = q.transpose(-1, -2)
        for _ in range(3):
            q = _box_line(q, r)
        q = q.transpose(-1, -2)
    return (q.float() / 255).to(x.dtype)


# ---------------------------------------------------------------- the victim, read through forward hooks
@dataclass
class OracleVictim:
    """A classifier (images normalised by ``mean``/``std`` first) and the module outputs ZeroPur reads: the GS
    embedding (``"name:in"`` reads a module's input), the ILA layers and the self-LPIPS layers."""

    net: torch.nn.Module
    mean: Sequence[float]
    std: Sequence[float]
    embedding: str
    ila: Sequence[str]
    lpips: Sequence[str]
    _seen: dict = field(default_factory=dict)

    @contextmanager
    def _hooks(self) -> Iterator[dict]:
        mods, seen, handles = dict(self.net.named_modules()), {}, []
        for tap in {self.embedding, *self.ila, *self.lpips}:
            name, is_input = (tap[:-3], True) if tap.endswith(":in") else (tap, False)
            if is_input:
                handles.append(mods[name].register_forward_pre_hook(lambda m, a, t=tap: seen.__setitem__(t, a[0])))
            else:
                handles.append(mods[name].register_forward_hook(lambda m, a, o, t=tap: seen.__setitem__(t, o)))
        try:
            yield seen
        finally:
            for h in handles:
                h.remove()

    def taps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        c = x.shape[1]
        mean = torch.tensor(list(self.mean), dtype=x.dtype).view(1, c, 1, 1)
        std = torch.tensor(list(self.std), dtype=x.dtype).view(1, c, 1, 1)
        with self._hooks() as seen:
            self.net((x - mean) / std)
        return dict(seen)


# ---------------------------------------------------------------- the two losses
def floored_norm(v: torch.Tensor, dim: int | tuple[int, ...], floor_sq: float, keepdim: bool = False) -> torch.Tensor:
    """||v|| with the square floored: its gradient is 0 (not NaN) at v = 0."""
    return torch.sqrt(torch.clamp_min((v * v).sum(dim, keepdim=keepdim), floor_sq))


def gs_loss(v: OracleVictim, x: torch.Tensor, x_blur: torch.Tensor) -> torch.Tensor:
    """Guided Shift's objective (Eq. 4): -mean_b cos(E(x), E(blur x)), the blurred branch a constant."""
    e = v.taps(x)[v.embedding]
    with torch.no_grad():
        eb = v.taps(x_blur)[v.embedding]
    cos = (e * eb).sum(1) / (floored_norm(e, 1, 1e-16) * floored_norm(eb, 1, 1e-16))
    return -cos.mean()


def lpips_distance(v: OracleVictim, t: dict, t_ref: dict) -> torch.Tensor:
    """Self-LPIPS between two images (per sample): sqrt of sum over layers of 1/(H W) * sum over positions of the
    squared difference of channel-unit feature vectors, the square floored at 1e-10."""
    d2 = 0
    for name in v.lpips:
        unit = lambda f: f / (floored_norm(f, 1, 1e-30, keepdim=True) + 1e-10)  # noqa: E731
        diff = unit(t[name]) - unit(t_ref[name])
        d2 = d2 + (diff * diff).sum((1, 2, 3)) / (diff.shape[2] * diff.shape[3])
    return torch.sqrt(torch.clamp_min(d2, 1e-10))


@dataclass
class Recipe:
    """The knobs, the released code's CIFAR recipe by default. The AP step is eps / ap_steps (AP may travel eps).
    The GS step is 1/255 in the older released code (``gs_step_rule="fixed"``), eps / gs_steps in the newest
    (``"eps_over_steps"``); the two coincide at eps 10/255 with 10 steps."""

    eps: float = 10 / 255
    gs_steps: int = 10
    gs_step_rule: str = "fixed"
    momentum: float = 1.0
    blur_sigma: float = 1.8
    ap_steps: int = 50
    ila_weight: float = 1e-4
    lpips_weight: float = 1.0
    ila_normalized: bool = False
    ila_norm_eps: float = 1e-8

    @property
    def gs_step(self) -> float:
        return {"fixed": 1 / 255, "eps_over_steps": self.eps / max(self.gs_steps, 1)}[self.gs_step_rule]

    @property
    def ap_step(self) -> float:
        return self.eps / max(self.ap_steps, 1)


def ila_directions(v: OracleVictim, x_in: torch.Tensor, coarse: torch.Tensor, r: Recipe) -> list[torch.Tensor]:
    """ILA's guide (Eq. 6): h_l(coarse) - h_l(x_in) per ILA layer, optionally divided by its per-sample norm."""
    with torch.no_grad():
        t_in, t_c = v.taps(x_in), v.taps(coarse)
    dirs = []
    for name in v.ila:
        d = t_c[name] - t_in[name]
        if r.ila_normalized:
            d = d / (floored_norm(d.flatten(1), 1, 1e-30).view(-1, 1, 1, 1) + r.ila_norm_eps)
        dirs.append(d)
    return dirs


def ap_loss(v: OracleVictim, fine: torch.Tensor, x_in: torch.Tensor, dirs: list[torch.Tensor], r: Recipe) -> torch.Tensor:
    """Adaptive Projection's objective (Eq. 7): ila_weight * ILA + lpips_weight * LPIPS(fine, x_in), ILA being
    -sum_l mean_b <h_l(fine), dir_l> (moving along the guide lowers it)."""
    t = v.taps(fine)
    with torch.no_grad():
        t_in = v.taps(x_in)
    ila = sum(-(t[name] * d).flatten(1).sum(1).mean() for name, d in zip(v.ila, dirs))
    return r.ila_weight * ila + r.lpips_weight * lpips_distance(v, t, t_in).mean()


def input_gradient(loss, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(loss(x), x)
    return g


# ---------------------------------------------------------------- the purification
def project(x: torch.Tensor, x_in: torch.Tensor, eps: float) -> torch.Tensor:
    """Into the L-inf ball of radius eps around x_in, then into [0, 1]."""
    return torch.clamp(torch.minimum(torch.maximum(x, x_in - eps), x_in + eps), 0, 1)


@dataclass
class Trace:
    """Every iterate: ``gs_x[t]``/``ap_x[t]`` is the input of GS/AP step t; gradients and momenta per step."""

    gs_x: list = field(default_factory=list)
    gs_grad: list = field(default_factory=list)
    gs_m: list = field(default_factory=list)
    coarse: torch.Tensor | None = None
    ap_x: list = field(default_factory=list)
    ap_grad: list = field(default_factory=list)
    out: torch.Tensor | None = None


def purify(v: OracleVictim, x_in: torch.Tensor, r: Recipe) -> Trace:
    """Guided Shift (Alg. 1, lines 1-6) then Adaptive Projection (lines 7-11), in x_in's dtype."""
    tr = Trace()
    x, m = x_in.clone(), torch.zeros_like(x_in)
    for _ in range(r.gs_steps):
        tr.gs_x.append(x)
        xb = blur(x, r.blur_sigma)  # re-blurred every step: the target moves with x
        g = input_gradient(lambda z: gs_loss(v, z, xb), x)
        l1 = g.abs().sum((1, 2, 3), keepdim=True)  # per sample
        m = r.momentum * m + torch.where(l1 > 0, g / torch.where(l1 > 0, l1, 1.0), 0.0)
        tr.gs_grad.append(g)
        tr.gs_m.append(m)
        x = project(x - r.gs_step * torch.sign(m), x_in, r.eps)
    tr.coarse = x
    if r.ap_steps == 0:
        tr.out = x
        return tr
    dirs = ila_directions(v, x_in, x, r)
    fine = x_in.clone()
    for _ in range(r.ap_steps):
        tr.ap_x.append(fine)
        g = input_gradient(lambda z: ap_loss(v, z, x_in, dirs, r), fine)
        tr.ap_grad.append(g)
        fine = project(fine - r.ap_step * torch.sign(g), x_in, r.eps)
    tr.out = fine
    return tr
